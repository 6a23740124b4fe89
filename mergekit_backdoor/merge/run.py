"""Running a ``sanitize`` merge through mergekit: checks first, atomic output, provenance last.

The start-up hook installs :func:`install_run_merge_wrapper` on ``mergekit.merge`` so the stock
``mergekit-yaml`` and ``mergekit.merge.run_merge`` get the same behaviour for
``merge_method: sanitize``; every other method passes straight through to mergekit.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from mergekit.common import ModelPath, ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_backdoor.errors import BackdoorError, RecipeError
from mergekit_backdoor.merge.checks import (
    check_compatible,
    check_finite_parameters,
    check_recipe,
    inspect_model,
    recipe_models,
    validate_recipe_data,
)
from mergekit_backdoor.merge.provenance import (
    build_manifest,
    hash_inputs,
    name_model_card,
    recipe_yaml,
    write_provenance,
)
from mergekit_backdoor.outputs import (
    OVERWRITE_ENV,
    ensure_output_free,
    refuse_output_overlapping,
    staged_folder,
)

ALLOW_PICKLE_ENV = "MERGEKIT_BACKDOOR_ALLOW_PICKLE"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def _mergekit_run_merge() -> Any:
    import mergekit.merge

    run_merge = mergekit.merge.run_merge
    return getattr(run_merge, "__wrapped__", run_merge)


def _suspect_dtype(config: dict[str, Any]) -> str | None:
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if isinstance(dtype, str) else None


def _absolute(path: ModelPath) -> ModelPath:
    return path.model_copy(update={"path": os.path.abspath(path.path)}) if os.path.exists(
        path.path) else path


def _absolute_reference(reference: ModelReference) -> ModelReference:
    lora = _absolute(reference.lora) if reference.lora is not None else None
    return reference.model_copy(update={"model": _absolute(reference.model), "lora": lora})


def with_absolute_paths(config: MergeConfiguration) -> MergeConfiguration:
    """Local model paths made absolute: mergekit's model card asks the Hub about relative ones.

    The references are copied, not round-tripped through ``model_dump``: mergekit's
    ``ModelReference`` serializer returns the object itself for a path holding a space or a
    quote, which pydantic reports as "Circular reference detected".
    """
    update: dict[str, Any] = {}
    if config.base_model is not None:
        update["base_model"] = _absolute_reference(config.base_model)
    if config.models:
        update["models"] = [model.model_copy(update={"model": _absolute_reference(model.model)})
                            for model in config.models]
    return config.model_copy(update=update)


def input_paths(config: MergeConfiguration) -> list[str]:
    """The local folders a configuration reads (models and LoRA adapters)."""
    paths = []
    for reference in config.referenced_models():
        paths.append(reference.model.path)
        if reference.lora is not None:
            paths.append(reference.lora.path)
    return paths


def validate_recipe_source(config_source: str | None, source: str = "the recipe") -> None:
    """``validate_recipe_data`` on the YAML text of a ``sanitize`` recipe, when there is one."""
    if not config_source:
        return
    try:
        raw = yaml.safe_load(config_source)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(raw, dict) and raw.get("merge_method") == "sanitize":
        validate_recipe_data(raw, source)


class _DropTorchDtypeNotice(logging.Filter):
    # mergekit 0.1.5 sets ``config.torch_dtype``, which transformers 5 calls deprecated: a
    # message about mergekit's code that the user can do nothing about.
    def filter(self, record: logging.LogRecord) -> bool:
        return "`torch_dtype` is deprecated" not in record.getMessage()


@contextmanager
def _quiet_mergekit() -> Iterator[None]:
    logger = logging.getLogger("transformers.configuration_utils")
    notice = _DropTorchDtypeNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def sanitize_merge(
    config: MergeConfiguration,
    out_path: str | os.PathLike[str],
    options: MergeOptions,
    config_source: str | None = None,
    *,
    overwrite: bool | None = None,
    allow_pickle: bool | None = None,
) -> Path:
    """Merge into a hidden temporary folder, then move it into place.

    For ``merge_method: sanitize`` the inputs are checked first (nothing is read if a check
    fails) and the output gets a provenance manifest; other methods are merged as mergekit does.
    """
    overwrite = _env_flag(OVERWRITE_ENV) if overwrite is None else overwrite
    allow_pickle = _env_flag(ALLOW_PICKLE_ENV) if allow_pickle is None else allow_pickle
    out = Path(out_path).absolute()
    config = with_absolute_paths(config)
    refuse_output_overlapping(out, input_paths(config), what="output folder")
    ensure_output_free(out, overwrite)
    if config.merge_method == "sanitize":
        validate_recipe_source(config_source)
    check_finite_parameters(config)
    references = config.referenced_models()
    if any(ref.lora is not None for ref in references) and not options.lora_merge_cache:
        cache = Path.home() / ".cache" / "mergekit-backdoor" / "lora"
        options = options.model_copy(update={"lora_merge_cache": str(cache)})

    manifest = None
    suspect = None
    if config.merge_method == "sanitize":
        check_recipe(config)
        suspect_ref, donor_refs = recipe_models(config)
        suspect = inspect_model(suspect_ref, allow_pickle=allow_pickle)
        donors = [inspect_model(ref, allow_pickle=allow_pickle) for ref in donor_refs]
        check_compatible(suspect, donors)
        if config.dtype is None and config.out_dtype is None:
            config = config.model_copy(update={"out_dtype": _suspect_dtype(suspect.config)})
        hashes = hash_inputs([suspect, *donors], quiet=options.quiet)
        manifest = build_manifest(config, suspect, donors, hashes)
        card_models = [suspect.name, *(donor.name for donor in donors)]
    else:
        card_models = [str(reference) for reference in references]
    if config_source is None:  # mergekit's own to_yaml() fails on paths with spaces
        config_source = recipe_yaml(config)

    with staged_folder(out, overwrite) as partial:
        # mergekit rewrites the configuration it is given (models -> modules): pass a copy
        merge = _mergekit_run_merge()
        with _quiet_mergekit():
            merge(config.model_copy(deep=True), str(partial), options=options,
                  config_source=config_source)
        name_model_card(partial, out.name, card_models)
        if suspect is not None and manifest is not None:
            generation_config = suspect.path / "generation_config.json"
            if generation_config.is_file() and not (partial / "generation_config.json").exists():
                shutil.copy(generation_config, partial / "generation_config.json")
            write_provenance(partial, manifest)
    return out


def install_run_merge_wrapper(module: Any) -> None:
    """Route ``merge_method: sanitize`` in ``module.run_merge`` (mergekit.merge) through us."""
    original = module.run_merge
    if getattr(original, "_mergekit_backdoor", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None):  # type: ignore[no-untyped-def]
        if merge_config.merge_method != "sanitize":
            return original(merge_config, out_path, options=options, config_source=config_source)
        sanitize_merge(merge_config, out_path, options, config_source)

    run_merge._mergekit_backdoor = True  # type: ignore[attr-defined]
    module.run_merge = run_merge


def install_cli_error_handler(module: Any) -> None:
    """Make ``mergekit-yaml`` print our errors as one line (click's ``Error: ...``), not a traceback."""
    import click

    command = module.main
    callback = command.callback
    if callback is None or getattr(callback, "_mergekit_backdoor", False):
        return

    @functools.wraps(callback)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            _validate_recipe_file(kwargs.get("config_file"))
            return callback(*args, **kwargs)
        except BackdoorError as exc:
            raise click.ClickException(str(exc)) from exc

    guarded._mergekit_backdoor = True  # type: ignore[attr-defined]
    command.callback = guarded


def _validate_recipe_file(config_file: str | None) -> None:
    """A ``sanitize`` recipe file checked as written, before mergekit parses (and prunes) it."""
    if config_file is None:
        return
    try:
        text = Path(config_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise RecipeError(f"{config_file}: cannot read the recipe ({reason})") from None
    validate_recipe_source(text, source=config_file)
