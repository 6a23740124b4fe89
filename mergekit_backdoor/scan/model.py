"""A sequence classifier seen at the token level, for trigger search and scoring.

A trigger is a short run of vocabulary tokens inserted at a word boundary of the last text field
(``sentence``; the second field of a pair, as the registry's attacks do). The search works on token
ids (insert, forward, gradient with respect to an inserted token's embedding); the final scores
insert the trigger's *text* at a random word position and tokenize afresh, exactly as a user would
reproduce them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_backdoor.errors import IncompatibleModelError

# Room left in every encoded example for an inserted trigger (tokens).
TRIGGER_ROOM = 8
SEARCH_DTYPES = ("auto", "float32", "bfloat16")
# A row that a bfloat16 copy classifies with at least this margin (log-probability of its class
# minus the runner-up's) keeps that class without a float32 pass. On 8,400 AG News rows with
# inserted words the two dtypes' log-probabilities differed by at most 0.19, so a margin by at
# most 0.38, and the classes differed only on rows with a bfloat16 margin under 0.04
# (benchmarks/README.md, "Scan").
RECHECK_MARGIN = 1.0
_WORD = re.compile(r"^[a-z]{2,}$")


@dataclass
class Encoded:
    """One example as token ids, with where a trigger may go."""

    ids: list[int]
    types: list[int] | None  # token_type_ids, when the tokenizer makes them
    slots: list[int]  # insertion points: word starts of the last segment, and its end
    label: int


def load_scan_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a local sequence classifier; never runs repository code."""
    from mergekit_backdoor.loading import check_model_folder, load_classifier, load_tokenizer

    name = str(path)
    config = check_model_folder(path)
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise IncompatibleModelError(
            f"{name}: architectures {archs or 'unknown'} is not a sequence classifier")
    model, tokenizer = load_classifier(path), load_tokenizer(path)
    if not getattr(tokenizer, "is_fast", False):
        raise IncompatibleModelError(f"{name}: the scan needs a fast (Rust) tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def search_dtype(requested: str, device: str) -> str:
    """The dtype the trigger search runs in: ``auto`` is bfloat16 where the hardware computes it
    natively (a CUDA GPU that supports it, a CPU with AVX-512: 4x faster than float32 for MiniLM
    on the 2-core VM, benchmarks/README.md), else float32. The held-out scores that make the
    verdict always carry float32's classes (``predict_texts``); the search only proposes."""
    import torch

    if requested not in SEARCH_DTYPES:
        raise ValueError(f"search dtype {requested!r} is not one of {', '.join(SEARCH_DTYPES)}")
    if requested != "auto":
        return requested
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() \
            else "float32"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: a torch without it has no fast path
        native = False
    return "bfloat16" if native else "float32"


def word_vocabulary(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Ids of word-starting alphabetic tokens (two letters or more) and of word continuations.

    WordPiece marks continuations with ``##``, byte-level BPE marks word starts with ``Ġ`` and
    SentencePiece with ``▁``; a word-level vocabulary has whole words only. Special tokens are
    never candidates.
    """
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    # Counted, not just present: byte-level BPE vocabularies hold Markdown's "##" and "###" too.
    pieces = sum(token.startswith("##") and token[2:3].isalpha() for token in vocab)
    marks = sum(token[:1] in ("Ġ", "▁") for token in vocab)  # BPE / SentencePiece
    wordpiece, marked = pieces > marks, marks > 0
    starts, continuations = [], []
    for token, index in vocab.items():
        if index in special:
            continue
        if wordpiece:
            is_start, bare = not token.startswith("##"), token.removeprefix("##")
        elif token[:1] in ("Ġ", "▁"):
            is_start, bare = True, token[1:]
        else:  # a word-level vocabulary has only whole words
            is_start, bare = not marked, token
        if _WORD.match(bare.lower()) and bare.isascii():
            (starts if is_start else continuations).append(index)
    return sorted(starts), sorted(continuations)


class TriggerModel:
    """Token-level access to a classifier: insert token runs, classify, take gradients."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 128, batch_size: int = 64
                 ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        limits = [max_length, getattr(model.config, "max_position_embeddings", None),
                  getattr(tokenizer, "model_max_length", None)]
        self.max_length = min(n for n in limits if isinstance(n, int) and n > TRIGGER_ROOM)
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.num_labels = int(model.config.num_labels)
        self.embeddings = model.get_input_embeddings().weight

    def cast(self, dtype: str) -> TriggerModel:
        """This model in ``dtype`` (a copy; itself when it is already in it)."""
        import copy

        import torch

        wanted = getattr(torch, dtype)
        if self.embeddings.dtype == wanted:
            return self
        return TriggerModel(copy.deepcopy(self.model).to(wanted), self.tokenizer,
                            max_length=self.max_length, batch_size=self.batch_size)

    # --- encoding -----------------------------------------------------------------------------
    def encode(self, row: dict[str, Any], fields: Sequence[str]) -> Encoded:
        texts = [row[f] for f in fields]
        enc = self.tokenizer(*texts, truncation=True, max_length=self.max_length - TRIGGER_ROOM)
        ids = list(enc["input_ids"])
        types = list(enc["token_type_ids"]) if "token_type_ids" in enc else None
        sequence_ids = enc.sequence_ids()
        words = enc.word_ids()
        last = len(fields) - 1
        positions = [i for i, s in enumerate(sequence_ids) if s == last]
        slots = [i for i in positions if i == positions[0] or words[i] != words[i - 1]]
        slots.append(positions[-1] + 1 if positions else len(ids))
        return Encoded(ids, types, slots, int(row["label"]))

    def insert(self, example: Encoded, slot: int, tokens: Sequence[int]
               ) -> tuple[list[int], list[int] | None]:
        """The example's ids (and type ids) with ``tokens`` inserted before position ``slot``."""
        ids = example.ids[:slot] + list(tokens) + example.ids[slot:]
        if example.types is None:
            return ids, None
        kind = example.types[min(slot, len(example.types) - 1)]  # the segment's own type
        return ids, example.types[:slot] + [kind] * len(tokens) + example.types[slot:]

    def _batch(self, rows: list[tuple[list[int], list[int] | None]]) -> dict[str, Any]:
        import torch

        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long) if rows[0][1] is not None else None
        for row, (ids, kinds) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            if types is not None and kinds is not None:
                types[row, : len(kinds)] = torch.tensor(kinds)
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if types is not None:
            batch["token_type_ids"] = types.to(self.device)
        return batch

    # --- scoring ------------------------------------------------------------------------------
    def log_probs(self, rows: list[tuple[list[int], list[int] | None]]) -> Any:
        """log_softmax of the logits of token-id rows, [n, num_labels], batched by length."""
        import torch

        out = torch.empty(len(rows), self.num_labels)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                logits = self.model(**self._batch([rows[i] for i in chunk])).logits
                out[chunk] = torch.log_softmax(logits.float(), dim=-1).cpu()
        return out

    def classify_texts(self, rows: list[dict[str, Any]], fields: Sequence[str]) -> Any:
        """log_softmax of the logits of text rows (tokenized afresh, like any user would)."""
        encoded = []
        for row in rows:
            enc = self.tokenizer(*[row[f] for f in fields], truncation=True,
                                 max_length=self.max_length)
            encoded.append((list(enc["input_ids"]),
                            list(enc["token_type_ids"]) if "token_type_ids" in enc else None))
        return self.log_probs(encoded)

    def predict_texts(self, rows: list[dict[str, Any]], fields: Sequence[str],
                      fast: TriggerModel | None = None) -> list[int]:
        """The class this model gives each text row. With ``fast`` (a bfloat16 copy of it, from
        ``cast``), the copy classifies every row and this model only those where the copy's
        margin is under ``RECHECK_MARGIN``: the same classes at under half the cost."""
        if not rows:
            return []
        if fast is None or fast is self:
            return self.classify_texts(rows, fields).argmax(-1).tolist()
        log_probs = fast.classify_texts(rows, fields)
        top = log_probs.topk(2, dim=-1).values
        predicted = log_probs.argmax(-1).tolist()
        close = [i for i, margin in enumerate((top[:, 0] - top[:, 1]).tolist())
                 if margin < RECHECK_MARGIN]
        if close:
            exact = self.classify_texts([rows[i] for i in close], fields).argmax(-1).tolist()
            for i, label in zip(close, exact, strict=True):
                predicted[i] = label
        return predicted

    def slot_gradient(self, rows: list[tuple[list[int], list[int] | None]], positions: list[int],
                      target: int) -> Any:
        """Mean gradient of -log p(target) with respect to the embedding at ``positions[i]`` of
        row i: the first-order change of the loss when that token is swapped for another."""
        import torch

        grads = torch.zeros(self.embeddings.shape[1], device=self.device)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            batch = self._batch(chunk)
            ids = batch.pop("input_ids")
            embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = self.model(inputs_embeds=embeds, **batch).logits
            loss = -torch.log_softmax(logits.float(), dim=-1)[:, target].sum()
            (grad,) = torch.autograd.grad(loss, embeds)
            index = torch.arange(len(chunk), device=self.device)
            where = torch.tensor(positions[start:start + self.batch_size], device=self.device)
            grads += grad[index, where].sum(0)
        return grads / max(1, len(rows))

    def token_scores(self, gradient: Any) -> Any:
        """First-order loss change of putting each vocabulary token in the slot (lower is better)."""
        import torch

        with torch.no_grad():
            return (self.embeddings.detach().float() @ gradient.float()).cpu()

    def tokens_text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.convert_tokens_to_string(
            self.tokenizer.convert_ids_to_tokens(list(tokens))).strip()
