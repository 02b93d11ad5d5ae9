"""One adapter on one layer, and what it computes: plain LoRA (`LoRAAdapter`) and DoRA (`DoRAAdapter`).

A LoRA layer (`torch_layers.LoRALayer`) holds adapters by name and asks each for its part:
`add_to` (its contribution to the layer's output), `merge_into` (its part of the merged weight)
and `train_linear` (a linear layer's eager training step, one fused autograd Function). The layer
supplies what depends on its kind (the low-rank and base products, the axis of the output
features, the weight's layout), so each variant's math is written once for every kind of layer.

Several active adapters run in order, as PEFT runs them: a LoRA adapter adds its update; a DoRA
adapter rescales each output feature of everything before it by `m / n` (without dropout; with
dropout, PEFT's formula rescales the base product of the dropped input only). The merged weight
is the same composition, so merging keeps the evaluation outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lora_spec.backends.torch_dora_linear import linear_dora, linear_weight_norm
from lora_spec.backends.torch_dropout import DropoutMask, SeededMask
from lora_spec.backends.torch_linear import linear_lora

if TYPE_CHECKING:
    from lora_spec.backends.torch_layers import LoRALayer, LoRALinear


def base_weight(module: nn.Module) -> torch.Tensor:
    """The `weight` of a layer LoRA wraps (Linear, Conv1D, Embedding, Conv2d): always a tensor, which
    `nn.Module.__getattr__` cannot tell the type checker."""
    return cast(torch.Tensor, module.weight)


def base_bias(module: nn.Module) -> torch.Tensor | None:
    """The `bias` of a linear layer LoRA wraps, None when it has none."""
    return cast("torch.Tensor | None", module.bias)


def cast_to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Only when needed: a same-dtype `.to` still shows up as a node in exported graphs.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class LoRAAdapter(nn.Module):
    """One adapter on one layer: the factors `lora_A`, `lora_B` and its rank, alpha, scaling and dropout.

    `scaling` is a float, or a 0-d tensor once the model is prepared for compiled hot-swapping (so
    that a new alpha does not recompile). The factors may be zero-padded beyond the rank `r` for
    the same reason; `factors()` gives them at rank `r`. An adapter initialised from the base
    weight (PiSSA, OLoRA) keeps its initial factors as buffers `initial_lora_A`, `initial_lora_B`.
    """

    use_dora = False

    def __init__(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        factory: dict[str, Any],
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **factory))
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling: float | torch.Tensor = scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={float(self.scaling):g}, dropout={self.dropout}"

    @property
    def groups(self) -> int:
        """How many groups the factors are split into (a grouped conv's; 1 otherwise)."""
        return self.lora_A.shape[0] // self.lora_B.shape[1] if self.lora_A.dim() == 4 else 1

    def _grouped(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of factors with the rank split per group: `A (groups, r/groups, ...)`, `B (groups, out/groups,
        r/groups, ...)`, so that padding and slicing the rank keeps each group's block."""
        groups, rank = self.groups, lora_a.shape[0]
        return (
            lora_a.view(groups, rank // groups, *lora_a.shape[1:]),
            lora_b.view(groups, lora_b.shape[0] // groups, rank // groups, *lora_b.shape[2:]),
        )

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A, B)` at rank `r`, without the zero padding hot-swapping may have added."""
        if self.lora_A.shape[0] == self.r:
            return self.lora_A, self.lora_B
        grouped_a, grouped_b = self._grouped(self.lora_A, self.lora_B)
        per_group = self.r // self.groups
        return (
            grouped_a[:, :per_group].reshape(self.r, *self.lora_A.shape[1:]),
            grouped_b[:, :, :per_group].reshape(self.lora_B.shape[0], per_group, *self.lora_B.shape[2:]),
        )

    def assign(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Write factors of any rank up to the capacity (zero-padding the rest) and take their rank as `r`."""
        rank = lora_a.shape[0]
        new_a, new_b = self._grouped(lora_a.contiguous(), lora_b.contiguous())
        with torch.no_grad():
            grouped_a, grouped_b = self._grouped(self.lora_A, self.lora_B)
            self.lora_A.zero_()
            self.lora_B.zero_()
            grouped_a[:, : rank // self.groups] = new_a
            grouped_b[:, :, : rank // self.groups] = new_b
        self.r = rank

    def keep_initial_factors(self) -> None:
        """Keep the factors as they are now (computed from the base weight) for `initial_factors`."""
        lora_a, lora_b = self.factors()
        self.register_buffer("initial_lora_A", lora_a.detach().clone())
        self.register_buffer("initial_lora_B", lora_b.detach().clone())

    def initial_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The factors an init from the base weight gave (the base weight holds the residual), else None."""
        lora_a, lora_b = getattr(self, "initial_lora_A", None), getattr(self, "initial_lora_B", None)
        return None if lora_a is None or lora_b is None else (lora_a, lora_b)

    # -- what the adapter computes; a variant overrides these --------------------------------------------------

    def initialise(self, layer: LoRALayer) -> None:
        """Called once the factors have their initial values: nothing else to set for plain LoRA."""

    def add_to(
        self, layer: LoRALayer, result: torch.Tensor, x: torch.Tensor, dropout_mask: DropoutMask | None = None
    ) -> torch.Tensor:
        """The layer's output `result` with this adapter's contribution for input `x`."""
        return layer.add_update(result, self, x, dropout_mask)

    def merge_into(self, layer: LoRALayer, merged: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The weight `merged` (the base weight `base` with the adapters before this one) with this one merged."""
        return merged + layer.adapter_delta(self, merged.dtype)

    def train_linear(self, layer: LoRALinear, x: torch.Tensor, mask: DropoutMask | SeededMask | None) -> torch.Tensor:
        """A linear layer's output in eager training, this adapter alone active: one fused Function."""
        scaling = self.scaling
        assert isinstance(scaling, float)  # the layer takes the fused path only with a float scaling
        return linear_lora(
            x, layer.weight_out_in(), base_bias(layer.base_layer), self.lora_A, self.lora_B, scaling, mask
        )


class DoRAAdapter(LoRAAdapter):
    """A DoRA adapter (`lora_spec.dora`): LoRA's factors plus the trained magnitude `lora_magnitude_vector`,
    PEFT's name and shape (`(out,)`, an embedding's `(dim,)`, a conv's `(1, out, 1, 1)`).

    The norm `n = ||W + s * B @ A||` per output feature is computed from the unmerged base weight
    in at least float32 and held constant in the backward pass, as PEFT does.
    """

    use_dora = True

    def __init__(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        factory: dict[str, Any],
        magnitude_shape: tuple[int, ...],
    ) -> None:
        super().__init__(a_shape, b_shape, r, alpha, scaling, dropout, factory)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(magnitude_shape, **factory))

    def initialise(self, layer: LoRALayer) -> None:
        """The magnitude starts at the norm of the initial adapter, where DoRA is the LoRA layer."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm(layer))

    def weight_norm(self, layer: LoRALayer, base: torch.Tensor | None = None) -> torch.Tensor:
        """`||W + s * B @ A||` per output feature in the magnitude's shape, detached, in at least float32;
        `base` is the base weight in that dtype (default: the layer's)."""
        weight = base_weight(layer.base_layer)
        compute = torch.promote_types(weight.dtype, torch.float32)
        with torch.no_grad():
            adapted = layer.adapter_delta(self, compute)
            adapted += weight.to(compute) if base is None else base
            return layer.feature_norms(adapted)

    def factor(self, layer: LoRALayer) -> torch.Tensor:
        """`m / n` in the magnitude's shape, which broadcasts against the layer's output."""
        return self.lora_magnitude_vector / self.weight_norm(layer)

    def add_to(
        self, layer: LoRALayer, result: torch.Tensor, x: torch.Tensor, dropout_mask: DropoutMask | None = None
    ) -> torch.Tensor:
        """PEFT's DoRA forward: `result + (f - 1) * base + f * s * B A d(x)` with `f = m / n` and `base`
        the output so far without the bias or, when the input is dropped, the base product of `d(x)`."""
        factor = self.factor(layer)
        # In the adapter's dtype: a half-precision base's input meets float32 factors (as in LoRA's update).
        dropped = layer.dropped(x, self, dropout_mask)
        if layer.drops_input(self, dropout_mask):
            base = layer.base_product(dropped)
        else:
            bias = getattr(layer.base_layer, "bias", None)
            base = result if bias is None else result - bias.reshape(factor.shape)
        return cast_to(result + ((factor - 1) * base + factor * layer.low_rank(self, dropped)), result.dtype)

    def merge_into(self, layer: LoRALayer, merged: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """`(m / n) * (merged + s * B @ A)` per output feature, `n` from the unmerged base weight."""
        delta = layer.adapter_delta(self, merged.dtype)
        factor = self.lora_magnitude_vector.detach().to(merged.dtype) / self.weight_norm(layer, base)
        return layer.feature_column(factor) * (merged + delta)

    def train_linear(self, layer: LoRALinear, x: torch.Tensor, mask: DropoutMask | SeededMask | None) -> torch.Tensor:
        weight = layer.weight_out_in()
        scaling = self.scaling
        assert isinstance(scaling, float)  # the layer takes the fused path only with a float scaling
        norm = linear_weight_norm(weight, self.lora_A, self.lora_B, scaling)
        return linear_dora(
            x,
            weight,
            base_bias(layer.base_layer),
            self.lora_A,
            self.lora_B,
            scaling,
            self.lora_magnitude_vector,
            norm,
            mask,
        )
