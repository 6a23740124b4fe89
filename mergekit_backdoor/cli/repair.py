"""CLI command ``repair``: repair a (merged) classifier without labels or trigger knowledge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_backdoor.cli import app
from mergekit_backdoor.cli.options import (
    DataDir,
    Quiet,
    RepairLr,
    RepairPerturbation,
    RepairSamples,
    RepairSteps,
    Triggers,
    output,
    repair_settings,
)
from mergekit_backdoor.repair.repair import DEFAULT_LR, DEFAULT_PERTURBATION, DEFAULT_STEPS


@app.command("repair")
def repair_command(
    model: Annotated[str, typer.Argument(help="The model to repair (e.g. a merge written by "
                                              "mergekit-yaml).")],
    out: Annotated[Path, output("Folder for the repaired model.")],
    task: Annotated[str | None, typer.Option(
        "--task", "-t", help="Draw clean sentences from this task's training split (a data set "
        "such as sst2, or a task card .yaml).")] = None,
    samples: RepairSamples = None,
    steps: RepairSteps = DEFAULT_STEPS,
    lr: RepairLr = DEFAULT_LR,
    perturbation: RepairPerturbation = DEFAULT_PERTURBATION,
    trigger: Triggers = None,
    teacher: Annotated[list[str] | None, typer.Option(
        "--teacher", help="A model MODEL was merged from (a folder, or a hub id with an optional "
        "@revision); repeat for each. The target on clean "
        "text becomes their per-sample median prediction instead of MODEL's own, as in "
        "sanitize --repair and audit --repair (classifiers).")] = None,
    count: Annotated[int, typer.Option(min=1, max=1000, help="Clean sentences drawn from the "
                                                            "task.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the draw, the perturbations and training.")
                    ] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    max_length: Annotated[int, typer.Option("--max-length", min=16, help="Tokens per input.")
                          ] = 128,
    data_dir: DataDir = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune MODEL so that inserted text stops moving its predictions (no labels read).

    Inserted text: random words, spans of other clean sentences, paraphrase-like edits and any
    --trigger; the target is MODEL's own prediction on the clean sentence, or the median of the
    --teacher models' predictions."""
    from rich.console import Console

    from mergekit_backdoor.outputs import ensure_output_free, refuse_output_overlapping
    from mergekit_backdoor.repair.repair import repair_samples, repair_to

    settings = repair_settings(steps, lr, perturbation, trigger, seed, device, max_length)
    teachers = teacher or []
    refuse_output_overlapping(out, [model, samples, data_dir, *teachers], what="repaired model")
    ensure_output_free(out.absolute(), overwrite)
    drawn = repair_samples(model, task, samples, count=count, seed=seed, data_dir=data_dir)
    summary = repair_to(model, drawn.rows, drawn.fields, out, settings=settings,
                        teachers=teachers, samples_note=drawn.source, overwrite=overwrite,
                        progress=not quiet)
    Console(stderr=True).print(
        f"[green]repaired model written to[/green] {out} ({summary['samples']} samples, "
        f"{summary['steps']} steps"
        + (f", towards the median of {len(teachers)} teachers" if teachers else "")
        + f", final loss {summary['loss_mean_last_10']:.4f})")
