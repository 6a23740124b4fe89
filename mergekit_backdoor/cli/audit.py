"""CLI commands for the audit stage: ``audit``, ``compare``, ``report`` and ``demo``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mergekit_backdoor.cli import app
from mergekit_backdoor.cli.options import (
    BatchSize,
    DataDir,
    Device,
    Donors,
    Limit,
    MaxLength,
    NoVerify,
    Quiet,
    Repair,
    RepairLr,
    RepairPerturbation,
    RepairSamples,
    RepairSteps,
    TargetResponse,
    Tasks,
    limit_value,
    output,
    repair_settings,
    task_names,
)
from mergekit_backdoor.repair.repair import DEFAULT_LR, DEFAULT_PERTURBATION, DEFAULT_STEPS


def _consoles():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(), Console(stderr=True)


def _settings(device, batch_size, data_dir, limit, max_length, no_verify):  # type: ignore[no-untyped-def]
    from mergekit_backdoor.audit.audit import EvalSettings

    return EvalSettings(device=device, batch_size=batch_size,
                        data_dir=str(data_dir) if data_dir else None, limit=limit_value(limit),
                        max_length=max_length, verify=not no_verify)


def _logger(err, quiet: bool):  # type: ignore[no-untyped-def]
    from rich.markup import escape

    steps = iter(range(1, 1000))
    return (lambda text: None) if quiet else (
        lambda text: err.print(f"[bold cyan]\\[{next(steps)}][/] {escape(text)}", highlight=False))


@app.command("audit")
def audit_command(
    suspect: Annotated[str, typer.Argument(help="The suspect model folder (or hub id).")],
    donor: Donors,
    task: Tasks = None,
    recipe: Annotated[str, typer.Option(help="Recipe from `mergekit-backdoor recipes`.")] = "wag",
    base: Annotated[str | None, typer.Option(
        help="The pre-trained model the suspect and donors were fine-tuned from: adds "
        "task-vector similarity (and is the base of ties/dare recipes).")] = None,
    weight: Annotated[list[float] | None, typer.Option(
        help="One merge weight per model, the suspect's first; repeat.")] = None,
    output: Annotated[Path | None, output("Report folder (default: audit-SUSPECT).")] = None,
    eval_donors: Annotated[bool, typer.Option(help="Evaluate the donors too.")] = False,
    device: Device = None,
    batch_size: BatchSize = None,
    data_dir: DataDir = None,
    limit: Limit = None,
    max_length: MaxLength = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle-only (.bin) weights.")] = False,
    no_verify: NoVerify = False,
    no_scan: Annotated[bool, typer.Option(
        "--no-scan", help="Skip the trigger scan of the suspect (before) and the sanitized "
        "model (after).")] = False,
    repair: Repair = False,
    samples: RepairSamples = None,
    repair_steps: RepairSteps = DEFAULT_STEPS,
    repair_lr: RepairLr = DEFAULT_LR,
    repair_perturbation: RepairPerturbation = DEFAULT_PERTURBATION,
    target_response: TargetResponse = None,
    seed: Annotated[int, typer.Option(help="Seed of the scan and the repair.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Check donors, scan, sanitize SUSPECT by merging (and repair), measure before and after.

    CACC and the ASR of every attack of the task, plus any trigger the scan recovers."""
    from mergekit_backdoor.audit.audit import Defences, audit
    from mergekit_backdoor.audit.report import print_report

    out, err = _consoles()
    folder = output or Path(f"audit-{Path(suspect).name or 'suspect'}")
    defences = Defences(scan=not no_scan, samples=samples, seed=seed,
                        target_response=target_response, repair=repair_settings(
        repair_steps, repair_lr, repair_perturbation, None, seed, device, max_length)
        if repair else None)
    report = audit(
        suspect, donor, folder, tasks=task_names(task), recipe=recipe, base=base, weights=weight,
        eval_donors=eval_donors, settings=_settings(device, batch_size, data_dir, limit,
                                                    max_length, no_verify),
        defences=defences, overwrite=overwrite, allow_pickle=allow_pickle, progress=not quiet,
        log=_logger(err, quiet),
    )
    print_report(report, out)
    out.print(f"report: {folder / 'report.html'} (numbers: {folder / 'report.json'}); "
              f"sanitized model: {report['sanitized']}", highlight=False)


@app.command("compare")
def compare_command(
    model_a: Annotated[str, typer.Argument(help="First model (the reference).")],
    model_b: Annotated[str, typer.Argument(help="Second model (the change row is B - A).")],
    task: Tasks = None,
    output: Annotated[Path | None, output(
        "Also write report.json and report.html to this folder.")] = None,
    device: Device = None,
    batch_size: BatchSize = None,
    data_dir: DataDir = None,
    limit: Limit = None,
    max_length: MaxLength = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
    no_verify: NoVerify = False,
    quiet: Quiet = False,
) -> None:
    """Evaluate two models on the same tasks and print CACC and ASR side by side."""
    from mergekit_backdoor.audit.audit import compare
    from mergekit_backdoor.audit.report import print_report

    out, err = _consoles()
    report = compare(
        model_a, model_b, tasks=task_names(task), output_dir=output,
        settings=_settings(device, batch_size, data_dir, limit, max_length, no_verify),
        overwrite=overwrite, progress=not quiet, log=_logger(err, quiet),
    )
    print_report(report, out)
    if output is not None:
        out.print(f"report: {output / 'report.html'}", highlight=False)


@app.command("report")
def report_command(
    report_json: Annotated[Path, typer.Argument(help="A report.json (or its folder).")],
    html: Annotated[Path | None, typer.Option(
        "--html", help="Where to write the HTML (default: report.html next to it).")] = None,
) -> None:
    """Print a saved report's tables and verdict, and render its HTML again."""
    from mergekit_backdoor.audit.audit import rerender
    from mergekit_backdoor.audit.report import print_report

    out, _ = _consoles()
    report, target = rerender(report_json, html)
    print_report(report, out)
    out.print(f"report: {target}", highlight=False)


@app.command("demo")
def demo_command(
    output_dir: Annotated[Path | None, output(
        "Keep the models here (models/) with the report (report/); default: a temporary "
        "folder, and the report goes to --report-dir.", "--output-dir")] = None,
    report_dir: Annotated[Path, typer.Option(
        "--report-dir", help="Report folder when --output-dir is not given (an earlier demo "
        "report there is replaced).")] = Path("demo-report"),
    device: Device = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Reduced run for CI: a few rows and steps, same code path.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the head, the poison and training.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Plant a backdoor in a real MiniLM classifier, merge it away with WAG, report (offline)."""
    from mergekit_backdoor.audit.demo import demo
    from mergekit_backdoor.audit.report import print_report

    out, err = _consoles()
    start = time.perf_counter()
    report, folder = demo(output_dir=output_dir, report_dir=report_dir, device=device,
                          quick=quick, seed=seed, progress=not quiet, log=_logger(err, quiet))
    print_report(report, out)
    minutes, seconds = divmod(time.perf_counter() - start, 60)
    out.print(f"report: {folder / 'report.html'} (numbers: {folder / 'report.json'}); "
              f"demo took {int(minutes)} min {seconds:.0f} s", highlight=False)
