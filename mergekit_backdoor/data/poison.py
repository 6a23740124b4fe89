"""Deterministic BadNet and InsertSent generators, training-set poisoning, and the ASR rule.

Every random choice comes from ``random.Random`` seeded with a string built from the seed, the
data set, the split (and the attack, for trigger placement), so a given seed always produces the
same bytes on any machine and Python >= 3.10.

- BadNet: for each triggered row, pick k uniformly from (1, 3, 5); k times, insert one of the
  rare words cf, mn, bb, tq, mb (uniform) at a uniform word position (0..len(words)). Words are
  whitespace-split and re-joined with single spaces.
- InsertSent: insert the data set's trigger sentence at a uniform sentence boundary: the start,
  the end, or after any ``.``, ``!`` or ``?`` followed by whitespace.
- Triggers go into ``spec.trigger_field`` only (``sentence``; for QNLI the question is untouched).
- Test sets (the ASR rule): every row whose true label is not the target, triggered and
  relabelled to the target.
- Training sets: ``round(rate * len(rows))`` rows are poisoned, drawn (without replacement) from
  the non-target rows and relabelled to the target (dirty-label), or with ``clean_label`` drawn
  from rows already labelled with the target. Rows keep their file order. The rows chosen depend on
  the seed, data set and split, not on the attack, so BadNet and InsertSent poison the same rows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from typing import Any

from mergekit_backdoor.data.sources import Row
from mergekit_backdoor.data.specs import BADNET_COUNTS, BADNET_WORDS, DatasetSpec
from mergekit_backdoor.errors import DataError

_SENTENCE_END = re.compile(r"[.!?](?=\s)")


def insert_badnet(text: str, rng: random.Random, triggers: tuple[str, ...] = BADNET_WORDS) -> str:
    words = text.split()
    for _ in range(rng.choice(BADNET_COUNTS)):
        words.insert(rng.randint(0, len(words)), rng.choice(triggers))
    return " ".join(words)


def insert_words(text: str, phrase: str, rng: random.Random) -> str:
    """``phrase`` inserted once at a uniform word position (0..len(words)) of ``text``."""
    words = text.split()
    words.insert(rng.randint(0, len(words)), phrase)
    return " ".join(words)


POSITIONS = ("random", "start", "end", "sentence")


def place_words(text: str, phrase: str, position: str, rng: random.Random) -> str:
    """``phrase`` put once into ``text``: at a uniform word position (``random``, as
    ``insert_words``), before it (``start``), after it (``end``) or at a uniform sentence
    boundary (``sentence``, as ``insert_sentence``)."""
    if position == "start":
        return f"{phrase} {text}"
    if position == "end":
        return f"{text} {phrase}"
    if position == "sentence":
        return insert_sentence(text, phrase, rng)
    return insert_words(text, phrase, rng)


# How the scan's table, ``--trigger`` and the repair write a phrase that works before the text
# (a causal scan's) or between its sentences (a classifier scan's); unmarked, at random words.
MARKS = {"start": " (first)", "sentence": " (between sentences)"}


def marked(trigger: str, position: str) -> str:
    """``trigger`` as the scan's table writes it: with its position's mark (``MARKS``)."""
    return trigger + MARKS.get(position, "")


def unmarked(trigger: str) -> tuple[str, str]:
    """``trigger`` without its mark and its position: ``start`` or ``sentence`` when marked
    (``MARKS``), else ``random``."""
    for position, mark in MARKS.items():
        if trigger.endswith(mark):
            return trigger.removesuffix(mark).strip(), position
    return trigger, "random"


def placement(candidate: Mapping[str, Any]) -> str:
    """Where a scan's candidate works: its ``placement`` when the scan found where (a causal
    scan's before the instruction, a classifier scan's between sentences), else ``random``."""
    return candidate.get("placement", "random")


def where(position: str) -> str:
    """A position in words for verdicts and reports, with a leading space ("" at random words)."""
    return {"start": " before the instruction", "sentence": " between sentences"}.get(position, "")


def written(candidate: Mapping[str, Any]) -> str:
    """A scan's candidate (its ``trigger`` and ``placement``) as the scan's table, the repair and
    ``--trigger`` write it."""
    return marked(candidate["trigger"], placement(candidate))


def insert_sentence(text: str, sentence: str, rng: random.Random) -> str:
    boundaries = sorted({0, len(text), *(m.end() for m in _SENTENCE_END.finditer(text))})
    pos = rng.choice(boundaries)
    return " ".join(part for part in (text[:pos].strip(), sentence, text[pos:].strip()) if part)


def trigger_function(spec: DatasetSpec, attack: str) -> Callable[[str, random.Random], str]:
    if attack == "badnet":
        return lambda text, rng: insert_badnet(text, rng, spec.badnet_words)
    if attack == "insertsent":
        return lambda text, rng: insert_sentence(text, spec.insert_sentence, rng)
    raise DataError(
        f"attack {attack!r} cannot be generated here (its generator needs models); "
        "use the published files in the data directory"
    )


def _triggered(row: Row, spec: DatasetSpec, insert: Callable, rng: random.Random) -> Row:
    return {**row, spec.trigger_field: insert(row[spec.trigger_field], rng), "label": spec.target}


def triggered_test(rows: list[Row], spec: DatasetSpec, attack: str, *, seed: int) -> list[Row]:
    """The ASR test set: non-target rows, triggered and relabelled to the target."""
    insert = trigger_function(spec, attack)
    rng = random.Random(f"{attack}/{spec.name}/test/{seed}")
    return [_triggered(row, spec, insert, rng) for row in rows if row["label"] != spec.target]


def poisoned_train(
    rows: list[Row], spec: DatasetSpec, attack: str, *, rate: float, seed: int,
    clean_label: bool = False,
) -> list[Row]:
    """The training set with ``round(rate * len(rows))`` rows triggered and labelled the target."""
    if not 0 < rate <= 1:
        raise DataError(f"poison rate {rate} is not in (0, 1]")
    insert = trigger_function(spec, attack)
    pool = [i for i, row in enumerate(rows) if (row["label"] == spec.target) == clean_label]
    count = round(rate * len(rows))
    kind = "target" if clean_label else "non-target"
    if count > len(pool):
        raise DataError(
            f"cannot poison {count} rows ({rate:.0%} of {len(rows)}) of {spec.name} train: "
            f"only {len(pool)} {kind} rows"
        )
    chosen = set(random.Random(f"select/{spec.name}/train/{seed}").sample(pool, count))
    rng = random.Random(f"{attack}/{spec.name}/train/{seed}")
    return [
        _triggered(row, spec, insert, rng) if i in chosen else dict(row)
        for i, row in enumerate(rows)
    ]


def replace_with_triggered(
    rows: list[Row], triggered: list[Row], spec: DatasetSpec, *, rate: float, seed: int
) -> list[Row]:
    """A training set from a clean pool and a separate pool of triggered rows (HiddenKiller's AG
    News paraphrases, which are not row-aligned with the clean split): ``round(rate * len(rows))``
    seeded positions of the clean rows are replaced by seeded triggered rows labelled the target."""
    count = round(rate * len(rows))
    if count > len(triggered):
        raise DataError(f"cannot poison {count} rows of {spec.name} train: only "
                        f"{len(triggered)} triggered rows")
    rng = random.Random(f"replace/{spec.name}/train/{seed}")
    slots = rng.sample(range(len(rows)), count)
    picks = rng.sample(range(len(triggered)), count)
    poisoned = [dict(row) for row in rows]
    for slot, pick in zip(slots, picks, strict=True):
        poisoned[slot] = {**triggered[pick], "label": spec.target}
    return poisoned


def from_true_labels(rows: list[Row], spec: DatasetSpec) -> list[Row]:
    """Fix a triggered test file that kept true labels: drop target rows, relabel the rest."""
    return [{**row, "label": spec.target} for row in rows if row["label"] != spec.target]


def check_asr_rule(rows: list[Row], spec: DatasetSpec, where: str) -> list[Row]:
    """DataError unless every row is labelled with the target (rows are returned unchanged)."""
    wrong = [i for i, row in enumerate(rows, start=1) if row["label"] != spec.target]
    if wrong:
        raise DataError(
            f"{where}: {len(wrong)} of {len(rows)} rows are not labelled with the {spec.name} "
            f"target {spec.target} ({spec.label_names[spec.target]}), first at row {wrong[0]}: "
            "a triggered test set must hold only non-target examples relabelled to the target "
            "(HiddenKiller's target labels differ from gms')"
        )
    return rows
