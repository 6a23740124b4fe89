"""Sample files a user supplies (clean examples for ``search``, and later for scanning and
repair): JSON lines, a JSON list, CSV or TSV, checked row by row like the registry's own files.

Each row has ``sentence`` or ``text`` (or ``question`` + ``sentence``, a pair) and, when labels
are asked for, an integer ``label``. Every problem is a DataError naming ``file:line``; nothing
is skipped.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergekit_backdoor.data.sources import Row, _field, _read_text, _text, iter_json_items
from mergekit_backdoor.errors import DataError

TEXT_LAYOUTS: tuple[tuple[str, ...], ...] = (("question", "sentence"), ("sentence",), ("text",))
_INTEGER = re.compile(r"^\s*-?\d+\s*$")


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            raise DataError(f"{where}: empty line")
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg})") from None


def _table(path: Path, text: str, delimiter: str) -> Iterator[tuple[str, Any]]:
    # TSV is read with quoting off, as the registry reads it: a field may start with '"' (QNLI)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"{where}: more fields than the header "
                                f"({len(reader.fieldnames)})")
            yield where, {key: value for key, value in row.items() if value is not None}
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed {delimiter!r}-separated row "
                        f"({exc})") from None


def _items(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return _table(path, text, "\t" if path.suffix.lower() == ".tsv" else ",")
    if text.lstrip().startswith("["):
        return iter_json_items(path)
    return _json_lines(path, text)


def _label(value: Any, where: str, num_labels: int | None) -> int:
    if isinstance(value, str) and _INTEGER.match(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: label {value!r} is not an integer class id")
    if num_labels is not None and not 0 <= value < num_labels:
        raise DataError(f"{where}: label {value} is not a class of the model "
                        f"(0 to {num_labels - 1})")
    return value


def read_samples(
    path: str | Path,
    *,
    labels: bool = True,
    num_labels: int | None = None,
    min_classes: int = 0,
) -> tuple[list[Row], tuple[str, ...]]:
    """The rows of a sample file and their text fields.

    ``labels``: every row needs an integer ``label`` (with ``num_labels``, in 0..num_labels-1);
    without it labels are never read (the repair learns from text alone). ``min_classes``: at least this many
    distinct labels. The text layout (``question`` + ``sentence``, ``sentence`` or ``text``) is
    taken from the first row; every row must have it.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: sample file not found")
    rows: list[Row] = []
    fields: tuple[str, ...] | None = None
    for where, obj in _items(file):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected an object with text fields, got "
                            f"{type(obj).__name__}")
        if fields is None:
            fields = next((f for f in TEXT_LAYOUTS if set(f) <= set(obj)), None)
            if fields is None:
                raise DataError(f"{where}: a sample needs a 'sentence' or 'text' field "
                                f"(or 'question' + 'sentence'); found {sorted(obj)}")
        row: Row = {f: _text(_field(obj, f, where), f, where) for f in fields}
        if labels:
            row["label"] = _label(_field(obj, "label", where), where, num_labels)
        rows.append(row)
    if not rows or fields is None:
        raise DataError(f"{file}: no samples")
    classes = sorted({row["label"] for row in rows if "label" in row})
    if len(classes) < min_classes:
        found = f"only label {classes[0]}" if classes else "no labels"
        raise DataError(f"{file}: {found}; give samples of at least {min_classes} classes")
    return rows, fields
