"""The trigger search for one candidate target label, on the search half of the clean examples.

1. **Single tokens**, from two sources: the gradient (HotFlip: the first-order change of the
   target's loss when a placeholder inserted at a random word boundary becomes each vocabulary
   word, averaged over ``subset`` of the examples; with reference models, also the top of that
   change minus the same change in them, each reference on its share of those examples: words
   only the scanned model obeys) and a label-agnostic **sweep** of the short rare words (BadNet's
   kind: ``cf``, ``mn``...), each inserted into a few examples and classified exactly.
2. **Screening, then exact re-scoring**: every new candidate is inserted at a fixed word boundary
   of ``screen`` examples; the ``screen_keep`` best are scored on all search examples (the
   screening examples are not classified again): the share sent to the target (the flip rate),
   ties broken by the mean log-probability of the target.
   (Exact scores of every candidate on every example made a 4-label scan take an hour; a label
   also reads at most ``max_examples`` search examples, spread over the other classes.)
3. **Phrases**: a beam of the runs of highest worth (below; with fewer than two references, of
   highest flip rate) grows one token at a time (before or after; after may also add a word
   continuation such as ``##x``), candidates again from the gradient at the new position,
   screened and re-scored the same way, up to ``max_tokens`` tokens. Growing stops once a run
   sends every search example to the target with a mean probability of at least 0.9 (a shorter
   trigger that already works is the answer), or when a longer run no longer raises the best
   *worth* (the flip rate minus the references' on the same inputs; without references, the flip
   rate) by ``min_gain``: words that move every model of the task make a phrase longer, not more
   of a trigger. Most labels of a clean model stop there after one or two steps, which is what
   keeps a scan within minutes.
4. **Minimal triggers**: the best runs and every contiguous part of them are ranked; a token
   beyond the first must flip one more example to earn its place. ``keep`` are reported, and up to
   ``keep_tied`` when more of them send every search example to the label, each as well as the
   best (within one example): a backdoor with many equal triggers is not cut arbitrarily. With
   references, the rank is the flip rate minus the references' mean flip rate on the same inputs:
   growing a phrase with words that move every model of the task (``blessing``, ``elegant``
   towards "not offensive") raises the flip rate but not this difference, so the part only the
   scanned model obeys wins. The references classify a run only when it could be chosen: its worth
   is at most its flip rate, so a run whose flip rate is below the worth of the runs already
   chosen is skipped (steps 3 and 4 choose what they would with every run's rate, up to bfloat16's
   rounding, which depends on the rows that share a batch; a quarter of the references' rows on AG
   News' InsertSent victim).
5. **Moved words** (before step 4; with two references or more): fine-tuning on poisoned rows
   moves the input embeddings of the trigger's words, in every poisoned row the same way, and
   models of the task trained without them leave those rows where they were. The
   ``moved_top`` word starts whose embedding row lies farthest from the nearest reference's
   seed a second beam, grown as in step 3 but with those words only, and with
   ``MOVED_PATIENCE``: the words of an inserted sentence pay off together, so one longer run
   that adds too little does not stop it (only a run of its own beam that sends every example
   to the label does). It finds sentences none of whose words is a trigger alone (SST-2's
   ``I watched this movie``: ``watched`` flips a quarter of the search examples, and the
   gradient ranks it 16,662nd of 21,719 words), and choosing the words costs no forward pass.
   Its beams' runs join the ranking.

Only the search examples are read here; the held-out half scores the result (``scan.py``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_backdoor.scan.model import Encoded, TriggerModel

Tokens = tuple[int, ...]
# With fewer references than this, what a model obeys *beyond* them is mostly where two models
# disagree (benchmarks/README.md, "Scan"): the beam and the held-out count then ignore the margin.
MIN_REFERENCES_FOR_MARGIN = 2
# Longer runs of moved words that may fail to raise the worth before their beam stops: the words
# of an inserted sentence pay off together (``watched this`` flips less than a longer part).
MOVED_PATIENCE = 1
# Runs whose references' flip rates the ranking takes at a time (``LabelSearch.ranked``).
REFERENCE_CHUNK = 8


@dataclass(frozen=True)
class SearchSettings:
    max_tokens: int = 6  # longest run (phrases of up to ~6 words)
    beam: int = 3  # runs grown at each length
    gradient_top: int = 48  # single tokens taken from the gradient
    extend_top: int = 16  # tokens tried per side of each run when growing it
    sweep_top: int = 16  # single tokens taken from the rare-word sweep
    sweep_per_class: int = 2  # examples per class in the sweep
    sweep_max_chars: int = 3  # "rare short words": word tokens of at most this many letters
    keep: int = 5  # candidates returned (before held-out scoring)...
    # ...and up to this many when more runs send every search example to the label as well as
    # the best does: a BadNet taught with five words obeys them and their look-alikes equally
    # (QNLI's: ``tq``, ``mb``, ``bb``, ``cf``, ``mn``, ``bn``, ``rq``, ``cb``), and a cut at
    # ``keep`` dropped a true word from the repair's list (benchmarks/README.md, "Sanitizer v2")
    keep_tied: int = 10
    done_log_prob: float = math.log(0.9)
    subset: int = 24  # search examples for gradients and the references' flip rates
    # search examples per label, spread over the other classes: every run scored exactly costs
    # one forward pass per example (a 4-label task has 60 with 50 samples per class)
    max_examples: int = 24
    screen: int = 16  # new runs are first scored on this many search examples...
    screen_keep: int = 16  # ...and this many of the best are scored exactly on all of them
    min_gain: float = 0.05  # the least rise of the best worth that earns a longer run
    moved_top: int = 16  # words whose embeddings moved most beyond the references' (step 5)


@dataclass(frozen=True)
class Candidate:
    tokens: Tokens
    flip: float  # share of the search examples classified as the target
    log_prob: float  # their mean log-probability of the target

    @property
    def key(self) -> tuple[float, float]:
        return (self.flip, self.log_prob)


def _spread(n: int, count: int) -> list[int]:
    """Indices of ``count`` of ``n`` examples spread evenly over the list (all, if fewer): the
    examples come grouped by class, so every class keeps its share."""
    return sorted({i * n // count for i in range(count)}) if n > count else list(range(n))


def _tied(flip: float, worth: float, best: float, tolerance: float) -> bool:
    """Whether a run may be reported past ``keep``: it sends every search example to the label
    and its worth is within one example (``tolerance``) of the best run's."""
    return flip >= 1.0 and worth >= best - tolerance


def _contains(run: Tokens, part: Tokens) -> bool:
    return any(run[i:i + len(part)] == part for i in range(len(run) - len(part) + 1))


def _overlap(a: Tokens, b: Tokens) -> float:
    """Jaccard overlap of two runs' token sets."""
    return len(set(a) & set(b)) / len(set(a) | set(b))


class LabelSearch:
    """Search triggers that send ``examples`` (none labelled ``target``) to ``target``."""

    def __init__(self, model: TriggerModel, examples: Sequence[Encoded], target: int,
                 vocabulary: tuple[list[int], list[int]], settings: SearchSettings,
                 rng: random.Random, references: Sequence[TriggerModel] = ()) -> None:
        import torch

        self.model = model
        # same vocabulary: their gradients can be compared with the model's token by token
        self.references = [r for r in references
                           if r.embeddings.shape[0] == model.embeddings.shape[0]]
        self.target = target
        self.settings = settings
        self.examples = [examples[i] for i in _spread(len(examples), settings.max_examples)]
        self.slots = [rng.choice(e.slots) for e in self.examples]
        starts, continuations = vocabulary
        size = model.embeddings.shape[0]
        self.start_mask = torch.zeros(size, dtype=torch.bool)
        self.start_mask[starts] = True
        self.after_mask = self.start_mask.clone()
        self.after_mask[continuations] = True
        tokenizer = model.tokenizer
        self.placeholder = next(t for t in (tokenizer.mask_token_id, tokenizer.unk_token_id,
                                            tokenizer.pad_token_id, tokenizer.eos_token_id)
                                if t is not None)
        self.scored: dict[Tokens, Candidate] = {}
        self.classified: dict[tuple[Tokens, int], Any] = {}  # (run, example index) -> log-probabilities
        self.stop: dict[str, object] = {}  # how long the runs grew, and why they stopped (``run``)
        self.reference_flip: dict[Tokens, float] = {}

    # --- exact scores ---------------------------------------------------------------------------
    def evaluate(self, runs: Sequence[Tokens]) -> list[Candidate]:
        """Exact flip rate and mean target log-probability of each run (cached)."""
        fresh = [run for run in dict.fromkeys(runs) if run not in self.scored]
        for candidate in self._scores(fresh, range(len(self.examples))):
            self.scored[candidate.tokens] = candidate
        return [self.scored[run] for run in runs]

    def _scores(self, runs: Sequence[Tokens], examples: Sequence[int]) -> list[Candidate]:
        """Each run's flip rate and mean target log-probability on the ``examples`` (indices).
        Every (run, example) is classified once: a screened run's exact score reuses its
        screening examples (16 of the 20 of a two-label task with 50 samples per class)."""
        import torch

        missing = [(run, i) for run in runs for i in examples if (run, i) not in self.classified]
        if missing:
            log_probs = self.model.log_probs(self._inserted(missing))
            self.classified.update(zip(missing, log_probs, strict=True))
        scores = []
        for run in runs:
            log_probs = torch.stack([self.classified[run, i] for i in examples])
            hits = (log_probs.argmax(-1) == self.target).float()
            scores.append(Candidate(run, float(hits.mean()), float(log_probs[:, self.target].mean())))
        return scores

    def _screened(self, runs: Sequence[Tokens]) -> list[Tokens]:
        """The ``screen_keep`` runs that do best on ``screen`` search examples spread over the
        list (the examples come grouped by class), with the runs already scored exactly."""
        settings, n = self.settings, len(self.examples)
        runs = list(dict.fromkeys(runs))
        fresh = [run for run in runs if run not in self.scored]
        if n <= settings.screen or len(fresh) <= settings.screen_keep:
            return runs
        best = sorted(self._scores(fresh, self._spread(settings.screen)), key=lambda c: c.key,
                      reverse=True)
        return [run for run in runs if run in self.scored] + \
            [c.tokens for c in best[: settings.screen_keep]]

    def _spread(self, count: int) -> list[int]:
        return _spread(len(self.examples), count)

    def _inserted(self, pairs: Sequence[tuple[Tokens, int]]
                  ) -> list[tuple[list[int], list[int] | None]]:
        """For each (run, example index), the search example with the run inserted at its slot."""
        return [self.model.insert(self.examples[i], self.slots[i], run) for run, i in pairs]

    def _reference_flips(self, runs: Sequence[Tokens]) -> None:
        """The references' mean flip rate of each run on the same inputs, ``subset`` of the
        search examples (cached)."""
        fresh = [run for run in dict.fromkeys(runs) if run not in self.reference_flip]
        if not fresh or not self.references:
            return
        examples = self._spread(self.settings.subset)
        rows = self._inserted([(run, i) for run in fresh for i in examples])
        n = len(examples)
        total = [0.0] * len(fresh)
        for reference in self.references:
            hits = (reference.log_probs(rows).argmax(-1) == self.target).float()
            for index in range(len(fresh)):
                total[index] += float(hits[index * n:(index + 1) * n].mean())
        for index, run in enumerate(fresh):
            self.reference_flip[run] = total[index] / len(self.references)

    # --- candidates from the gradient -----------------------------------------------------------
    def _from_gradient(self, run: Tokens, side: str, top: int) -> list[int]:
        """The ``top`` tokens whose first-order effect at a new position ``side`` of ``run``
        (``alone``, ``before`` or ``after``) lowers the target's loss most; with references, also
        the ``top`` that lower it most below the references' mean (words only it obeys)."""
        import torch

        rows, positions = [], []
        for index in self._spread(self.settings.subset):
            example, slot = self.examples[index], self.slots[index]
            if side == "after":
                tokens, where = (*run, self.placeholder), slot + len(run)
            else:
                tokens, where = (self.placeholder, *run), slot
            rows.append(self.model.insert(example, slot, tokens))
            positions.append(where)
        own = self.model.token_scores(self.model.slot_gradient(rows, positions, self.target))
        rankings = [own]
        if self.references:  # what moves the references too is a feature of the task
            # each reference sees its share of the rows: their mean costs one model's gradient
            count = len(self.references)
            rankings.append(own - sum(
                r.token_scores(r.slot_gradient(rows[k::count], positions[k::count], self.target))
                for k, r in enumerate(self.references)) / count)
        mask = self.after_mask if side == "after" else self.start_mask
        chosen: list[int] = []
        for scores in rankings:  # the model's own top tokens, and the top of the difference
            scores = torch.where(mask, scores, torch.tensor(float("inf")))
            scores[list(run)] = float("inf")  # no token twice in one run
            best = scores.topk(min(top, len(scores)), largest=False)
            chosen += [i for i, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)
                       if v != float("inf")]
        return list(dict.fromkeys(chosen))

    # --- the search -----------------------------------------------------------------------------
    def run(self, sweep: Sequence[int] = (), moved: Sequence[int] = ()) -> list[Candidate]:
        settings = self.settings
        singles = self._from_gradient((), "alone", settings.gradient_top)
        self.stop, _ = self._grow([(t,) for t in [*singles, *sweep]], self._from_gradient)
        pool = sorted(self.scored.values(), key=lambda c: c.key, reverse=True)[: 4 * settings.keep]
        if moved:
            def propose(run: Tokens, side: str, top: int) -> list[int]:
                return [t for t in moved if t not in run]

            self.stop["moved"], beams = self._grow([(t,) for t in moved], propose, moved=True)
            pool += self.evaluate(beams)
        return self.ranked(pool)

    def _grow(self, singles: list[Tokens], propose: Any, moved: bool = False
              ) -> tuple[dict[str, Any], list[Tokens]]:
        """Steps 2-3 from ``singles``: a beam grown a token at a time with the tokens
        ``propose(run, side, top)`` offers. Returns why it stopped and the runs of every beam.
        The moved words' beam (step 5) stops only when a run of its own sends every example to
        the label, and only after ``MOVED_PATIENCE`` + 1 longer runs in a row fail to add
        ``min_gain``."""
        settings = self.settings
        patience = MOVED_PATIENCE if moved else 0
        beam = self._best(self.evaluate(self._screened(singles)))
        beams = [c.tokens for c in beam]
        worth = self._best_worth(beam)
        stop: dict[str, Any] = {"tokens": 1, "reason": "longest allowed"}
        stalled = 0
        for length in range(2, settings.max_tokens + 1):
            if self._done(beam if moved else self.scored.values()):
                stop["reason"] = "a run sends every search example to the label"
                break
            grown: list[Tokens] = []
            for candidate in beam:
                for side in ("before", "after"):
                    for token in propose(candidate.tokens, side, settings.extend_top):
                        run = candidate.tokens
                        grown.append((*run, token) if side == "after" else (token, *run))
            beam = self._best(self.evaluate(self._screened(grown)))
            beams += [c.tokens for c in beam]
            stop["tokens"] = length
            longer = self._best_worth(beam)
            if longer >= worth + settings.min_gain:
                worth, stalled = longer, 0
                continue
            stalled += 1
            if stalled > patience:
                stop["reason"] = f"a longer run raised the worth by less than {settings.min_gain:g}"
                break
        return stop, list(dict.fromkeys(beams))

    def _worth(self, candidate: Candidate) -> float:
        """The flip rate minus the references' on the same inputs (``_reference_flips`` first).
        A run whose references' rate was not taken counts at its bound, its flip rate: ``_best``
        and ``ranked`` rely on that for the runs they skip."""
        return candidate.flip - self.reference_flip.get(candidate.tokens, 0.0)

    def _best_worth(self, candidates: Sequence[Candidate]) -> float:
        self._reference_flips([c.tokens for c in candidates])
        return max(self._worth(c) for c in candidates)

    def _best(self, candidates: list[Candidate]) -> list[Candidate]:
        """The beam. With two references or more, the runs of highest worth, so that words every
        model of the task obeys (``tennis`` towards *Sports*) do not crowd out the ones only this
        model obeys. With one, the runs of highest flip rate: a search for what a model obeys
        and its single reference does not finds phrases where two models merely disagree (on
        the tests' tiny classifiers, a clean one scored 77 that way), not a planted trigger."""
        beam = self.settings.beam
        if len(self.references) < MIN_REFERENCES_FOR_MARGIN:
            return sorted(candidates, key=lambda c: c.key, reverse=True)[:beam]
        # A run's worth is at most its flip rate, so one whose flip rate is below the worth of
        # the beam's runs known so far cannot join it: its references' flips are not needed.
        self._reference_flips([c.tokens for c in
                               sorted(candidates, key=lambda c: c.key, reverse=True)[:beam]])
        known = sorted((self._worth(c) for c in candidates if c.tokens in self.reference_flip),
                       reverse=True)
        bar = known[beam - 1] if len(known) >= beam else -math.inf
        self._reference_flips([c.tokens for c in candidates if c.flip >= bar])
        return sorted(candidates, key=lambda c: (self._worth(c), c.log_prob), reverse=True)[:beam]

    def _done(self, candidates: Iterable[Candidate]) -> bool:
        best = max(candidates, key=lambda c: c.key)
        return best.flip >= 1.0 and best.log_prob >= self.settings.done_log_prob

    def ranked(self, pool: list[Candidate]) -> list[Candidate]:
        """The best ``keep`` runs of ``pool`` and their parts, each a different trigger, reported
        minimal (module docstring, step 4). A run is left out when a part of it already kept
        does as well (within one example), or when it shares half its words with a better run
        already kept."""
        tolerance = 1.0 / max(1, len(self.examples))
        parts = {run[i:j] for run in (c.tokens for c in pool)
                 for i in range(len(run)) for j in range(i + 1, len(run) + 1)}
        pool = self.evaluate(sorted(parts | {c.tokens for c in pool}))

        def bound(c: Candidate) -> float:  # the worth if the references flipped nothing
            return c.flip - tolerance * (len(c.tokens) - 1)

        def worth(c: Candidate) -> float:
            return self._worth(c) - tolerance * (len(c.tokens) - 1)

        # The references' flips are taken a few runs at a time, highest bound first, until the
        # runs kept are settled: a run whose worth is above every bound still open comes before
        # all of them in the order below, so the choice among those runs is final.
        waiting = sorted((c for c in pool if c.tokens not in self.reference_flip),
                         key=bound, reverse=True) if self.references else []
        while True:
            chunk, waiting = waiting[:REFERENCE_CHUNK], waiting[REFERENCE_CHUNK:]
            self._reference_flips([c.tokens for c in chunk])
            open_bound = bound(waiting[0]) if waiting else -math.inf
            # a run still waiting has worth == bound <= open_bound: never settled
            kept = self._kept([c for c in pool if worth(c) > open_bound], worth, tolerance)
            tie_open = bool(kept) and any(_tied(c.flip, bound(c), worth(kept[0]), tolerance)
                                          for c in waiting)
            full = len(kept) == self._most or len(kept) >= self.settings.keep and not tie_open
            if full or not waiting:
                return kept

    @property
    def _most(self) -> int:
        return max(self.settings.keep, self.settings.keep_tied)

    def _kept(self, pool: list[Candidate], worth: Callable[[Candidate], float], tolerance: float
              ) -> list[Candidate]:
        """Step 4's choice, best worth first (``ranked``); past ``keep``, only runs that send
        every search example to the label and tie with the best."""
        kept: list[Candidate] = []
        for candidate in sorted(pool, reverse=True,
                                key=lambda c: (worth(c), c.log_prob, -len(c.tokens))):
            if len(kept) >= self.settings.keep and not _tied(
                    candidate.flip, worth(candidate), worth(kept[0]), tolerance):
                break
            if any(_contains(candidate.tokens, k.tokens) and worth(k) >= worth(candidate) - tolerance
                   for k in kept):
                continue
            if any(_overlap(candidate.tokens, k.tokens) >= 0.5 for k in kept):
                continue
            kept.append(candidate)
            if len(kept) == self._most:
                break
        return kept


def sweep(model: TriggerModel, examples: Sequence[Encoded], tokens: Sequence[int],
          settings: SearchSettings, rng: random.Random) -> dict[int, list[int]]:
    """Every short rare word inserted into a few examples of each class and classified: per
    target label, the ``sweep_top`` words that send the most other-label examples to it."""
    import torch

    by_label: dict[int, list[Encoded]] = {}
    for example in sorted(examples, key=lambda e: len(e.ids)):
        by_label.setdefault(example.label, []).append(example)
    chosen = [e for group in by_label.values() for e in group[: settings.sweep_per_class]]
    slots = [rng.choice(e.slots) for e in chosen]
    rows = [model.insert(example, slot, (token,)) for token in tokens
            for example, slot in zip(chosen, slots, strict=True)]
    log_probs = model.log_probs(rows).view(len(tokens), len(chosen), -1)
    predicted = log_probs.argmax(-1)
    labels = torch.tensor([e.label for e in chosen])
    best: dict[int, list[int]] = {}
    for target in range(model.num_labels):
        others = labels != target
        if not bool(others.any()):
            continue
        flips = (predicted[:, others] == target).float().mean(-1)
        mean_lp = log_probs[:, others, target].mean(-1)
        order = sorted(range(len(tokens)), key=lambda i: (float(flips[i]), float(mean_lp[i])),
                       reverse=True)
        best[target] = [tokens[i] for i in order[: settings.sweep_top]]
    return best


def moved_words(model: TriggerModel, references: Sequence[TriggerModel], starts: Sequence[int],
                top: int) -> list[int]:
    """The ``top`` word starts whose input-embedding row in ``model`` lies farthest from the
    nearest reference's row (step 5 of the module docstring). None with fewer than two
    references of the same vocabulary: with one, a row far from it may as well have moved in
    the reference (another victim's trigger among the donors)."""
    import torch

    others = [r.embeddings for r in references if r.embeddings.shape == model.embeddings.shape]
    if len(others) < MIN_REFERENCES_FOR_MARGIN or not starts:
        return []
    ids = torch.tensor(list(starts))
    with torch.no_grad():
        own = model.embeddings.detach()[ids].float().cpu()
        nearest = torch.stack([(own - r.detach()[ids].float().cpu()).norm(dim=1)
                               for r in others]).min(0).values
    best = nearest.topk(min(top, len(ids))).indices
    return ids[best].tolist()
