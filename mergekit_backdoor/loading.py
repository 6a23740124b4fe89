"""Loading Hugging Face classifiers and tokenizers without ever running a model's own code.

A checkpoint whose ``config.json`` needs its own Python classes (``auto_map`` with a model type
transformers does not know) is refused with one line, and every load passes
``trust_remote_code=False``, so transformers neither runs repository code nor asks whether to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from mergekit_backdoor.errors import IncompatibleModelError


def read_config(config_file: Path) -> dict[str, Any]:
    """A model's config.json as a dict; one-line IncompatibleModelError naming the file."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IncompatibleModelError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise IncompatibleModelError(f"{config_file}: expected a JSON object, got "
                                     f"{type(config).__name__}")
    return config


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; one-line error for a broken file."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IncompatibleModelError(
            f"{file}: not a readable safetensors file ({reason}; truncated or corrupt?)"
        ) from None


def needs_custom_code(config: dict[str, Any]) -> bool:
    """Whether a config can only be built by the model's own code: it maps Auto classes to its
    files (``auto_map``) and its ``model_type`` is not one transformers knows."""
    if not config.get("auto_map"):
        return False
    from transformers import CONFIG_MAPPING

    return config.get("model_type") not in CONFIG_MAPPING


def refuse_custom_code(folder: str | Path) -> None:
    """IncompatibleModelError when a local model folder needs its own code to load."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        return
    config = read_config(file)
    if needs_custom_code(config):
        raise IncompatibleModelError(
            f"{file}: the model needs its own code to load (auto_map, model_type "
            f"{config.get('model_type')!r}); mergekit-backdoor never executes repository code"
        )


def check_model_folder(folder: str | Path) -> dict[str, Any]:
    """A local model folder's config, after checking what loading it would trip on: config.json
    present and valid, no custom code needed, every safetensors header readable."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise IncompatibleModelError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = read_config(config_file)
    refuse_custom_code(folder)
    for file in sorted(folder.glob("*.safetensors")):
        safetensors_shapes(file)
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_classifier(path: str | Path, **kwargs: Any) -> Any:
    """``AutoModelForSequenceClassification.from_pretrained`` without custom code."""
    from transformers import AutoModelForSequenceClassification

    refuse_custom_code(path)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(path), trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise IncompatibleModelError(f"{path}: cannot load a sequence classifier "
                                     f"({_first_line(exc)})") from None


def load_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` without custom code."""
    from transformers import AutoTokenizer

    refuse_custom_code(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise IncompatibleModelError(f"{path}: cannot load the tokenizer ({_first_line(exc)})"
                                     ) from None
