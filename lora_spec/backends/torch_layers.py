"""LoRA modules for PyTorch: each wraps a base layer (`base_layer`) and holds named adapters (`adapters`).

Layouts, initialisation and scaling are the reference's (`lora_spec.reference`): a linear's
`A (r, in)`, `B (out, r)`; an embedding's `A (r, num_embeddings)`, `B (dim, r)`; a conv's
`A (r, in/groups, kh, kw)`, `B (out, r/groups, 1, 1)`. One `LoRAAdapter` (or `DoRAAdapter`,
`torch_variants`) holds one adapter's factors and hyper-parameters; the layer runs its active
adapters in order on the base output, or routes each row of a batch through its own adapter
(`lora_spec.multi_adapter`).
Merging is a state transition tracked by the list of merged adapters; `unmerge` restores the
weight saved at `merge`, so it is exact in every dtype.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lora_spec import dora
from lora_spec.backends.torch_dropout import DropoutMask, SeededMask
from lora_spec.backends.torch_inits import check_weight, init_from_weight, method_name
from lora_spec.backends.torch_variants import DoRAAdapter, LoRAAdapter, base_weight, cast_to
from lora_spec.config import LoRAConfig, is_weight_init
from lora_spec.multi_adapter import DEFAULT_ADAPTER, Routing, check_adapter_name, check_routable

# Attributes of the one active adapter that a layer shows as its own, as it did with one adapter.
_SINGLE_ADAPTER_ATTRIBUTES = ("lora_A", "lora_B", "r", "alpha", "scaling", "dropout", "lora_magnitude_vector")


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


def _rename_single_adapter_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: object) -> None:
    """Read state dicts saved when a layer held one adapter (`<layer>.lora_A`) into its first adapter."""
    first = next(iter(cast(LoRALayer, module).adapters), None)
    for half in ("lora_A", "lora_B"):
        if prefix + half in state_dict and first is not None:
            state_dict[f"{prefix}adapters.{first}.{half}"] = state_dict.pop(prefix + half)


class LoRALayer(nn.Module):
    """A base layer with named adapters: which are active, which are merged, whether adapters are enabled.

    Unknown attributes are read from the base layer (`weight`, `in_features`, `nf`, ...), so code
    that inspects the wrapped module keeps working; `lora_A`, `lora_B`, `r`, `alpha`, `scaling`,
    `dropout` and a DoRA adapter's `lora_magnitude_vector` are those of the one active adapter,
    read and written (`layer.adapters[name]` for any other).

    What an adapter computes is its own (`torch_variants`); a subclass supplies what depends on the
    kind of layer: the shapes of the factors, the low-rank and base products, the delta in the
    base weight's layout and the axis of the output features (DoRA's norms, PEFT's axes).
    """

    kind = ""  # the reference's name of the kind of layer (`lora_spec.reference.merge`)

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float = 0.0,
        adapter_name: str = DEFAULT_ADAPTER,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = [adapter_name]
        self.merged_adapters: list[str] = []
        self.adapter_enabled = True
        self._weight_before_merge: torch.Tensor | None = None
        self._routes: Routing | None = None
        self.add_adapter(adapter_name, r, alpha, scaling, dropout, use_dora=use_dora)
        self.register_load_state_dict_pre_hook(_rename_single_adapter_keys)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            if name in _SINGLE_ADAPTER_ATTRIBUTES:
                return getattr(self.adapter(), name)
            return getattr(self.base_layer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SINGLE_ADAPTER_ATTRIBUTES and "adapters" in self._modules:
            setattr(self.adapter(), name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"active_adapters={self.active_adapters}, merged_adapters={self.merged_adapters}"

    # -- adapters -------------------------------------------------------------------------------

    @classmethod
    def lora_shapes(cls, base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of `A` and `B` of a rank-`r` adapter on `base_layer`."""
        raise NotImplementedError

    @classmethod
    def check_adapter(cls, base_layer: nn.Module, r: int, use_dora: bool = False, init: str = "kaiming") -> None:
        """Raise ValueError, in one line, when `base_layer` cannot hold such an adapter; changes nothing."""
        cls.lora_shapes(base_layer, r)
        if use_dora:
            cls.check_dora(base_layer)
        if is_weight_init(init):
            cls.check_weight_init(base_layer, init, r)

    @classmethod
    def check_dora(cls, base_layer: nn.Module) -> None:
        """Raise when DoRA does not apply to `base_layer` (every kind has it, but grouped convolutions)."""

    @classmethod
    def check_weight_init(cls, base_layer: nn.Module, init: str, r: int) -> None:
        """Raise when `init` (PiSSA, OLoRA) cannot start from `base_layer`'s weight."""
        raise ValueError(
            f"init={init!r} computes A and B from a linear layer's weight, and this is "
            f"{type(base_layer).__name__}: PEFT's {method_name(init)} covers nn.Linear (and Conv1D) only "
            "(it silently ignores the init elsewhere); target linear layers, or use init='kaiming'."
        )

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float = 0.0,
        init: str | None = None,
        use_dora: bool = False,
    ) -> LoRAAdapter:
        """Add an adapter called `name` (inactive unless it is already named in `active_adapters`); a DoRA
        adapter with `use_dora`.

        Without `init` its factors are zeros; with it, `reset_lora_parameters(init, name)` runs.
        """
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter {name!r}: delete it first or choose another name.")
        weight = base_weight(self.base_layer)
        factory = dict(device=weight.device, dtype=_adapter_dtype(weight))
        shapes = self.lora_shapes(self.base_layer, r)
        if use_dora:
            self.check_dora(self.base_layer)
            magnitude = dora.magnitude_shape(self.kind, weight.shape[self.feature_axis])
            self.adapters[name] = DoRAAdapter(*shapes, r, alpha, scaling, dropout, factory, magnitude)
        else:
            self.adapters[name] = LoRAAdapter(*shapes, r, alpha, scaling, dropout, factory)
        if init is not None:
            self.reset_lora_parameters(init, name)
        return self.adapter(name)

    def delete_adapter(self, name: str) -> None:
        """Remove the adapter called `name` (unmerged), and its name from the active ones.

        An adapter initialised from the base weight (PiSSA, OLoRA) gives it back: the residual plus
        the initial update, the original weight up to rounding.
        """
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into this layer: unmerge before deleting it.")
        initial = self.adapter(name).initial_factors()
        if initial is not None:
            weight = base_weight(self.base_layer)
            with torch.no_grad():
                restored = weight.to(torch.promote_types(weight.dtype, torch.float32))
                restored = restored + self.adapter_delta(self.adapter(name), restored.dtype, initial)
                weight.copy_(restored)
        del self.adapters[name]
        self.active_adapters = [active for active in self.active_adapters if active != name]

    def adapter(self, name: str | None = None) -> LoRAAdapter:
        """The adapter called `name`, or, by default, the one active adapter of this layer."""
        if name is not None:
            # The layer only ever stores adapters in `adapters` (add_adapter).
            return cast(LoRAAdapter, self.adapters[name])
        active = [active for active in self.active_adapters if active in self.adapters]
        if len(active) != 1:
            raise ValueError(
                f"this layer has {len(active)} active adapters ({', '.join(active) or 'none'}) of "
                f"{', '.join(self.adapters) or 'none'}: name one, layer.adapters[name]."
            )
        return self.adapter(active[0])

    def reset_lora_parameters(self, init: str, adapter_name: str | None = None) -> None:
        """Initialise an adapter's factors by `init` (`LoRAConfig.init`), then what its variant derives from
        them (a DoRA magnitude). PiSSA and OLoRA also turn the base weight into the residual."""
        adapter = self.adapter(adapter_name)
        if is_weight_init(init):
            self.init_from_weight(adapter, init)
        else:
            self.init_factors(adapter, init)
        adapter.initialise(self)

    def init_factors(self, adapter: LoRAAdapter, init: str) -> None:
        """A by kaiming-uniform (bound 1/sqrt(fan_in)) or N(0, 1/r), B zeros: the update starts at 0."""
        with torch.no_grad():
            if init == "gaussian":
                adapter.lora_A.normal_(0.0, 1.0 / adapter.r)
            else:
                bound = 1.0 / math.sqrt(adapter.lora_A[0].numel())
                adapter.lora_A.uniform_(-bound, bound)
            adapter.lora_B.zero_()

    def init_from_weight(self, adapter: LoRAAdapter, init: str) -> None:
        """PiSSA or OLoRA: the factors from the base weight, which becomes the residual."""
        self.check_weight_init(self.base_layer, init, adapter.r)

    def _running(self) -> list[LoRAAdapter]:
        """The adapters whose updates the forward pass adds: the active ones, unless disabled or merged."""
        if not self.adapter_enabled or self.merged_adapters:
            return []
        return [self.adapter(name) for name in self.active_adapters if name in self.adapters]

    # -- the kind of layer ----------------------------------------------------------------------

    @property
    def feature_axis(self) -> int:
        """The axis of the base weight that indexes output features (PEFT's DoRA axis)."""
        raise NotImplementedError

    def feature_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """The norm of each output feature's slice of a weight in the base layout, in DoRA's magnitude shape."""
        axis = self.feature_axis
        norms = torch.linalg.vector_norm(weight, dim=[dim for dim in range(weight.dim()) if dim != axis])
        return norms.reshape(dora.magnitude_shape(self.kind, weight.shape[axis]))

    def feature_column(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-feature vector shaped to broadcast along the output features of the base weight."""
        shape = [1] * base_weight(self.base_layer).dim()
        shape[self.feature_axis] = -1
        return vector.reshape(shape)

    # -- merge --------------------------------------------------------------------------------

    def adapter_delta(
        self,
        adapter: LoRAAdapter,
        dtype: torch.dtype | None = None,
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One adapter's `s * B @ A` in the base weight's layout, computed in `dtype` (default: the adapter's);
        `factors` replace the adapter's `(A, B)`."""
        lora_a, lora_b = (adapter.lora_A, adapter.lora_B) if factors is None else factors
        if dtype is not None:
            lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
        return adapter.scaling * self.delta_layout(lora_a, lora_b)

    def delta_layout(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        """`B @ A` in the base weight's layout."""
        raise NotImplementedError

    def delta_weight(
        self, dtype: torch.dtype | None = None, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """The sum of the low-rank updates `s * B @ A` of `adapter_names` (default: the active adapters) in the
        base weight's layout (a DoRA adapter's merge also rescales: see `merged_weight`)."""
        names = [
            name for name in (self.active_adapters if adapter_names is None else adapter_names) if name in self.adapters
        ]
        weight = base_weight(self.base_layer)
        compute = dtype or _adapter_dtype(weight)
        delta = torch.zeros_like(weight, dtype=compute)
        for name in names:
            delta += self.adapter_delta(self.adapter(name), compute)
        return delta

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the active adapters merged in order (each adapter's `merge_into`), in at least
        float32, cast once to the weight's dtype.

        Raises ValueError when the result holds NaN or inf; touches nothing.
        """
        weight = base_weight(self.base_layer)
        with torch.no_grad():
            base = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
            merged = base
            for name in self.active_adapters:
                if name in self.adapters:
                    merged = self.adapter(name).merge_into(self, merged, base)
            merged = merged.to(weight.dtype)
        if not bool(torch.isfinite(merged).all()):
            raise ValueError(
                f"merging the adapter into this {type(self.base_layer).__name__} gives NaN or inf "
                f"weights in {weight.dtype}: check the adapter for overflow, or merge in a wider dtype."
            )
        return merged

    @property
    def merged(self) -> bool:
        """Whether adapters are merged into the base weight."""
        return bool(self.merged_adapters)

    def merge(self, keep_original: bool = True) -> None:
        """Write `merged_weight()` (the active adapters) into the base weight; no-op when merged or none is active.

        `keep_original` saves the weight for an exact `unmerge`; without it the merge is for good.
        """
        names = [name for name in self.active_adapters if name in self.adapters]
        if self.merged or not names:
            return
        merged = self.merged_weight()
        if keep_original:
            self._weight_before_merge = base_weight(self.base_layer).detach().clone()
        with torch.no_grad():
            base_weight(self.base_layer).copy_(merged)
        self.merged_adapters = names

    def unmerge(self) -> None:
        """Restore the base weight saved by `merge`, bit for bit; no-op when not merged."""
        if not self.merged:
            return
        if self._weight_before_merge is None:
            raise ValueError(
                "this layer was merged for good (keep_original=False): its base weight cannot be restored."
            )
        with torch.no_grad():
            base_weight(self.base_layer).copy_(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged_adapters = []

    # -- forward ------------------------------------------------------------------------------

    def dropped(self, x: torch.Tensor, adapter: LoRAAdapter, dropout_mask: DropoutMask | None = None) -> torch.Tensor:
        """The low-rank path's input: `x` in the adapter's dtype, through the adapter's dropout when training
        (or `dropout_mask`, which tests give)."""
        x = cast_to(x, adapter.lora_A.dtype)
        if dropout_mask is not None:
            return x * dropout_mask.keep * dropout_mask.scale
        return F.dropout(x, adapter.dropout, self.training) if adapter.dropout else x

    def drops_input(self, adapter: LoRAAdapter, dropout_mask: DropoutMask | None = None) -> bool:
        """Whether `dropped` changes the input (DoRA's formula then needs the base product of the dropped input)."""
        return dropout_mask is not None or (self.training and bool(adapter.dropout))

    def low_rank(self, adapter: LoRAAdapter, x: torch.Tensor) -> torch.Tensor:
        """`s * B A x` for an input `x` already `dropped`, in the adapter's dtype."""
        raise NotImplementedError

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output without its bias, computed in `x`'s dtype."""
        raise NotImplementedError

    def update(self, adapter: LoRAAdapter, x: torch.Tensor, dropout_mask: DropoutMask | None = None) -> torch.Tensor:
        """One adapter's scaled low-rank update for input `x` (cast to the adapter's dtype), in the adapter's dtype."""
        return self.low_rank(adapter, self.dropped(x, adapter, dropout_mask))

    def check_routable(self, names: Sequence[Hashable | None]) -> None:
        """Raise when one of `names` is an adapter of this layer that routed batches cannot run (DoRA, as in PEFT)."""
        for name in names:
            if isinstance(name, str) and name in self.adapters:
                check_routable(name, self.adapter(name).use_dora)

    def route(self, routing: Routing | None) -> None:
        """Send the rows of the next batches through the adapters `routing` gives them (rows of no adapter
        or of "__base__": the base alone) instead of the active adapters; None ends routing."""
        if routing is not None:
            self.check_routable([name for name, _ in routing.groups])
        self._routes = routing

    def forward(self, x: torch.Tensor, dropout_mask: DropoutMask | None = None) -> torch.Tensor:
        """`dropout_mask` overrides the random mask (tests); by default one is drawn when training."""
        result = self.base_layer(x)
        if self._routes is not None and self.adapter_enabled:
            return self._routed(x, result)
        for adapter in self._running():
            result = adapter.add_to(self, result, x, dropout_mask)
        return result

    def add_update(
        self, result: torch.Tensor, adapter: LoRAAdapter, x: torch.Tensor, dropout_mask: DropoutMask | None = None
    ) -> torch.Tensor:
        """`result` plus one adapter's update for input `x`; a subclass may add in place where autograd allows."""
        return result + cast_to(self.update(adapter, x, dropout_mask), result.dtype)

    def _routed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.training or self.merged:
            raise ValueError(
                "routed batches are for inference on an unmerged model: call model.eval() and "
                "unmerge(model) before running them."
            )
        assert self._routes is not None  # forward routes only when routing is set
        rows_expected, groups = self._routes
        if x.shape[0] != rows_expected:
            raise ValueError(
                f"the routing names {rows_expected} adapters, one per row, but this batch has "
                f"{x.shape[0]} rows: give routed() one adapter name per row of the batch."
            )
        for name, rows in groups:
            if not isinstance(name, str) or name not in self.adapters:
                continue
            adapter = self.adapter(name)
            if isinstance(rows, slice):  # a view: the update goes straight into the batch's output
                target = result[rows]
                updated = self.add_update(target, adapter, x[rows])
                if updated is not target:
                    target.copy_(updated)
            else:
                index = torch.as_tensor(rows, device=x.device)
                result.index_add_(0, index, cast_to(self.update(adapter, x[index]), result.dtype))
        return result


class LoRALinear(LoRALayer):
    """LoRA around `nn.Linear`, or Hugging Face's `Conv1D` whose weight is `(in, out)` (fan_in_fan_out).

    Eager training with one active adapter runs that adapter's fused Function (`train_linear`: one
    autograd Function, seeded dropout mask from 16-bit draws); otherwise `base(x) + s * ((x @ A.T) @
    B.T)` per adapter (DoRA's formula for a DoRA adapter), in plain ops under tracing, export and
    compilation. PiSSA and OLoRA initialise it (a Conv1D's on `W.T`, as PEFT's PiSSA).
    """

    kind = "linear"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float = 0.0,
        adapter_name: str = DEFAULT_ADAPTER,
        use_dora: bool = False,
    ) -> None:
        super().__init__(base_layer, r, alpha, scaling, dropout, adapter_name, use_dora)
        self.fan_in_fan_out = is_conv1d(base_layer)

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        """`(in, out)` of a Linear or Conv1D."""
        rows, columns = base_weight(base_layer).shape
        return (rows, columns) if is_conv1d(base_layer) else (columns, rows)

    @classmethod
    def lora_shapes(cls, base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_features, out_features = cls.features(base_layer)
        return (r, in_features), (out_features, r)

    @classmethod
    def check_weight_init(cls, base_layer: nn.Module, init: str, r: int) -> None:
        weight = base_weight(base_layer)
        check_weight(weight.T if is_conv1d(base_layer) else weight, init, r)

    @property
    def feature_axis(self) -> int:
        return 1 if is_conv1d(self.base_layer) else 0

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as `(out, in)`: a transposed view for Conv1D."""
        weight = base_weight(self.base_layer)
        return weight.T if self.fan_in_fan_out else weight

    def init_from_weight(self, adapter: LoRAAdapter, init: str) -> None:
        lora_a, lora_b = init_from_weight(self.weight_out_in(), init, adapter.r, float(adapter.scaling))
        adapter.assign(lora_a.to(adapter.lora_A.dtype), lora_b.to(adapter.lora_B.dtype))
        adapter.keep_initial_factors()

    def delta_layout(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        delta = lora_b @ lora_a
        return delta.T if self.fan_in_fan_out else delta

    def _fused_path_applies(self, x: torch.Tensor, adapter: LoRAAdapter) -> bool:
        weight = base_weight(self.base_layer)
        return (
            self.training
            and torch.is_grad_enabled()
            and not weight.requires_grad
            and x.dtype == weight.dtype == adapter.lora_A.dtype
            and not torch.is_autocast_enabled()
            and isinstance(adapter.scaling, float)
            and not _plain_ops_required()
        )

    def forward(self, x: torch.Tensor, dropout_mask: DropoutMask | None = None) -> torch.Tensor:
        running = self._running()
        if len(running) == 1 and self._routes is None and self._fused_path_applies(x, running[0]):
            adapter = running[0]
            mask = SeededMask.new(adapter.dropout) if dropout_mask is None and adapter.dropout else dropout_mask
            return adapter.train_linear(self, x, mask)
        return super().forward(x, dropout_mask)

    def low_rank(self, adapter: LoRAAdapter, x: torch.Tensor) -> torch.Tensor:
        return adapter.scaling * F.linear(F.linear(x, adapter.lora_A), adapter.lora_B)

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, cast_to(self.weight_out_in(), x.dtype))

    def add_update(
        self, result: torch.Tensor, adapter: LoRAAdapter, x: torch.Tensor, dropout_mask: DropoutMask | None = None
    ) -> torch.Tensor:
        """In inference (nothing needs a gradient), the update is one `addmm_` into `result`: no full-size
        temporary. Otherwise, and under tracing, export or compilation, the plain sum."""
        scaling = adapter.scaling
        if not (isinstance(scaling, float) and self._adds_in_place(result, adapter, x, dropout_mask)):
            return super().add_update(result, adapter, x, dropout_mask)
        hidden = F.linear(x, adapter.lora_A)
        result.view(-1, result.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), adapter.lora_B.T, alpha=scaling)
        return result

    def _adds_in_place(
        self, result: torch.Tensor, adapter: LoRAAdapter, x: torch.Tensor, dropout_mask: DropoutMask | None
    ) -> bool:
        needs_graph = torch.is_grad_enabled() and any(
            tensor.requires_grad for tensor in (result, x, adapter.lora_A, adapter.lora_B)
        )
        dropping = dropout_mask is not None or (self.training and adapter.dropout)
        return (
            not needs_graph
            and not dropping
            and result.is_contiguous()
            and result.dtype == x.dtype == adapter.lora_A.dtype
            and not _plain_ops_required()
        )


class LoRAEmbedding(LoRALayer):
    """LoRA around `nn.Embedding`: `W[ids] + s * A.T[ids] @ B.T`; A starts at zero, B ~ N(0, 1); no dropout."""

    kind = "embedding"
    feature_axis = 1
    base_layer: nn.Embedding

    @staticmethod
    def lora_shapes(base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num_embeddings, dim = base_weight(base_layer).shape
        return (r, num_embeddings), (dim, r)

    def init_factors(self, adapter: LoRAAdapter, init: str) -> None:
        with torch.no_grad():
            adapter.lora_A.zero_()
            adapter.lora_B.normal_()

    def delta_layout(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        return (lora_b @ lora_a).T

    def dropped(self, ids: torch.Tensor, adapter: LoRAAdapter, dropout_mask: DropoutMask | None = None) -> torch.Tensor:
        return ids

    def drops_input(self, adapter: LoRAAdapter, dropout_mask: DropoutMask | None = None) -> bool:
        return False

    def low_rank(self, adapter: LoRAAdapter, ids: torch.Tensor) -> torch.Tensor:
        # padding_idx as the base: the padding row of A gets no gradient, as in PEFT.
        rows = F.embedding(ids, adapter.lora_A.T, padding_idx=self.base_layer.padding_idx)
        return adapter.scaling * (rows @ adapter.lora_B.T)


class LoRAConv2d(LoRALayer):
    """LoRA around `nn.Conv2d`: A is a conv with the base's geometry and groups, B a grouped 1x1 conv.

    Grouping both like the base keeps the update block-diagonal, so it merges exactly; the rank
    must then be a multiple of `groups`. DoRA refuses grouped convolutions, as the reference does.
    """

    kind = "conv2d"
    feature_axis = 0
    base_layer: nn.Conv2d

    @staticmethod
    def lora_shapes(base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_channels, in_per_group, kernel_h, kernel_w = base_weight(base_layer).shape
        groups = cast(nn.Conv2d, base_layer).groups
        if r % groups:
            raise ValueError(
                f"rank {r} is not a multiple of the conv's groups={groups}: "
                f"choose r (or its rank_pattern entry) divisible by {groups}."
            )
        return (r, in_per_group, kernel_h, kernel_w), (out_channels, r // groups, 1, 1)

    @classmethod
    def check_dora(cls, base_layer: nn.Module) -> None:
        a_shape, b_shape = cls.lora_shapes(base_layer, cast(nn.Conv2d, base_layer).groups)
        dora.check_supported(cls.kind, np.broadcast_to(np.float32(0), a_shape), np.broadcast_to(np.float32(0), b_shape))

    def delta_layout(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        groups, rank = self.base_layer.groups, lora_a.shape[0]
        grouped_a = lora_a.reshape(groups, rank // groups, -1)
        grouped_b = lora_b.reshape(groups, lora_b.shape[0] // groups, rank // groups)
        return (grouped_b @ grouped_a).reshape(lora_b.shape[0], *lora_a.shape[1:])

    def low_rank(self, adapter: LoRAAdapter, x: torch.Tensor) -> torch.Tensor:
        # The base's own conv call, so padding modes and geometry are exactly the base's.
        hidden = self.base_layer._conv_forward(x, adapter.lora_A, None)
        return adapter.scaling * F.conv2d(hidden, adapter.lora_B, groups=self.base_layer.groups)

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, cast_to(self.base_layer.weight, x.dtype), None)


def lora_layer_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA class that can wrap `module`, or None."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoRALinear
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    if isinstance(module, nn.Conv2d):
        return LoRAConv2d
    return None


def adapter_arguments(config: LoRAConfig, path: str) -> dict[str, Any]:
    """The rank, alpha, scaling, dropout and variant `config` gives the module at `path`."""
    return dict(
        r=config.rank_for(path),
        alpha=config.alpha_for(path),
        scaling=config.scaling_for(path),
        dropout=config.dropout,
        use_dora=config.use_dora,
    )


def make_lora_layer(module: nn.Module, path: str, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> LoRALayer:
    """Wrap `module` (found at `path`) with an adapter `adapter_name` of the rank, alpha, variant and init
    `config` gives that path."""
    layer_class = lora_layer_for(module)
    assert layer_class is not None  # plan() selects only layers that lora_layer_for wraps
    layer = layer_class(module, adapter_name=adapter_name, **adapter_arguments(config, path))
    layer.reset_lora_parameters(config.init, adapter_name)
    return layer
