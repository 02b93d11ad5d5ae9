"""Side-by-side timing for the benchmarks: rows interleaved in rotating rounds, medians reported.

This machine drifts by several percent between identical runs, so rows are never timed one
after the other: each round runs every row once, in an order rotated by one each round, and
the median of the rounds is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleaved_medians(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds of each row's `step()`, the rows interleaved within each round.

    `clock` is wall time by default; `time.process_time` gives the CPU time of every thread of
    the process instead, which other jobs sharing the cores disturb far less.
    """
    rows = list(steps)
    for row in rows:
        for _ in range(warmup):
            steps[row]()
    samples: dict[str, list[float]] = {row: [] for row in rows}
    for round_index in range(rounds):
        shift = round_index % len(rows)
        for row in rows[shift:] + rows[:shift]:
            start = clock()
            steps[row]()
            samples[row].append(clock() - start)
    return {row: statistics.median(values) for row, values in samples.items()}
