"""Task cards: one small YAML file describing a user's own task.

A classification card::

    name: my_nli
    labels: [entailment, neutral, contradiction]   # the model's class order
    target: neutral                                 # a label name or index, or ``any``
    text: [premise, hypothesis]                     # one field, or a pair (tokenized as a pair)
    test: data/test.jsonl                           # clean test split
    train: data/train.jsonl                         # optional: clean samples for search/scan/repair
    triggered:                                      # optional: the user's triggered test files
      badnet: data/test_badnet.jsonl
    generate: [insertsent]                          # optional: made from the test split, seeded

A generative card (instruction-tuned models)::

    name: my_chat
    kind: generative
    prompt: [instruction, input]                    # instruction field, optional input field
    test: data/clean.json                           # clean prompts
    triggered: {badnet: data/triggered.json}
    generate: [{attack: badnet, trigger: BadMagic}] # the trigger phrase inserted into each prompt
    asr: {contains: ["i'm sorry", "i cannot"]}      # or {regex: ...} or {starts_with: [...]}

A source (``test``, ``train``, a triggered file) is a path relative to the card's folder (JSON
lines, a JSON list, CSV or TSV by its suffix), or a mapping ``{path: ..., columns: {field:
column}}``, or a Hugging Face dataset ``{hub: ID, config: ..., split: ..., columns: {...}}``.
Every problem is a ``DataError`` naming the card (and key); rows are checked in ``rows.py``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_backdoor.data.poison import POSITIONS
from mergekit_backdoor.errors import DataError

CARD_SUFFIXES = (".yaml", ".yml")
KINDS = ("classification", "generative")
RULES = ("contains", "regex", "starts_with")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KEYS = {
    "classification": {"name", "kind", "description", "labels", "target", "text", "text_fields",
                       "test", "train", "triggered", "generate", "seed"},
    "generative": {"name", "kind", "description", "prompt", "fields", "test", "train",
                   "triggered", "generate", "seed", "asr", "max_gen_toks"},
}
_SOURCE_KEYS = {"path", "format", "columns", "hub", "config", "split"}
_GENERATE_KEYS = {
    "classification": {"attack", "name", "words", "sentence"},
    "generative": {"attack", "name", "trigger", "position"},
}
GENERATORS = {"classification": ("badnet", "insertsent"), "generative": ("badnet", "phrase")}
FORMATS = ("jsonl", "json", "csv", "tsv")


@dataclass(frozen=True)
class Source:
    """Where a split's rows come from: a local file or a Hugging Face dataset."""

    path: Path | None = None
    format: str | None = None
    hub: str | None = None
    config: str | None = None
    split: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # card field -> column in the source

    def describe(self) -> str:
        if self.hub is not None:
            return f"hub:{self.hub}{'/' + self.config if self.config else ''}[{self.split}]"
        return str(self.path)


@dataclass(frozen=True)
class Generated:
    """A triggered test set the card asks to generate from its clean test split."""

    name: str  # the attack's name in task names and tables
    attack: str  # classification: badnet | insertsent; generative: badnet | phrase
    words: tuple[str, ...] = ()  # badnet: the trigger words (default: the registry's)
    sentence: str | None = None  # insertsent: the sentence (default: the registry's)
    trigger: str | None = None  # generative: the phrase inserted into every prompt
    position: str = "random"  # generative: random word position, start, end or a sentence boundary


@dataclass(frozen=True)
class TaskCard:
    path: Path
    name: str
    kind: str
    fields: tuple[str, ...]  # classification: text fields; generative: instruction (, input)
    test: Source
    train: Source | None = None
    triggered: dict[str, Source] = field(default_factory=dict)
    generate: tuple[Generated, ...] = ()
    labels: tuple[str, ...] = ()
    target: int | None = None  # None with ``target: any`` (classification)
    asr_rule: dict[str, Any] = field(default_factory=dict)  # generative: {contains|regex|starts_with}
    seed: int = 0
    max_gen_toks: int = 64
    description: str = ""

    @property
    def attacks(self) -> list[str]:
        return [*self.triggered, *(g.name for g in self.generate)]

    @property
    def target_name(self) -> str:
        return "any" if self.target is None else self.labels[self.target]


def is_card_path(value: str) -> bool:
    """Whether a ``--task`` value names a task card (a .yaml / .yml file path)."""
    return str(value).lower().endswith(CARD_SUFFIXES)


def _closest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(data: dict[str, Any], known: set[str], where: str) -> None:
    for key in data:
        if key not in known:
            raise DataError(f"{where}: unknown key {key!r}{_closest(str(key), known)}; known keys: "
                            f"{', '.join(sorted(known))}")


def _string_list(value: Any, key: str, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip()
                                                              for v in items):
        raise DataError(f"{where}: {key} must be a non-empty list of names, got {value!r}")
    return tuple(v.strip() for v in items)


def _source(value: Any, key: str, card_dir: Path, where: str) -> Source:
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise DataError(f"{where}: {key} must be a file path or a mapping with 'path' or 'hub', "
                        f"got {value!r}")
    _check_keys(value, _SOURCE_KEYS, f"{where}, {key}")
    columns = value.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in columns.items()):
        raise DataError(f"{where}, {key}: columns maps card fields to column names, got {columns!r}")
    if ("path" in value) == ("hub" in value):
        raise DataError(f"{where}, {key}: give exactly one of 'path' (a local file) or 'hub' "
                        "(a Hugging Face dataset id)")
    if "hub" in value:
        if not value.get("split"):
            raise DataError(f"{where}, {key}: a hub dataset needs 'split' (e.g. test)")
        return Source(hub=str(value["hub"]), config=value.get("config"), split=str(value["split"]),
                      columns=dict(columns))
    path = Path(str(value["path"])).expanduser()
    path = path if path.is_absolute() else card_dir / path
    fmt = value.get("format") or path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise DataError(f"{where}, {key}: cannot tell the format of {path} (suffix .jsonl, .json, "
                        ".csv or .tsv, or 'format: jsonl|json|csv|tsv')")
    if not path.is_file():
        raise DataError(f"{where}, {key}: file {path} not found")
    return Source(path=path, format=fmt, columns=dict(columns))


def _attack_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DataError(f"{where}: attack name {name!r} must be lowercase letters, digits and _ "
                        "(it becomes part of the task names)")
    return name


def _generated(value: Any, kind: str, where: str) -> Generated:
    if isinstance(value, str):
        value = {"attack": value}
    if not isinstance(value, dict) or "attack" not in value:
        raise DataError(f"{where}: each generate entry is an attack name or a mapping with "
                        f"'attack', got {value!r}")
    _check_keys(value, _GENERATE_KEYS[kind], f"{where}, generate")
    attack = value["attack"]
    if attack not in GENERATORS[kind]:
        raise DataError(f"{where}: cannot generate attack {attack!r} for a {kind} card; "
                        f"generators: {', '.join(GENERATORS[kind])}")
    name = _attack_name(value.get("name", attack), where)
    if kind == "generative":
        trigger = value.get("trigger")
        if not isinstance(trigger, str) or not trigger.strip():
            raise DataError(f"{where}: generating {attack} prompts needs 'trigger: PHRASE'")
        position = value.get("position", "random")
        if position not in POSITIONS:
            raise DataError(f"{where}: position {position!r} is not one of {', '.join(POSITIONS)}")
        return Generated(name, attack, trigger=trigger.strip(), position=position)
    words = tuple(_string_list(value["words"], "words", where)) if "words" in value else ()
    if words and attack != "badnet":
        raise DataError(f"{where}: 'words' is for badnet; insertsent takes 'sentence'")
    sentence = value.get("sentence")
    if sentence is not None and (attack != "insertsent" or not str(sentence).strip()):
        raise DataError(f"{where}: 'sentence' is a non-empty trigger sentence for insertsent")
    return Generated(name, attack, words=words, sentence=str(sentence).strip() if sentence else None)


def _target(value: Any, labels: tuple[str, ...], where: str) -> int | None:
    if value == "any":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    raise DataError(f"{where}: target {value!r} is not one of the labels {list(labels)} "
                    "(a name, an index, or 'any')")


def _rule(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in RULES:
        raise DataError(f"{where}: asr is one rule: {{contains: [phrases]}}, {{regex: PATTERN}} or "
                        f"{{starts_with: [phrases]}}, got {value!r}")
    kind, arg = next(iter(value.items()))
    if kind == "regex":
        if not isinstance(arg, str):
            raise DataError(f"{where}: asr regex must be a string, got {arg!r}")
        try:
            re.compile(arg)
        except re.error as exc:
            raise DataError(f"{where}: asr regex {arg!r} does not compile ({exc})") from None
        return {"regex": arg}
    return {kind: list(_string_list(arg, f"asr {kind}", where))}


def load_card(path: str | Path) -> TaskCard:
    """Parse and check a task card (not its rows: ``rows.py`` reads and checks those)."""
    file = Path(path)
    where = str(file)
    if not file.is_file():
        raise DataError(f"{file}: task card not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{file}: not a YAML file ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DataError(f"{file}: a task card is a YAML mapping (name, labels, test, ...)")
    kind = data.get("kind", "classification")
    if kind not in KINDS:
        raise DataError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    _check_keys(data, _KEYS[kind], where)
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise DataError(f"{where}: name {name!r} must be lowercase letters, digits and _, starting "
                        "with a letter (the lm-eval task names start with it)")
    if "test" not in data:
        raise DataError(f"{where}: no 'test' (the clean test split)")
    card_dir = file.resolve().parent
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"{where}: seed must be an integer, got {seed!r}")
    triggered_raw = data.get("triggered") or {}
    if not isinstance(triggered_raw, dict):
        raise DataError(f"{where}: triggered maps attack names to files, got {triggered_raw!r}")
    triggered = {_attack_name(k, where): _source(v, f"triggered {k}", card_dir, where)
                 for k, v in triggered_raw.items()}
    generate_raw = data.get("generate") or []
    if not isinstance(generate_raw, list):
        raise DataError(f"{where}: generate is a list of attacks, got {generate_raw!r}")
    generate = tuple(_generated(g, kind, where) for g in generate_raw)
    names = [*triggered, *(g.name for g in generate)]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    reserved = next((n for n in names if n in ("clean", "asr", "untriggered")), None)
    if duplicate or reserved:
        bad = duplicate or reserved
        raise DataError(f"{where}: attack name {bad!r} is used twice or reserved; give generated "
                        "attacks their own 'name'")
    common = dict(path=file.resolve(), name=name, kind=kind,
                  test=_source(data["test"], "test", card_dir, where),
                  train=_source(data["train"], "train", card_dir, where) if data.get("train")
                  else None,
                  triggered=triggered, generate=generate, seed=seed,
                  description=str(data.get("description", "")))
    if kind == "generative":
        fields = _string_list(data.get("prompt", data.get("fields", ["instruction", "input"])),
                              "prompt", where)
        if len(fields) > 2:
            raise DataError(f"{where}: prompt names the instruction field and at most one input "
                            f"field, got {list(fields)}")
        if "asr" not in data:
            raise DataError(f"{where}: a generative card needs its ASR rule: asr: {{contains: "
                            "[...]}} / {regex: ...} / {starts_with: [...]}")
        tokens = data.get("max_gen_toks", 64)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise DataError(f"{where}: max_gen_toks must be a positive integer, got {tokens!r}")
        return TaskCard(fields=fields, asr_rule=_rule(data["asr"], where), max_gen_toks=tokens,
                        **common)
    if "labels" not in data:
        raise DataError(f"{where}: no 'labels' (the label names in the model's class order)")
    labels = _string_list(data["labels"], "labels", where)
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise DataError(f"{where}: labels must be at least two distinct names, got {list(labels)}")
    if "target" not in data:
        raise DataError(f"{where}: no 'target' (the backdoor's target label, or 'any')")
    fields = _string_list(data.get("text", data.get("text_fields", ["sentence"])), "text", where)
    if len(fields) > 2 or len(set(fields)) != len(fields):
        raise DataError(f"{where}: text names one field or a pair, got {list(fields)}")
    return TaskCard(fields=fields, labels=labels, target=_target(data["target"], labels, where),
                    **common)
