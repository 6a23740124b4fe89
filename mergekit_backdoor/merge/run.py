"""Running a ``sanitize`` merge through mergekit: checks first, atomic output, provenance last.

The start-up hook installs :func:`install_run_merge_wrapper` on ``mergekit.merge`` so the stock
``mergekit-yaml`` and ``mergekit.merge.run_merge`` get the same behaviour for
``merge_method: sanitize``; every other method passes straight through to mergekit.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_backdoor.errors import BackdoorError
from mergekit_backdoor.merge.checks import (
    check_compatible,
    check_recipe,
    inspect_model,
    recipe_models,
)
from mergekit_backdoor.merge.provenance import build_manifest, hash_inputs, write_provenance
from mergekit_backdoor.outputs import OVERWRITE_ENV, ensure_output_free, staged_folder

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


def _absolute_reference(reference: str) -> str:
    parts = [os.path.abspath(part) if os.path.exists(part) else part for part in reference.split("+")]
    return "+".join(parts)


def with_absolute_paths(config: MergeConfiguration) -> MergeConfiguration:
    """Local model paths made absolute: mergekit's model card asks the Hub about relative ones."""
    data = config.model_dump(mode="json", exclude_none=True)
    if "base_model" in data:
        data["base_model"] = _absolute_reference(str(data["base_model"]))
    for model in data.get("models") or []:
        model["model"] = _absolute_reference(str(model["model"]))
    return MergeConfiguration.model_validate(data)


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
    ensure_output_free(out, overwrite)
    config = with_absolute_paths(config)
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

    with staged_folder(out, overwrite) as partial:
        # mergekit rewrites the configuration it is given (models -> modules): pass a copy
        merge = _mergekit_run_merge()
        merge(config.model_copy(deep=True), str(partial), options=options,
              config_source=config_source)
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
            return callback(*args, **kwargs)
        except BackdoorError as exc:
            raise click.ClickException(str(exc)) from exc

    guarded._mergekit_backdoor = True  # type: ignore[attr-defined]
    command.callback = guarded
