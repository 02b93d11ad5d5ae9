"""What a run reports: the summary table, the loss-curve PNG, and the table of a multi-seed comparison."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Summary:
    """The measured outcome of one `lora-spec finetune` run (what the table and metrics.json show)."""

    data: str
    train_examples: int
    validation_examples: int
    trainable_parameters: int
    head_parameters: int
    total_parameters: int
    head_only_accuracy: float
    lora_accuracy: float
    adapter_bytes: int
    model_bytes: int
    latency_batch_size: int
    base_latency_s: float
    unmerged_latency_s: float
    merged_latency_s: float
    matching_predictions: int
    max_logit_difference: float
    train_seconds: float

    @property
    def verified(self) -> bool:
        """Whether the merged ONNX model predicts what the PyTorch model predicts, on every example."""
        return self.matching_predictions == self.validation_examples


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def summary_table(summary: Summary) -> str:
    """The run's results as one markdown table."""
    s = summary
    gain = (s.lora_accuracy - s.head_only_accuracy) * 100
    rows = [
        ("data", f"{s.data}: {s.train_examples} train, {s.validation_examples} validation"),
        (
            "trainable parameters, head only",
            f"{s.head_parameters:,} ({100 * s.head_parameters / s.total_parameters:.3f}%)",
        ),
        (
            "trainable parameters, LoRA + head",
            f"{s.trainable_parameters:,} of {s.total_parameters:,} "
            f"({100 * s.trainable_parameters / s.total_parameters:.2f}%)",
        ),
        ("validation accuracy, head only (frozen base)", f"{100 * s.head_only_accuracy:.1f}%"),
        ("validation accuracy, LoRA", f"{100 * s.lora_accuracy:.1f}% ({gain:+.1f} points)"),
        (
            "adapter on disk vs model",
            f"{_size(s.adapter_bytes)} vs {_size(s.model_bytes)} ({100 * s.adapter_bytes / s.model_bytes:.2f}%)",
        ),
        (
            f"ONNX latency per batch of {s.latency_batch_size}: base / unmerged / merged",
            f"{1e3 * s.base_latency_s:.2f} / {1e3 * s.unmerged_latency_s:.2f} / {1e3 * s.merged_latency_s:.2f} ms "
            f"(merged/base {s.merged_latency_s / s.base_latency_s:.2f}x, unmerged/merged "
            f"{s.unmerged_latency_s / s.merged_latency_s:.2f}x)",
        ),
        (
            "merged ONNX predictions equal PyTorch's",
            f"{s.matching_predictions} of {s.validation_examples} (max logit difference {s.max_logit_difference:.1e})",
        ),
        ("LoRA training time", f"{s.train_seconds:.0f} s"),
    ]
    return _markdown(("quantity", "value"), rows)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_losses(curves: dict[str, Sequence[float]], steps_per_epoch: int, path: Path) -> None:
    """Write a PNG with one panel per training-loss curve against epochs (raw steps faint, a moving average bold)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, panels = pyplot.subplots(1, len(curves), figsize=(5 * len(curves), 4), sharey=True, squeeze=False)
    for axes, (name, curve) in zip(panels[0], curves.items(), strict=True):
        losses = np.asarray(curve, dtype=float)
        epochs = np.arange(1, len(losses) + 1) / steps_per_epoch
        window = max(1, min(len(losses) // 20, steps_per_epoch))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(epochs, losses, color="tab:blue", alpha=0.25 if window > 1 else 1.0, linewidth=0.7, label="per step")
        if window > 1:
            axes.plot(epochs[window - 1 :], smooth, color="tab:blue", label=f"moving average of {window} steps")
        axes.set_title(name)
        axes.set_xlabel("epoch")
        axes.grid(True, alpha=0.3)
        axes.legend()
    panels[0][0].set_ylabel("training loss (cross-entropy)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


@dataclasses.dataclass
class SeedResult:
    """Validation accuracies of the head-only baseline and of LoRA for one seed."""

    seed: int
    head_only_accuracy: float
    lora_accuracy: float


def _mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seeds_table(results: Sequence[SeedResult]) -> tuple[str, bool]:
    """The per-seed table with mean ± standard deviation, and whether LoRA's gain exceeds the spread.

    The spread is the sum of the two standard deviations: the gain must clear both methods'
    seed-to-seed variation at once.
    """
    rows = [
        (
            str(r.seed),
            f"{100 * r.head_only_accuracy:.1f}%",
            f"{100 * r.lora_accuracy:.1f}%",
            f"{100 * (r.lora_accuracy - r.head_only_accuracy):+.1f}",
        )
        for r in results
    ]
    head_mean, head_spread = _mean_spread([r.head_only_accuracy for r in results])
    lora_mean, lora_spread = _mean_spread([r.lora_accuracy for r in results])
    gain, spread = lora_mean - head_mean, head_spread + lora_spread
    rows.append(
        (
            "mean ± std",
            f"{100 * head_mean:.1f} ± {100 * head_spread:.1f}%",
            f"{100 * lora_mean:.1f} ± {100 * lora_spread:.1f}%",
            f"{100 * gain:+.1f}",
        )
    )
    table = _markdown(("seed", "head only", "LoRA", "gain (points)"), rows)
    beats = gain > spread
    verdict = (
        f"LoRA {'beats' if beats else 'does not beat'} head-only by {100 * gain:.1f} points on the mean, "
        f"{'more' if beats else 'no more'} than the spread "
        f"({100 * spread:.1f} points, the sum of both standard deviations)."
    )
    return table + "\n\n" + verdict, beats
