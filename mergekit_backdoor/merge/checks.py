"""Checks that run before any tensor is read: can these models be merged, and is the recipe sane?

Each failure is an ``IncompatibleModelError`` or ``RecipeError`` whose one-line message names the
model and the field, so a user can tell which donor to drop.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit.common import ModelPath, ModelReference
from mergekit.config import ConditionalParameter, InputModelDefinition, MergeConfiguration

from mergekit_backdoor.errors import IncompatibleModelError, RecipeError
from mergekit_backdoor.loading import read_config, refuse_custom_code, safetensors_shapes
from mergekit_backdoor.merge.methods import AGGREGATES

SANITIZE_PARAMETERS = {"weight", "aggregate", "trim", "normalize"}
RECIPE_KEYS = tuple(MergeConfiguration.model_fields)
MODEL_ENTRY_KEYS = tuple(InputModelDefinition.model_fields)
_DEFAULT_LABEL = re.compile(r"^label_\d+$")


@dataclass
class InputModel:
    """A model as the checks see it: its reference, local folder, config and weight files."""

    reference: ModelReference
    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    adapter_path: Path | None = None
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.reference)


def _local_dir(path_spec: str, revision: str | None, what: str) -> Path:
    if os.path.isdir(path_spec):
        return Path(path_spec)
    if os.path.exists(path_spec):
        raise IncompatibleModelError(f"{path_spec}: {what} is a file, expected a model folder")
    if path_spec.startswith((".", "/", "~")) or os.sep in path_spec.strip("/").split("/", 1)[-1]:
        raise IncompatibleModelError(f"{path_spec}: {what} folder does not exist")
    hub_id = ModelPath(path=path_spec, revision=revision)
    try:  # a hub id: fetch config and weights the way mergekit does, at the pinned revision
        return Path(ModelReference(model=hub_id).local_path())
    except Exception as exc:
        raise IncompatibleModelError(
            f"{hub_id}: {what} not found locally and not downloadable ({type(exc).__name__})"
        ) from exc


def _weight_files(folder: Path, name: str, allow_pickle: bool, prefix: str = "") -> list[Path]:
    safetensors = sorted(folder.glob(f"{prefix}*.safetensors"))
    if safetensors:
        return safetensors
    pickled = sorted(folder.glob(f"{prefix}*.bin"))
    if pickled and not allow_pickle:
        raise IncompatibleModelError(
            f"{name}: weights are pickle-only ({pickled[0].name}); pickles can run code when loaded. "
            "Convert to safetensors, or allow with --allow-pickle / MERGEKIT_BACKDOOR_ALLOW_PICKLE=1"
        )
    if not pickled:
        raise IncompatibleModelError(f"{name}: no weight files (*.safetensors or *.bin) in {folder}")
    return pickled


def inspect_model(reference: ModelReference, *, allow_pickle: bool = False) -> InputModel:
    """Read a model's config and weight headers (never tensor data)."""
    name = str(reference)
    path = _local_dir(reference.model.path, reference.model.revision, "model")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise IncompatibleModelError(f"{name}: no config.json in {path}")
    config = read_config(config_file)
    files = _weight_files(path, name, allow_pickle)
    adapter = None
    if reference.lora is not None:
        adapter = _local_dir(reference.lora.path, reference.lora.revision, "LoRA adapter")
        if not (adapter / "adapter_config.json").is_file():
            raise IncompatibleModelError(f"{name}: no adapter_config.json in {adapter}")
        files = files + _weight_files(adapter, name, allow_pickle, prefix="adapter_model")
    refuse_custom_code(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            file_shapes = safetensors_shapes(file)
            if file.parent == path:
                shapes.update(file_shapes)
    return InputModel(reference, path, config, files, adapter, shapes)


def _architecture(model: InputModel) -> str:
    architectures = model.config.get("architectures") or []
    if not architectures:
        raise IncompatibleModelError(f"{model.name}: config.json has no 'architectures' entry")
    return architectures[0]


def _labels(model: InputModel) -> list[str] | None:
    id2label = model.config.get("id2label")
    if not id2label:
        return None
    return [str(id2label[key]).strip().lower() for key in sorted(id2label, key=int)]


def _vocab_size(config: dict[str, Any]) -> int | None:
    if "vocab_size" in config:
        return config["vocab_size"]
    return (config.get("text_config") or {}).get("vocab_size")


def check_compatible(suspect: InputModel, donors: list[InputModel], *,
                     whose: str = "the suspect's") -> None:
    """Refuse donors that differ from the suspect in ways that make averaging meaningless
    (``whose`` names the suspect in the error)."""
    arch = _architecture(suspect)
    suspect_labels = _labels(suspect)
    is_classifier = "Classification" in arch or "MultipleChoice" in arch
    for donor in donors:
        donor_arch = _architecture(donor)
        if donor_arch != arch:
            raise IncompatibleModelError(
                f"{donor.name}: architecture {donor_arch} differs from {whose} {arch}"
            )
        donor_labels = _labels(donor)
        if is_classifier and suspect_labels is not None and donor_labels is not None:
            if len(donor_labels) != len(suspect_labels):
                raise IncompatibleModelError(
                    f"{donor.name}: num_labels {len(donor_labels)} differs from {whose} "
                    f"{len(suspect_labels)}"
                )
            named = not any(_DEFAULT_LABEL.match(label) for label in suspect_labels + donor_labels)
            if named and donor_labels != suspect_labels:
                raise IncompatibleModelError(
                    f"{donor.name}: id2label order {donor_labels} differs from {whose} "
                    f"{suspect_labels}"
                )
        if _vocab_size(donor.config) != _vocab_size(suspect.config):
            raise IncompatibleModelError(
                f"{donor.name}: vocab_size {_vocab_size(donor.config)} differs from {whose} "
                f"{_vocab_size(suspect.config)}"
            )
        _check_tensors(suspect, donor, whose)


def _check_tensors(suspect: InputModel, donor: InputModel, whose: str) -> None:
    if not suspect.tensor_shapes or not donor.tensor_shapes:
        return  # pickled weights: mergekit checks shapes while merging
    for first, second in ((suspect, donor), (donor, suspect)):
        missing = sorted(set(first.tensor_shapes) - set(second.tensor_shapes))
        if missing:
            extra = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise IncompatibleModelError(f"{second.name}: missing tensor {missing[0]}{extra}")
    for key, shape in suspect.tensor_shapes.items():
        if donor.tensor_shapes[key] != shape:
            raise IncompatibleModelError(
                f"{donor.name}: tensor {key} has shape {list(donor.tensor_shapes[key])}, "
                f"{whose} is {list(shape)}"
            )


def _scalar_settings(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """Plain values of a parameters block (gradients and filtered lists are left to mergekit)."""
    return {k: v for k, v in (parameters or {}).items() if isinstance(v, (int, float, str, bool))}


def _closest(key: str, known: tuple[str, ...] | set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _leaves(value: Any) -> list[Any]:
    """The plain values of a parameter setting: a scalar, a gradient list, or filtered entries."""
    if isinstance(value, ConditionalParameter):
        return _leaves(value.value)
    if isinstance(value, dict) and "value" in value:
        return _leaves(value["value"])
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_parameter(name: str, value: Any, where: str) -> None:
    """One sanitize parameter: known name, right type, finite numbers."""
    if name not in SANITIZE_PARAMETERS:
        hint = _closest(name, SANITIZE_PARAMETERS)
        raise RecipeError(f"unknown sanitize parameter {name!r} in {where}{hint} "
                          f"(known: {', '.join(sorted(SANITIZE_PARAMETERS))})")
    entries = value if isinstance(value, list) else [value]
    for entry in entries:
        if isinstance(entry, dict):
            extra = sorted(set(entry) - {"filter", "value"})
            if extra or "value" not in entry:
                raise RecipeError(f"{name} in {where}: a filtered entry has the keys 'filter' and "
                                  f"'value', got {sorted(entry)}")
    if name in ("aggregate", "normalize") and (isinstance(value, (list, dict, ConditionalParameter))):
        raise RecipeError(f"{name} in {where} takes one value for the whole merge, got {value!r}")
    for leaf in _leaves(value):
        if name == "weight" and not (_is_number(leaf) and math.isfinite(leaf)):
            raise RecipeError(f"weight must be a finite number, got {leaf!r} ({where})")
        if name == "trim" and not (_is_number(leaf) and 0.0 <= leaf < 0.5):
            raise RecipeError(f"trim must be in [0, 0.5), got {leaf!r} ({where})")
        if name == "aggregate" and leaf not in AGGREGATES:
            raise RecipeError(f"aggregate {leaf!r} is not one of {', '.join(AGGREGATES)} ({where})")
        if name == "normalize" and not isinstance(leaf, bool):
            raise RecipeError(f"normalize must be true or false, got {leaf!r} ({where})")


def _check_parameters(parameters: Any, where: str) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise RecipeError(f"{where} must be a mapping of parameter names to values, got {parameters!r}")
    for name, value in parameters.items():
        _check_parameter(str(name), value, where)


def validate_recipe_data(raw: Any, source: str = "the recipe") -> None:
    """Check a ``sanitize`` recipe as written (YAML data), before mergekit sees it: every key
    known (mergekit ignores unknown ones silently), every value of the right type and finite."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in RECIPE_KEYS:
            hint = _closest(str(key), RECIPE_KEYS)
            raise RecipeError(f"{source}: unknown key {key!r} at the top level{hint} "
                              f"(known: {', '.join(sorted(RECIPE_KEYS))})")
    _check_parameters(raw.get("parameters"), f"{source}, parameters")
    models = raw.get("models")
    if models is None:
        return
    if not isinstance(models, list):
        raise RecipeError(f"{source}: 'models' must be a list of entries like '- model: PATH'")
    for entry in models:
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"{source}: each entry of 'models' needs 'model: PATH', got {entry!r}")
        for key in entry:
            if key not in MODEL_ENTRY_KEYS:
                raise RecipeError(f"{source}: unknown key {key!r} in the models entry of "
                                  f"{entry['model']}{_closest(str(key), MODEL_ENTRY_KEYS)} "
                                  f"(known: {', '.join(MODEL_ENTRY_KEYS)})")
        _check_parameters(entry.get("parameters"), f"parameters of {entry['model']}")


def parameter_blocks(config: MergeConfiguration) -> list[tuple[str, dict[str, Any] | None]]:
    """Every parameters block of a configuration, with where it is (any merge method)."""
    blocks: list[tuple[str, dict[str, Any] | None]] = [("parameters", config.parameters)]
    for model in config.models or []:
        blocks.append((f"parameters of {model.model}", model.parameters))
    for index, piece in enumerate(config.slices or []):
        blocks.append((f"parameters of slice {index}", piece.parameters))
        for source in piece.sources:
            blocks.append((f"parameters of {source.model} in slice {index}", source.parameters))
    return blocks


def check_finite_parameters(config: MergeConfiguration) -> None:
    """Refuse NaN or infinite numbers in any recipe parameter, whatever the merge method: they
    turn every merged tensor into NaN (or, in a median, into the minimum)."""
    for where, parameters in parameter_blocks(config):
        for name, value in (parameters or {}).items():
            for leaf in _leaves(value):
                if _is_number(leaf) and not math.isfinite(leaf):
                    raise RecipeError(f"{name} must be a finite number, got {leaf} ({where})")


def check_recipe(config: MergeConfiguration) -> None:
    """Validate a ``sanitize`` recipe: mergekit silently ignores misspelt parameter names."""
    if config.base_model is None:
        raise RecipeError("sanitize needs base_model: the suspect model")
    if not config.models:
        raise RecipeError("sanitize recipes list the suspect and donors under 'models:'")
    for where, parameters in parameter_blocks(config):
        _check_parameters(parameters, where)
    settings = _scalar_settings(config.parameters)
    aggregate = settings.get("aggregate", "mean")
    weights = effective_weights(config)
    if aggregate != "mean":
        if settings.get("normalize", True) is False:
            raise RecipeError(f"normalize: false only applies to aggregate: mean, not {aggregate}")
        if any(w < 0 for w in weights.values()):
            raise RecipeError(f"aggregate {aggregate} needs non-negative weights, got {weights}")
    if settings.get("normalize", True) and sum(weights.values()) == 0:
        raise RecipeError("the model weights sum to zero; nothing to normalize by")


def effective_weights(config: MergeConfiguration) -> dict[str, float]:
    """Each input's scalar ``weight`` as mergekit resolves it (model, then top level, then 1)."""
    default = float(_scalar_settings(config.parameters).get("weight", 1.0))
    weights = {
        str(m.model): float(_scalar_settings(m.parameters).get("weight", default))
        for m in config.models or []
    }
    if config.base_model is not None:
        weights.setdefault(str(config.base_model), default)
    return weights


def recipe_models(config: MergeConfiguration) -> tuple[ModelReference, list[ModelReference]]:
    """The suspect (``base_model``) and the donors (every other model of the recipe)."""
    assert config.base_model is not None
    donors = [m.model for m in config.models or [] if m.model != config.base_model]
    if not donors:
        raise RecipeError("sanitize needs at least one donor besides the suspect (base_model)")
    return config.base_model, donors
