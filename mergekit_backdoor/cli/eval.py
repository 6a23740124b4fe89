"""CLI command for the eval stage: ``mergekit-backdoor eval MODEL --tasks ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_backdoor.cli import app


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="Model folder (or hub id) to evaluate.")],
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks",
            "-t",
            help="Comma-separated tasks or suites, e.g. backdoor_sst2 or "
            "backdoor_sst2_clean,backdoor_sst2_badnet or backdoor_llm_refusal.",
        ),
    ],
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1... (default: CUDA when available).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Rows per batch (default 64 / 8).")
    ] = None,
    output_path: Annotated[
        Path | None,
        typer.Option("--output-path", help="Folder for lm-eval's results JSON."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Data folder (default: $MERGEKIT_BACKDOOR_DATA)."),
    ] = None,
    limit: Annotated[
        float | None,
        typer.Option(help="Rows per task: a count, or a fraction below 1 (for quick checks)."),
    ] = None,
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
        typer.Option("--log-samples", help="Also write per-row samples (needs --output-path)."),
    ] = False,
) -> None:
    """Measure clean accuracy (CACC) and attack success rate (ASR) with lm-evaluation-harness."""
    from rich.console import Console

    from mergekit_backdoor.errors import EvalError
    from mergekit_backdoor.eval.run import evaluate_model, results_table

    if log_samples and output_path is None:
        raise EvalError("--log-samples needs --output-path")
    if limit is not None and limit >= 1:
        limit = int(limit)
    parsed = evaluate_model(
        model,
        tasks,
        backend=backend,
        device=device,
        batch_size=batch_size,
        data_dir=data_dir,
        limit=limit,
        output_path=output_path,
        apply_chat_template=apply_chat_template,
        log_samples=log_samples,
    )
    console = Console()
    console.print(results_table(parsed))
    if parsed.get("results_file"):
        console.print(f"results: {parsed['results_file']}")
