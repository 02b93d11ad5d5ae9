"""Numerical helpers for tests: finite differences and magnitude-aware tolerances."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-3}


def numerical_gradient(loss: Callable[[np.ndarray], float], at: np.ndarray, step: float = 1e-3) -> np.ndarray:
    """Central differences of a scalar `loss` with respect to every element of `at` (float64)."""
    gradient = np.zeros_like(at, dtype=np.float64)
    for index in np.ndindex(at.shape):
        original = at[index]
        at[index] = original + step
        above = loss(at)
        at[index] = original - step
        below = loss(at)
        at[index] = original
        gradient[index] = (above - below) / (2 * step)
    return gradient


def assert_close(actual, expected, dtype=np.float64, factor: float = 1.0) -> None:
    """Equal within a tolerance scaled to the largest magnitude, so exact zeros stay strict."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    scale = float(np.max(np.abs(expected), initial=0.0))
    atol = factor * TOLERANCE[np.dtype(dtype)] * scale + 1e-300
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)
