"""Properties of the sanitize kernel, through mergekit's own in-memory merge API."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import merge_tensors

import mergekit_backdoor.merge.methods  # noqa: F401  (registers sanitize)

AGGREGATES = ["mean", "median", "trimmed_mean"]

values = st.floats(min_value=-100, max_value=100, allow_nan=False, width=32)
weights_st = st.floats(min_value=0.05, max_value=5.0)


@st.composite
def models(draw, min_models: int = 2, max_models: int = 6):
    n = draw(st.integers(min_models, max_models))
    size = draw(st.integers(1, 12))
    tensors = [torch.tensor(draw(st.lists(values, min_size=size, max_size=size))) for _ in range(n)]
    weights = draw(st.lists(weights_st, min_size=n, max_size=n))
    return tensors, weights


def sanitize(tensors, weights, aggregate, **extra) -> torch.Tensor:
    parameters = {"weight": list(weights), "aggregate": aggregate, **extra}
    return merge_tensors(tensors, "sanitize", parameters=parameters, base_index=0)


@settings(max_examples=40, deadline=None)
@given(models(), st.sampled_from(AGGREGATES))
def test_identical_models_merge_to_that_model(data, aggregate):
    tensors, weights = data
    same = [tensors[0].clone() for _ in tensors]
    assert torch.allclose(sanitize(same, weights, aggregate), tensors[0], atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(models(), st.sampled_from(AGGREGATES), st.randoms(use_true_random=False))
def test_donor_order_does_not_change_the_result(data, aggregate, rng):
    tensors, weights = data
    order = [0, *rng.sample(range(1, len(tensors)), len(tensors) - 1)]  # suspect stays base
    shuffled = sanitize([tensors[i] for i in order], [weights[i] for i in order], aggregate)
    assert torch.allclose(sanitize(tensors, weights, aggregate), shuffled, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(models(min_models=3, max_models=3))
def test_median_of_three_is_the_middle_value(data):
    tensors, _ = data
    expected = torch.stack(tensors).median(0).values
    assert torch.equal(sanitize(tensors, [1.0] * 3, "median"), expected)


@settings(max_examples=40, deadline=None)
@given(models())
def test_mean_honours_weights(data):
    tensors, weights = data
    expected = sum(w * t for w, t in zip(weights, tensors, strict=True)) / sum(weights)
    assert torch.allclose(sanitize(tensors, weights, "mean"), expected, atol=1e-4)


def test_weighted_median_follows_the_weight_not_the_count():
    tensors = [torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor([20.0])]
    assert sanitize(tensors, [1.0, 1.0, 3.0], "median").item() == 20.0  # 3 of 5 weight units
    assert sanitize(tensors, [1.0, 1.0, 1.0], "median").item() == 10.0
    assert sanitize(tensors[:2], [1.0, 1.0], "median").item() == 5.0  # even: average the middle


def test_trimmed_mean_matches_scipy_when_trim_times_n_is_whole():
    tensors = [torch.tensor([v]) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert sanitize(tensors, [1.0] * 5, "trimmed_mean", trim=0.2).item() == pytest.approx(3.0)
    assert sanitize(tensors, [1.0] * 5, "trimmed_mean", trim=0.0).item() == pytest.approx(22.0)


def test_median_refuses_negative_weights():
    with pytest.raises(ValueError, match="non-negative"):
        sanitize([torch.tensor([1.0]), torch.tensor([2.0])], [1.0, -1.0], "median")
