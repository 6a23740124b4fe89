"""CLI command for the eval stage: ``mergekit-backdoor eval MODEL --task ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_backdoor.cli import app
from mergekit_backdoor.cli.options import (
    BatchSize,
    DataDir,
    Device,
    Limit,
    NoVerify,
    Tasks,
    limit_value,
    output,
    task_names,
)


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="Model folder (or hub id) to evaluate.")],
    task: Tasks = None,
    device: Device = None,
    batch_size: BatchSize = None,
    output_path: Annotated[
        Path | None, output("Folder for lm-eval's results JSON.", "--output-path")
    ] = None,
    data_dir: DataDir = None,
    limit: Limit = None,
    backend: Annotated[
        str | None,
        typer.Option(help="hf-seqcls or hf (default: read from the model's config)."),
    ] = None,
    apply_chat_template: Annotated[
        bool | None,
        typer.Option(
            "--apply-chat-template/--no-chat-template",
            help="Causal LMs: wrap prompts in the tokenizer's chat template "
            "(default: when it has one).",
        ),
    ] = None,
    log_samples: Annotated[
        bool,
        typer.Option("--log-samples", help="Also write per-row samples (needs --output)."),
    ] = False,
    no_verify: NoVerify = False,
) -> None:
    """Measure clean accuracy (CACC) and attack success rate (ASR) with lm-evaluation-harness."""
    from rich.console import Console
    from rich.markup import escape

    from mergekit_backdoor.cli.options import data_folder
    from mergekit_backdoor.errors import EvalError
    from mergekit_backdoor.eval.run import evaluate_model, read_model_config, results_table
    from mergekit_backdoor.outputs import local_paths, refuse_output_overlapping
    from mergekit_backdoor.tasks.resolve import resolve_tasks

    if log_samples and output_path is None:
        raise EvalError("--log-samples needs --output")
    if output_path is not None:
        refuse_output_overlapping(output_path, [*local_paths(model), data_folder(data_dir)],
                                  what="output folder")
    names = task_names(task)
    tasks = [t.card.path if t.card else t.lm_eval
             for t in resolve_tasks(names, None if names else read_model_config(model))]
    parsed = evaluate_model(
        model,
        [str(t) for t in tasks],
        backend=backend,
        device=device,
        batch_size=batch_size,
        data_dir=data_dir,
        limit=limit_value(limit),
        output_path=output_path,
        apply_chat_template=apply_chat_template,
        log_samples=log_samples,
        verify=not no_verify,
    )
    for notice in parsed.get("notices", []):
        Console(stderr=True).print(f"note: {escape(notice)}", highlight=False)
    console = Console()
    console.print(results_table(parsed))
    if parsed.get("results_file"):
        console.print(f"results: {parsed['results_file']}")
