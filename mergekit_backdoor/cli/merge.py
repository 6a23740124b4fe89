"""CLI commands for the merge stage: ``sanitize`` and ``recipes``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from mergekit_backdoor.cli import app
from mergekit_backdoor.cli.options import DataDir, Donors, NoVerify, output


@app.command()
def sanitize(
    suspect: Annotated[str, typer.Argument(help="The suspect model: a folder, a hub id, or base+lora.")],
    donor: Donors,
    output: Annotated[Path, output("Folder for the sanitized model.")],
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


@app.command()
def search(
    suspect: Annotated[str, typer.Argument(help="The suspect sequence classifier (folder or hub id).")],
    donor: Donors,
    output: Annotated[Path, output("Recipe file to write (.yml).")],
    dataset: Annotated[str | None, typer.Option(
        help="Draw the clean samples from this registry dataset's clean training split.")] = None,
    samples: Annotated[Path | None, typer.Option(
        help="Or read them from a JSON/JSONL/CSV file (label + sentence/text columns).")] = None,
    clean_samples: Annotated[int, typer.Option(help="Clean examples per class (at most 50).")] = 50,
    candidates: Annotated[int, typer.Option(help="Low-penalty layouts scored on the samples.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the layout search and the sample draw.")] = 0,
    data_dir: DataDir = None,
    no_verify: NoVerify = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing recipe file.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Find a module-switching layout with a few clean examples; write it as a mergekit recipe."""
    from mergekit_backdoor.cli.options import data_folder
    from mergekit_backdoor.errors import DataError, OutputExistsError
    from mergekit_backdoor.merge.search import (
        clean_examples,
        read_examples,
        search_layout,
        suspect_num_labels,
        write_recipe,
    )
    from mergekit_backdoor.outputs import refuse_output_overlapping

    if (dataset is None) == (samples is None):
        raise DataError("give the clean samples with either --dataset NAME or --samples FILE")
    data = data_folder(data_dir) if dataset is not None else None
    refuse_output_overlapping(output, [suspect, *donor, samples, data], what="recipe file")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
    if dataset is not None:
        examples, fields = clean_examples(dataset, clean_samples, seed=seed, data_dir=data_dir,
                                          verify=not no_verify)
        note = f"drawn from {dataset}'s clean training split with seed {seed}"
    else:
        examples, fields = read_examples(samples, clean_samples,
                                         num_labels=suspect_num_labels(suspect))
        note = f"read from {samples}"
    result = search_layout([suspect, *donor], examples, fields, candidates=candidates, seed=seed,
                           progress=not quiet)
    write_recipe(result, output, overwrite=overwrite, note=note)
    console = Console(stderr=True)
    console.print(result.describe())
    console.print(f"balanced accuracy on {len(examples)} clean samples: "
                  f"{result.balanced_accuracy:.3f} (plain mean: {result.mean_balanced_accuracy:.3f})")
    console.print(f"[green]recipe written to[/green] {output}; run: mergekit-yaml {output} OUT")
