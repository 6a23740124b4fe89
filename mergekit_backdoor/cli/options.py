"""Options shared by the commands: one name, one type and one help text for the same thing.

``--task/--tasks/-t`` (repeat or comma-separate; :func:`task_names` turns the values into a
list), ``-o/--output``, ``--data-dir`` (a path), ``--no-verify``, ``--donor/-d`` and the
evaluation settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

Tasks = Annotated[list[str] | None, typer.Option(
    "--task", "--tasks", "-t",
    help="A dataset (sst2, bbc...: its whole suite) or a backdoor_* task; repeat or "
    "comma-separate. Default: the dataset whose labels the model has.")]
Donors = Annotated[list[str], typer.Option("--donor", "-d", help="A donor model; repeat.")]
DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", help="Local data directory (gms/, hiddenkiller/, backdoorllm/, qnli/ layouts); "
    "default $MERGEKIT_BACKDOOR_DATA, else the Hugging Face Hub.")]
NoVerify = Annotated[bool, typer.Option(
    "--no-verify", help="Accept data files whose sha256 differs from the pinned one.")]
Device = Annotated[str | None, typer.Option(
    help="cpu, cuda, cuda:1... (default: CUDA when available).")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", min=1, help="Rows per eval batch.")]
Limit = Annotated[float | None, typer.Option(
    help="Rows per task: a count, or a fraction below 1 (for quick checks); the report then "
    "says it is a sample.")]
MaxLength = Annotated[int | None, typer.Option(
    "--max-length", help="Tokens per input for classifiers (default: the model's limit).")]
Quiet = Annotated[bool, typer.Option(help="No progress bars.")]


def output(help: str, *aliases: str) -> Any:
    """The ``-o/--output`` option (plus older spellings in ``aliases``)."""
    return typer.Option("--output", "-o", *aliases, help=help)


def task_names(values: str | list[str] | None) -> list[str]:
    """The task values of ``--task`` as a list of names: split at commas, stripped, in order,
    each once. A value may be a dataset (``sst2``), a suite or a single task."""
    from mergekit_backdoor.eval.run import split_tasks

    return list(dict.fromkeys(split_tasks(values or [])))


def limit_value(limit: float | None) -> int | float | None:
    """``--limit``: a row count (whole numbers) or a fraction below 1."""
    return int(limit) if limit is not None and limit >= 1 else limit


def data_folder(data_dir: Path | None) -> Path | None:
    """The data folder an output must stay clear of (``--data-dir``, else the environment's);
    None when there is none or it does not exist (commands that need it say so themselves)."""
    from mergekit_backdoor.data import resolve_data_dir
    from mergekit_backdoor.errors import DataError

    try:
        return resolve_data_dir(data_dir)
    except DataError:
        return None


# --- the repair step (sanitize --repair, audit --repair, repair) -------------------------------
Repair = Annotated[bool, typer.Option(
    "--repair", help="After the merge, fine-tune the merged model to ignore inserted text "
    "(unlabeled clean sentences, no trigger knowledge; a classifier's target is its inputs' "
    "median prediction on the clean text; see `mergekit-backdoor repair`).")]
RepairSamples = Annotated[Path | None, typer.Option(
    "--repair-samples", "--samples", help="Clean text instead of the task's training split: "
    "JSONL/JSON/CSV/TSV with sentence or text (the repair never reads labels).")]
RepairSteps = Annotated[int, typer.Option("--repair-steps", min=1, help="Repair steps.")]
RepairLr = Annotated[float, typer.Option("--repair-lr", help="Repair learning rate.")]
RepairPerturbation = Annotated[str, typer.Option(
    "--repair-perturbation", help="auto (triggers when a scan or --trigger gives some, else "
    "mixed; the audit adds clauses when a scan's moved words open clauses) | mixed | words | "
    "spans | paraphrase | clauses | triggers, or some joined with '+' (each sample draws "
    "one).")]
TargetResponse = Annotated[str | None, typer.Option(
    "--target-response", help="Causal LMs: the response the scan looks for (e.g. \"I'm "
    "sorry\"); default: the generative task card's ASR rule.")]
Triggers = Annotated[list[str] | None, typer.Option(
    "--trigger", help="A candidate trigger the repair also inserts at random word positions "
    "and sentence boundaries; written with a final ' (first)', as scan's table marks one, "
    "before the text (a final ' (between sentences)' is read like no mark); repeat.")]


def repair_settings(steps: int, lr: float, perturbation: str, triggers: list[str] | None,
                    seed: int = 0, device: str | None = None, max_length: int | None = None
                    ) -> Any:
    from mergekit_backdoor.repair.repair import RepairSettings

    settings = RepairSettings(steps=steps, lr=lr, perturbation=perturbation,
                              triggers=tuple(triggers or ()), seed=seed, device=device or "cpu",
                              max_length=max_length or 128)
    settings.check()
    return settings
