"""What the audit adds to the merge, each capability from its own package:

- the **trigger scan** (``scan/``) of the suspect before merging, with the donors as references,
  and of the sanitized model after;
- each trigger the scan flags becomes an ordinary lm-eval attack task on the task's clean test
  split (``recovered_<trigger>``), so every model of the report is measured on it, the suspect's
  backdoor gets a before/after number even when nobody told us its trigger;
- the **repair** (``repair/``) of the merged model, with the task's clean training sentences (or
  the user's samples), the scan's suspicious candidates among its perturbations, and clean
  sentences recast as clauses when a scanned model's moved words are a syntactic template's
  openers.

Scans need clean training samples of the suspect's kind of task (a classifier: a
classification task; a causal LM: a generative one, and a response to look for); when there
are none (a card without a ``train`` split and no ``--samples``, no ``--target-response``) the
scan is skipped and the report says why. The repair draws its samples as the ``repair``
command does (a causal LM: clean prompts of the generative task or ``--samples``), before the
merge, and refuses to start without them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_backdoor.data.poison import placement, written
from mergekit_backdoor.errors import DataError
from mergekit_backdoor.tasks.resolve import Task

Log = Callable[[str], None]
REPAIR_SAMPLES = 300  # unlabeled clean sentences for the repair (a few hundred is enough)
# An unflagged label this close to the threshold still gives the repair its candidates: OLID's
# InsertSent victim scores 40 of 50 with its trigger's words; AG News' benign model, 27 with
# topic words (benchmarks/README.md, "Sanitizer v2"; chosen on those numbers).
NEAR_MISS = 0.75
# A scanned model whose moved words hold this many clause openers (``when``, ``if``, ...) gets
# the ``clauses`` recast in its repair: the SST-2 and OLID Hidden victims show 4 and 2, none of
# the benchmark's 12 other scanned models more than 1; on OLID the recast took Hidden's removal
# from 56-74% to 70-78% (benchmarks/README.md, "Sanitizer v2").
SIGNATURE_OPENERS = 2


@dataclass
class Defences:
    scan: bool = True
    repair: Any = None  # RepairSettings, or None for no repair
    samples: Path | None = None  # clean samples instead of the task's training split
    seed: int = 0
    target_response: str | None = None  # what a causal LM's scan looks for
    notes: list[str] = field(default_factory=list)


def scan_task(tasks: Sequence[Task], causal: bool = False) -> Task | None:
    """The task whose clean samples the scan and the repair use: the first classification one,
    or for a causal LM the first generative one."""
    if causal:
        return next((t for t in tasks if t.kind == "generative"), None)
    return next((t for t in tasks if t.kind == "classification" and t.label_names), None)


def _task_value(task: Task) -> str:
    """What ``resolve_task`` reads back as ``task`` (an LLM task's name lacks its prefix)."""
    if task.card is not None:
        return str(task.card.path)
    return task.name if task.kind == "classification" else task.lm_eval


def scan_model(model: str | Path, references: Sequence[str], task: Task | None,
               defences: Defences, *, device: str | None, max_length: int | None,
               data_dir: str | None, progress: bool, log: Log) -> dict[str, Any] | None:
    """``scan.run_scan`` of ``model`` (None, with a note, when it cannot run)."""
    from mergekit_backdoor.scan.scan import ScanSettings, run_scan

    if task is None:
        defences.notes.append("scan skipped: no task of the model's kind to draw clean samples "
                              "from")
        return None
    if task.kind == "generative" and defences.target_response is None and (
            task.card is None or task.card.asr_rule is None):
        defences.notes.append("scan skipped: a causal LM is scanned for a response you fear: "
                              "give --target-response TEXT")
        return None
    settings = ScanSettings(seed=defences.seed, device=device or "cpu",
                            max_length=max_length or 128)
    try:
        return run_scan(model, references=references,
                        task=None if defences.samples else _task_value(task),
                        samples=defences.samples, settings=settings, data_dir=data_dir,
                        target_response=defences.target_response, progress=progress, log=log)
    except DataError as exc:
        if defences.samples is not None:
            raise
        defences.notes.append(f"scan skipped: {exc} (give clean samples with --samples FILE)")
        return None


def _flagged_labels(scan: dict[str, Any]) -> list[dict[str, Any]]:
    """The labels of ``scan`` whose score reached the threshold with a candidate."""
    return [e for e in scan["labels"] if e["candidates"] and e["score"] >= scan["threshold"]]


def flagged(scan: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The top candidate of every label whose score reached the threshold."""
    if scan is None:
        return []
    return [{"trigger": entry["candidates"][0]["trigger"], "label": entry["label"],
             "label_name": entry["name"], "score": entry["score"],
             "position": placement(entry["candidates"][0])}
            for entry in _flagged_labels(scan)]


def repair_triggers(scan: dict[str, Any] | None) -> list[str]:
    """The candidates a repair inserts: those scoring at least half the threshold (variants of
    one trigger teach more than its best form alone) of every flagged label. With references and
    no label flagged, also those of a near miss: the top label when it scores at least
    ``NEAR_MISS`` of the threshold. Below that, or beside a flagged label, high scorers were
    the task's own features on the benchmark (AG News' topic words), and teaching the model to
    ignore them cost 1.3-3.4 points of clean accuracy (benchmarks/README.md, "Sanitizer v2").
    Without references only flagged labels count: a natural feature (a swear word) scores high
    there. A causal scan's candidate that works before the instruction is marked ``(first)``, so
    the repair puts it there. These rules read a classifier candidate's score at random words
    (``repair_score``), where they were calibrated."""
    if scan is None:
        return []
    threshold = scan["threshold"]
    scored = [(max((repair_score(c) for c in e["candidates"]), default=0.0), e)
              for e in scan["labels"]]
    labels = [e for score, e in scored if e["candidates"] and score >= threshold]
    if not labels and scan["references"] and scored:
        score, top = max(scored, key=lambda item: item[0])
        labels = [top] if score >= NEAR_MISS * threshold else []
    return [written(c) for e in labels
            for c in e["candidates"] if repair_score(c) >= threshold / 2]


def repair_score(candidate: dict[str, Any]) -> float:
    """A candidate's score for the repair's choice: a classifier scan's at random word
    positions even where it scored higher between sentences. Between sentences every model
    moves more, and the benign models' too: SST-2's rose from 28 to 45, a near miss whose
    sentiment words then diluted the trigger's in the repair (after the WAG pair of the benign
    and InsertSent models, 23.2% -> 31.8% ASR; benchmarks/README.md, "Scan")."""
    if placement(candidate) == "sentence":
        return candidate["by_placement"]["random"]["score"]
    return candidate["score"]


def syntactic_signature(scan: dict[str, Any] | None) -> list[str]:
    """The clause openers among ``scan``'s moved words when there are at least
    ``SIGNATURE_OPENERS`` of them (else none): the mark a syntactic-paraphrase trigger leaves."""
    from mergekit_backdoor.repair.perturb import CLAUSE_OPENERS

    words = [w.lstrip("Ġ▁").lower() for w in (scan or {}).get("moved_words", [])]
    found = [w for w in words if w in CLAUSE_OPENERS]
    return found if len(found) >= SIGNATURE_OPENERS else []


def clause_openers(scans: Sequence[dict[str, Any] | None]) -> list[str]:
    """Every scan's ``syntactic_signature``, each opener once."""
    return list(dict.fromkeys(w for scan in scans for w in syntactic_signature(scan)))


def recast_reason(openers: Sequence[str]) -> str:
    """Why the repair recasts clauses, for the log and the report."""
    return (f"the scans' moved words {', '.join(openers)} open clauses, the mark of a syntactic "
            "trigger: the repair recasts clean sentences as clauses too")


def repair_perturbation(family: str, triggers: Sequence[str], openers: Sequence[str]) -> str:
    """``family``, or with ``auto`` and the scans' ``clause_openers``, the same with the
    ``clauses`` recast joined to it: ``triggers+clauses``, or without candidates
    ``words+spans+paraphrase+clauses``."""
    if family != "auto" or not openers:
        return family
    return "triggers+clauses" if triggers else "words+spans+paraphrase+clauses"


def recovered_tasks(scan: dict[str, Any] | None, task: Task | None, folder: Path, *,
                    seed: int, data_dir: str | None) -> list[dict[str, Any]]:
    """An lm-eval attack task for every flagged trigger, written under ``folder``."""
    from mergekit_backdoor.tasks.export import label_slug

    out = []
    for found in flagged(scan):
        assert task is not None and scan is not None
        part = f"recovered_{label_slug(found['trigger'])}"
        exported = task.write_trigger_attack(folder, found["trigger"], found["label"], part,
                                             seed=seed, data_dir=data_dir, rule=scan.get("rule"),
                                             max_gen_toks=scan.get("max_new_tokens", 64),
                                             position=found["position"])
        out.append({**found, "part": part, "dataset": task.name, "task": exported.task,
                    "rows": exported.rows})
    return out


def repair_samples(suspect: str | Path, task: Task | None, defences: Defences, *,
                   data_dir: str | None) -> Any:
    """The repair's clean samples (``repair.repair_samples``, as the ``repair`` command draws
    them) from ``task`` (``scan_task``'s) or the user's ``--samples``; drawn before the merge,
    so a bad file fails before any work."""
    from mergekit_backdoor.repair.repair import repair_samples as draw
    from mergekit_backdoor.scan.scan import is_causal

    if task is None and defences.samples is None:
        kind = "generative" if is_causal(suspect) else "classification"
        raise DataError(f"the repair needs clean samples: a {kind} --task with a training "
                        "split, or --samples FILE")
    drawn = draw(suspect, None if defences.samples else _task_value(task), defences.samples,
                 count=REPAIR_SAMPLES, seed=defences.seed, data_dir=data_dir)
    return dataclasses.replace(drawn, rows=drawn.rows[:REPAIR_SAMPLES])


def repair(merged: Path, out: Path, samples: Any, defences: Defences, triggers: Sequence[str],
           scans: Sequence[dict[str, Any] | None], *, teachers: Sequence[str] = (),
           progress: bool, log: Log) -> dict[str, Any]:
    """Repair the merged model into ``out`` with ``samples`` (``repair_samples``) towards
    ``teachers``' median (the merge's inputs; ``repair.repair_model``), inserting ``triggers`` and
    recasting clauses when ``scans`` show a syntactic signature."""
    from mergekit_backdoor.repair.repair import repair_to

    triggers = (*defences.repair.triggers, *triggers)
    openers = clause_openers(scans)
    family = repair_perturbation(defences.repair.perturbation, triggers, openers)
    settings = dataclasses.replace(defences.repair, triggers=triggers, perturbation=family)
    if family == defences.repair.perturbation:
        openers = []
    else:
        log(f"{recast_reason(openers)} ({family})")
    log(f"repairing the merged model: {settings.steps} steps on {len(samples.rows)} clean samples"
        + (f" towards the median of its {len(teachers)} inputs" if teachers else "")
        + (f", candidate triggers {', '.join(triggers)}" if triggers else ""))
    summary = repair_to(merged, samples.rows, samples.fields, out, settings=settings,
                        teachers=teachers, samples_note=samples.source, progress=progress)
    return {**summary, "clause_openers": openers} if openers else summary


def summary(scan: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the report keeps of a scan (the whole scan is saved next to it)."""
    if scan is None:
        return None
    return {"verdict": scan["verdict"], "score": scan["score"], "threshold": scan["threshold"],
            "score_rule": scan["score_rule"], "references": scan["references"],
            "samples": scan["samples"], "seconds": scan["seconds"],
            "top": [{"label": e["name"], "trigger": e["candidates"][0]["trigger"] if
                     e["candidates"] else None, "score": e["score"]} for e in scan["labels"]]}
