"""Module-switching layouts (MSD: Li, Arora, He, Dras, Xu 2025, arXiv 2504.05902).

Instead of averaging every tensor, each switchable module of each layer (query, key, value,
attention output, feed-forward in, feed-forward out) is taken whole from one of the merged
models. A backdoor is a chain of modules trained together; a layout in which neighbouring
modules come from different models breaks the chain, while every module still does the task it
was trained for. Tensors outside the switched modules (embeddings, norms, classifier head) are
averaged.

This module holds the structure only: finding the slots in a model's tensor names, the
structural penalty of a layout, a local search for low-penalty layouts, and the mergekit recipe
that replays a layout exactly (``sanitize`` with per-tensor ``weight`` filters: 1 for the
module's source, 0 for the others). Choosing among candidate layouts with clean samples is
``merge/search.py``.

The penalty follows MSD's rules, re-derived rather than copied: a unit cost for every pair of
directly connected modules (q-k, v-o, o-ffn_in, ffn_in-ffn_out, ffn_out into the next layer's
q/k/v) that share a source, half that for q-o / k-o and for the same module in consecutive
layers (the residual path), plus a balance term so each model supplies its share of modules.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# module path (after the layer index) -> role; the first pattern that matches wins
_ROLES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("q", re.compile(r"(^|\.)(query|q_proj|q_lin|q)$")),
    ("k", re.compile(r"(^|\.)(key|k_proj|k_lin|k)$")),
    ("v", re.compile(r"(^|\.)(value|v_proj|v_lin|v)$")),
    ("o", re.compile(r"(attention\.output\.dense|o_proj|out_lin|attn\.c_proj|self_attn\.out_proj)$")),
    ("ffn_in", re.compile(r"(intermediate\.dense|gate_proj|up_proj|lin1|fc1|mlp\.c_fc)$")),
    ("ffn_out", re.compile(r"((^|\.)output\.dense|down_proj|lin2|fc2|mlp\.c_proj)$")),
)
_LAYER_TENSOR = re.compile(r"^(?P<prefix>.*?\.(?:layer|layers|h|block)\.(?P<index>\d+)\.)"
                           r"(?P<module>.+)\.(?:weight|bias)$")
EDGE_WEIGHTS = {"direct": 1.0, "attention": 0.5, "residual": 0.5}
BALANCE_WEIGHT = 2.0


@dataclass(frozen=True)
class Slot:
    """One switchable module: its layer, role and the tensor-name prefix mergekit filters on."""

    layer: int
    role: str
    prefix: str  # e.g. "bert.encoder.layer.0.attention.self.query." (ends with a dot)


def role_of(module: str) -> str | None:
    for role, pattern in _ROLES:
        if pattern.search(module):
            return role
    return None


def find_slots(tensor_names: Iterable[str]) -> list[Slot]:
    """The switchable modules among ``tensor_names``, ordered by layer and role."""
    slots: dict[str, Slot] = {}
    for name in tensor_names:
        match = _LAYER_TENSOR.match(name)
        if not match:
            continue
        role = role_of(match["module"])
        if role is None:
            continue
        prefix = f"{match['prefix']}{match['module']}."
        slots.setdefault(prefix, Slot(int(match["index"]), role, prefix))
    order = {role: i for i, (role, _) in enumerate(_ROLES)}
    return sorted(slots.values(), key=lambda s: (s.layer, order[s.role], s.prefix))


def slot_graph(slots: Sequence[Slot]) -> list[tuple[int, int, float]]:
    """Weighted edges between slots whose modules feed each other directly or residually."""
    by_layer: dict[int, dict[str, list[int]]] = {}
    for i, slot in enumerate(slots):
        by_layer.setdefault(slot.layer, {}).setdefault(slot.role, []).append(i)
    direct, attention, residual = (EDGE_WEIGHTS[k] for k in ("direct", "attention", "residual"))
    edges: list[tuple[int, int, float]] = []

    def connect(a: list[int], b: list[int], weight: float) -> None:
        edges.extend((i, j, weight) for i in a for j in b if i != j)

    layers = sorted(by_layer)
    for position, layer in enumerate(layers):
        roles = by_layer[layer]
        get = roles.get  # role -> slot indices ([] when the layer has none)
        connect(get("q", []), get("k", []), direct)
        connect(get("v", []), get("o", []), direct)
        connect(get("q", []) + get("k", []), get("o", []), attention)
        connect(get("o", []), get("ffn_in", []), direct)
        ffn_in = get("ffn_in", [])
        connect(ffn_in, get("ffn_out", []), direct)
        for a, b in itertools.combinations(ffn_in, 2):  # gate and up multiply each other
            edges.append((a, b, direct))
        if position + 1 < len(layers):
            following = by_layer[layers[position + 1]]
            connect(get("ffn_out", []), following.get("q", []) + following.get("k", [])
                    + following.get("v", []), direct)
            for role, members in roles.items():
                connect(members, following.get(role, []), residual)
    return edges


def structure_penalty(layout: Sequence[int], edges: Sequence[tuple[int, int, float]],
                      n_models: int) -> float:
    """Same-source adjacency cost plus the balance term (0 is a perfect layout)."""
    same = sum(weight for i, j, weight in edges if layout[i] == layout[j])
    counts = Counter(layout)
    ideal = len(layout) / n_models
    balance = sum((counts.get(m, 0) - ideal) ** 2 for m in range(n_models)) / max(1, len(layout))
    return same + BALANCE_WEIGHT * balance


def _local_search(layout: list[int], edges: Sequence[tuple[int, int, float]], n_models: int,
                  rng: random.Random) -> tuple[float, list[int]]:
    best = structure_penalty(layout, edges, n_models)
    improved = True
    while improved:
        improved = False
        for slot in rng.sample(range(len(layout)), len(layout)):
            current = layout[slot]
            for source in range(n_models):
                if source == current:
                    continue
                layout[slot] = source
                score = structure_penalty(layout, edges, n_models)
                if score < best - 1e-9:
                    best, current, improved = score, source, True
                else:
                    layout[slot] = current
    return best, layout


def candidate_layouts(slots: Sequence[Slot], n_models: int, *, count: int = 24, restarts: int = 200,
                      seed: int = 0) -> list[tuple[float, tuple[int, ...]]]:
    """Up to ``count`` distinct layouts, lowest structural penalty first.

    Random restarts of a first-improvement local search; every layout found is also added
    under each relabelling of the models (same penalty, different modules from each model), so
    the clean-sample stage chooses which model supplies which modules.
    """
    if n_models < 2:
        raise ValueError("module switching needs at least two models")
    rng = random.Random(seed)
    edges = slot_graph(slots)
    found: dict[tuple[int, ...], float] = {}
    for _ in range(restarts):
        start = [rng.randrange(n_models) for _ in slots]
        score, layout = _local_search(start, edges, n_models, rng)
        for permutation in itertools.permutations(range(n_models)):
            found.setdefault(tuple(permutation[s] for s in layout), score)
    ranked = sorted(found.items(), key=lambda item: (round(item[1], 9), item[0]))
    return [(score, layout) for layout, score in ranked[:count]]


def layout_recipe(models: Sequence[str], slots: Sequence[Slot], layout: Sequence[int], *,
                  dtype: str | None = None) -> dict[str, Any]:
    """A ``sanitize`` recipe that replays ``layout``: for every slot the source model gets
    weight 1 and the others 0 (a weighted mean that returns the source's tensor exactly);
    everything else is the plain mean. The first model is the suspect (``base_model``)."""
    entries = []
    for index, model in enumerate(models):
        weight = [{"filter": slot.prefix, "value": 0.0}
                  for slot, source in zip(slots, layout, strict=True) if source != index]
        weight.append({"value": 1.0})
        entries.append({"model": model, "parameters": {"weight": weight}})
    recipe: dict[str, Any] = {"merge_method": "sanitize", "base_model": models[0],
                              "models": entries, "parameters": {"aggregate": "mean"}}
    if dtype:
        recipe["dtype"] = dtype
    return recipe


def describe_layout(slots: Sequence[Slot], layout: Sequence[int], names: Sequence[str]) -> str:
    """One line per layer: ``layer 0: q=A k=B v=C o=A ffn_in=B ffn_out=C``."""
    letters = [chr(ord("A") + i) for i in range(len(names))]
    lines: dict[int, list[str]] = {}
    for slot, source in zip(slots, layout, strict=True):
        lines.setdefault(slot.layer, []).append(f"{slot.role}={letters[source]}")
    legend = ", ".join(f"{letter}={name}" for letter, name in zip(letters, names, strict=True))
    return "\n".join([legend] + [f"layer {layer}: {' '.join(parts)}" for layer, parts in
                                 sorted(lines.items())])
