"""Plan the merge of PEFT-format adapter directories into the base weights of an ONNX graph.

`plan_adapter_merge` reads adapters (ours or PEFT's), finds the graph weight of every adapted
module and returns the new weights; it never touches the model or the files. A module path
such as `encoder.layer.0.attention.self.query` is found, for each compute node that reads a
weight initializer (`MatMul`, `Gemm`, onnxruntime's `FusedMatMul`, `Gather` on axis 0, 2-D
`Conv`), through:

- the module the node records: the dynamo exporter's metadata (`pkg.torch.onnx.name_scopes`,
  else `namespace`) or a TorchScript node name (`/encoder/layer.0/attention/self/query/MatMul`);
  it wins over the weight's name, since exporters store equal weights once, under one name;
- else the initializer's name when the exporter kept the parameter's (`<path>.weight`);
- Keras/tf2onnx scopes (`functional_1/block_1/hidden_1/MatMul` for `block.hidden`: the root
  model's scope first, then each layer name, possibly with TensorFlow's `_N` uniquifier);
- else a unique module whose path ends with the adapter's path, or the reverse (an adapter
  trained on `BertForSequenceClassification` merged into an exported `BertModel`).

The weight may reach its node through `Identity`, `Cast` and `Transpose` nodes. The delta
`s * B @ A` of the reference, `(out, in)`, is laid out like the node's operand (MatMul and Gemm
`transB=0` read `W.T`; Gemm's `alpha` multiplies the operand, so the delta is divided by it),
then like the initializer behind any `Transpose`.

Several adapters merge as `W' = W + sum_k weight_k * delta_k`, in at least float32, cast once to
the initializer's dtype. A DoRA adapter (`use_dora`) merges as `lora_spec.dora.dora_merge`,
`W' = (m/n) * (W + s * B @ A)` with the norm `n` of the graph's own weight: it takes weight 1 only
(the normalisation leaves no meaning to another), and no other adapter may change the same weight.
Full tensors stored in an adapter (`modules_to_save`, trained biases) replace the base tensor as
they are: an adapter's weight scales only its low-rank deltas, a full tensor may come from one
adapter with a non-zero weight only, and deltas of other adapters are added on top of it.
An adapter with weight 0 contributes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from numbers import Real

import numpy as np
import onnx

from lora_spec import dora, reference
from lora_spec.adapter_io import AdapterWeights, load_adapter_dir
from lora_spec.config import LoRAConfig
from lora_spec.export.graph import FLOAT_TYPES, attribute, initializer_behind
from lora_spec.export.naming import PEFT_WRAPPER, TF_UNIQUIFIER, node_module, tf_scopes

_KIND_OF_OP = {"MatMul": "linear", "Gemm": "linear", "FusedMatMul": "linear", "Gather": "embedding", "Conv": "conv2d"}
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "FusedMatMul": 1, "Gather": 0, "Conv": 1}
# Ops that scale their weight operand by `alpha` and read it transposed with `transB=1`.
_SCALED_OPS = ("Gemm", "FusedMatMul")
_WEIGHT_RANK = {"linear": 2, "embedding": 2, "conv2d": 4}
_DELTAS = {
    "linear": reference.delta_weight,
    "embedding": reference.embedding_delta_weight,
    "conv2d": reference.conv2d_delta_weight,
}
# Transpose perms met walking from a consumer back to its initializer, innermost last: `(perm, outer)`.
_Perms = tuple[tuple[int, ...] | None, "_Perms"] | None
# Nodes a weight may pass through on its way from the initializer to the node that reads it.
_FORWARDING_OPS = ("Identity", "Cast", "Transpose")
# Inputs of normalization nodes holding a module's parameters, by PyTorch's parameter names.
_NORMALIZATION_INPUTS = {
    "LayerNormalization": {"weight": 1, "bias": 2},
    "BatchNormalization": {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4},
    "InstanceNormalization": {"weight": 1, "bias": 2},
    "GroupNormalization": {"weight": 1, "bias": 2},
    "SimplifiedLayerNormalization": {"weight": 1},
    "RMSNormalization": {"weight": 1},
}
_TRAINING_COUNTER = ".num_batches_tracked"


@dataclasses.dataclass
class WeightUpdate:
    """A new weight for one input of one node.

    `node_name` is the node that reads the weight initializer, directly or through `Identity`
    nodes: the `MatMul`/`Gemm`/`Gather`/`Conv` itself, or the `Transpose`/`Cast` in front of
    it. `value` is the whole new tensor in the initializer's dtype and layout (bfloat16 in the
    representation `read_tensor` returned: `ml_dtypes.bfloat16` or uint16 bit patterns). It is
    computed by `compute` each time it is read, so a plan holds no weights: the writer computes
    one at a time and a model larger than memory merges.
    """

    node_name: str
    input_index: int
    compute: Callable[[], np.ndarray]

    @property
    def value(self) -> np.ndarray:
        return self.compute()


@dataclasses.dataclass
class AdapterMergePlan:
    """The updates to write, which adapter keys matched which nodes, and which matched none.

    A key is a module path for a LoRA pair (`encoder.layer.0.attention.self.query`) and
    `<module path>.<parameter>` for a full tensor (`classifier.weight`); `matched` pairs it with
    the compute node that reads the weight (or, for a full tensor found by its initializer's
    name, the node reading that initializer).
    """

    updates: list[WeightUpdate]
    matched: list[tuple[str, str]]
    unmatched: list[str]


class AdapterMergeError(ValueError):
    """An adapter that cannot be merged into the graph; the message says which key or file and why."""


@dataclasses.dataclass
class TensorLocation:
    """Where a tensor is read: the reading node's input and the initializer behind it."""

    consumer: str
    input_index: int
    initializer: onnx.TensorProto
    perm: tuple[int, ...]  # the reading compute node sees `initializer.transpose(perm)`
    element_type: int  # the type the reading compute node sees: a `Cast` on the way may change it

    def from_operand(self, operand: np.ndarray) -> np.ndarray:
        """A tensor laid out like the compute node's operand, laid out like the initializer."""
        return np.transpose(operand, np.argsort(self.perm))

    @property
    def operand_shape(self) -> tuple[int, ...]:
        return tuple(int(self.initializer.dims[axis]) for axis in self.perm)


@dataclasses.dataclass
class WeightSite:
    """A compute node reading a weight initializer, with the module paths its names suggest."""

    node: onnx.NodeProto
    kind: str
    weight: TensorLocation
    transposed: bool  # the operand is the reference layout transposed: `(in, out)`
    factor: float  # Gemm's alpha: the node multiplies its operand by it
    paths: set[str]
    tf_scopes: list[list[str]]

    def reference_shape(self) -> tuple[int, ...]:
        shape = self.weight.operand_shape
        return shape[::-1] if self.transposed else shape

    def check_unfolded(self, adapter: LoadedAdapter, key: str) -> None:
        """Refuse a conv weight the TorchScript exporter computed rather than kept.

        A conv needs no transposed copy, so an anonymous `onnx::` weight behind a TorchScript
        `Conv` is a BatchNorm folded into it: adding the delta there would skip the BatchNorm's
        per-channel scale.
        """
        if (
            self.node.op_type == "Conv"
            and self.node.name.startswith("/")
            and (self.weight.initializer.name.startswith("onnx::"))
        ):
            raise AdapterMergeError(
                f"adapter {adapter.directory}: {key} targets node {self.node.name!r}, whose weight "
                f"{self.weight.initializer.name} the exporter folded (a BatchNorm merged into the conv), so no exact "
                "merge exists: export the base model with torch.onnx.export(..., do_constant_folding=False)."
            )

    def to_initializer(self, reference_value: np.ndarray) -> np.ndarray:
        """A weight in the reference layout (delta or full), as the initializer must hold it."""
        operand = reference_value.T if self.transposed else reference_value
        return self.weight.from_operand(operand / self.factor)

    def to_reference(self, initializer_value: np.ndarray) -> np.ndarray:
        """The weight the node applies, in the reference layout, from the initializer's value."""
        operand = np.transpose(initializer_value, self.weight.perm) * self.factor
        return operand.T if self.transposed else operand


class _Graph:
    """The main graph's initializers, producers and consumers, for tracing weights to their readers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.nodes = list(graph.node)
        self.producers = {output: node for node in graph.node for output in node.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for index, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, index))

    def behind_identities(self, tensor: str) -> str | None:
        """The initializer `tensor` is, directly or through `Identity` nodes; None if it is computed."""
        return initializer_behind(tensor, self.initializers, self.producers)

    def trace(self, node: onnx.NodeProto, index: int) -> TensorLocation | None:
        """The initializer behind `node.input[index]`, through Identity, Cast and Transpose nodes."""
        consumer, consumer_index, name, element_type = node, index, node.input[index], None
        perm: _Perms = None
        while name not in self.initializers:
            producer = self.producers.get(name)
            if producer is None or producer.op_type not in _FORWARDING_OPS or not producer.input:
                return None
            if producer.op_type == "Transpose":
                step = attribute(producer, "perm", None)
                perm = (tuple(step) if step is not None else None, perm)
            if producer.op_type == "Cast" and element_type is None:
                element_type = attribute(producer, "to")
            if producer.op_type != "Identity":
                consumer, consumer_index = producer, 0
            name = producer.input[0]
        tensor = self.initializers[name]
        return TensorLocation(
            consumer.name, consumer_index, tensor, _compose(perm, len(tensor.dims)), element_type or tensor.data_type
        )

    def readers(self, tensor: str) -> list[tuple[onnx.NodeProto, TensorLocation]]:
        """The nodes reading `tensor` (an initializer or an `Identity` of one), through Identity nodes."""
        name = self.behind_identities(tensor)
        if name is None:
            return []
        initializer, found, pending = self.initializers[name], [], [tensor]
        same_layout = tuple(range(len(initializer.dims)))
        while pending:
            for node, index in self.consumers.get(pending.pop(), []):
                if node.op_type == "Identity":
                    pending.append(node.output[0])
                else:
                    found.append(
                        (node, TensorLocation(node.name, index, initializer, same_layout, initializer.data_type))
                    )
        return found


def _compose(perms: _Perms, rank: int) -> tuple[int, ...]:
    """Fold the nested `(inner, outer)` Transpose perms collected by `_Graph.trace` into one."""
    total = tuple(range(rank))
    while perms is not None:
        step, perms = perms
        step = step if step is not None else tuple(reversed(range(rank)))
        total = tuple(total[axis] for axis in step)
    return total


def _torch_paths(node: onnx.NodeProto, weight_names: Sequence[str]) -> set[str]:
    """The module path a PyTorch exporter gives the node: its own record, else its weight's name.

    The node's record wins because exporters store equal weights once, under the first
    module's name: the second module's node then reads `0.weight` (dynamo) or an `Identity`
    of it (TorchScript), and must not be merged with module `0`'s adapter. The base layer of a
    model exported with its LoRA wrappers (`<path>.base_layer`) is the module at `<path>`.
    """
    module = node_module(node)
    if module is None:
        kept = [name for name in weight_names if "/" not in name and name.endswith(".weight")]
        module = kept[0][: -len(".weight")] if kept else None
    return {module.removesuffix(PEFT_WRAPPER)} if module else set()


def weight_sites(model: onnx.ModelProto) -> list[WeightSite]:
    """Every compute node of `model`'s main graph that reads a weight initializer, with the module
    paths its names suggest."""
    return _weight_sites(_Graph(model))


def _weight_sites(graph: _Graph) -> list[WeightSite]:
    sites = []
    for node in graph.nodes:
        kind = _KIND_OF_OP.get(node.op_type)
        if kind is None or len(node.input) <= _WEIGHT_INPUT[node.op_type]:
            continue
        if node.op_type == "Gather" and attribute(node, "axis", 0) != 0:
            continue
        location = graph.trace(node, _WEIGHT_INPUT[node.op_type])
        if (
            location is None
            or len(location.initializer.dims) != _WEIGHT_RANK[kind]
            or location.initializer.data_type not in FLOAT_TYPES
        ):
            continue
        scaled = node.op_type in _SCALED_OPS
        transposed = node.op_type == "MatMul" or (scaled and not attribute(node, "transB", 0))
        site = WeightSite(
            node=node,
            kind=kind,
            weight=location,
            transposed=transposed,
            factor=float(attribute(node, "alpha", 1.0)) if scaled else 1.0,
            paths=_torch_paths(node, [node.input[_WEIGHT_INPUT[node.op_type]], location.initializer.name]),
            tf_scopes=tf_scopes(node.name) or tf_scopes(location.initializer.name),
        )
        site.paths |= _first_call_paths(graph, site)
        sites.append(site)
    return sites


def _first_call_paths(graph: _Graph, site: WeightSite) -> set[str]:
    """The path of a module that the TorchScript exporter names `<name>_1` on its second call.

    A module run twice (one MLP on two inputs) has its second call's nodes under `mlp.0_1`
    (`/mlp/mlp.0_1/MatMul`, a transposed copy of the weight); it is module `mlp.0` when its
    weight or bias is the parameter the exporter kept as `mlp.0.weight` or `mlp.0.bias` (or a
    name ending so). A module really named `fc_1` reads its own `fc_1.bias`.
    """
    module = node_module(site.node) if site.node.name.startswith("/") else None
    first = re.sub(r"_\d+(?=\.|$)", "", module) if module else None
    if first is None or first == module:
        return set()
    bias = _bias_location(graph, site)
    kept = [site.weight.initializer.name, *([bias[0].initializer.name] if bias else [])]
    parameters = (f"{first}.weight", f"{first}.bias")
    # PEFT's TorchScript names start below its wrappers: `model.mlp.0` for `base_model.model.mlp.0`.
    if any(name in parameters or name.endswith(tuple("." + parameter for parameter in parameters)) for name in kept):
        return {first.removesuffix(PEFT_WRAPPER)}
    return set()


def _tf_match_score(scope: list[str], parts: list[str]) -> int | None:
    """How many of `parts` matched with a TensorFlow `_N` suffix, or None if `scope` is not theirs.

    The first component is the root model's scope; a Keras module path starts below it, and
    something (the op) must follow the layer's scope.
    """
    body = scope[1:]
    if len(body) <= len(parts):
        return None
    score = 0
    for component, part in zip(body, parts, strict=False):
        if component == part:
            continue
        if not re.fullmatch(re.escape(part) + TF_UNIQUIFIER, component):
            return None
        score += 1
    return score


def _tf_site_score(site: WeightSite, parts: list[str]) -> int | None:
    scores = [score for scope in site.tf_scopes if (score := _tf_match_score(scope, parts)) is not None]
    return max(scores, default=None)


def _find_sites(path: str, sites: Iterable[WeightSite]) -> list[WeightSite]:
    """The sites of the module at `path`: exact names first, then Keras scopes, then a unique suffix.

    With TensorFlow's uniquifier a layer `dense_1` may appear as `dense_1_2` while `dense`
    appears as `dense_1`: the reading with the most suffixed components wins, since every
    layer scope of an exported Keras graph carries one.
    """
    sites = list(sites)
    exact = [site for site in sites if path in site.paths]
    if exact:
        return exact
    parts = path.split(".")
    scored = [(score, site) for site in sites if (score := _tf_site_score(site, parts)) is not None]
    if scored:
        best = max(score for score, _ in scored)
        return [site for score, site in scored if score == best]
    related: dict[str, list[WeightSite]] = {}
    for site in sites:
        for other in site.paths:
            if other.endswith("." + path) or path.endswith("." + other):
                related.setdefault(other, []).append(site)
    if len(related) == 1:
        return next(iter(related.values()))
    return []


@dataclasses.dataclass
class LoadedAdapter:
    """An adapter directory's config and tensors, checked (float, finite), with its weight."""

    directory: str
    weight: float
    config: LoRAConfig
    fan_in_fan_out: bool
    tensors: AdapterWeights


def load_adapter(directory: str | os.PathLike, weight: float) -> LoadedAdapter:
    """The adapter at `directory`; AdapterMergeError names the file and the problem."""
    try:
        config, raw, tensors = load_adapter_dir(directory)
    except ValueError as error:
        raise AdapterMergeError(f"cannot read adapter {os.fspath(directory)}: {error}") from None
    # A saved BatchNorm's step counter has no effect on inference and no tensor in the graph.
    tensors.extra = {key: value for key, value in tensors.extra.items() if not key.endswith(_TRAINING_COUNTER)}
    if config.use_dora and weight != 1:
        raise AdapterMergeError(
            f"adapter {os.fspath(directory)} is a DoRA adapter (use_dora=true) and has weight "
            f"{weight:g}: DoRA normalises each output feature of the merged weight, which leaves no "
            "meaning to a weight; merge it with weight 1."
        )
    named = [(f"{path}.lora_A", pair[0]) for path, pair in tensors.lora.items()]
    named += [(f"{path}.lora_B", pair[1]) for path, pair in tensors.lora.items()] + list(tensors.extra.items())
    named += [(f"{path}.lora_magnitude_vector", value) for path, value in tensors.magnitudes.items()]
    for name, value in named:
        if not np.issubdtype(value.dtype, np.floating):
            raise AdapterMergeError(
                f"adapter {os.fspath(directory)}: tensor {name} has dtype {value.dtype}, not a "
                "floating point type: re-save the adapter with float weights."
            )
        if not np.all(np.isfinite(value)):
            raise AdapterMergeError(
                f"adapter {os.fspath(directory)}: tensor {name} holds NaN or inf: the training "
                "diverged; re-train the adapter or save an earlier checkpoint."
            )
    return LoadedAdapter(os.fspath(directory), float(weight), config, bool(raw.get("fan_in_fan_out")), tensors)


def _check_arguments(model: onnx.ModelProto, read_tensor: Callable[[str], np.ndarray]) -> None:
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(
            f"model is a {type(model).__name__}: pass an onnx.ModelProto (onnx.load(path, load_external_data=False))."
        )
    if not callable(read_tensor):
        raise TypeError(
            f"read_tensor={read_tensor!r} is not callable: pass a function from initializer name to its NumPy values."
        )


def _checked_adapters(adapters: Sequence[tuple[str | os.PathLike, float]]) -> list[tuple[str | os.PathLike, float]]:
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError(f"adapters={adapters!r} is invalid: pass a non-empty list of (directory, weight) pairs.")
    checked: list[tuple[str | os.PathLike, float]] = []
    for entry in adapters:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], (str, os.PathLike))):
            raise TypeError(f"adapter entry {entry!r} is invalid: use a (directory, weight) pair.")
        directory, weight = entry
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
            raise ValueError(f"adapter {os.fspath(directory)} has weight {weight!r}: use a finite number.")
        checked.append((directory, float(weight)))
    return checked


class _Accumulator:
    """The new value of each changed input: a replaced base (full tensor) plus weighted deltas.

    Deltas are computed only when the updates are built, one initializer at a time, so that
    at most one base weight and one delta are held beside the finished updates.
    """

    def __init__(self, read_tensor: Callable[[str], np.ndarray]) -> None:
        self.read_tensor = read_tensor
        self.locations: dict[tuple[str, int], TensorLocation] = {}
        self.replacements: dict[tuple[str, int], tuple[np.ndarray, str]] = {}
        self.deltas: dict[tuple[str, int], list[tuple[Callable[[], np.ndarray], str]]] = {}
        self.dora_merges: dict[tuple[str, int], tuple[Callable[[np.ndarray], np.ndarray], str]] = {}

    def replace(self, location: TensorLocation, value: np.ndarray, source: str) -> None:
        key = (location.consumer, location.input_index)
        if key in self.replacements and self.replacements[key][1] != source:
            raise AdapterMergeError(
                f"two adapters replace the weight read by node {location.consumer!r} "
                f"({self.replacements[key][1]} and {source}): give one of them weight 0."
            )
        self.locations[key] = location
        self.replacements[key] = (value, source)

    def add(self, location: TensorLocation, delta: Callable[[], np.ndarray], source: str) -> None:
        key = (location.consumer, location.input_index)
        if key in self.dora_merges:
            raise _beside_dora(self.dora_merges[key][1], source, key)
        self.locations[key] = location
        self.deltas.setdefault(key, []).append((delta, source))

    def add_dora(self, location: TensorLocation, merge: Callable[[np.ndarray], np.ndarray], source: str) -> None:
        """`merge` maps the weight (the base's, or its replacement) to its DoRA-merged value."""
        key = (location.consumer, location.input_index)
        others = [other for _, other in self.deltas.get(key, [])]
        others += [self.dora_merges[key][1]] if key in self.dora_merges else []
        if others:
            raise _beside_dora(source, others[0], key)
        self.locations[key] = location
        self.dora_merges[key] = (merge, source)

    def updates(self) -> list[WeightUpdate]:
        by_initializer: dict[str, list[tuple[str, int]]] = {}
        for key, location in self.locations.items():
            by_initializer.setdefault(location.initializer.name, []).append(key)
        return [
            WeightUpdate(key[0], key[1], functools.partial(self._new_weight, name, key))
            for name, keys in by_initializer.items()
            for key in keys
        ]

    def _new_weight(self, name: str, key: tuple[str, int]) -> np.ndarray:
        """The base weight (or its replacement) plus every delta for `key`, in float32 or wider, cast once."""
        initializer = self.locations[key].initializer
        stored = self.read_tensor(name)
        if tuple(stored.shape) != tuple(initializer.dims):
            raise AdapterMergeError(
                f"read_tensor({name!r}) returned shape {tuple(stored.shape)} but the graph "
                f"declares {tuple(initializer.dims)}: fix the tensor reader."
            )
        base = self.replacements[key][0] if key in self.replacements else _to_float(stored, initializer.data_type)
        value = base.astype(_compute_dtype(initializer.data_type), copy=True)
        if key in self.dora_merges:
            value = self.dora_merges[key][0](value)
        for delta, _ in self.deltas.get(key, []):
            value += delta()
        return _like(value, stored)


def _beside_dora(dora_source: str, other_source: str, key: tuple[str, int]) -> AdapterMergeError:
    return AdapterMergeError(
        f"{dora_source} is DoRA and {other_source} changes the same weight (read by node "
        f"{key[0]!r}): DoRA rescales the whole weight, so merge one adapter per module there."
    )


def _compute_dtype(data_type: int) -> np.dtype:
    """At least float32, so half-precision weights are not rounded before the sum."""
    return np.dtype(np.float64 if data_type == onnx.TensorProto.DOUBLE else np.float32)


def _to_float(stored: np.ndarray, data_type: int) -> np.ndarray:
    """An initializer's values in its compute dtype; bfloat16 may come as uint16 bit patterns."""
    if data_type == onnx.TensorProto.BFLOAT16 and stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(_compute_dtype(data_type))


def _like(value: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """`value` cast once to `stored`'s dtype, bfloat16 bit patterns rounded to nearest even."""
    if stored.dtype == np.uint16:
        import ml_dtypes

        return value.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return value.astype(stored.dtype)


def _checked_factors(adapter: LoadedAdapter, path: str, site: WeightSite) -> tuple[np.ndarray, np.ndarray]:
    """A and B of `path`, checked against the config's rank and the site's weight, before anything is read."""
    site.check_unfolded(adapter, path)
    lora_a, lora_b = adapter.tensors.lora[path]
    rank = adapter.config.rank_for(path)
    if lora_a.shape[0] != rank:
        raise AdapterMergeError(
            f"adapter {adapter.directory}: module {path} has rank {lora_a.shape[0]} in the "
            f"file but {rank} by its config: the files disagree, re-save the adapter."
        )
    if not _fits(site, lora_a, lora_b):
        raise AdapterMergeError(
            f"adapter {adapter.directory}: module {path} has lora_A {lora_a.shape} and lora_B {lora_b.shape}, which "
            f"do not fit the weight {site.reference_shape()} (reference layout) of node {site.node.name!r}: "
            "the adapter was trained on another model."
        )
    return lora_a, lora_b


def _dora_merge(adapter: LoadedAdapter, path: str, site: WeightSite) -> Callable[[np.ndarray], np.ndarray]:
    """The DoRA merge of `path` as a function of the initializer's value (compute dtype)."""
    lora_a, lora_b = _checked_factors(adapter, path, site)
    try:
        dora.check_supported(site.kind, lora_a, lora_b)
    except ValueError as error:
        raise AdapterMergeError(f"adapter {adapter.directory}: module {path}: {error}") from None
    magnitude, scaling = adapter.tensors.magnitudes[path], adapter.config.scaling_for(path)

    def merge(value: np.ndarray) -> np.ndarray:
        merged = dora.dora_merge(
            site.to_reference(value),
            lora_a.astype(value.dtype),
            lora_b.astype(value.dtype),
            scaling,
            magnitude.astype(value.dtype),
            site.kind,
        )
        return site.to_initializer(merged).astype(value.dtype, copy=False)

    return merge


def _delta(adapter: LoadedAdapter, path: str, site: WeightSite) -> Callable[[], np.ndarray]:
    """`weight * s * B @ A` for `path`, laid out like the site's initializer, computed when called."""
    lora_a, lora_b = _checked_factors(adapter, path, site)
    compute = _compute_dtype(site.weight.initializer.data_type)
    scaling = adapter.config.scaling_for(path)

    def compute_delta() -> np.ndarray:
        delta = _DELTAS[site.kind](lora_a.astype(compute), lora_b.astype(compute), scaling)
        return site.to_initializer(adapter.weight * delta).astype(compute)

    return compute_delta


def _fits(site: WeightSite, lora_a: np.ndarray, lora_b: np.ndarray) -> bool:
    """Whether `A` and `B` make a delta of the site's shape (and, for a conv, of its groups)."""
    expected = site.reference_shape()
    if site.kind == "embedding":
        return (
            lora_a.ndim == lora_b.ndim == 2
            and lora_b.shape[1] == lora_a.shape[0]
            and (lora_a.shape[1], lora_b.shape[0]) == expected
        )
    if site.kind == "linear":
        return (
            lora_a.ndim == lora_b.ndim == 2
            and lora_b.shape[1] == lora_a.shape[0]
            and (lora_b.shape[0], lora_a.shape[1]) == expected
        )
    groups = int(attribute(site.node, "group", 1))
    return (
        lora_a.ndim == lora_b.ndim == 4
        and lora_b.shape[2:] == (1, 1)
        and lora_b.shape[1] * groups == lora_a.shape[0]
        and (lora_b.shape[0], *lora_a.shape[1:]) == expected
    )


def _bias_location(graph: _Graph, site: WeightSite) -> tuple[TensorLocation, float] | None:
    """The bias of a site's module and the factor its node multiplies it by (Gemm's beta)."""
    node = site.node
    if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
        location = graph.trace(node, 2)
        beta = float(attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        return (location, beta) if location is not None else None
    if node.op_type in ("MatMul", "FusedMatMul"):
        for consumer, index in graph.consumers.get(node.output[0], []):
            location = graph.trace(consumer, 1 - index) if consumer.op_type == "Add" and index < 2 else None
            if location is not None and len(location.initializer.dims) == 1:
                return location, 1.0
    return None


def _check_full_shape(
    adapter: LoadedAdapter, key: str, value: np.ndarray, expected: tuple[int, ...], node: str
) -> None:
    if tuple(value.shape) != tuple(expected):
        raise AdapterMergeError(
            f"adapter {adapter.directory}: tensor {key} has shape {tuple(value.shape)} but the "
            f"graph's tensor read by node {node!r} is {tuple(expected)}: the adapter was trained "
            "on another model."
        )


def _full_tensor_targets(
    graph: _Graph, sites: list[WeightSite], adapter: LoadedAdapter, key: str, value: np.ndarray
) -> list[tuple[TensorLocation, np.ndarray, str]]:
    """`(location, value in the initializer's layout, reading node)` for a full tensor `<path>.<param>`.

    `weight` of a module with a compute node is its weight: as the initializer holds it when the
    exporter kept the parameter's name, else in PyTorch's layout (`(out, in)`, or `(in, out)`
    for `fan_in_fan_out` adapters of GPT-2's Conv1D). `bias` is the bias its node adds. A
    normalization's parameters are inputs of the module's `LayerNormalization` (or other
    normalization) node; any other tensor is found by the name the exporter kept, at the nodes
    of that module only. Those are taken in their stored layout.
    """
    value = value.astype(np.promote_types(value.dtype, np.float32))
    path, _, param = key.rpartition(".")
    path = path.removesuffix(PEFT_WRAPPER)
    targets = []
    for site in _find_sites(path, sites) if param in ("weight", "bias") else ():
        if param == "weight" and f"{path}.weight" in (
            site.node.input[_WEIGHT_INPUT[site.node.op_type]],
            site.weight.initializer.name,
        ):
            # The exporter kept the parameter as it is: the tensor is already in its layout.
            _check_full_shape(adapter, key, value, tuple(site.weight.initializer.dims), site.node.name)
            targets.append((site.weight, value, site.node.name))
        elif param == "weight":
            site.check_unfolded(adapter, key)
            full = value.T if site.kind == "linear" and adapter.fan_in_fan_out else value
            _check_full_shape(adapter, key, full, site.reference_shape(), site.node.name)
            targets.append((site.weight, site.to_initializer(full), site.node.name))
        elif (bias := _bias_location(graph, site)) is not None:
            location, beta = bias
            _check_full_shape(adapter, key, value, location.operand_shape, site.node.name)
            targets.append((location, location.from_operand(value / beta), site.node.name))
    if targets:
        return targets
    readers = [
        location
        for node in graph.nodes
        if node_module(node) == path
        for index in [_NORMALIZATION_INPUTS.get(node.op_type, {}).get(param)]
        if index is not None and index < len(node.input)
        for location in [graph.trace(node, index)]
        if location is not None
    ]
    if not readers:
        readers = [location for node, location in graph.readers(f"{path}.{param}") if node_module(node) in (None, path)]
    for location in readers:
        _check_full_shape(adapter, key, value, tuple(location.initializer.dims), location.consumer)
    return [(location, value, location.consumer) for location in readers]


def _lora_kind(adapter: LoadedAdapter, path: str) -> str:
    if path in adapter.tensors.embeddings:
        return "embedding"
    dims = adapter.tensors.lora[path][0].ndim
    if dims not in (2, 4):
        raise AdapterMergeError(
            f"adapter {adapter.directory}: module {path} has a {dims}-D lora_A, which is neither a "
            "linear (2-D) nor a 2-D convolution (4-D) adapter: lora_spec merges linear, embedding "
            "and Conv2d adapters only."
        )
    return "conv2d" if dims == 4 else "linear"


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


def _unmatched_message(unmatched: list[str], total: int, sites: list[WeightSite], fix: str) -> str:
    shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
    names = sorted(
        {path for site in sites for path in site.paths}
        | {"/".join(scope) for site in sites for scope in site.tf_scopes}
    )
    examples = ", ".join(names[:3]) or "(no weight initializer read by MatMul/Gemm/Gather/Conv)"
    return (
        f"{len(unmatched)} of {total} adapter keys matched no weight of the graph: {shown}"
        f"{_fused_hint(unmatched, sites)}; the graph's weights belong to modules such as {examples}: {fix}."
    )


def _fused_hint(unmatched: list[str], sites: list[WeightSite]) -> str:
    """Why a module's kept weight is read only by another module's node: the exporter fused the two."""
    for path in unmatched:
        readers = [site for site in sites if site.weight.initializer.name == f"{path}.weight"]
        if readers:
            site = readers[0]
            return (
                f" ({path}.weight is read by node {site.node.name!r} of module {', '.join(sorted(site.paths))}: "
                "the exporter fused the two, e.g. a BatchNorm folded into a conv, and no exact merge exists)"
            )
    return ""


@dataclasses.dataclass
class LoRATarget:
    """An adapter's LoRA pair for module `path` (a `kind` of layer) and the compute nodes it adapts."""

    adapter: LoadedAdapter
    path: str
    kind: str
    sites: list[WeightSite]


@dataclasses.dataclass
class FullTarget:
    """An adapter's full tensor `key` and where it goes: `(location, value in the initializer's layout,
    reading node)` for each place the graph reads it."""

    adapter: LoadedAdapter
    key: str
    locations: list[tuple[TensorLocation, np.ndarray, str]]


@dataclasses.dataclass
class AdapterTargets:
    """Where every key of some adapters goes in a graph; `matched` and `unmatched` as in `AdapterMergePlan`."""

    lora: list[LoRATarget]
    full: list[FullTarget]
    matched: list[tuple[str, str]]
    unmatched: list[str]


def resolve_adapters(
    model: onnx.ModelProto,
    adapters: Sequence[tuple[str | os.PathLike, float]],
    allow_partial: bool = False,
    sites: list[WeightSite] | None = None,
    verb: str = "merge",
) -> AdapterTargets:
    """Load `adapters` (`(directory, weight)` pairs) and find the graph tensors each key adapts or replaces.

    `sites` defaults to `weight_sites(model)`; a caller may leave some out or give them more paths.
    Every LoRA pair is checked against each weight it adapts (rank, shapes) and every full tensor
    against the tensor it replaces, before any weight is read. `verb` says what the caller does with
    the matches, in the message for unmatched keys.

    Raises:
        AdapterMergeError: an unreadable adapter, a tensor with NaN/inf, shapes that do not fit the
            graph, unmatched keys without `allow_partial`, or nothing matched at all.
    """
    loaded = [load_adapter(directory, weight) for directory, weight in _checked_adapters(adapters)]
    graph = _Graph(model)
    sites = _weight_sites(graph) if sites is None else sites
    lora, full, matched, unmatched, keys = [], [], [], [], []
    for adapter in loaded:
        for path in adapter.tensors.lora:
            keys.append(path)
            kind = _lora_kind(adapter, path)
            found = _find_sites(path, [site for site in sites if site.kind == kind])
            if not found:
                unmatched.append(path)
                continue
            for site in found:
                _checked_factors(adapter, path, site)
                matched.append((path, site.node.name))
            lora.append(LoRATarget(adapter, path, kind, found))
        for key, value in adapter.tensors.extra.items():
            keys.append(key)
            locations = _full_tensor_targets(graph, sites, adapter, key, value)
            if not locations:
                unmatched.append(key)
                continue
            matched += [(key, node_name) for _, _, node_name in locations]
            full.append(FullTarget(adapter, key, locations))
    unmatched, keys = _unique(unmatched), _unique(keys)
    if not matched:
        raise AdapterMergeError(
            _unmatched_message(unmatched, len(keys), sites, f"nothing to {verb}; use adapters trained on this model")
        )
    if unmatched and not allow_partial:
        raise AdapterMergeError(
            _unmatched_message(
                unmatched,
                len(keys),
                sites,
                "use adapters trained on this model, or pass allow_partial=True "
                f"(--allow-partial) to {verb} the keys that match",
            )
        )
    return AdapterTargets(lora=lora, full=full, matched=_unique(matched), unmatched=unmatched)


def plan_adapter_merge(
    model: onnx.ModelProto,
    read_tensor: Callable[[str], np.ndarray],
    adapters: Sequence[tuple[str | os.PathLike, float]],
    allow_partial: bool = False,
) -> AdapterMergePlan:
    """The new base weights of `model` with `adapters` merged: `W + sum_k weight_k * delta_k`.

    Args:
        model: the graph, loaded without external data (`onnx.load(path, load_external_data=False)`).
        read_tensor: returns the values of one initializer by name (external data included).
        adapters: `(adapter directory, weight)` pairs, in PEFT's format (ours or PEFT's).
        allow_partial: merge what matches instead of raising when some adapter keys match nothing.

    Full tensors in an adapter (`modules_to_save`, trained biases, normalization parameters)
    replace the base's as they are; the weights scale only the low-rank deltas. Adapters are
    validated before any weight is read, and each changed weight is read once; the returned
    updates hold every changed weight, about the model's size when every matrix is adapted.

    Returns:
        The updates (one per changed node input, deltas of every adapter accumulated), the
        `(adapter key, compute node)` pairs matched, and the keys that matched nothing.

    Raises:
        AdapterMergeError: an unreadable adapter, a tensor with NaN/inf, shapes that do not fit
            the graph, two adapters replacing the same full tensor, unmatched keys without
            `allow_partial`, or nothing matched at all.
    """
    _check_arguments(model, read_tensor)
    targets = resolve_adapters(model, adapters, allow_partial)
    accumulator = _Accumulator(read_tensor)
    for target in targets.lora:
        source = f"adapter {target.adapter.directory} ({target.path})"
        for site in target.sites:
            if target.path in target.adapter.tensors.magnitudes:
                accumulator.add_dora(site.weight, _dora_merge(target.adapter, target.path, site), source)
            elif target.adapter.weight:
                accumulator.add(site.weight, _delta(target.adapter, target.path, site), source)
    for full_target in targets.full:
        if full_target.adapter.weight:
            for location, full, _ in full_target.locations:
                accumulator.replace(location, full, f"{full_target.adapter.directory} ({full_target.key})")
    return AdapterMergePlan(updates=accumulator.updates(), matched=targets.matched, unmatched=targets.unmatched)
