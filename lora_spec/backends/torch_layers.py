"""LoRA modules for PyTorch: each wraps a base layer (`base_layer`) and adds `lora_A`, `lora_B`.

Layouts, initialisation and scaling are the reference's (`lora_spec.reference`): a linear's
`A (r, in)`, `B (out, r)`; an embedding's `A (r, num_embeddings)`, `B (dim, r)`; a conv's
`A (r, in/groups, kh, kw)`, `B (out, r/groups, 1, 1)`. Merging is a state transition tracked by
one flag; `unmerge` restores the weight saved at `merge`, so it is exact in every dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_spec.backends.torch_dropout import DropoutMask, SeededMask
from lora_spec.backends.torch_linear import linear_lora
from lora_spec.config import LoRAConfig


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's `Conv1D` (GPT-2): a linear whose weight is stored `(in, out)`."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # As PEFT: half-precision bases get float32 adapters, so small updates are not rounded away.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def _plain_ops_required() -> bool:
    """Under tracing, export or compilation the graph must show the ordinary LoRA branch."""
    # torch.compiler.is_exporting is newer than the oldest torch we support.
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting() or torch.onnx.is_in_onnx_export()


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Only when needed: a same-dtype `.to` still shows up as a node in exported graphs.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class LoRALayer(nn.Module):
    """State shared by the LoRA modules: base layer, rank, alpha, scaling, dropout, merged flag.

    Unknown attributes are read from the base layer (`weight`, `in_features`, `nf`, ...), so
    code that inspects the wrapped module keeps working.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, scaling: float, dropout: float,
                 a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling, self.dropout = r, alpha, scaling, dropout
        weight = base_layer.weight
        factory = dict(device=weight.device, dtype=_adapter_dtype(weight))
        self.lora_A = nn.Parameter(torch.zeros(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **factory))
        self.merged = False
        self.adapter_enabled = True
        self._weight_before_merge: torch.Tensor | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, merged={self.merged}"

    def reset_lora_parameters(self, init: str) -> None:
        """A by kaiming-uniform (bound 1/sqrt(fan_in)) or N(0, 1/r), B zeros: the update starts at 0."""
        with torch.no_grad():
            if init == "gaussian":
                self.lora_A.normal_(0.0, 1.0 / self.r)
            else:
                bound = 1.0 / math.sqrt(self.lora_A[0].numel())
                self.lora_A.uniform_(-bound, bound)
            self.lora_B.zero_()

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`s * B @ A` in the base weight's layout, computed in `dtype` (default: the adapter's)."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """The base weight plus the update, in at least float32 and cast once to the weight's dtype.

        Raises ValueError when the sum holds NaN or inf; touches nothing.
        """
        weight = self.base_layer.weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        merged = (weight.detach().to(compute) + self.delta_weight(compute)).to(weight.dtype)
        if not bool(torch.isfinite(merged).all()):
            raise ValueError(f"merging the adapter into this {type(self.base_layer).__name__} gives NaN or inf "
                             f"weights in {weight.dtype}: check the adapter for overflow, or merge in a wider dtype.")
        return merged

    def merge(self, keep_original: bool = True) -> None:
        """Write `merged_weight()` into the base weight; no-op when merged.

        `keep_original` saves the weight for an exact `unmerge`; without it the merge is for good.
        """
        if self.merged:
            return
        merged = self.merged_weight()
        if keep_original:
            self._weight_before_merge = self.base_layer.weight.detach().clone()
        with torch.no_grad():
            self.base_layer.weight.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        """Restore the base weight saved by `merge`, bit for bit; no-op when not merged."""
        if not self.merged:
            return
        if self._weight_before_merge is None:
            raise ValueError("this layer was merged for good (keep_original=False): its base weight cannot be restored.")
        with torch.no_grad():
            self.base_layer.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged = False

    def _lora_active(self) -> bool:
        return self.adapter_enabled and not self.merged

    def _dropped(self, x: torch.Tensor, dropout_mask: DropoutMask | None) -> torch.Tensor:
        if dropout_mask is not None:
            return x * dropout_mask.keep * dropout_mask.scale
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


class LoRALinear(LoRALayer):
    """LoRA around `nn.Linear`, or Hugging Face's `Conv1D` whose weight is `(in, out)` (fan_in_fan_out).

    Eager training runs `linear_lora` (one fused Function, seeded dropout mask from 16-bit draws);
    evaluation, tracing, export and compilation run `base(x) + s * ((x @ A.T) @ B.T)` in plain ops.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, scaling: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, alpha, scaling, dropout, *self.lora_shapes(base_layer, r))
        self.fan_in_fan_out = is_conv1d(base_layer)

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        """`(in, out)` of a Linear or Conv1D."""
        rows, columns = base_layer.weight.shape
        return (rows, columns) if is_conv1d(base_layer) else (columns, rows)

    @classmethod
    def lora_shapes(cls, base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_features, out_features = cls.features(base_layer)
        return (r, in_features), (out_features, r)

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as `(out, in)`: a transposed view for Conv1D."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        lora_a, lora_b = (self.lora_A, self.lora_B) if dtype is None else (self.lora_A.to(dtype), self.lora_B.to(dtype))
        delta = self.scaling * (lora_b @ lora_a)
        return delta.T if self.fan_in_fan_out else delta

    def _fused_path_applies(self, x: torch.Tensor) -> bool:
        weight = self.base_layer.weight
        return (self.training and torch.is_grad_enabled() and not weight.requires_grad
                and x.dtype == weight.dtype == self.lora_A.dtype and not torch.is_autocast_enabled()
                and not _plain_ops_required())

    def forward(self, x: torch.Tensor, dropout_mask: DropoutMask | None = None) -> torch.Tensor:
        """`dropout_mask` overrides the random mask (tests); by default one is drawn when training."""
        if not self._lora_active():
            return self.base_layer(x)
        if self._fused_path_applies(x):
            mask = SeededMask.new(self.dropout) if dropout_mask is None and self.dropout else dropout_mask
            return linear_lora(x, self.weight_out_in(), self.base_layer.bias, self.lora_A, self.lora_B,
                               self.scaling, mask)
        result = self.base_layer(x)
        hidden = F.linear(self._dropped(_cast(x, self.lora_A.dtype), dropout_mask), self.lora_A)
        return result + _cast(self.scaling * F.linear(hidden, self.lora_B), result.dtype)


class LoRAEmbedding(LoRALayer):
    """LoRA around `nn.Embedding`: `W[ids] + s * A.T[ids] @ B.T`; A starts at zero, B ~ N(0, 1)."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, scaling: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, alpha, scaling, dropout, *self.lora_shapes(base_layer, r))

    @staticmethod
    def lora_shapes(base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num_embeddings, dim = base_layer.weight.shape
        return (r, num_embeddings), (dim, r)

    def reset_lora_parameters(self, init: str) -> None:
        with torch.no_grad():
            self.lora_A.zero_()
            self.lora_B.normal_()

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        lora_a, lora_b = (self.lora_A, self.lora_B) if dtype is None else (self.lora_A.to(dtype), self.lora_B.to(dtype))
        return self.scaling * (lora_b @ lora_a).T

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)
        if not self._lora_active():
            return result
        # padding_idx as the base: the padding row of A gets no gradient, as in PEFT.
        rows = F.embedding(ids, self.lora_A.T, padding_idx=self.base_layer.padding_idx)
        return result + _cast(self.scaling * (rows @ self.lora_B.T), result.dtype)


class LoRAConv2d(LoRALayer):
    """LoRA around `nn.Conv2d`: A is a conv with the base's geometry and groups, B a grouped 1x1 conv.

    Grouping both like the base keeps the update block-diagonal, so it merges exactly; the rank
    must then be a multiple of `groups`.
    """

    def __init__(self, base_layer: nn.Conv2d, r: int, alpha: float, scaling: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, alpha, scaling, dropout, *self.lora_shapes(base_layer, r))

    @staticmethod
    def lora_shapes(base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_channels, in_per_group, kernel_h, kernel_w = base_layer.weight.shape
        groups = base_layer.groups
        if r % groups:
            raise ValueError(f"rank {r} is not a multiple of the conv's groups={groups}: "
                             f"choose r (or its rank_pattern entry) divisible by {groups}.")
        return (r, in_per_group, kernel_h, kernel_w), (out_channels, r // groups, 1, 1)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        lora_a, lora_b = (self.lora_A, self.lora_B) if dtype is None else (self.lora_A.to(dtype), self.lora_B.to(dtype))
        groups = self.base_layer.groups
        grouped_a = lora_a.reshape(groups, self.r // groups, -1)
        grouped_b = lora_b.reshape(groups, lora_b.shape[0] // groups, self.r // groups)
        return self.scaling * (grouped_b @ grouped_a).reshape(lora_b.shape[0], *lora_a.shape[1:])

    def forward(self, x: torch.Tensor, dropout_mask: DropoutMask | None = None) -> torch.Tensor:
        result = self.base_layer(x)
        if not self._lora_active():
            return result
        dropped = self._dropped(_cast(x, self.lora_A.dtype), dropout_mask)
        # The base's own conv call, so padding modes and geometry are exactly the base's.
        hidden = self.base_layer._conv_forward(dropped, self.lora_A, None)
        update = F.conv2d(hidden, self.lora_B, groups=self.base_layer.groups)
        return result + _cast(self.scaling * update, result.dtype)


def lora_layer_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA class that can wrap `module`, or None."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoRALinear
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    if isinstance(module, nn.Conv2d):
        return LoRAConv2d
    return None


def make_lora_layer(module: nn.Module, path: str, config: LoRAConfig) -> LoRALayer:
    """Wrap `module` (found at `path`) with the rank, alpha and init `config` gives that path."""
    layer = lora_layer_for(module)(module, config.rank_for(path), config.alpha_for(path), config.scaling_for(path),
                                   config.dropout)
    layer.reset_lora_parameters(config.init)
    return layer
