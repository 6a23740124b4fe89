"""Pick a module-switching layout for given models with a handful of clean examples.

``search_layout`` takes the suspect and its donors (sequence classifiers of one architecture),
finds low-penalty layouts (``merge/switching.py``), builds each candidate in memory exactly as
mergekit would (switched modules copied from their source, every other tensor the float32 mean
cast back), scores it on the clean examples and keeps the best. No trigger is known or guessed:
the score is the balanced accuracy (mean per-class recall) on clean examples, ties broken by the
structural penalty. A backdoor that leaks into clean behaviour shows up there as a drop in the
recall of the non-target classes.

The result is an ordinary ``sanitize`` recipe: ``mergekit-yaml`` replays it bit for bit.

Clean examples (``tasks.resolve.clean_samples``): at most 50 per class, drawn with a seed from a task's clean
training split (never the test split the benchmarks evaluate on; a drawn row whose text also
appears in that test split is skipped), or read from a user's JSON/JSONL/CSV file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_backdoor.errors import DataError, IncompatibleModelError, RecipeError
from mergekit_backdoor.merge.switching import (
    Slot,
    candidate_layouts,
    describe_layout,
    find_slots,
    layout_recipe,
)


@dataclass
class SearchResult:
    models: list[str]
    slots: list[Slot]
    layout: tuple[int, ...]
    penalty: float
    balanced_accuracy: float
    mean_balanced_accuracy: float  # the plain average (WAG) of the same models, for comparison
    candidates: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)

    def recipe(self, dtype: str | None = None) -> dict[str, Any]:
        return layout_recipe(self.models, self.slots, self.layout, dtype=dtype)

    def describe(self) -> str:
        return describe_layout(self.slots, self.layout, self.models)


# --- models -------------------------------------------------------------------------------------

def num_labels_of(config: dict[str, Any]) -> int | None:
    """How many classes a classifier's config declares (id2label, else num_labels)."""
    if config.get("id2label"):
        return len(config["id2label"])
    value = config.get("num_labels")
    return value if isinstance(value, int) else None


def suspect_num_labels(suspect: str) -> int | None:
    """The number of classes of the suspect (a local folder or hub id), to check samples by."""
    from mergekit.common import ModelReference

    from mergekit_backdoor.merge.checks import inspect_model

    return num_labels_of(inspect_model(ModelReference.model_validate(suspect)).config)


def _check_example_labels(examples: list[dict[str, Any]], suspect: Any) -> None:
    count = num_labels_of(suspect.config)
    labels = sorted({int(row["label"]) for row in examples})
    if count is not None and any(not 0 <= label < count for label in labels):
        raise DataError(f"the clean samples have labels {labels}, but {suspect.name} has "
                        f"{count} classes (0 to {count - 1})")
    if len(labels) < 2:
        raise DataError("the clean samples hold a single class; give at least two")


def _load_tensors(folder: Path, name: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise IncompatibleModelError(f"{name}: no *.safetensors weights in {folder} "
                                     "(the layout search reads safetensors only)")
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


class _Composer:
    """Builds the merged state dict of any layout from the models' tensors."""

    def __init__(self, tensors: list[dict[str, Any]], slots: Sequence[Slot]):
        import torch

        first = tensors[0]  # names and shapes already match: check_compatible ran first
        self.tensors = tensors
        self.mean = {}
        for key, value in first.items():
            if value.is_floating_point():
                total = torch.stack([t[key].float() for t in tensors]).mean(0)
                self.mean[key] = total.to(value.dtype)
            else:
                self.mean[key] = value
        self.members = [[key for key in first if key.startswith(slot.prefix)] for slot in slots]

    def compose(self, layout: Sequence[int]) -> dict[str, Any]:
        state = dict(self.mean)
        for keys, source in zip(self.members, layout, strict=True):
            for key in keys:
                state[key] = self.tensors[source][key]
        return state


def _balanced_accuracy(model: Any, batches: list[tuple[dict[str, Any], list[int]]]) -> float:
    import torch

    predictions: list[int] = []
    labels: list[int] = []
    with torch.no_grad():
        for batch, batch_labels in batches:
            predictions += model(**batch).logits.argmax(-1).tolist()
            labels += batch_labels
    recalls = []
    for label in sorted(set(labels)):
        rows = [p for p, y in zip(predictions, labels, strict=True) if y == label]
        recalls.append(sum(p == label for p in rows) / len(rows))
    return sum(recalls) / len(recalls)


def _batches(tokenizer: Any, examples: list[dict[str, Any]], text_fields: Sequence[str],
             max_length: int, size: int = 16) -> list[tuple[dict[str, Any], list[int]]]:
    """Length-sorted batches, each padded to its own longest row (forward passes dominate)."""
    def text(row: dict[str, Any]) -> list[str]:
        return [row[f] for f in text_fields]

    lengths = [len(tokenizer(*text(row), truncation=True, max_length=max_length)["input_ids"])
               for row in examples]
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    batches = []
    for start in range(0, len(order), size):
        rows = [examples[i] for i in order[start:start + size]]
        columns = [[row[f] for row in rows] for f in text_fields]
        batches.append((tokenizer(*columns, padding=True, truncation=True, max_length=max_length,
                                  return_tensors="pt"), [int(row["label"]) for row in rows]))
    return batches


def search_layout(models: Sequence[str], examples: list[dict[str, Any]], text_fields: Sequence[str],
                  *, candidates: int = 24, seed: int = 0, max_length: int = 128,
                  progress: bool = True) -> SearchResult:
    """Score up to ``candidates`` low-penalty layouts of ``models`` (suspect first) on the clean
    ``examples`` and return the best."""
    import torch
    from rich.progress import track

    from mergekit_backdoor.loading import load_classifier, load_tokenizer

    if len(models) < 2:
        raise RecipeError("module switching needs the suspect and at least one donor")
    from mergekit.common import ModelReference

    from mergekit_backdoor.merge.checks import check_compatible, inspect_model

    inputs = [inspect_model(ModelReference.model_validate(m)) for m in models]
    check_compatible(inputs[0], inputs[1:])  # the checks `sanitize` runs, with the same errors
    for model in inputs:
        if model.adapter_path is not None:
            raise IncompatibleModelError(f"{model.name}: the layout search reads full models, not "
                                         "base+adapter references; merge the adapter into its base first")
    _check_example_labels(examples, inputs[0])
    folders = [model.path for model in inputs]
    tensors = [_load_tensors(folder, name) for folder, name in zip(folders, models, strict=True)]
    slots = find_slots(tensors[0])
    if not slots:
        raise IncompatibleModelError(f"{models[0]}: no attention / feed-forward modules found in "
                                     "its tensor names; module switching does not know this layout")
    composer = _Composer(tensors, slots)
    torch.manual_seed(seed)
    model = load_classifier(folders[0]).eval()
    tokenizer = load_tokenizer(folders[0])
    batches = _batches(tokenizer, examples, text_fields, max_length)
    labels = [int(row["label"]) for row in examples]

    def score(state: dict[str, Any]) -> float:
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise IncompatibleModelError(f"{models[0]}: tensor {unexpected[0]} is not a parameter "
                                         "of the model transformers builds from its config")
        return _balanced_accuracy(model, batches)

    mean_accuracy = score(composer.mean)
    pool = candidate_layouts(slots, len(models), count=candidates, seed=seed)
    scored = []
    for penalty, layout in track(pool, description="scoring layouts", disable=not progress,
                                 transient=True):
        scored.append({"layout": list(layout), "penalty": penalty,
                       "balanced_accuracy": score(composer.compose(layout))})
    best = max(scored, key=lambda c: (c["balanced_accuracy"], -c["penalty"]))
    return SearchResult(list(models), slots, tuple(best["layout"]), best["penalty"],
                        best["balanced_accuracy"], mean_accuracy, scored,
                        {"n": len(examples), "per_class": dict(sorted(
                            {y: labels.count(y) for y in labels}.items()))})


def write_recipe(result: SearchResult, path: str | Path, *, overwrite: bool = False,
                 dtype: str | None = None, note: str = "") -> Path:
    """The recipe as YAML with the search's settings and scores in a comment header, atomically."""
    from mergekit_backdoor.errors import OutputExistsError
    from mergekit_backdoor.outputs import refuse_output_overlapping, write_text

    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    refuse_output_overlapping(out, result.models, what="recipe file")
    header = [
        "Module-switching layout found by `mergekit-backdoor search` (MSD-style, arXiv 2504.05902).",
        "Each listed module comes whole from one model (weight 1 there, 0 elsewhere); all other",
        "tensors are the plain mean. Replay with: mergekit-yaml THIS_FILE OUTPUT_FOLDER",
        f"clean samples: {result.samples.get('n')} ({result.samples.get('per_class')} per label)"
        + (f", {note}" if note else ""),
        f"balanced accuracy on them: {result.balanced_accuracy:.4f} (plain mean of the same "
        f"models: {result.mean_balanced_accuracy:.4f}); structural penalty {result.penalty:.2f}",
        *result.describe().splitlines(),
    ]
    text = "".join(f"# {line}\n" for line in header)
    text += yaml.safe_dump(result.recipe(dtype), sort_keys=False, width=120)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text, overwrite=overwrite)
    return out
