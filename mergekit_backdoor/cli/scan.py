"""CLI command ``scan``: look for a backdoor nobody told us about."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from mergekit_backdoor.cli import app
from mergekit_backdoor.cli.options import DataDir, Quiet, TargetResponse, output
from mergekit_backdoor.scan.model import SEARCH_DTYPES

SearchDtype = enum.Enum("SearchDtype", {name: name for name in SEARCH_DTYPES}, type=str)


@app.command("scan")
def scan_command(
    model: Annotated[str, typer.Argument(help="The sequence classifier to scan (a folder).")],
    reference: Annotated[list[str] | None, typer.Option(
        "--reference", "-r", help="A model to compare with (a donor, the sanitized model, a "
        "clean model); repeat.")] = None,
    task: Annotated[str | None, typer.Option(
        "--task", "-t", help="Draw the clean samples from this task's training split (a data set "
        "such as sst2, or a task card .yaml).")] = None,
    samples: Annotated[Path | None, typer.Option(
        help="Or read them from a JSON/JSONL/CSV/TSV file (label + sentence/text).")] = None,
    clean_samples: Annotated[int, typer.Option(
        min=1, max=50, help="Clean examples per class (at most 50); for a causal LM, clean "
        "prompts.")] = 50,
    target_response: TargetResponse = None,
    out: Annotated[Path | None, output("Folder for scan.json.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample draw, split and search.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    max_length: Annotated[int, typer.Option("--max-length", min=16,
                                            help="Tokens per input of a classifier (a causal LM "
                                            "reads whole prompts).")] = 128,
    search_dtype: Annotated[SearchDtype, typer.Option(
        case_sensitive=False, help="dtype of a classifier's trigger search: "
        "auto is bfloat16 on a GPU or CPU that computes it natively (AVX-512), else float32. "
        "The held-out scores and the verdict carry float32's classes either way.")
    ] = SearchDtype.auto,
    data_dir: DataDir = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Quiet = False,
) -> None:
    """Look for a trigger nobody told us about: short word runs that send clean inputs to one label.

    With --reference models (donors, a clean model) a word that moves every model is a feature of
    the task, not a backdoor; the verdict compares MODEL with them."""
    from rich.console import Console
    from rich.markup import escape

    from mergekit_backdoor.scan.scan import ScanSettings, run_scan, scan_table

    err = Console(stderr=True)
    result = run_scan(model, references=reference or [], task=task, samples=samples,
                      per_class=clean_samples, settings=ScanSettings(seed=seed, device=device,
                                                                     max_length=max_length,
                                                                     search_dtype=search_dtype.value),
                      data_dir=data_dir, out=out, overwrite=overwrite,
                      target_response=target_response, progress=not quiet,
                      log=None if quiet else lambda text: err.print(escape(text), style="dim"))
    console = Console()
    console.print(scan_table(result))
    style = "bold red" if result["verdict"]["flagged"] else "bold green"
    console.print(f"[{style}]verdict:[/] {escape(result['verdict']['text'])}", highlight=False)
    console.print(f"decision rule: flagged when the backdoor score reaches "
                  f"{100 * result['threshold']:.1f} ({escape(result['score_rule'])})",
                  highlight=False)
    if out is not None:
        console.print(f"scan: {out / 'scan.json'}", highlight=False)
