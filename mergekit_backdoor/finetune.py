"""Fine-tune a sequence classifier on a labelled ``datasets.Dataset`` (tests, demo, benchmarks).

A plain torch loop (AdamW, linear decay), deterministic for a given seed on a given device, so
that victims, donors and test fixtures can be rebuilt byte for byte. The result is written with
``save_pretrained`` (safetensors) plus the tokenizer into a temporary folder next to ``out_dir``
and renamed into place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergekit_backdoor.errors import OutputExistsError
from mergekit_backdoor.outputs import staged_folder


def finetune_classifier(
    model_dir: str | Path,
    dataset: Any,
    out_dir: str | Path,
    *,
    text_fields: Sequence[str] = ("sentence",),
    epochs: float = 3,
    lr: float = 2e-5,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    max_steps: int | None = None,
    weight_decay: float = 0.0,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
    desc: str | None = None,
) -> Path:
    """Train ``model_dir`` on ``dataset`` (``text_fields`` + int ``label``), save to ``out_dir``.

    ``text_fields`` of two names are tokenized as a pair (QNLI). ``epochs`` may be fractional;
    ``max_steps`` caps the number of optimizer steps. ``num_labels`` / ``label_names`` give a
    base encoder (no classification head yet) its head and ``id2label``. ``desc`` labels the
    progress bar (default: ``fine-tune OUT_DIR's name``). Returns ``out_dir``.
    """
    import torch
    from tqdm.auto import tqdm

    from mergekit_backdoor.loading import load_classifier, load_tokenizer

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass overwrite=True to replace it")
    fields = tuple(text_fields)
    if not 1 <= len(fields) <= 2:
        raise ValueError(f"text_fields must name one or two columns, got {fields}")

    torch.manual_seed(seed)
    load_kwargs: dict[str, Any] = {}
    if label_names is not None:
        num_labels = len(label_names)
        load_kwargs["id2label"] = dict(enumerate(label_names))
        load_kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    if num_labels is not None:
        load_kwargs["num_labels"] = num_labels
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir, **load_kwargs)
    if tokenizer.pad_token is None:  # decoder classifiers (Llama...) ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).train()

    columns = {f: list(dataset[f]) for f in fields}
    labels = torch.tensor([int(x) for x in dataset["label"]])
    n = len(labels)
    steps_per_epoch = max(1, -(-n // batch_size))
    total = int(round(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(1, total))
    )
    generator = torch.Generator().manual_seed(seed)

    order: list[int] = []
    bar = tqdm(total=total, disable=not progress, desc=desc or f"fine-tune {out.name}")
    for _ in range(total):
        while len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        texts = [[columns[f][i] for i in batch] for f in fields]
        enc = tokenizer(
            *texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        loss = model(**enc, labels=labels[batch].to(device)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    model.eval()
    with staged_folder(out, overwrite=True) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
    return out
