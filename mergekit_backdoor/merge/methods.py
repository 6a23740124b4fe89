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

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from mergekit.merge_methods import BasePolicy, InputContract, PerInput, TensorGroup, merge_method
from pydantic import Field

from mergekit_backdoor import register
from mergekit_backdoor.errors import IncompatibleModelError

Aggregate = Literal["mean", "median", "trimmed_mean"]
AGGREGATES: tuple[str, ...] = ("mean", "median", "trimmed_mean")
_BLOCK = 1 << 22  # coordinates per block for median / trimmed_mean in the kernel (4M)


def _weighted_mean(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], compute: torch.dtype, normalize: bool
) -> torch.Tensor:
    """sum(w_i x_i) (/ sum(w_i)) accumulated in place in ``compute``, one input at a time.

    No [n_models, ...] stack and no per-input temporaries (``add_`` upcasts bf16 inputs on the
    fly), as mergekit's own ``linear`` does.
    """
    merged = tensors[0].to(compute, copy=True)
    if weights[0] != 1.0:
        merged.mul_(weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        merged.add_(tensor, alpha=weight)
    if normalize:
        merged.div_(torch.tensor(weights, dtype=compute).sum())
    return merged


def _all_finite(tensor: torch.Tensor) -> bool:
    """Cheap screen: a NaN or Inf anywhere makes the sum non-finite (so does overflow, rarely).

    One reduction, no bool tensor: ``torch.isfinite(...).all()`` is ~10x slower on CPU.
    """
    return bool(torch.isfinite(tensor.sum()))


def _raise_on_non_finite(group: TensorGroup) -> None:
    """Name the first input holding NaN or Inf (in input order), if any."""
    for entry in group.entries:
        if not _all_finite(entry.tensor) and not bool(torch.isfinite(entry.tensor).all()):
            raise IncompatibleModelError(
                f"{entry.id}: tensor {group.metadata.name} holds NaN or Inf values"
            )


def aggregate_tensors(
    stack: torch.Tensor,
    weights: torch.Tensor,
    aggregate: str = "mean",
    *,
    trim: float = 0.2,
    normalize: bool = True,
) -> torch.Tensor:
    """Aggregate ``stack`` ([n_models, *shape], float) along dim 0 with per-model ``weights``."""
    if aggregate == "mean":
        return _weighted_mean(stack.unbind(0), weights.tolist(), stack.dtype, normalize)
    w = weights.to(device=stack.device, dtype=stack.dtype).reshape(-1, *([1] * (stack.ndim - 1)))
    if bool((weights < 0).any()):
        raise ValueError(
            f"aggregate {aggregate!r} needs non-negative weights, got {weights.tolist()}"
        )
    equal = bool((weights == weights[0]).all())
    if aggregate == "median" and equal and bool(weights[0] > 0):
        # equal weights: the middle value (or the mean of the two middle ones), no cumsum/gather
        values, n = stack.sort(dim=0).values, stack.shape[0]
        return (values[(n - 1) // 2] + values[n // 2]) / 2
    values, order = stack.sort(dim=0)
    if equal:
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
    values = [float(weight[entry.id]) for entry in group.entries]
    if aggregate == "mean":
        # A NaN/Inf in any input (even one weighted 0) makes the result non-finite, so one cheap
        # check of the result replaces a scan of every input; only when it fails are the inputs
        # scanned to name the culprit (a result that overflowed from finite inputs is kept).
        merged = _weighted_mean([e.tensor for e in group.entries], values, compute, normalize)
        if not _all_finite(merged):
            _raise_on_non_finite(group)
        return merged.to(first.dtype)
    # The robust aggregates are coordinate-wise: work through the flattened inputs a block of
    # coordinates at a time, so the float32 stack and the sort's temporaries stay small.
    weights = torch.tensor(values, dtype=compute, device=first.device)
    flats = [entry.tensor.reshape(-1) for entry in group.entries]
    merged = torch.empty(first.numel(), dtype=first.dtype, device=first.device)
    stack = torch.empty((len(flats), min(_BLOCK, first.numel())), dtype=compute,
                        device=first.device)
    for start in range(0, first.numel(), _BLOCK):
        stop = min(start + _BLOCK, first.numel())
        block = stack[:, : stop - start]
        for row, flat in zip(block, flats, strict=True):
            row.copy_(flat[start:stop])
        if not _all_finite(block):
            _raise_on_non_finite(group)
        merged[start:stop] = aggregate_tensors(block, weights, aggregate, trim=trim,
                                               normalize=normalize)
    return merged.view(first.shape)


METHODS = (sanitize,)

register()  # no-op when mergekit's import hook already did it
