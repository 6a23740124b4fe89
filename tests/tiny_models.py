"""Tiny models built inside the tests: one shared init, several fine-tuned variants."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

LABELS = {0: "negative", 1: "positive"}


def bert_config(**overrides) -> BertConfig:
    settings = dict(vocab_size=96, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=32, num_labels=2,
                    id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    settings.update(overrides)
    return BertConfig(**settings)


def llama_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                    tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def finetune_steps(model: torch.nn.Module, seed: int, steps: int = 3) -> None:
    """A few real optimizer steps on random tokens, so variants differ like fine-tunes do."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    vocab = model.config.vocab_size
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 12), generator=generator)
        if model.config.architectures and "CausalLM" in model.config.architectures[0]:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            labels = torch.randint(0, model.config.num_labels, (4,), generator=generator)
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def make_variants(model_cls, config, root: Path, names: list[str], init_seed: int = 0) -> list[Path]:
    """Save one fine-tuned variant of a shared random init per name."""
    torch.manual_seed(init_seed)
    shared = model_cls(config)
    shared.config.architectures = [model_cls.__name__]
    paths = []
    for index, name in enumerate(names):
        model = model_cls(config)
        model.load_state_dict(shared.state_dict())
        model.config.architectures = [model_cls.__name__]
        finetune_steps(model, seed=100 + index)
        model.save_pretrained(root / name)
        paths.append(root / name)
    return paths


def bert_variants(root: Path, names: list[str], **config) -> list[Path]:
    return make_variants(BertForSequenceClassification, bert_config(**config), root, names)


def llama_variants(root: Path, names: list[str], **config) -> list[Path]:
    return make_variants(LlamaForCausalLM, llama_config(**config), root, names)
