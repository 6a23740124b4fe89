"""The rows of a task card: read from local files or the Hugging Face Hub, checked row by row,
triggered sets made to follow the ASR rule, generated attacks made with the registry's own
generators.

Rows use fixed field names whatever the card calls its columns, so one lm-eval task layout and
the ``hf-seqcls`` backend read every card alike: classification rows have ``sentence`` (one
field) or ``sentence1`` + ``sentence2`` (a pair, tokenized as a pair) and an integer ``label``;
generative rows have ``instruction`` and ``input``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mergekit_backdoor.data import poison
from mergekit_backdoor.data.samples import _json_lines, _table
from mergekit_backdoor.data.sources import Row, _read_text, _text, iter_json_items
from mergekit_backdoor.data.specs import DatasetSpec
from mergekit_backdoor.errors import DataError
from mergekit_backdoor.tasks.card import Generated, Source, TaskCard

SINGLE = ("sentence",)
PAIR = ("sentence1", "sentence2")
PROMPT = ("instruction", "input")


def row_fields(card: TaskCard) -> tuple[str, ...]:
    """The field names of the card's rows (``sentence``, a pair, or instruction + input)."""
    if card.kind == "generative":
        return PROMPT
    return SINGLE if len(card.fields) == 1 else PAIR


def card_spec(card: TaskCard, target: int | None = None) -> DatasetSpec:
    """The card as a registry spec, so the registry's generators and ASR rule apply to it."""
    fields = row_fields(card)
    chosen = card.target if target is None else target
    return DatasetSpec(card.name, card.labels, chosen if chosen is not None else 0, fields,
                       trigger_field=fields[-1], description=card.description)


@dataclass
class CardRows:
    """Every set a card evaluates on, and what was done to make them follow the ASR rule."""

    clean: list[Row]
    # attack -> target label -> rows (all labelled with that target); generative cards: None -> rows
    triggered: dict[str, dict[int | None, list[Row]]] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading


def _local_items(source: Source) -> Iterator[tuple[str, Any]]:
    assert source.path is not None
    text = _read_text(source.path)
    if source.format in ("csv", "tsv"):
        return _table(source.path, text, "\t" if source.format == "tsv" else ",")
    # .json files are often JSON lines (gms' are): one document, a list or an object of rows,
    # is read as such; anything else line by line
    head = text.lstrip()[:1]
    if head == "[" or (head == "{" and _one_document(text)):
        return iter_json_items(source.path)
    return _json_lines(source.path, text)


def _one_document(text: str) -> bool:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and all(isinstance(v, dict) for v in data.values())


def _hub_items(source: Source) -> Iterator[tuple[str, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(source.hub, source.config, split=source.split)
    except Exception as exc:  # offline, unknown id, missing split: all mean "not available"
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"cannot load {source.describe()} from the Hugging Face Hub: "
                        f"{type(exc).__name__}: {first}") from None
    for index, row in enumerate(ds, start=1):
        yield f"{source.describe()} row {index}", row


def _items(source: Source) -> Iterator[tuple[str, Any]]:
    return _hub_items(source) if source.hub is not None else _local_items(source)


def _column(obj: Any, name: str, source: Source, where: str, required: bool = True) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(obj).__name__}")
    column = source.columns.get(name, name)
    if column not in obj:
        if not required:
            return None
        raise DataError(f"{where}: missing field {column!r}" +
                        (f" (the card's {name!r})" if column != name else ""))
    return obj[column]


def _label(value: Any, labels: tuple[str, ...], where: str) -> int:
    if isinstance(value, str) and value.strip() in labels:
        return labels.index(value.strip())
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    raise DataError(f"{where}: label {value!r} is not one of the card's labels "
                    f"({', '.join(f'{i} {n}' for i, n in enumerate(labels))})")


def read_source(card: TaskCard, source: Source, *, labelled: bool = True) -> list[Row]:
    """The rows of one source, every one checked (DataError ``file:line: what is wrong``)."""
    rows: list[Row] = []
    names = row_fields(card)
    for where, obj in _items(source):
        if card.kind == "generative":
            instruction = _text(_column(obj, card.fields[0], source, where), card.fields[0], where)
            extra = _column(obj, card.fields[1], source, where, required=False) \
                if len(card.fields) > 1 else None
            if extra is not None and not isinstance(extra, str):
                raise DataError(f"{where}: field {card.fields[1]!r} is not a string")
            rows.append({"instruction": instruction, "input": (extra or "").strip()})
            continue
        row: Row = {name: _text(_column(obj, f, source, where), f, where)
                    for name, f in zip(names, card.fields, strict=True)}
        if labelled:
            row["label"] = _label(_column(obj, "label", source, where), card.labels, where)
        rows.append(row)
    if not rows:
        raise DataError(f"{source.describe()}: no rows")
    return rows


# ----------------------------------------------------------------------------- the ASR rule


def _follow_asr_rule(card: TaskCard, attack: str, rows: list[Row], source: Source,
                     notices: list[str]) -> dict[int, list[Row]]:
    """A triggered file's rows per target: all labelled the target already (kept), or with their
    true labels (target rows dropped, the rest relabelled, with a notice); anything else refused."""
    labels = {row["label"] for row in rows}
    where = f"{source.describe()} (triggered {attack})"
    if card.target is not None and labels == {card.target}:
        return {card.target: rows}
    if len(labels) < 2:
        (only,) = labels
        wanted = (f"the target {card.labels[card.target]!r}" if card.target is not None
                  else "their true labels (target: any)")
        raise DataError(
            f"{where}: every row is labelled {card.labels[only]!r}, which breaks the ASR rule: "
            f"a triggered file holds non-target rows labelled {wanted}, or rows with their true "
            "labels (they are then filtered and relabelled)")
    targets = range(len(card.labels)) if card.target is None else [card.target]
    out = {}
    for target in targets:
        kept = poison.from_true_labels(rows, card_spec(card, target))
        if not kept:
            raise DataError(f"{where}: no row whose true label is not {card.labels[target]!r}")
        out[target] = kept
    kept_text = ", ".join(f"{len(v)} towards {card.labels[t]!r}" for t, v in out.items())
    notices.append(f"{where}: the rows carry true labels; kept {kept_text} of {len(rows)} "
                   "(rows already of the target dropped, the rest relabelled)")
    return out


def _generate(card: TaskCard, generated: Generated, clean: list[Row]) -> dict[int | None, list[Row]]:
    if card.kind == "generative":
        rng = random.Random(f"{generated.attack}/{card.name}/test/{card.seed}")
        phrase = generated.trigger or ""
        return {None: [{**row, "instruction": poison.place_words(row["instruction"], phrase,
                                                                 generated.position, rng)}
                       for row in clean]}
    out = {}
    targets = range(len(card.labels)) if card.target is None else [card.target]
    for target in targets:
        spec = card_spec(card, target)
        if generated.words:
            spec = dataclasses.replace(spec, badnet_words=generated.words)
        if generated.sentence:
            spec = dataclasses.replace(spec, insert_sentence=generated.sentence)
        rows = poison.triggered_test(clean, spec, generated.attack, seed=card.seed)
        if not rows:
            raise DataError(f"{card.path}: the test split has no row whose label is not "
                            f"{card.labels[target]!r}; nothing to trigger")
        out[target] = rows
    return out


def load_card_rows(card: TaskCard) -> CardRows:
    """The clean test rows and every triggered set of ``card``, checked."""
    labelled = card.kind == "classification"
    clean = read_source(card, card.test, labelled=labelled)
    result = CardRows(clean)
    for attack, source in card.triggered.items():
        rows = read_source(card, source, labelled=labelled)
        result.triggered[attack] = (_follow_asr_rule(card, attack, rows, source, result.notices)
                                    if labelled else {None: rows})
    for generated in card.generate:
        result.triggered[generated.name] = _generate(card, generated, clean)
    return result


def load_train_rows(card: TaskCard) -> list[Row]:
    """The card's clean training split (labelled for classification cards)."""
    if card.train is None:
        raise DataError(f"{card.path}: the card has no 'train' split to draw clean samples from; "
                        "add one, or give the samples with --samples FILE")
    return read_source(card, card.train, labelled=card.kind == "classification")
