"""LoRA dropout as the backends draw it: masks from 16-bit random integers.

An exact Bernoulli mask draws one random number per input element, which on CPU costs about a
third of a large matrix product per layer. The backends draw 16-bit integers instead, several
per wider random word, and keep an element when its integer (read as signed) is at least
`keep_threshold(p)`. An element is therefore kept with probability `keep_probability(p)`: `1 - p`
rounded to a multiple of 2**-16, within 7.7e-6 of it. Kept inputs are scaled by the inverse of
that exact probability, so the mask stays unbiased. The reference takes the mask explicitly.
"""

from __future__ import annotations

LEVELS = 1 << 16
INT16_MIN = -(1 << 15)


def kept_levels(p: float) -> int:
    """How many of the 65536 16-bit values keep an element at dropout probability `p`."""
    return max(1, round((1 - p) * LEVELS))


def keep_probability(p: float) -> float:
    """The probability that a drawn mask keeps an element: `1 - p` rounded to a multiple of 2**-16."""
    return kept_levels(p) / LEVELS


def keep_threshold(p: float) -> int:
    """Signed 16-bit integers at or above this keep their element: `kept_levels(p)` values of 65536."""
    return INT16_MIN + LEVELS - kept_levels(p)
