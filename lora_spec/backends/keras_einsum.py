"""How an `EinsumDense` equation maps to a linear layer, so the reference's `A`/`B` apply to it.

An equation such as `abc,cde->abde` is a linear map when each kernel axis is either contracted
with the input (`c`: an input feature) or carried to the output (`d`, `e`: output features).
Flattening those axes in the kernel's order gives the reference layout `W (out, in)`, which is
what a PyTorch `Linear(in, heads * head_dim)` holds; the low-rank path is then two einsums
through a rank axis.
"""

from __future__ import annotations

import dataclasses
import math
import string

import numpy as np


@dataclasses.dataclass(frozen=True)
class EinsumPlan:
    """The linear view of an equation: kernel axes split into inputs and outputs, and the two
    einsums of the low-rank path (`x, lora_a -> hidden`, `hidden, lora_b -> y`)."""

    input_axes: str
    output_axes: str
    kernel_axes: str
    to_hidden: str
    from_hidden: str
    output: str

    @property
    def feature_axes(self) -> str:
        """The output axes in the order the layer's output has them."""
        return "".join(a for a in self.output if a in self.output_axes)

    @property
    def feature_sums(self) -> str:
        """The einsum that sums a kernel-shaped tensor over the input axes, leaving the output axes in kernel order."""
        return f"{self.kernel_axes}->{self.output_axes}"

    @property
    def feature_tail(self) -> str | None:
        """The output's axes from its first output axis on, along which a per-feature tensor broadcasts; None
        when an ellipsis is among them (its rank is unknown)."""
        tail = self.output[min(self.output.index(a) for a in self.output_axes) :]
        return None if "." in tail else tail

    @property
    def delta(self) -> str:
        """The einsum of `lora_a (*input, r)` and `lora_b (r, *output)` that gives their product in the kernel's
        axis order."""
        rank = next(a for a in string.ascii_letters if a not in self.kernel_axes)
        return f"{self.input_axes}{rank},{rank}{self.output_axes}->{self.kernel_axes}"

    def feature_shape(self, kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape that lays one value per output feature (`feature_axes` order) along `feature_tail`, 1 on
        its other axes, so that it broadcasts against the output."""
        tail = self.feature_tail
        assert tail is not None  # DoRA, which needs these shapes, refuses equations without one
        size = dict(zip(self.kernel_axes, kernel_shape, strict=True))
        return tuple(size.get(a, 1) for a in tail)

    def features_from_reference(self, kernel_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """`(shape, permutation)`: a vector over the flattened output features (the reference's order, the
        kernel's) reshaped to `shape` and transposed by `permutation` is in `feature_axes` order."""
        _, outputs = self.dims(kernel_shape)
        return outputs, tuple(self.output_axes.index(a) for a in self.feature_axes)

    def dims(self, kernel_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The kernel's input and output dimensions, in kernel order."""
        size = dict(zip(self.kernel_axes, kernel_shape, strict=True))
        return tuple(size[a] for a in self.input_axes), tuple(size[a] for a in self.output_axes)

    def _order(self) -> list[int]:
        return [self.kernel_axes.index(a) for a in self.input_axes + self.output_axes]

    def to_reference(self, kernel: np.ndarray) -> np.ndarray:
        """`W (out, in)` from a kernel of any axis order."""
        inputs, outputs = self.dims(kernel.shape)
        return np.transpose(kernel, self._order()).reshape(math.prod(inputs), math.prod(outputs)).T

    def from_reference(self, weight: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
        """The kernel holding `W (out, in)`, inverse of `to_reference`."""
        inputs, outputs = self.dims(kernel_shape)
        return np.transpose(weight.T.reshape(*inputs, *outputs), np.argsort(self._order()))


def plan(equation: str) -> EinsumPlan | None:
    """The linear view of `equation`, or None when it is not one (a kernel axis also indexes the
    input and output, like per-head weights, or is summed away)."""
    try:
        operands, output = equation.replace(" ", "").split("->")
        inputs, kernel = operands.split(",")
    except ValueError:
        return None
    if "." in kernel or len(set(kernel)) != len(kernel):
        return None
    input_axes = "".join(a for a in kernel if a in inputs and a not in output)
    output_axes = "".join(a for a in kernel if a in output and a not in inputs)
    if len(input_axes) + len(output_axes) != len(kernel) or not input_axes or not output_axes:
        return None
    rank = next(a for a in string.ascii_letters if a not in equation)
    hidden = "".join(a for a in inputs if a not in input_axes) + rank
    return EinsumPlan(
        input_axes=input_axes,
        output_axes=output_axes,
        kernel_axes=kernel,
        to_hidden=f"{inputs},{input_axes}{rank}->{hidden}",
        from_hidden=f"{hidden},{rank}{output_axes}->{output}",
        output=output,
    )


def linear_plan(equation: str) -> EinsumPlan:
    """`plan(equation)` of an equation known to be linear: the LoRA layers and targets refuse the others."""
    found = plan(equation)
    assert found is not None, f"equation {equation!r} is not a linear map"
    return found
