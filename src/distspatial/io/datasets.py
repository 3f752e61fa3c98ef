"""Synthetic workloads: skewed spatial point sets like real geodata (cities, hot spots).

Used by the demo, the benchmarks and the tests, so all three measure the same kind of data.
"""

from __future__ import annotations

import numpy as np

__all__ = ["skewed_points", "uniform_points"]


def skewed_points(
    n: int,
    d: int = 2,
    n_hotspots: int = 50,
    background: float = 0.2,
    seed: int | None = 0,
    sample_seed: int | None = None,
) -> np.ndarray:
    """``n`` points in the unit cube: Gaussian hot spots of varied size with Pareto weights over a uniform
    background holding the fraction ``background`` of the points.

    ``seed`` fixes the layout (hot spot centres, sizes, weights); ``sample_seed`` (default: ``seed``) the draw,
    so queries from the same distribution as the data are ``skewed_points(m, seed=s, sample_seed=other)``.

    >>> skewed_points(1000, 2).shape
    (1000, 2)
    """
    if n < 0 or d < 1 or not 0 <= background <= 1 or n_hotspots < 1:
        raise ValueError("need n >= 0, d >= 1, n_hotspots >= 1 and 0 <= background <= 1")
    layout = np.random.default_rng(seed)
    weights = layout.pareto(1.2, n_hotspots) + 1e-3
    weights /= weights.sum()
    centers = layout.uniform(0.05, 0.95, (n_hotspots, d))
    scales = 10 ** layout.uniform(-3, -1.3, n_hotspots)
    rng = np.random.default_rng(seed if sample_seed is None else [seed or 0, sample_seed])
    n_bg = int(round(n * background))
    n_hot = n - n_bg
    which = rng.choice(n_hotspots, size=n_hot, p=weights)
    hot = centers[which] + rng.standard_normal((n_hot, d)) * scales[which, None]
    pts = np.concatenate([hot, rng.random((n_bg, d))])
    np.clip(pts, 0.0, 1.0, out=pts)
    return np.take(pts, rng.permutation(n), axis=0)


def uniform_points(n: int, d: int = 2, seed: int | None = 0) -> np.ndarray:
    """``n`` uniform points in the unit cube."""
    return np.random.default_rng(seed).random((n, d))
