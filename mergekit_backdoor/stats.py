"""Small statistics shared by reports, the scanner and the benchmarks."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate of ``successes`` out of ``n`` (``(0, 1)`` for n=0).

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0% and 100%, where
    a backdoor's rates often sit.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def floor_adjusted(victim: float, after: float, floor: float) -> float:
    """Floor-adjusted removal: the share of the victim's ASR above the floor (a clean model's rate
    on the same triggered set, under the same processing) that is gone ``after``; NaN when the
    victim is not above the floor."""
    excess = victim - floor
    return (victim - after) / excess if excess > 0 else float("nan")
