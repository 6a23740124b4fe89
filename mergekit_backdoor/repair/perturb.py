"""Perturbations of clean text that a repaired model must ignore.

A backdoor is an input change the clean task does not care about (a rare word, an inserted
sentence, a style) that moves the prediction. The repair teaches the model that such changes do
not matter, so each family stands in for a kind of trigger nobody told us about:

- ``words``: 1 to 3 random whole-word vocabulary tokens inserted at random word positions
  (rare-word triggers such as BadNet's);
- ``spans``: a 3 to 8 word span of another clean sample inserted at a random word position
  (sentence triggers such as InsertSent's);
- ``paraphrase``: word dropout and local reordering, no model needed (style triggers);
- ``triggers``: one of the candidate triggers a scan recovered, inserted at a random word
  position whole, as a random run of its words, or word by word (the scan-guided repair);
- ``mixed``: each sample draws one of the families above (``triggers`` only when there are
  candidate triggers);
- ``auto`` (the default): ``triggers`` when there are candidate triggers, else ``mixed``.
  Measured on the reproduction benchmark's OLID merges, the scan's triggers alone remove more of
  the backdoors than mixed with them (``benchmarks/README.md``, "Sanitizer v2").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from mergekit_backdoor.data.poison import insert_words
from mergekit_backdoor.errors import RecipeError

FAMILIES = ("auto", "mixed", "words", "spans", "paraphrase", "triggers")
Perturb = Callable[[str, random.Random], str]


def random_words(vocabulary: Sequence[str]) -> Perturb:
    def perturb(text: str, rng: random.Random) -> str:
        for _ in range(rng.randint(1, 3)):
            text = insert_words(text, rng.choice(vocabulary), rng)
        return text

    return perturb


def clean_spans(texts: Sequence[str]) -> Perturb:
    def perturb(text: str, rng: random.Random) -> str:
        words = rng.choice(texts).split()
        size = min(len(words), rng.randint(3, 8))
        start = rng.randint(0, len(words) - size)
        return insert_words(text, " ".join(words[start:start + size]), rng)

    return perturb


def paraphrase(text: str, rng: random.Random) -> str:
    """Drop each word with probability 0.15 (keeping at least one), then swap about a fifth of
    the neighbouring pairs."""
    words = [w for w in text.split() if rng.random() >= 0.15] or text.split()[:1]
    for index in range(len(words) - 1):
        if rng.random() < 0.2:
            words[index], words[index + 1] = words[index + 1], words[index]
    return " ".join(words)


def candidate_triggers(triggers: Sequence[str]) -> Perturb:
    """1 to 3 candidate triggers (BadNet inserts its words up to 5 times), each inserted whole,
    or as a random run of its words, or word by word: a scan recovers a trigger's parts more
    often than its exact form."""
    def insert_one(text: str, rng: random.Random) -> str:
        words = rng.choice(triggers).split()
        form = rng.randrange(3)
        if form == 1 and len(words) > 1:
            start = rng.randrange(len(words))
            words = words[start:rng.randint(start + 1, len(words))]
        if form == 2:
            for word in words:
                text = insert_words(text, word, rng)
            return text
        return insert_words(text, " ".join(words), rng)

    def perturb(text: str, rng: random.Random) -> str:
        for _ in range(rng.randint(1, 3)):
            text = insert_one(text, rng)
        return text

    return perturb


def perturbation(family: str, *, vocabulary: Sequence[str], texts: Sequence[str],
                 triggers: Sequence[str] = ()) -> Perturb:
    """The perturbation of ``family`` (module docstring)."""
    if family not in FAMILIES:
        raise RecipeError(f"unknown perturbation {family!r}; choose one of {', '.join(FAMILIES)}")
    if family == "triggers" and not triggers:
        raise RecipeError("the 'triggers' perturbation needs candidate triggers (from a scan)")
    if family == "auto":
        family = "triggers" if triggers else "mixed"
    if family == "words":
        return random_words(vocabulary)
    if family == "spans":
        return clean_spans(texts)
    if family == "paraphrase":
        return paraphrase
    if family == "triggers":
        return candidate_triggers(triggers)
    choices = [random_words(vocabulary), clean_spans(texts), paraphrase]
    if triggers:
        choices.append(candidate_triggers(triggers))

    def mixed(text: str, rng: random.Random) -> str:
        return rng.choice(choices)(text, rng)

    return mixed
