"""The DoRA `Dense` product without dropout as one TensorFlow op with a hand-written gradient, for speed.

Without dropout a DoRA layer is its merged weight: `x @ ((K + s * A @ B) * f)` with `f = m / n` per
output feature (`lora_spec.dora`, Keras's `(in, out)` layout), and the norm `n` already forms the
full-size `K + s * A @ B`. So the forward pass is one product with that weight, instead of the base
product, the low-rank products, their sum and a pass rescaling the output: full-size passes over
the `(in, out)` weight replace passes over the `(rows, out)` activations. Automatic differentiation
of that product would form `x.T @ g` for the weight (full fine-tuning's most expensive product);
the gradient here keeps LoRA's low-rank products instead:

- `dx = g @ weight.T`, the one full-size product backward, as the base product's own, with the weight
  formed again (keeping it from the forward pass would hold a copy of every layer's weight in memory);
- `dA = s * x.T @ (g @ (f * B).T)`, `dB = s * f * ((x @ A).T @ g)`, both through rank-`r` products;
- `dm = sum(g * (x @ weight)) / m` per output feature: the saved output is `D * m / n` with `D` the
  direction `x @ (K + s * A @ B)`, so this is `sum(g * D) / n`, PEFT's magnitude gradient. Where a
  factor `m / n` is so small that the division would lose precision, the direction is computed again.

The base kernel is frozen (no gradient); the norm is a constant for the gradient (the DoRA paper's
section 4.3, PEFT's `detach`). Only training on TensorFlow uses it (`LoRADense._merged_dora` names the
cases); inference keeps the general formulation, and so exported graphs theirs, as do JAX and PyTorch.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

Tensor = Any


def is_dense(inputs: Tensor) -> bool:
    """Whether `inputs` is a dense TensorFlow tensor, which this product takes (not sparse or ragged)."""
    import tensorflow as tf

    return isinstance(inputs, tf.Tensor)


def dora_dense_product(
    inputs: Tensor, kernel: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, magnitude: Tensor
) -> Tensor:
    """`inputs @ ((kernel + scaling * lora_a @ lora_b) * magnitude / n)`, `n` the norm of each column of
    the sum; every operand in one float32 or float64 dtype (mixed policies keep the general path)."""

    def adapted(lora_a: Tensor, lora_b: Tensor) -> Tensor:
        return ops.add(kernel, ops.matmul(lora_a * scaling, lora_b))

    @ops.custom_gradient
    def product(inputs: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor) -> tuple[Tensor, Any]:
        rows = ops.reshape(inputs, (-1, inputs.shape[-1]))
        forward_adapted = adapted(lora_a, lora_b)
        norm = ops.sqrt(ops.sum(ops.square(forward_adapted), axis=0))
        factor = ops.divide(magnitude, norm)
        outputs = ops.matmul(rows, forward_adapted * factor)

        def gradient(upstream: Tensor) -> tuple[Tensor, ...]:
            # The weight is formed again rather than kept: a full-size copy of every layer's weight would
            # otherwise stay in memory from the forward pass to the backward pass.
            backward_adapted = adapted(lora_a, lora_b)
            grads = ops.reshape(upstream, (-1, upstream.shape[-1]))
            grad_inputs = ops.matmul(grads, ops.transpose(backward_adapted * factor))
            grad_hidden = ops.matmul(grads, ops.transpose(lora_b * (factor * scaling)))
            grad_a = ops.matmul(ops.transpose(rows), grad_hidden)
            grad_b = ops.matmul(ops.transpose(ops.matmul(rows, lora_a)), grads) * (factor * scaling)
            grad_magnitude = _magnitude_gradient(grads, outputs, rows, backward_adapted, norm, magnitude)
            return ops.reshape(grad_inputs, ops.shape(inputs)), grad_a, grad_b, grad_magnitude

        return ops.reshape(outputs, (*ops.shape(inputs)[:-1], kernel.shape[-1])), gradient

    return product(inputs, lora_a, lora_b, magnitude)


def _magnitude_gradient(
    grads: Tensor, outputs: Tensor, rows: Tensor, adapted: Tensor, norm: Tensor, magnitude: Tensor
) -> Tensor:
    """`sum(g * D) / n` per output feature, from the saved outputs `D * m / n` while every factor `m / n`
    is far from zero, else from the direction `D` computed again."""
    # Below this the saved outputs may have lost D's low bits to underflow (subnormals).
    smallest = float(np.sqrt(np.finfo(keras.backend.standardize_dtype(outputs.dtype)).tiny))

    def from_outputs() -> Tensor:
        return ops.sum(grads * outputs, axis=0) / magnitude

    def from_direction() -> Tensor:
        return ops.sum(grads * ops.matmul(rows, adapted), axis=0) / norm

    return ops.cond(ops.all(ops.abs(magnitude / norm) >= smallest), from_outputs, from_direction)
