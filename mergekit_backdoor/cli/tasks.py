"""CLI commands for task cards: ``tasks check`` and ``tasks export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_backdoor.cli import app
from mergekit_backdoor.cli.options import output

tasks_app = typer.Typer(help="Task cards: a user's own task as lm-eval tasks.",
                        no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")

Card = Annotated[Path, typer.Argument(help="A task card (.yaml).")]


@tasks_app.command("check")
def check(card: Card) -> None:
    """Read a task card and every row it names; print what it would evaluate."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from mergekit_backdoor.tasks.card import load_card
    from mergekit_backdoor.tasks.rows import load_card_rows

    loaded = load_card(card)
    rows = load_card_rows(loaded)
    console = Console()
    for notice in rows.notices:
        console.print(f"note: {escape(notice)}", highlight=False)
    table = Table("task", "rows", "what", title=escape(f"task card {loaded.name} ({loaded.kind}, "
                                                        f"target {_target(loaded)})"))
    table.add_row(f"{loaded.name}_clean", str(len(rows.clean)), escape(loaded.test.describe()))
    for attack, by_target in rows.triggered.items():
        for target, triggered in by_target.items():
            what = f"-> {loaded.labels[target]}" if target is not None else "triggered prompts"
            table.add_row(f"{loaded.name}_{attack}", str(len(triggered)), escape(what))
    console.print(table)


def _target(card) -> str:  # type: ignore[no-untyped-def]
    return card.target_name if card.kind == "classification" else f"rule {card.asr_rule}"


@tasks_app.command("export")
def export(
    card: Card,
    out: Annotated[Path, output("Folder for the lm-eval task YAML (read it with lm_eval "
                                "--include_path DIR).")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
) -> None:
    """Write a task card as ordinary lm-eval task YAML (clean task, one task per attack, groups)."""
    from rich.console import Console
    from rich.markup import escape

    from mergekit_backdoor.outputs import refuse_output_overlapping, staged_folder
    from mergekit_backdoor.tasks.card import load_card
    from mergekit_backdoor.tasks.export import write_tasks
    from mergekit_backdoor.tasks.rows import load_card_rows

    loaded = load_card(card)
    sources = [loaded.test.path, loaded.train.path if loaded.train else None,
               *(s.path for s in loaded.triggered.values()), card]
    refuse_output_overlapping(out, [s for s in sources if s is not None], what="export folder")
    rows = load_card_rows(loaded)
    console = Console()
    for notice in rows.notices:
        console.print(f"note: {escape(notice)}", highlight=False)
    with staged_folder(out, overwrite) as folder:
        exported = write_tasks(loaded, folder, rows)
    console.print(f"wrote {len(exported)} tasks of {loaded.name} to {escape(str(out))}; run: "
                  f"lm_eval --include_path {escape(str(out))} --tasks {loaded.name} ...",
                  highlight=False)
