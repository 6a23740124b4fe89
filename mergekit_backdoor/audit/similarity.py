"""How close each donor is to the suspect: weight cosine, relative distance, task-vector cosine.

Tensors are streamed one name at a time from the safetensors files, so memory stays at a few
tensors whatever the model size. Task vectors (``model - base``) need the pre-trained model the
fine-tunes share; a base without a classification head (``BertModel`` under a
``BertForSequenceClassification``) is matched by dropping the first component of each name, and
names it lacks (the new head) are left out of the task vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergekit_backdoor.merge.checks import InputModel

_TOKENIZER_FILES = ("vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")


@dataclass
class Similarity:
    """One model compared with the suspect, over every floating-point tensor they share."""

    model: str
    weights_cosine: float | None
    relative_distance: float | None  # ||w - w_suspect|| / ||w_suspect||
    task_vector_cosine: float | None = None  # cos(w - w_base, w_suspect - w_base)
    tensors: int = 0
    task_vector_tensors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Accumulator:
    def __init__(self) -> None:
        self.dot = self.norm_a = self.norm_b = self.diff = 0.0
        self.count = 0

    def add(self, a: Any, b: Any) -> None:
        # float32 products, summed per tensor by torch and across tensors in Python floats
        a, b = a.float().flatten(), b.float().flatten()
        self.dot += float(a @ b)
        self.norm_a += float(a @ a)
        self.norm_b += float(b @ b)
        delta = a - b
        self.diff += float(delta @ delta)
        self.count += 1

    def cosine(self) -> float | None:
        if not self.count or self.norm_a == 0 or self.norm_b == 0:
            return None
        return self.dot / math.sqrt(self.norm_a * self.norm_b)

    def relative_distance(self) -> float | None:
        if not self.count or self.norm_a == 0:
            return None
        return math.sqrt(self.diff / self.norm_a)


class _Tensors:
    """Lazy access to the tensors of a model folder's safetensors files."""

    def __init__(self, model: InputModel, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.where: dict[str, Any] = {}
        for file in model.weight_files:
            if file.suffix != ".safetensors" or file.parent != model.path:
                continue
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            for key in handle.keys():
                self.where[key] = handle

    def get(self, key: str) -> Any | None:
        handle = self.where.get(key)
        return None if handle is None else handle.get_tensor(key)

    def get_base(self, key: str) -> Any | None:
        """The tensor of ``key``, or of ``key`` without its first component (a bare encoder)."""
        if key in self.where:
            return self.get(key)
        return self.get(key.split(".", 1)[1]) if "." in key else None


def streamable(model: InputModel) -> bool:
    """Whether the tensors can be read without unpickling or merging an adapter."""
    return model.adapter_path is None and bool(model.tensor_shapes)


def similarities(
    suspect: InputModel,
    others: list[InputModel],
    base: InputModel | None = None,
    *,
    progress: bool = False,
) -> list[Similarity]:
    """Compare every model of ``others`` with ``suspect`` (and their task vectors over ``base``)."""
    usable = [m for m in others if streamable(m)]
    results = {m.name: Similarity(m.name, None, None) for m in others}
    if not streamable(suspect) or not usable:
        return list(results.values())
    if base is not None and not streamable(base):
        base = None
    weights = {m.name: _Accumulator() for m in usable}
    tasks = {m.name: _Accumulator() for m in usable}
    with ExitStack() as stack:
        suspect_t = _Tensors(suspect, stack)
        readers = {m.name: _Tensors(m, stack) for m in usable}
        base_t = _Tensors(base, stack) if base is not None else None
        for key in _tracked(sorted(suspect.tensor_shapes), progress):
            a = suspect_t.get(key)
            if a is None or not a.is_floating_point():
                continue
            b0 = base_t.get_base(key) if base_t is not None else None
            if b0 is not None and b0.shape != a.shape:
                b0 = None
            for name, reader in readers.items():
                other = reader.get(key)
                if other is None or other.shape != a.shape:
                    continue
                weights[name].add(a, other)
                if b0 is not None:
                    tasks[name].add(a.float() - b0.float(), other.float() - b0.float())
    for name in weights:
        results[name] = Similarity(
            name, weights[name].cosine(), weights[name].relative_distance(),
            tasks[name].cosine() if base is not None else None,
            weights[name].count, tasks[name].count,
        )
    return list(results.values())


def _tracked(keys: list[str], progress: bool) -> Iterator[str]:
    if not progress:
        yield from keys
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("comparing weights", total=len(keys))
        for key in keys:
            yield key
            bar.advance(task)


def tokenizer_fingerprint(folder: Path) -> tuple[str, str] | None:
    """(kind, sha256) of a saved tokenizer's vocabulary; None when the folder has none.

    ``tokenizer.json`` is reduced to its vocabulary and added tokens, so two saves of the same
    tokenizer with other truncation or padding settings still match.
    """
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab")
        added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
        blob = json.dumps([vocab, added], sort_keys=True).encode()
        return "tokenizer.json", hashlib.sha256(blob).hexdigest()
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            return name, hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return None
