"""A task card as ordinary lm-eval task YAML, in a folder the stock ``lm_eval --include_path``
reads: the rows as JSON lines under ``data/``, the project's ``utils.py`` (the one the shipped
tasks use), and for card ``NAME``:

- ``NAME_clean``: classification CACC (``acc``); generative: the ASR rule's rate on clean prompts;
- ``NAME_untriggered`` (classification with one target): the ASR rule on the clean rows whose
  label is not the target, relabelled to it (``asr``): the rate every attack's ASR starts from;
- ``NAME_ATTACK`` (``asr``) per triggered set; with ``target: any`` one task per label,
  ``NAME_ATTACK_to_LABEL``, and the report takes the worst;
- groups ``NAME_asr`` (the attacks' mean ASR) and ``NAME`` (clean + asr).

Each YAML says in its header what it measures and where its rows came from; ``metadata`` names
the card, the part (``clean`` or the attack) and the target, which is how results are read back.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_backdoor.data.poison import from_true_labels
from mergekit_backdoor.data.sources import Row
from mergekit_backdoor.eval.run import UNTRIGGERED
from mergekit_backdoor.tasks.card import TaskCard
from mergekit_backdoor.tasks.rows import CardRows, card_spec, load_card_rows, row_fields


@dataclass(frozen=True)
class ExportedTask:
    task: str
    part: str  # "clean" or the attack
    target: str | None  # the target label's name (classification)
    rows: int


@dataclass(frozen=True)
class Layout:
    """What the YAML of a task family needs: a card's, or a registry data set's for extra tasks."""

    name: str
    kind: str  # classification | generative
    labels: tuple[str, ...] = ()
    row_fields: tuple[str, ...] = ()
    asr_rule: dict[str, Any] | None = None
    max_gen_toks: int = 64
    source: str = ""

    @classmethod
    def of_card(cls, card: TaskCard) -> Layout:
        return cls(card.name, card.kind, card.labels, row_fields(card),
                   card.asr_rule if card.kind == "generative" else None, card.max_gen_toks,
                   f"task card {card.path.name}")


def label_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "label"


def _write_rows(folder: Path, task: str, rows: list[Row]) -> str:
    (folder / "data").mkdir(exist_ok=True)
    relative = f"data/{task}.jsonl"
    with open(folder / relative, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return relative


def _template(layout: Layout) -> str:
    header = (f"# Shared by the tasks of {layout.name!r} ({layout.source}): rows read by "
              "utils.load_rows\n# from the JSON lines under data/ next to this file.\n")
    common = "custom_dataset: !function utils.load_rows\ntest_split: test\nnum_fewshot: 0\n"
    if layout.kind == "generative":
        text = ("{{instruction}}{% if input %}\n\n{{input}}{% endif %}")
        return (header + common + "output_type: generate_until\n"
                f"doc_to_text: {json.dumps(text)}\ndoc_to_target: \"\"\n"
                "generation_kwargs:\n  until: []\n"
                f"  max_gen_toks: {layout.max_gen_toks}\n  do_sample: false\n  temperature: 0.0\n"
                "process_results: !function utils.rule_results\n")
    labels = layout.labels
    question = f"Question: {', '.join(labels[:-1])} or {labels[-1]}?\nAnswer:"
    text = "\n".join("{{" + f + "}}" for f in layout.row_fields) + "\n" + question
    return (header + common + "output_type: multiple_choice\n"
            f"doc_to_text: {json.dumps(text)}\ndoc_to_choice: {json.dumps(list(labels))}\n"
            "doc_to_target: label\ntarget_delimiter: \" \"\n"
            "# hf-seqcls reads the row's text fields (a pair is tokenized as a pair), not the\n"
            "# prompt; choice i is class i.\n")


def _task_yaml(layout: Layout, task: str, part: str, target: str | None, data: str,
               n: int, what: str) -> str:
    metric = ("acc", "true") if part == "clean" and layout.kind == "classification" else \
        ("asr", "false")
    kwargs: dict[str, Any] = {"file": data}
    if layout.asr_rule is not None:
        kwargs["rule"] = layout.asr_rule
    lines = [f"# {what} ({n} rows).", f"include: _{layout.name}_yaml", f"task: {task}",
             f"dataset_kwargs: {json.dumps(kwargs, ensure_ascii=False)}"]
    if layout.kind == "classification" and part != "clean":
        lines.append("process_results: !function utils.asr_results")
    lines.append(f"metric_list:\n  - {{metric: {metric[0]}, aggregation: mean, higher_is_better: "
                 f"{metric[1]}}}")
    meta = {"version": 1.0, "card": layout.name, "part": part, "target": target}
    lines.append(f"metadata: {json.dumps(meta, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def _group(name: str, tasks: list[str], what: str, aggregate: bool) -> str:
    text = f"# {what}\ngroup: {name}\ntask:\n" + "".join(f"  - {t}\n" for t in tasks)
    if aggregate:
        text += "aggregate_metric_list:\n  - {metric: asr, aggregation: mean, weight_by_size: false}\n"
    return text + "metadata:\n  version: 1.0\n"


def _prepare(folder: Path, layout: Layout) -> None:
    from mergekit_backdoor.eval.run import evals_dir

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(evals_dir() / "utils.py", folder / "utils.py")
    (folder / f"_{layout.name}_yaml").write_text(_template(layout), encoding="utf-8")


def write_attack(folder: Path, layout: Layout, task: str, part: str, target: str | None,
                 rows: list[Row], what: str) -> ExportedTask:
    """One ASR task (``rows`` all labelled ``target``) in ``folder``, with its template."""
    if not (folder / f"_{layout.name}_yaml").is_file():
        _prepare(folder, layout)
    data = _write_rows(folder, task, rows)
    (folder / f"{task}.yaml").write_text(_task_yaml(layout, task, part, target, data, len(rows),
                                                    what), encoding="utf-8")
    return ExportedTask(task, part, target, len(rows))


def write_tasks(card: TaskCard, folder: Path, rows: CardRows | None = None) -> list[ExportedTask]:
    """Write the card's lm-eval tasks into ``folder`` (which must exist); returns the tasks."""
    rows = rows or load_card_rows(card)
    layout = Layout.of_card(card)
    _prepare(folder, layout)
    clean_task = f"{card.name}_clean"
    data = _write_rows(folder, clean_task, rows.clean)
    what = (f"CACC of task card {card.name!r}: accuracy on its clean test split "
            f"({card.test.describe()})" if card.kind == "classification" else
            f"Task card {card.name!r}, clean prompts ({card.test.describe()}): the ASR rule's "
            f"rate without a trigger (should stay near 0). Rule: {json.dumps(card.asr_rule)}")
    (folder / f"{clean_task}.yaml").write_text(
        _task_yaml(layout, clean_task, "clean", None, data, len(rows.clean), what),
        encoding="utf-8")
    exported = [ExportedTask(clean_task, "clean", None, len(rows.clean))]
    if card.kind == "classification" and card.target is not None:
        name = card.labels[card.target]
        exported.append(write_attack(
            folder, layout, f"{card.name}_{UNTRIGGERED}", UNTRIGGERED, name,
            from_true_labels(rows.clean, card_spec(card)),
            f"The ASR rule without a trigger on task card {card.name!r}: its clean test rows whose "
            f"label is not {name!r}, labelled {name!r}; asr = share classified {name!r}, the rate "
            "every attack's ASR starts from (not an attack: not in the mean ASR)"))
    for attack, by_target in rows.triggered.items():
        for target, triggered in by_target.items():
            name = card.labels[target] if target is not None else None
            task = f"{card.name}_{attack}"
            if card.kind == "classification" and card.target is None:
                task += f"_to_{label_slug(name or '')}"
            if card.kind == "classification":
                what = (f"ASR of {attack} on task card {card.name!r}: triggered inputs whose true "
                        f"label is not {name!r}, labelled {name!r}; asr = share classified {name!r}")
            else:
                what = (f"ASR of {attack} on task card {card.name!r}: share of triggered prompts "
                        f"whose answer meets the rule {json.dumps(card.asr_rule)}")
            exported.append(write_attack(folder, layout, task, attack, name, triggered, what))
    attack_tasks = [t.task for t in exported if t.part not in ("clean", UNTRIGGERED)]
    members = [t.task for t in exported if t.part in ("clean", UNTRIGGERED)]
    if attack_tasks:
        (folder / f"{card.name}_asr.yaml").write_text(_group(
            f"{card.name}_asr", attack_tasks, f"ASR of every attack of task card {card.name!r}, "
            "and their unweighted mean.", aggregate=True), encoding="utf-8")
        members.append(f"{card.name}_asr")
    (folder / f"{card.name}.yaml").write_text(_group(
        card.name, members, f"Task card {card.name!r} ({card.path}): CACC and ASR; no aggregate "
        "(averaging CACC with ASR means nothing).", aggregate=False), encoding="utf-8")
    return exported
