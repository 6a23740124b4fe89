"""CLI commands for the merge stage: ``sanitize`` and ``recipes``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from mergekit_backdoor.cli import app
from mergekit_backdoor.cli.options import (
    DataDir,
    Donors,
    NoVerify,
    Repair,
    RepairLr,
    RepairPerturbation,
    RepairSamples,
    RepairSteps,
    Triggers,
    output,
    repair_settings,
)
from mergekit_backdoor.repair.repair import DEFAULT_LR, DEFAULT_PERTURBATION, DEFAULT_STEPS


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
    repair: Repair = False,
    task: Annotated[str | None, typer.Option(
        "--task", "-t", help="With --repair: draw clean sentences from this task's training "
        "split (default: the data set the suspect's labels name).")] = None,
    repair_samples: RepairSamples = None,
    repair_steps: RepairSteps = DEFAULT_STEPS,
    repair_lr: RepairLr = DEFAULT_LR,
    repair_perturbation: RepairPerturbation = DEFAULT_PERTURBATION,
    trigger: Triggers = None,
    data_dir: DataDir = None,
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
    if not repair:
        out = sanitize_merge(config, output, options, config_source=source, overwrite=overwrite,
                             allow_pickle=allow_pickle)
        Console(stderr=True).print(f"[green]sanitized model written to[/green] {out}")
        return
    from mergekit_backdoor.outputs import refuse_output_overlapping
    from mergekit_backdoor.repair.repair import merge_and_repair
    from mergekit_backdoor.repair.repair import repair_samples as draw_samples

    settings = repair_settings(repair_steps, repair_lr, repair_perturbation, trigger,
                               random_seed or 0, "cuda" if cuda else "cpu")
    refuse_output_overlapping(output, [suspect, *donor, base, repair_samples], what="output")
    drawn = draw_samples(suspect, task, repair_samples, seed=random_seed or 0,
                         data_dir=data_dir)
    out = merge_and_repair(config, output, options, drawn.rows, drawn.fields, settings=settings,
                           samples_note=drawn.source, config_source=source,
                           overwrite=overwrite, allow_pickle=allow_pickle, progress=not quiet)
    Console(stderr=True).print(f"[green]sanitized and repaired model written to[/green] {out}")


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
    task: Annotated[str | None, typer.Option(
        "--task", "--dataset", "-t", help="Draw the clean samples from this task's clean "
        "training split (a data set such as sst2, or a task card .yaml).")] = None,
    samples: Annotated[Path | None, typer.Option(
        help="Or read them from a JSON/JSONL/CSV/TSV file (label + sentence/text columns).")] = None,
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
    from mergekit_backdoor.errors import OutputExistsError
    from mergekit_backdoor.merge.search import search_layout, suspect_num_labels, write_recipe
    from mergekit_backdoor.outputs import refuse_output_overlapping
    from mergekit_backdoor.tasks.resolve import clean_samples as draw

    data = data_folder(data_dir) if task is not None else None
    refuse_output_overlapping(output, [suspect, *donor, samples, data], what="recipe file")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
    drawn = draw(task, samples, per_class=clean_samples, seed=seed, data_dir=data_dir,
                 num_labels=suspect_num_labels(suspect) if samples else None,
                 verify=not no_verify)
    examples, fields, note = drawn.rows, drawn.fields, drawn.source
    result = search_layout([suspect, *donor], examples, fields, candidates=candidates, seed=seed,
                           progress=not quiet)
    write_recipe(result, output, overwrite=overwrite, note=note)
    console = Console(stderr=True)
    console.print(result.describe())
    console.print(f"balanced accuracy on {len(examples)} clean samples: "
                  f"{result.balanced_accuracy:.3f} (plain mean: {result.mean_balanced_accuracy:.3f})")
    console.print(f"[green]recipe written to[/green] {output}; run: mergekit-yaml {output} OUT")
