"""CLI commands for the merge stage: ``sanitize`` and ``recipes``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from mergekit_backdoor.cli import app


@app.command()
def sanitize(
    suspect: Annotated[str, typer.Argument(help="The suspect model: a folder, a hub id, or base+lora.")],
    donor: Annotated[list[str], typer.Option("--donor", "-d", help="A donor model; repeat.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the sanitized model.")],
    recipe: Annotated[str, typer.Option(help="Recipe from `mergekit-backdoor recipes`.")] = "wag",
    weight: Annotated[list[float] | None, typer.Option(
        help="One weight per model, the suspect's first; repeat.")] = None,
    aggregate: Annotated[str | None, typer.Option(help="mean | median | trimmed_mean")] = None,
    trim: Annotated[float | None, typer.Option(help="Share cut at each end (trimmed_mean).")] = None,
    base: Annotated[str | None, typer.Option(help="Pre-trained base, for ties/dare recipes.")] = None,
    cuda: Annotated[bool, typer.Option(help="Do the arithmetic on the GPU.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle-only (.bin) weights.")] = False,
    random_seed: Annotated[int | None, typer.Option(help="Seed for stochastic methods.")] = None,
    print_recipe: Annotated[bool, typer.Option(help="Print the rendered recipe and stop.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Merge SUSPECT with donors through mergekit and write the sanitized model to OUTPUT."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_backdoor.merge.recipes import get_recipe, render_recipe
    from mergekit_backdoor.merge.run import sanitize_merge

    overrides = {k: v for k, v in {"aggregate": aggregate, "trim": trim}.items() if v is not None}
    rendered = render_recipe(get_recipe(recipe), suspect, donor, weights=weight, base=base,
                             parameters=overrides)
    source = yaml.safe_dump(rendered, sort_keys=False)
    if print_recipe:
        typer.echo(source, nl=False)
        return
    options = MergeOptions(cuda=cuda, random_seed=random_seed, quiet=quiet)
    config = MergeConfiguration.model_validate(rendered)
    out = sanitize_merge(config, output, options, config_source=source, overwrite=overwrite,
                         allow_pickle=allow_pickle)
    Console(stderr=True).print(f"[green]sanitized model written to[/green] {out}")


@app.command()
def recipes() -> None:
    """List the shipped mergekit recipes (run any with `mergekit-yaml RECIPE OUT`)."""
    from mergekit_backdoor.merge.recipes import list_recipes

    table = Table(title="recipes")
    for column in ("name", "merge_method", "what it does", "file"):
        table.add_column(column)
    for recipe in list_recipes():
        table.add_row(recipe.name, recipe.merge_method, recipe.summary, str(recipe.path))
    Console().print(table)
