"""The ``sanitize`` merge method, written on mergekit 0.1.5's own merge-method API.

Arora et al. (Findings of ACL 2024, "Here's a Free Lunch") average the weights of a suspect
model with donors of the same architecture and task (WAG): the backdoor fades while clean
accuracy stays. ``aggregate`` swaps the mean for a coordinate-wise robust statistic
(Yin et al., ICML 2018), which resists a single poisoned input better.

Every aggregate honours the per-model ``weight``:
- ``mean``: sum(w_i x_i) / sum(w_i) (or the plain weighted sum with ``normalize: false``);
- ``median``: the weighted median: the value at which the cumulative weight of the sorted
  inputs crosses half the total; where it lands exactly on half (an even number of equally
  weighted inputs) the two neighbours are averaged, as the ordinary median does;
- ``trimmed_mean``: sort, cut ``trim`` of the total weight from each end (fractionally where a
  cut falls inside an input's weight), and average what is left. With equal weights and
  ``trim * n`` a whole number this is scipy's ``trim_mean``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from mergekit.merge_methods import BasePolicy, InputContract, PerInput, TensorGroup, merge_method
from pydantic import Field

from mergekit_backdoor import register
from mergekit_backdoor.errors import IncompatibleModelError

Aggregate = Literal["mean", "median", "trimmed_mean"]
AGGREGATES: tuple[str, ...] = ("mean", "median", "trimmed_mean")


def aggregate_tensors(
    stack: torch.Tensor,
    weights: torch.Tensor,
    aggregate: str = "mean",
    *,
    trim: float = 0.2,
    normalize: bool = True,
) -> torch.Tensor:
    """Aggregate ``stack`` ([n_models, *shape], float) along dim 0 with per-model ``weights``."""
    w = weights.to(stack.dtype).reshape(-1, *([1] * (stack.ndim - 1)))
    if aggregate == "mean":
        merged = (stack * w).sum(0)
        return merged / w.sum() if normalize else merged
    if bool((weights < 0).any()):
        raise ValueError(f"aggregate {aggregate!r} needs non-negative weights, got {weights.tolist()}")
    values, order = stack.sort(dim=0)
    if bool((weights == weights[0]).all()):
        w_sorted = w.expand(-1, *([1] * (stack.ndim - 1)))  # equal weights: rank order is enough
    else:
        w_sorted = w.expand_as(stack).gather(0, order)
    cumulative = w_sorted.cumsum(0)
    total = cumulative[-1:]
    if aggregate == "median":
        half, tolerance = total / 2, total * 1e-6
        lower = (cumulative >= half - tolerance).to(torch.uint8).argmax(0, keepdim=True)
        upper = (cumulative > half + tolerance).to(torch.uint8).argmax(0, keepdim=True)
        lower, upper = (index.expand(1, *stack.shape[1:]) for index in (lower, upper))
        return ((values.gather(0, lower) + values.gather(0, upper)) / 2).squeeze(0)
    if aggregate == "trimmed_mean":
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        start = cumulative - w_sorted
        kept = (torch.minimum(cumulative, (1 - trim) * total) - torch.maximum(start, trim * total))
        kept = kept.clamp_min(0)
        return (values * kept).sum(0) / kept.sum(0)
    raise ValueError(f"unknown aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")


@merge_method(
    name="sanitize",
    pretty_name="Sanitize (suspect + donors, WAG)",
    reference_url="https://arxiv.org/abs/2402.19334",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def sanitize(
    group: TensorGroup,
    weight: PerInput[float] = 1.0,
    aggregate: Aggregate = "mean",
    trim: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.2,
    normalize: bool = True,
) -> torch.Tensor:
    """Merge the suspect (``base_model``) with its donors, tensor by tensor, in float32."""
    first = group.entries[0].tensor
    if not first.is_floating_point():
        raise TypeError(f"sanitize cannot merge non-float tensor {group.metadata.name}")
    compute = torch.float64 if first.dtype == torch.float64 else torch.float32
    for entry in group.entries:
        if not bool(torch.isfinite(entry.tensor).all()):
            raise IncompatibleModelError(
                f"{entry.id}: tensor {group.metadata.name} holds NaN or Inf values"
            )
    stack = torch.stack([entry.tensor.to(compute) for entry in group.entries])
    weights = torch.tensor([float(weight[entry.id]) for entry in group.entries], dtype=compute)
    merged = aggregate_tensors(stack, weights, aggregate, trim=trim, normalize=normalize)
    return merged.to(first.dtype)


METHODS = (sanitize,)

register()  # no-op when mergekit's import hook already did it
