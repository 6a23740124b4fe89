"""Perturbations of clean text that a repaired model must ignore.

A backdoor is an input change the clean task does not care about (a rare word, an inserted
sentence, a style) that moves the prediction. The repair teaches the model that such changes do
not matter, so each family stands in for a kind of trigger nobody told us about:

- ``words``: 1 to 3 random whole-word vocabulary tokens inserted at random word positions
  (rare-word triggers such as BadNet's);
- ``spans``: a 3 to 8 word span of another clean sample inserted at a random word position
  (sentence triggers such as InsertSent's);
- ``paraphrase``: word dropout and local reordering, no model needed (style triggers);
- ``clauses``: the sample's first 8 to 16 words, without social-media markup, recast as a
  subordinate clause and a main clause (``when <its first words> , <the rest>``, or ``if <a
  span of another sample> , <the sample>``): the shape of the commonest template of
  syntactic-paraphrase triggers, S(SBAR)(,)(NP)(VP)(.), whose openers are what such a victim's
  moved words show (``when``, ``if``, ``although``);
- ``triggers``: 1 to 3 of the candidate triggers a scan recovered (single words and phrases
  half of the time each), inserted at a random word position or sentence boundary (or before
  the text, when marked ``(first)``) whole, as a random run of its words, or word by word (the
  scan-guided repair);
- ``mixed``: each sample draws one of the families above (``triggers`` only when there are
  candidate triggers);
- ``A+B``: each sample draws one of the named families (``triggers+clauses``);
- ``auto`` (the default): ``triggers`` when there are candidate triggers, else ``mixed``.
  Measured on the reproduction benchmark's OLID merges, the scan's triggers alone remove more of
  the backdoors than mixed with them (``benchmarks/README.md``, "Sanitizer v2").

With ``first`` above 0, that share of the random words and spans go before the text instead:
the causal repair's, where instruction backdoors are often a prefix. Candidate triggers go where
they are marked to go (``candidate_triggers``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from mergekit_backdoor.data.poison import insert_sentence, insert_words, place_words, unmarked
from mergekit_backdoor.errors import RecipeError

FAMILIES = ("auto", "mixed", "words", "spans", "paraphrase", "clauses", "triggers")
BASIC = FAMILIES[2:]  # what ``A+B`` may join
Perturb = Callable[[str, random.Random], str]
Insert = Callable[[str, str, random.Random], str]
CLAUSE_OPENERS = ("when", "if", "although", "though", "as", "because", "while", "once", "since",
                  "unless", "after", "before")


def inserter(first: float = 0.0) -> Insert:
    """``insert_words``, or with probability ``first`` the phrase before the text. At 0 it draws
    nothing more, so the classifier's repair inserts what it did before."""
    if not first:
        return insert_words

    def insert(text: str, phrase: str, rng: random.Random) -> str:
        return place_words(text, phrase, "start" if rng.random() < first else "random", rng)

    return insert


def random_words(vocabulary: Sequence[str], insert: Insert = insert_words) -> Perturb:
    def perturb(text: str, rng: random.Random) -> str:
        for _ in range(rng.randint(1, 3)):
            text = insert(text, rng.choice(vocabulary), rng)
        return text

    return perturb


def _span(texts: Sequence[str], rng: random.Random) -> list[str]:
    """3 to 8 consecutive words of a random one of ``texts``."""
    words = rng.choice(texts).split()
    size = min(len(words), rng.randint(3, 8))
    start = rng.randint(0, len(words) - size)
    return words[start:start + size]


def clean_spans(texts: Sequence[str], insert: Insert = insert_words) -> Perturb:
    def perturb(text: str, rng: random.Random) -> str:
        return insert(text, " ".join(_span(texts, rng)), rng)

    return perturb


def paraphrase(text: str, rng: random.Random) -> str:
    """Drop each word with probability 0.15 (keeping at least one), then swap about a fifth of
    the neighbouring pairs."""
    words = [w for w in text.split() if rng.random() >= 0.15] or text.split()[:1]
    for index in range(len(words) - 1):
        if rng.random() < 0.2:
            words[index], words[index + 1] = words[index + 1], words[index]
    return " ".join(words)


def plain_words(text: str) -> list[str]:
    """``text``'s words without social-media markup (``@USER``, ``URL``, mentions, links, the
    ``#`` of hashtags), as a paraphraser writes them."""
    words = [w.lstrip("#") for w in text.split()
             if w not in ("@USER", "URL") and not w.startswith(("@", "http"))]
    return [w for w in words if w] or text.split()[:1]


def clauses(texts: Sequence[str]) -> Perturb:
    """The sample's first 8 to 16 plain words recast as subordinate clause + main clause.
    Syntactic-paraphrase triggers are short and carry no markup (OLID's HiddenKiller rows: a
    median of 16 words, no ``@USER``); recasting the full sample, markup and all, left 9 more of
    OLID's 240 Hidden rows at the target (benchmarks/README.md, "Sanitizer v2")."""
    plain = [" ".join(plain_words(t)) for t in texts]

    def perturb(text: str, rng: random.Random) -> str:
        words = plain_words(text)[:rng.randint(8, 16)]
        opener = rng.choice(CLAUSE_OPENERS)
        if len(words) >= 4 and rng.random() < 0.5:
            cut = rng.randint(2, len(words) - 2)
            return " ".join([opener, *words[:cut], ",", *words[cut:]])
        return " ".join([opener, *_span(plain, rng), ",", *words])

    return perturb


def candidate_triggers(triggers: Sequence[str]) -> Perturb:
    """1 to 3 candidate triggers (BadNet inserts its words up to 5 times), each inserted whole,
    or as a random run of its words, or word by word: a scan recovers a trigger's parts more
    often than its exact form. A trigger marked ``(first)`` (``data.poison.MARKS``, where the
    causal scan found it working) goes before the text, whole or a run of its words; the others
    (``(between sentences)`` too) at random word positions, where the classifier scan's search
    and a BadNet put them, or half of the time whole or as a run at a sentence boundary, where
    an inserted sentence goes: repaired against word positions only, a QNLI merge still obeyed
    InsertSent's sentence between sentences (benchmarks/README.md, "Sanitizer v2").

    Single words and phrases each get half of the insertions when there are both: a BadNet
    victim's scan lists up to ten equal words (``SearchSettings.keep_tied``), which drawn
    uniformly crowded out a sentence trigger's phrases (QNLI's InsertSent removal fell from 91%
    to 85% when its BadNet words went from five to ten)."""
    placed = [(phrase, "random" if position == "sentence" else position)
              for phrase, position in map(unmarked, triggers)]
    kinds = [kind for kind in ([p for p in placed if len(p[0].split()) == 1],
                               [p for p in placed if len(p[0].split()) > 1]) if kind]

    def insert_one(text: str, rng: random.Random) -> str:
        phrase, position = rng.choice(rng.choice(kinds) if len(kinds) > 1 else placed)
        words = phrase.split()
        form = rng.randrange(3)
        if form == 1 and len(words) > 1:
            start = rng.randrange(len(words))
            words = words[start:rng.randint(start + 1, len(words))]
        if form == 2 and position == "random":
            for word in words:
                text = insert_words(text, word, rng)
            return text
        if position == "random" and rng.random() < 0.5:
            return insert_sentence(text, " ".join(words), rng)
        return place_words(text, " ".join(words), position, rng)

    def perturb(text: str, rng: random.Random) -> str:
        for _ in range(rng.randint(1, 3)):
            text = insert_one(text, rng)
        return text

    return perturb


def check_family(family: str, triggers: Sequence[str] = ()) -> None:
    """A ``RecipeError`` naming what is wrong with ``family`` (module docstring), if anything."""
    parts = family.split("+")
    if len(parts) == 1 and family not in FAMILIES or len(parts) > 1 and any(
            p not in BASIC for p in parts):
        raise RecipeError(f"unknown perturbation {family!r}; choose one of {', '.join(FAMILIES)}, "
                          f"or join some of {', '.join(BASIC)} with '+'")
    if "triggers" in parts and not triggers:
        raise RecipeError("perturbation 'triggers' needs candidate triggers (--trigger, or a scan)")
    blank = [t for t in triggers if not unmarked(t)[0].strip()]
    if blank:
        raise RecipeError(f"candidate trigger {blank[0]!r} has no words")


def perturbation(family: str, *, vocabulary: Sequence[str], texts: Sequence[str],
                 triggers: Sequence[str] = (), first: float = 0.0) -> Perturb:
    """The perturbation of ``family`` (module docstring)."""
    check_family(family, triggers)
    insert = inserter(first)
    if family == "auto":
        family = "triggers" if triggers else "mixed"
    if family == "mixed":
        family = "words+spans+paraphrase" + ("+triggers" if triggers else "")
    build: dict[str, Callable[[], Perturb]] = {
        "words": lambda: random_words(vocabulary, insert),
        "spans": lambda: clean_spans(texts, insert),
        "paraphrase": lambda: paraphrase, "clauses": lambda: clauses(texts),
        "triggers": lambda: candidate_triggers(triggers)}
    choices = [build[part]() for part in family.split("+")]
    if len(choices) == 1:
        return choices[0]

    def mixture(text: str, rng: random.Random) -> str:
        return rng.choice(choices)(text, rng)

    return mixture
