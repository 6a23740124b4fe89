"""Tiny BERT classifiers with a word-level tokenizer, built inside the tests (no MiniLM, no Hub):
enough for sanitize, search, eval and audit to run end to end in seconds."""

from __future__ import annotations

from pathlib import Path

from helpers_eval import word_tokenizer
from tiny_models import bert_variants

WORDS = ["a gripping funny film", "dull and far too long", "a joy from start to end",
         "the worst script this year", "warm and clever", "a tedious mess", "the movie is good",
         "it is bad"]


def tiny_classifiers(root: Path, names: list[str]) -> list[Path]:
    """Fine-tuned variants of one 2-label BERT init, each saved with the same tokenizer."""
    paths = bert_variants(root, names)
    tokenizer = word_tokenizer(WORDS, size=80)
    tokenizer.model_max_length = 32
    for path in paths:
        tokenizer.save_pretrained(path)
    return paths
