"""Where KerasHub's converter puts each Hugging Face tensor, recorded by running it on index probes.

KerasHub ports a transformers checkpoint with `convert_weights(backbone, loader, config)`, in which
`loader.port_weight(variable, key, hook)` reads the tensor `key` and assigns `hook(tensor, shape)` to
`variable`. Run with a loader that only records those calls, the converter says which tensor feeds
which Keras variable, and nothing is written to the model. Feeding each hook a tensor of element
indices (a probe) then shows every transpose, reshape and slice it does: for each element of the
variable, its flat index in the Hugging Face tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from lora_spec.backends import keras_einsum
from lora_spec.backends.keras_layers import LoRALayer, reference_shapes

Hook = Callable[[np.ndarray, list[int]], Any]


@dataclasses.dataclass(frozen=True)
class Placement:
    """A Keras variable inside a transformers tensor: the converter's `key`, the tensor's `shape`, and
    `index`, the flat index in that tensor of each element of the variable (in the variable's shape)."""

    key: str
    shape: tuple[int, ...]
    index: np.ndarray


@dataclasses.dataclass(frozen=True)
class LinearPlacement:
    """A Keras linear layer's kernel inside a transformers `Linear` (or GPT-2 `Conv1D`) weight.

    With `W` the Keras layer's weight in the reference layout `(out, in)` and `W_hf` the transformers
    layer's as a `Linear` holds it (a `Conv1D`'s transposed): `W[i, j] = W_hf[rows[i], columns[j]]`.
    `out_features` and `in_features` are the transformers layer's: larger than the Keras layer's
    when it fuses several (GPT-2's `c_attn` holds the query, key and value kernels).
    """

    key: str
    out_features: int
    in_features: int
    rows: np.ndarray
    columns: np.ndarray
    transposed: bool  # a Conv1D: the tensor is stored (in, out)


class _RecordingLoader:
    """Stands in for KerasHub's `SafetensorLoader`: records each `port_weight` call instead of assigning."""

    def __init__(self) -> None:
        self.ports: dict[int, tuple[keras.Variable, str, Hook | None]] = {}

    def port_weight(self, keras_variable: keras.Variable, hf_weight_key: str, hook_fn: Hook | None = None) -> None:
        self.ports[id(keras_variable)] = (keras_variable, hf_weight_key, hook_fn)

    def get_tensor(self, hf_weight_key: str) -> np.ndarray:
        # Only BERT's converter reads a tensor itself, to test for TensorFlow-era names (gamma/beta);
        # the names transformers writes today are the ones adapters use.
        raise KeyError(hf_weight_key)


class _Probe(np.ndarray):
    """Element indices that survive the converter's casts (Mistral's casts every weight to float16, which
    would round the indices): a cast changes values, never where they go."""

    def astype(self, dtype: Any, *args: Any, **kwargs: Any) -> _Probe:
        return self


def is_kernel(layer: keras.layers.Layer, variable: keras.Variable) -> bool:
    """Whether `variable` is the kernel of a `Dense` or `EinsumDense` layer (with or without LoRA)."""
    base = layer.base_class if isinstance(layer, LoRALayer) else type(layer)
    return base in (keras.layers.Dense, keras.layers.EinsumDense) and getattr(layer, "_kernel", None) is variable


def _kernel_to_reference(layer: keras.layers.Layer, kernel: np.ndarray) -> np.ndarray:
    """A kernel-shaped array in the reference layout `(out, in)`, as `LoRALayer.base_weight` lays out the kernel."""
    if hasattr(layer, "equation"):
        return keras_einsum.linear_plan(layer.equation).to_reference(kernel)
    return kernel.T


def _separated(reference: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """`(rows, columns, transposed)` when the flat indices `reference` (out, in) address a matrix of `shape`
    row by row and column by column (so that a low-rank factorization carries over), else None."""
    first, second = np.divmod(reference, shape[1])
    for transposed, (out_index, in_index) in ((False, (first, second)), (True, (second, first))):
        if (out_index == out_index[:, :1]).all() and (in_index == in_index[:1, :]).all():
            return out_index[:, 0], in_index[0, :], transposed
    return None


def _signature(hook: Hook | None) -> Any:
    """What makes two hooks the same function (the converter builds one lambda per layer), or None if unknown."""
    if hook is None:
        return ()
    cells = tuple(cell.cell_contents for cell in (hook.__closure__ or ()))
    try:
        hash(cells)
    except TypeError:
        return None
    return hook.__code__, cells


class Recording:
    """The converter's `port_weight` calls for one backbone, and the probes that place each variable."""

    def __init__(self, backbone: keras.Model, converter: Any, transformers_config: dict[str, Any]) -> None:
        loader = _RecordingLoader()
        converter.convert_weights(backbone, loader, transformers_config)
        self.ports = loader.ports
        self.members: dict[str, list[tuple[keras.Variable, Hook | None]]] = {}
        for variable, key, hook in self.ports.values():
            self.members.setdefault(key, []).append((variable, hook))
        self._probed: dict[Any, list[np.ndarray] | None] = {}
        self._placed: dict[int, Placement] = {}
        self._linears: dict[int, LinearPlacement] = {}
        self._separations: dict[Any, tuple[np.ndarray, tuple[np.ndarray, np.ndarray, bool] | None]] = {}

    def key_of(self, variable: keras.Variable) -> str | None:
        """The converter's key for the tensor that feeds `variable`, or None when it ports none."""
        port = self.ports.get(id(variable))
        return None if port is None else port[1]

    def _indices(self, key: str, shape: tuple[int, ...]) -> list[np.ndarray] | None:
        """Each member's flat indices when the tensor `key` has `shape`, or None when the hooks do not fit it:
        one fails, returns another shape, or the members do not cover the tensor exactly once."""
        members = self.members[key]
        if len(members) == 1 and members[0][1] is None:  # ported as it is: no probe needed
            size = math.prod(shape)
            fits = shape == tuple(members[0][0].shape)
            return [np.arange(size, dtype=np.int32 if size < 2**31 else np.int64).reshape(shape)] if fits else None
        signatures = tuple((_signature(hook), tuple(variable.shape)) for variable, hook in members)
        cache_key = None if any(signature is None for signature, _ in signatures) else (signatures, shape)
        if cache_key is not None and cache_key in self._probed:
            return self._probed[cache_key]
        size = math.prod(shape)
        probe = np.arange(size, dtype=np.int32 if size < 2**31 else np.int64).reshape(shape).view(_Probe)
        indices: list[np.ndarray] = []
        every_hook_fits = True
        for variable, hook in members:
            index: np.ndarray | None
            try:
                index = np.asarray(probe if hook is None else hook(probe, list(variable.shape))).view(np.ndarray)
            except (ValueError, IndexError, TypeError):
                index = None
            if index is None or index.shape != tuple(variable.shape):
                every_hook_fits = False
                break
            indices.append(index)
        found: list[np.ndarray] | None = None
        if every_hook_fits and sum(index.size for index in indices) == size:
            seen = np.zeros(size, bool)
            for index in indices:
                seen[index.ravel()] = True
            found = indices if seen.all() else None
        if cache_key is not None:
            self._probed[cache_key] = found
        return found

    def _candidate_shapes(self, key: str, layer: keras.layers.Layer, variable: keras.Variable) -> list[tuple[int, ...]]:
        """The shapes the tensor `key` may have: a transformers weight is a matrix (out, in) or, for GPT-2's
        Conv1D, (in, out); a bias or a norm's scale is a vector; an embedding table is (rows, width)."""
        size = sum(math.prod(member.shape) for member, _ in self.members[key])
        if is_kernel(layer, variable):
            in_features = reference_shapes(layer, 1)[0][1]
            return [(size // in_features, in_features), (in_features, size // in_features)]
        if len(variable.shape) == 1 or variable.name == "bias":
            return [(size,)]
        return [tuple(reversed(variable.shape)), tuple(variable.shape)]

    def placement(self, layer: keras.layers.Layer, variable: keras.Variable) -> Placement:
        """Where `variable` (of `layer`) sits in the tensor that feeds it; ValueError when the converter
        ports it in a way that is not a rearrangement of that tensor."""
        if id(variable) not in self._placed:
            self._placed[id(variable)] = self._place(layer, variable)
        return self._placed[id(variable)]

    def _place(self, layer: keras.layers.Layer, variable: keras.Variable) -> Placement:
        key = self.key_of(variable)
        assert key is not None  # callers place only variables the converter ports
        members = [member for member, _ in self.members[key]]
        position = next(i for i, member in enumerate(members) if member is variable)
        for shape in self._candidate_shapes(key, layer, variable):
            indices = self._indices(key, shape)
            if indices is None:
                continue
            if is_kernel(layer, variable) and self._separation(layer, indices[position], shape) is None:
                continue
            return Placement(key, shape, indices[position])
        raise ValueError(
            f"KerasHub's converter ports {key} into {variable.path} in a way that is not a rearrangement "
            "of the tensor: lora_spec cannot map adapters on it."
        )

    def _separation(
        self, layer: keras.layers.Layer, index: np.ndarray, shape: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """`_separated` for a kernel's indices; the layers of a model share their probes, and so this."""
        memo = (id(index), getattr(layer, "equation", None), shape)
        if memo not in self._separations:  # the entry keeps `index` alive, so that its id names it
            self._separations[memo] = index, _separated(_kernel_to_reference(layer, index), shape)
        return self._separations[memo][1]

    def linear(self, layer: keras.layers.Layer) -> LinearPlacement:
        """Where the kernel of the linear `layer` sits in its transformers layer's weight."""
        if id(layer) not in self._linears:
            placement = self.placement(layer, layer._kernel)
            separation = self._separation(layer, placement.index, placement.shape)
            assert separation is not None  # a kernel is placed only where its rows and columns separate
            rows, columns, transposed = separation
            out_features, in_features = placement.shape[::-1] if transposed else placement.shape
            self._linears[id(layer)] = LinearPlacement(
                placement.key, out_features, in_features, rows, columns, transposed
            )
        return self._linears[id(layer)]
