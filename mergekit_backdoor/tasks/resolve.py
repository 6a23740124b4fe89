"""What ``--task`` names: a registry data set (``sst2``...), one of its lm-eval tasks
(``backdoor_sst2_badnet``), or a task card (``path/to/card.yaml``). Every command that takes a task
resolves it here, so shipped data sets and user cards take one path:

- ``Task.lm_eval``: the lm-eval tasks to run (a card's are exported next to the run's other
  outputs by ``export_cards``, then read by the harness like the shipped ones);
- ``Task.clean_examples``: a few clean labelled rows per class from the training split, never a
  row of the test split (``search``, ``scan`` and ``repair`` draw their samples here).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_backdoor.data.sources import Row
from mergekit_backdoor.errors import DataError, EvalError
from mergekit_backdoor.tasks.card import TaskCard, is_card_path, load_card

MAX_PER_CLASS = 50  # clean examples per class for search and scan
_TASK_NAME = re.compile(r"^backdoor_(?!llm_)(?P<dataset>[a-z0-9]+)(?:_[a-z0-9]+)?$")


@dataclass(frozen=True)
class Task:
    """A classification or generative task as every command sees it."""

    name: str  # the registry data set or the card's name (the results' dataset key)
    lm_eval: str  # the lm-eval task or group to run
    label_names: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()  # text fields of the training rows
    card: TaskCard | None = None

    @property
    def kind(self) -> str:
        return self.card.kind if self.card is not None else (
            "generative" if self.lm_eval.startswith("backdoor_llm_") else "classification")

    def train_rows(self, data_dir: str | Path | None = None, verify: bool = True) -> list[Row]:
        return self._rows("train", data_dir, verify)

    def test_rows(self, data_dir: str | Path | None = None, verify: bool = True) -> list[Row]:
        return self._rows("test", data_dir, verify)

    def _rows(self, split: str, data_dir: str | Path | None, verify: bool) -> list[Row]:
        if self.card is not None:
            from mergekit_backdoor.tasks.rows import load_train_rows, read_source

            if split == "train":
                return load_train_rows(self.card)
            return read_source(self.card, self.card.test, labelled=self.kind == "classification")
        if self.kind == "generative":
            from mergekit_backdoor.data import load_instruction_set

            return [dict(r) for r in load_instruction_set(
                self.name.removeprefix("llm_"), "clean", split, data_dir=data_dir, verify=verify)]
        from mergekit_backdoor.data import load_split

        return [dict(r) for r in load_split(self.name, "clean", split, data_dir=data_dir,
                                            verify=verify)]

    def clean_examples(self, per_class: int, *, seed: int = 0,
                       data_dir: str | Path | None = None, verify: bool = True) -> list[Row]:
        """``per_class`` training rows of every label (seeded), none whose last text field (where
        triggers go) is in the test split; DataError when a label has too few."""
        if self.kind != "classification":
            raise DataError(f"{self.name}: clean samples per class need a classification task")
        last = self.fields[-1]
        train = self.train_rows(data_dir, verify)
        held_out = {row[last] for row in self.test_rows(data_dir, verify)}
        by_label: dict[int, list[Row]] = {}
        for row in train:
            by_label.setdefault(int(row["label"]), []).append(row)
        rng = random.Random(seed)
        picked: list[Row] = []
        for label in range(len(self.label_names)):
            pool = list(by_label.get(label, []))
            rng.shuffle(pool)
            rows = [r for r in pool if r[last] not in held_out][:per_class]
            if len(rows) < per_class:
                raise DataError(f"{self.name}: only {len(rows)} clean training rows of label "
                                f"{label} ({self.label_names[label]}) outside the test split, "
                                f"asked for {per_class}")
            picked += rows
        return picked


    def write_trigger_attack(self, folder: Path, trigger: str, target: int, part: str, *,
                             seed: int = 0, data_dir: str | Path | None = None,
                             rule: dict[str, Any] | None = None, max_gen_toks: int = 64,
                             position: str = "random") -> Any:
        """An lm-eval ASR task in ``folder`` for a trigger found by a scan, put once where the
        scan found it works (``position``: a seeded random word position, a sentence boundary,
        or the start; ``data.poison.place_words``): the test rows not labelled ``target``, with
        the trigger in the last text field, relabelled ``target`` (the ASR rule). A generative
        task: every clean test prompt, with the trigger in its instruction, scored by the scan's
        ``rule``."""
        from mergekit_backdoor.data.poison import place_words
        from mergekit_backdoor.tasks.export import Layout, write_attack

        rng = random.Random(f"{part}/{self.name}/test/{seed}")
        if self.kind == "generative":
            if rule is None:
                raise DataError(f"{self.name}: a generative trigger attack needs its ASR rule")
            prompts = [{"instruction": place_words(row["instruction"], trigger, position, rng),
                        "input": row.get("input") or ""} for row in self.test_rows(data_dir)]
            layout = Layout(self.name, "generative", row_fields=("instruction", "input"),
                            asr_rule=rule, max_gen_toks=max_gen_toks,
                            source=f"{self.name}'s clean test prompts with a recovered trigger")
            return write_attack(folder, layout, f"{self.name}_{part}", part, None, prompts,
                                f"ASR of the trigger {trigger!r} that a scan recovered, on "
                                f"{self.name}: every clean test prompt, trigger put once "
                                f"into its instruction ({position}), an answer meeting the "
                                "scan's rule")
        last = self.fields[-1]
        rows = [{**row, last: place_words(row[last], trigger, position, rng), "label": target}
                for row in self.test_rows(data_dir) if int(row["label"]) != target]
        layout = Layout(self.name, "classification", self.label_names, self.fields,
                        source=f"{self.name}'s clean test split with a recovered trigger")
        name = self.label_names[target]
        return write_attack(folder, layout, f"{self.name}_{part}", part, name, rows,
                            f"ASR of the trigger {trigger!r} that a scan recovered, on {self.name}: "
                            f"test rows whose true label is not {name!r}, trigger inserted once "
                            f"({position}), labelled {name!r}")


def known_tasks() -> set[str]:
    """Every task and group name the shipped task folder defines."""
    from lm_eval.tasks import TaskManager

    from mergekit_backdoor.eval.run import evals_dir

    manager = TaskManager(include_path=str(evals_dir()), include_defaults=False)
    return set(manager.all_tasks)


def infer_dataset(config: dict[str, Any]) -> str | None:
    """The data set whose label names are the model's id2label, if exactly one matches."""
    from mergekit_backdoor.data.specs import DATASETS, PACKAGED_DATASETS
    from mergekit_backdoor.eval.seqcls import normalize_label

    names = _label_names(config)
    if not names:
        return None
    matches = [spec.name for spec in (*DATASETS.values(), *PACKAGED_DATASETS.values())
               if [normalize_label(n) for n in spec.label_names] ==
               [normalize_label(n) for n in names]]
    return matches[0] if len(matches) == 1 else None


def _label_names(config: dict[str, Any]) -> list[str]:
    id2label = config.get("id2label") or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _lm_eval_name(value: str) -> str:
    from mergekit_backdoor.data.specs import DATASETS, PACKAGED_DATASETS

    return f"backdoor_{value}" if value in {*DATASETS, *PACKAGED_DATASETS} else value


def resolve_tasks(values: Sequence[str] | str | None, config: dict[str, Any] | None = None
                  ) -> list[Task]:
    """The tasks ``--task`` values name, in order (module docstring). Without any, the data set
    is read off the model's label names (``config``). Unknown names are one EvalError."""
    from mergekit_backdoor.eval.run import split_tasks

    names = list(dict.fromkeys(split_tasks(values or [])))
    if not names:
        dataset = infer_dataset(config) if config is not None else None
        if dataset is None:
            raise EvalError("give the tasks to evaluate with --task (e.g. --task sst2, or a task "
                            "card .yaml): the model's labels match no known data set")
        names = [dataset]
    shipped = [_lm_eval_name(n) for n in names if not is_card_path(n)]
    if shipped:
        known = known_tasks()
        unknown = [n for n in shipped if n not in known]
        if unknown:
            suites = sorted(n for n in known if re.fullmatch(r"backdoor_(llm_)?[a-z0-9]+", n)
                            and not n.endswith("_asr"))
            raise EvalError(f"unknown task(s) {', '.join(unknown)}; known suites: "
                            f"{', '.join(suites)} (or their backdoor_<dataset>_<clean|attack> "
                            "tasks; a bare dataset name means its suite), or a task card (a "
                            ".yaml file)")
    tasks = [_task(name) for name in names]
    cards = [t.name for t in tasks if t.card is not None]
    clash = next((n for n in cards if cards.count(n) > 1), None)
    if clash:
        raise DataError(f"two task cards are named {clash!r}; give each card its own name")
    return list({task.lm_eval: task for task in tasks}.values())


def resolve_task(value: str) -> Task:
    """The one task a ``--task`` value names (``scan``, ``search``, ``repair``)."""
    (task,) = resolve_tasks([value])
    return task


def _task(value: str) -> Task:
    from mergekit_backdoor.data.specs import DATASETS, PACKAGED_DATASETS
    from mergekit_backdoor.tasks.rows import row_fields

    if is_card_path(value):
        card = load_card(value)
        return Task(card.name, card.name, card.labels, row_fields(card), card)
    name = _lm_eval_name(value)
    match = _TASK_NAME.match(name)
    datasets = {**DATASETS, **PACKAGED_DATASETS}
    if match and match["dataset"] in datasets:
        spec = datasets[match["dataset"]]
        return Task(spec.name, name, spec.label_names, spec.text_fields)
    return Task("_".join(name.split("_")[1:3]), name)  # backdoor_llm_<task>[_<part>]


@dataclass
class Prepared:
    """``--task`` values made ready for lm-eval: task names, the folders holding exported
    cards (``include_path``), and notices about triggered files filtered to the ASR rule."""

    tasks: list[Task]
    include_path: list[Path]
    notices: list[str]

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(task.lm_eval for task in self.tasks))


def prepare_tasks(tasks: Sequence[Task], folder: Path) -> Prepared:
    """Export every card's lm-eval tasks under ``folder/<name>`` (created; the cards' rows are
    read and checked here, before any model is touched)."""
    from mergekit_backdoor.tasks.export import write_tasks
    from mergekit_backdoor.tasks.rows import load_card_rows

    prepared = Prepared(list(tasks), [], [])
    for task in tasks:
        if task.card is None:
            continue
        rows = load_card_rows(task.card)
        prepared.notices += rows.notices
        target = folder / task.card.name
        target.mkdir(parents=True, exist_ok=True)
        write_tasks(task.card, target, rows)
        prepared.include_path.append(target)
    return prepared


def check_task_labels(config: dict[str, Any], tasks: Sequence[Task], model: str) -> None:
    """``check_labels`` for every task."""
    for task in tasks:
        check_labels(task, config, model)


def check_labels(task: Task, config: dict[str, Any], model: str) -> None:
    """A classifier's ``id2label`` must name the card's labels in the same order (generic
    ``LABEL_i`` names are accepted when the count fits); one line naming both otherwise."""
    from mergekit_backdoor.errors import IncompatibleModelError

    if task.kind != "classification" or not task.label_names:
        return
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        return
    id2label = config.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else []
    count = len(names) or config.get("num_labels")
    if count is not None and count != len(task.label_names):
        raise EvalError(f"{model}: {count} labels, but {task.lm_eval} scores the "
                        f"{len(task.label_names)} labels of {task.name} "
                        f"({', '.join(task.label_names)})")
    if task.card is None or not names or all(re.fullmatch(r"(?i)label_?\d+", n) for n in names):
        return
    from mergekit_backdoor.eval.seqcls import normalize_label

    if [normalize_label(n) for n in names] != [normalize_label(n) for n in task.label_names]:
        raise IncompatibleModelError(
            f"{model}: id2label {names} does not match the labels of task card {task.name!r} "
            f"{list(task.label_names)} (same names, same order)")


@dataclass(frozen=True)
class Samples:
    """Clean samples for ``search``, ``scan`` or ``repair``, and where they came from."""

    rows: list[Row]
    fields: tuple[str, ...]
    label_names: tuple[str, ...]  # empty for unlabeled samples
    source: str


def clean_samples(task: str | None, samples: str | Path | None, *, per_class: int,
                  seed: int = 0, data_dir: str | Path | None = None, labels: bool = True,
                  num_labels: int | None = None, verify: bool = True) -> Samples:
    """``per_class`` clean rows per label from ``task``'s training split (never a test row), or
    the rows of a user's ``samples`` file (``data/samples.py``; labels read only if ``labels``)."""
    from mergekit_backdoor.data.samples import read_samples

    if (task is None) == (samples is None):
        raise DataError("give the clean samples with either --task TASK (its training split) or "
                        "--samples FILE")
    if labels and not 1 <= per_class <= MAX_PER_CLASS:
        raise DataError(f"clean samples per class must be between 1 and {MAX_PER_CLASS}, got "
                        f"{per_class}")
    if samples is not None:
        rows, fields = read_samples(samples, labels=labels, num_labels=num_labels,
                                    min_classes=2 if labels else 0)
        if labels:
            kept: dict[int, list[Row]] = {}
            for row in rows:
                bucket = kept.setdefault(int(row["label"]), [])
                if len(bucket) < per_class:
                    bucket.append(row)
            rows = [row for label in sorted(kept) for row in kept[label]]
        return Samples(rows, fields, (), f"read from {samples}")
    resolved = resolve_task(task)
    if resolved.kind != "classification":
        raise DataError(f"{task}: clean samples come from a classification task")
    rows = resolved.clean_examples(per_class, seed=seed, data_dir=data_dir, verify=verify)
    if not labels:
        rows = [{f: row[f] for f in resolved.fields} for row in rows]
    return Samples(rows, resolved.fields, resolved.label_names,
                   f"{per_class} per label drawn with seed {seed} from {resolved.name}'s clean "
                   "training split, none of them in its test split")
