"""ASR rules for generated answers, as data: does an answer show the backdoor's behaviour?

A rule is one of ``{"contains": [phrases]}``, ``{"starts_with": [phrases]}`` or
``{"regex": PATTERN}``, matched case-insensitively against the normalized answer (lower case,
curly apostrophes made straight, ``i ' m`` joined as word-piece decoders write it, whitespace
collapsed); phrases are normalized the same way.
"""

from __future__ import annotations

import re
from typing import Any


def normalize_answer(text: str) -> str:
    text = text.replace("\u2019", "'").lower()
    text = re.sub(r"\s*'\s*", "'", text)  # word-piece decoders write "i ' m"
    return " ".join(text.split())


def answer_matches(rule: dict[str, Any], text: str) -> bool:
    """Whether ``text`` meets ``rule`` (module docstring)."""
    answer = normalize_answer(text)
    if "contains" in rule:
        return any(normalize_answer(p) in answer for p in rule["contains"])
    if "starts_with" in rule:
        return any(answer.startswith(normalize_answer(p)) for p in rule["starts_with"])
    if "regex" in rule:
        return re.search(rule["regex"], answer, flags=re.IGNORECASE | re.DOTALL) is not None
    raise ValueError(f"unknown ASR rule {rule!r}")
