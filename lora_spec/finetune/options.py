"""The settings of a fine-tuning run, checked on construction; importing this module imports no framework."""

from __future__ import annotations

import dataclasses
from pathlib import Path

POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """Every setting of a run; the defaults are the documented, tuned ones."""

    output: Path = Path("runs/finetune")
    model: Path | None = None
    data: Path | None = None
    labels: tuple[str, ...] | None = None
    text_column: str = "text"
    label_column: str = "label"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("query", "value")
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 2e-3
    head_epochs: int = 40
    head_learning_rate: float = 3e-3
    max_length: int = 32
    pooling: str = "mean"
    max_examples: int | None = None
    validation_fraction: float = 0.2
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        positive = {
            "r": self.r,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "head_epochs": self.head_epochs,
            "max_length": self.max_length,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value} is invalid: use an integer >= 1.")
        for name in ("alpha", "learning_rate", "head_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is invalid: use a number > 0.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout {self.dropout} is invalid: use a probability in [0, 1).")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"--validation-fraction {self.validation_fraction} is invalid: use a number in (0, 1).")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads {self.threads} is invalid: use an integer >= 1.")
        if self.max_examples is not None and self.max_examples < 4:
            raise ValueError(
                f"--max-examples {self.max_examples} is invalid: use at least 4 (two per split and class)."
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"--pooling {self.pooling!r} is invalid: use one of {', '.join(POOLINGS)}.")
