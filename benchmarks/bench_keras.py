"""Training-step time in Keras 3 (TensorFlow): full fine-tuning, Keras's `enable_lora`, `LoRADense` (issue 4) and DoRA.

Workload: the PyTorch benchmark's, a 4-layer MLP of width 1024 (Dense + GELU), a batch of 2048
rows, r = 16, alpha = 32, AdamW; a step is forward + backward + optimizer step inside one
`tf.function`. The rows run in interleaved rounds in one process, so machine drift hits them
alike, and each row's median is reported. Required (issue 4): LoRADense/full <= 0.72 and
LoRADense/enable_lora <= 0.85 at dropout 0; (issue 13) DoRA/full <= 0.80 at dropout 0. The DoRA rows
are `LoRADense` with `use_dora=True`: its norm `||W + s * B @ A||` per output feature is computed from
the weights every step (detached), and rescales the layer's output.

LoRA layers differentiate Keras's exact GELU in one pass on TensorFlow
(`lora_spec/backends/keras_activations.py`), where Keras's `Dense` walks back through its chain of
element-wise ops. The "Keras's GELU" row is `LoRADense` with Keras's GELU and its autodiff gradient,
so that the table shows what that saves apart from what the adapter saves. The "frozen base" row
is the floor of Keras's layers: no adapter, every kernel frozen, only the first layer's bias
trains, so the step still back-propagates through all four frozen layers (their forward, GELU
backward and input gradients).

    python benchmarks/bench_keras.py            # 40 rounds
    python benchmarks/bench_keras.py --quick    # a short smoke run
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf
from interleave import interleaved_medians

import lora_spec.keras as lora

WIDTH, DEPTH, BATCH, RANK, ALPHA = 1024, 4, 2048, 16, 32
TARGETS = [f"dense_{i}" for i in range(DEPTH)]
ROWS = [
    "full",
    "enable_lora",
    "LoRADense p=0",
    "LoRADense p=0.1",
    "LoRADense p=0, Keras's GELU",
    "frozen base",
    "DoRA p=0",
    "DoRA p=0.1",
]
REQUIRED = {("LoRADense p=0", "full"): 0.72, ("LoRADense p=0", "enable_lora"): 0.85, ("DoRA p=0", "full"): 0.80}


def mlp() -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(WIDTH, activation="gelu", name=name) for name in TARGETS]
    return keras.Sequential([keras.Input((WIDTH,)), *layers])


def keras_gelu(x):
    """Keras's GELU behind another function object, which LoRA layers apply as given."""
    return keras.activations.gelu(x)


def build(row: str) -> keras.Model:
    """The model of one row, trainable weights set."""
    model = mlp()
    if row == "enable_lora":
        for layer in model.layers:
            layer.enable_lora(RANK, lora_alpha=ALPHA)
    elif row.startswith(("LoRADense", "DoRA")):
        dropout = float(row.split("p=")[1].split(",")[0])
        lora.apply(model, r=RANK, alpha=ALPHA, dropout=dropout, target_modules=TARGETS, use_dora=row.startswith("DoRA"))
        if row.endswith("Keras's GELU"):
            for layer in model.layers:
                layer.activation = keras_gelu
    elif row == "frozen base":
        for layer in model.layers:
            layer.kernel.trainable = False
            layer.bias.trainable = layer is model.layers[0]
    return model


class Trainer:
    """One row: model, optimizer and a fixed batch; `step()` runs one traced training step."""

    def __init__(self, row: str) -> None:
        self.model = build(row)
        self.weights = self.model.trainable_weights
        self.optimizer = keras.optimizers.AdamW(1e-4)
        self.optimizer.build(self.weights)
        self.x = tf.constant(np.random.default_rng(1).standard_normal((BATCH, WIDTH)), tf.float32)
        self._step = tf.function(self._train_step)

    def _train_step(self) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.model(self.x, training=True)))
        self.optimizer.apply(tape.gradient(loss, self.weights), self.weights)
        return loss

    def step(self) -> None:
        self._step().numpy()  # .numpy() waits for the step to finish


def time_rows(rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each row, rows interleaved within each round."""
    trainers = {row: Trainer(row) for row in ROWS}
    return interleaved_medians({row: trainer.step for row, trainer in trainers.items()}, rounds, warmup)


def table(times: dict[str, float]) -> str:
    lines = ["| row | ms / step | vs full | vs enable_lora |", "|---|---:|---:|---:|"]
    for row in ROWS:
        lines.append(
            f"| {row} | {times[row] * 1e3:.1f} | {times[row] / times['full']:.3f} | "
            f"{times[row] / times['enable_lora']:.3f} |"
        )
    return "\n".join(lines)


def verdicts(times: dict[str, float]) -> str:
    return "\n".join(
        f"{row}/{reference} = {times[row] / times[reference]:.3f} (required <= {limit}): "
        f"{'met' if times[row] / times[reference] <= limit else 'NOT met'}"
        for (row, reference), limit in REQUIRED.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds after 1 warm-up step: a smoke run")
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (each runs every row once)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} is invalid: use 1 or more.")
    rounds, warmup = (3, 1) if args.quick else (args.rounds, 3)
    print(
        f"keras {keras.__version__}, tensorflow {tf.__version__}, {os.cpu_count()} CPUs; MLP {DEPTH}x{WIDTH}, "
        f"batch {BATCH}, r={RANK}, alpha={ALPHA}, AdamW, step in tf.function; {rounds} interleaved rounds, medians",
        flush=True,
    )
    times = time_rows(rounds, warmup)
    print(table(times))
    print(verdicts(times))


if __name__ == "__main__":
    main()
