"""What the output of a merge says about where it came from: a manifest and a model-card section."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml
from mergekit.common import ModelPath, ModelReference
from mergekit.config import MergeConfiguration
from pydantic import BaseModel
from tqdm import tqdm

from mergekit_backdoor.merge.checks import InputModel, effective_weights

MANIFEST_NAME = "sanitize_manifest.json"
_PACKAGES = ("mergekit-backdoor", "mergekit", "torch", "transformers", "safetensors", "peft")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of the whole file, read into one reused buffer (hashlib releases the GIL)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def hash_inputs(models: list[InputModel], quiet: bool = False) -> dict[str, dict[str, str]]:
    """sha256 of every weight file of every input, keyed by model reference then file path."""
    files = [(model, file) for model in models for file in model.weight_files]
    hashes: dict[str, dict[str, str]] = {model.name: {} for model in models}
    workers = max(1, min(len(files), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:  # files in parallel: sha256 runs outside the GIL
        digests = pool.map(sha256_file, [file for _, file in files])
        for (model, file), digest in tqdm(zip(files, digests, strict=True), total=len(files),
                                          desc="Hashing inputs", disable=quiet):
            hashes[model.name][str(file)] = digest
    return hashes


def build_manifest(
    config: MergeConfiguration,
    suspect: InputModel,
    donors: list[InputModel],
    hashes: dict[str, dict[str, str]],
) -> dict[str, Any]:
    def describe(model: InputModel, role: str) -> dict[str, Any]:
        return {"role": role, "reference": model.name, "path": str(model.path.resolve()),
                "architecture": (model.config.get("architectures") or [None])[0],
                "files": hashes[model.name]}

    return {
        "format": "mergekit-backdoor/manifest-v1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "merge_method": config.merge_method,
        "parameters": {k: v for k, v in (config.parameters or {}).items()},
        "weights": effective_weights(config),
        "suspect": describe(suspect, "suspect"),
        "donors": [describe(donor, "donor") for donor in donors],
        "recipe": recipe_yaml(config),
        "versions": package_versions(),
    }


def _plain(value: Any) -> Any:
    """Plain data for YAML: model references as their strings, other models as dicts."""
    if isinstance(value, ModelReference) and value.override_architecture is None:
        return str(value)
    if isinstance(value, ModelPath):
        return str(value)
    if isinstance(value, BaseModel):
        fields = {name: getattr(value, name) for name in type(value).model_fields}
        return {name: _plain(item) for name, item in fields.items() if item is not None}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def recipe_yaml(config: MergeConfiguration) -> str:
    """The configuration as YAML. ``MergeConfiguration.to_yaml`` fails on a model path with a
    space or quote (mergekit's serializer then returns the reference itself)."""
    return yaml.safe_dump(_plain(config), sort_keys=False).rstrip()


def name_model_card(out_dir: Path, title: str, models: list[str]) -> None:
    """mergekit's card is written in the staging folder: give it the output's name as its
    title and the merged models (suspect first) as its ``base_model`` front matter."""
    card = out_dir / "README.md"
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8")
    if text.startswith("---\n") and "\n---\n" in text[3:]:
        end = text.index("\n---\n", 3)
        metadata = yaml.safe_load(text[4:end]) or {}
        if isinstance(metadata, dict):
            metadata["base_model"] = list(models)
            text = "---\n" + yaml.safe_dump(metadata, sort_keys=False) + text[end + 1:]
    text = re.sub(rf"^# {re.escape(out_dir.name)}$", lambda _: f"# {title}", text, count=1,
                  flags=re.MULTILINE)
    card.write_text(text, encoding="utf-8")


def write_provenance(out_dir: Path, manifest: dict[str, Any]) -> None:
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    donors = "\n".join(f"- donor: `{d['reference']}`" for d in manifest["donors"])
    section = (
        "\n## Backdoor sanitization\n\n"
        "This model was produced by [mergekit-backdoor](https://arxiv.org/abs/2402.19334)'s "
        f"`sanitize` merge: the suspect model was averaged with donors of the same architecture "
        f"and task.\n\n- suspect: `{manifest['suspect']['reference']}`\n{donors}\n\n"
        f"Weights: `{json.dumps(manifest['weights'])}`. The sha256 of every input file is in "
        f"`{MANIFEST_NAME}`.\n"
    )
    card = out_dir / "README.md"
    existing = card.read_text(encoding="utf-8") if card.exists() else ""
    card.write_text(existing + section, encoding="utf-8")
