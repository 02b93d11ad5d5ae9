"""Trainable-parameter counts, printed like PEFT's `print_trainable_parameters`, for every backend."""

from __future__ import annotations

from typing import NamedTuple


class TrainableParameters(NamedTuple):
    """Parameter counts; `str()` prints like PEFT's `print_trainable_parameters`."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"
