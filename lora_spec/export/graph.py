"""The graph walker: who produces and who reads each tensor, constants, shapes, and safe edits.

Exporters share initializers (the TorchScript exporter stores equal tensors once and hands them
out through `Identity` nodes; the dynamo exporter reuses one scale and equal matrices), so every
question about an initializer is asked through `Identity` chains, and an initializer that
anything else reads is copied before it is changed.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
# Ops whose output is not a function of their inputs: never evaluated as constants.
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of `node`'s attribute `name`, or `default` when it is not set."""
    for item in node.attribute:
        if item.name == name:
            return onnx.helper.get_attribute_value(item)
    return default


def initializer_behind(
    tensor: str, initializers: Mapping[str, object], producers: Mapping[str, onnx.NodeProto]
) -> str | None:
    """The initializer `tensor` is, directly or through `Identity` nodes; None if it is computed.

    Exporters hand one stored tensor to several readers through `Identity` nodes.
    """
    while tensor not in initializers:
        node = producers.get(tensor)
        if node is None or node.op_type != "Identity":
            return None
        tensor = node.input[0]
    return tensor


class Graph:
    """An index over one `onnx.GraphProto`: producers, consumers, initializers and inferred shapes.

    Edits (`replace_input`, `remove`, `copy_initializer`) keep the index current, so matches found
    after an edit see the edited graph. The nodes live in `self.nodes` (standalone copies, so that
    identity comparisons are reliable) until `finish` writes them back in their original order.
    """

    def __init__(self, model: onnx.ModelProto, read_tensor: Callable[[str], np.ndarray]) -> None:
        self.model = model
        self.graph = model.graph
        self.read_tensor = read_tensor
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        self.graph_outputs = {output.name for output in self.graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        self.nodes = []
        for original in self.graph.node:
            node = onnx.NodeProto()
            node.CopyFrom(original)
            self.nodes.append(node)
            self._index(node)
        self._removed: set[int] = set()
        self.shapes = _inferred_shapes(model)
        self._is_constant: dict[str, bool] = {}
        self._constant_values: dict[str, np.ndarray] = {}

    def _index(self, node: onnx.NodeProto) -> None:
        for output in node.output:
            if output:
                self.producer[output] = node
        for name in (*node.input, *_subgraph_inputs(node)):
            if name:
                self.consumers[name].append(node)

    def readers(self, tensor: str) -> int:
        """How many node inputs and graph outputs read `tensor`."""
        return len(self.consumers.get(tensor, ())) + (tensor in self.graph_outputs)

    def only_reader(self, tensor: str) -> onnx.NodeProto | None:
        """The one node reading `tensor`'s values, or None when several do or it is a graph output.

        `Shape` nodes read only the dims, which folding never changes, so they do not count.
        """
        readers = [node for node in self.consumers.get(tensor, ()) if node.op_type != "Shape"]
        return readers[0] if len(readers) == 1 and tensor not in self.graph_outputs else None

    def initializer_behind(self, tensor: str) -> str | None:
        """The initializer `tensor` is, directly or through `Identity` nodes; None if it is computed."""
        return initializer_behind(tensor, self.initializers, self.producer)

    def constant(self, tensor: str) -> np.ndarray | None:
        """The value of a small constant (initializer or `Constant` node, through `Identity`), else None."""
        name = self.initializer_behind(tensor)
        if name is not None:
            return np.asarray(self.read_tensor(name))
        while tensor in self.producer and self.producer[tensor].op_type == "Identity":
            tensor = self.producer[tensor].input[0]
        node = self.producer.get(tensor)
        if node is None or node.op_type != "Constant":
            return None
        for item in node.attribute:
            if item.name == "value":
                return numpy_helper.to_array(item.t)
            if item.name in ("value_float", "value_int", "value_floats", "value_ints"):
                return np.asarray(onnx.helper.get_attribute_value(item))
        return None

    def is_constant(self, tensor: str) -> bool:
        """Whether `tensor` is computed from initializers and `Constant` nodes alone (standard ops,
        no randomness, no subgraphs), so that its value is known without running the model."""
        pending = [tensor]
        while pending:
            name = pending[-1]
            if name in self._is_constant:
                pending.pop()
                continue
            node = self.producer.get(name)
            if (
                name in self.initializers
                or node is None
                or node.op_type in _RANDOM_OPS
                or node.domain not in ("", "ai.onnx")
                or _has_subgraph(node)
            ):
                self._is_constant[name] = name in self.initializers
                pending.pop()
                continue
            unknown = [item for item in node.input if item and item not in self._is_constant]
            if unknown:
                pending.extend(unknown)
                continue
            self._is_constant[name] = all(self._is_constant[item] for item in node.input if item)
            pending.pop()
        return self._is_constant[tensor]

    def evaluate_constant(self, tensor: str) -> np.ndarray | None:
        """The value of a tensor that `is_constant`, computed by onnx's reference evaluator from the
        nodes that produce it; None when it is not constant or the evaluator cannot run them.

        Exporters leave computations on weights in graphs (PyTorch's TorchScript exporter keeps a
        DoRA layer's weight norm), and their values are needed to fold them. Computed values are
        kept, and a later evaluation starts from them: evaluate a tensor's ancestors first.
        """
        if not self.is_constant(tensor):
            return None
        name = self.initializer_behind(tensor)
        if name is not None:
            return np.asarray(self.read_tensor(name))
        if tensor in self._constant_values:
            return self._constant_values[tensor]
        nodes: list[onnx.NodeProto] = []
        stored: dict[str, np.ndarray | None] = {}  # None: an initializer, read below
        pending, seen = [tensor], set()
        while pending:
            name = pending.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            if name in self.initializers or (name in self._constant_values and name != tensor):
                stored[name] = self._constant_values.get(name)
            else:
                nodes.append(self.producer[name])
                pending.extend(self.producer[name].input)
        feeds = {name: np.asarray(self.read_tensor(name)) if value is None else value for name, value in stored.items()}
        order = {id(node): index for index, node in enumerate(self.nodes)}
        nodes = sorted({id(node): node for node in nodes}.values(), key=lambda node: order[id(node)])
        from onnx.reference import ReferenceEvaluator

        inputs = [
            onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)
            )
            for name, value in feeds.items()
        ]
        graph = onnx.helper.make_graph(nodes, "constant", inputs, [onnx.helper.make_empty_tensor_value_info(tensor)])
        model = onnx.helper.make_model(
            graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version
        )
        try:
            # A list of the outputs asked for (the annotation also covers intermediate=True's dict).
            outputs = cast("list[Any]", ReferenceEvaluator(model).run([tensor], feeds))
            value = np.asarray(outputs[0])
        except Exception:
            return None
        self._constant_values[tensor] = value
        return value

    def initializer_readers(self, name: str) -> int:
        """Readers of initializer `name`, counting through every `Identity` that forwards it."""
        total, pending = 0, [name]
        while pending:
            tensor = pending.pop()
            total += tensor in self.graph_outputs
            for node in self.consumers.get(tensor, ()):
                if node.op_type == "Identity":
                    pending.append(node.output[0])
                else:
                    total += 1
        return total

    def shape(self, tensor: str) -> list[int | str | None] | None:
        """Inferred dims of `tensor` (ints, symbolic names or None), or None when unknown."""
        if tensor in self.initializers:
            return list(self.initializers[tensor].dims)
        return self.shapes.get(tensor)

    def copy_initializer(self, name: str, new_name_hint: str) -> str:
        """Add a copy of initializer `name`'s metadata under a fresh name; its data is written later."""
        new_name = self.fresh_name(new_name_hint)
        copy = onnx.TensorProto()
        copy.CopyFrom(self.initializers[name])
        copy.name = new_name
        self.graph.initializer.append(copy)
        self.initializers[new_name] = self.graph.initializer[-1]
        return new_name

    def add_initializer(self, tensor: onnx.TensorProto) -> None:
        """Add `tensor` (whose name is fresh) as an initializer."""
        self.graph.initializer.append(tensor)
        self.initializers[tensor.name] = self.graph.initializer[-1]

    def add_input(self, name: str, element_type: int, dims: Iterable[int | str]) -> None:
        """List `name` among the graph inputs, with `dims` (ints, or names of dims a run chooses)."""
        self.graph.input.append(onnx.helper.make_tensor_value_info(name, element_type, list(dims)))

    def insert_after(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        """Place `new_nodes` (which read only what exists at `node`, or each other) right after `node`."""
        position = next(index for index, existing in enumerate(self.nodes) if existing is node) + 1
        self.nodes[position:position] = new_nodes
        for new in new_nodes:
            self._index(new)

    def fresh_name(self, hint: str) -> str:
        taken = (
            set(self.initializers)
            | set(self.producer)
            | {value.name for value in self.graph.input}
            | {node.name for node in self.nodes}
        )
        name, counter = hint, 1
        while name in taken:
            name, counter = f"{hint}_{counter}", counter + 1
        return name

    def duplicate_chain(self, chain: list[onnx.NodeProto], before: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str]:
        """Copies of the nodes of `chain` (each reading the previous one's output), placed before `before`.

        Returns the copies and the last one's output; the originals stay for their other readers.
        """
        renamed: dict[str, str] = {}
        copies = []
        for original in chain:
            node = onnx.NodeProto()
            node.CopyFrom(original)
            node.name = self.fresh_name(f"{original.name or original.op_type}.lora_merged")
            for index, name in enumerate(node.input):
                node.input[index] = renamed.get(name, name)
            for index, name in enumerate(node.output):
                renamed[name] = node.output[index] = self.fresh_name(f"{name}.lora_merged")
            self._index(node)
            copies.append(node)
        position = next(index for index, node in enumerate(self.nodes) if node is before)
        self.nodes[position:position] = copies
        return copies, renamed[chain[-1].output[0]]

    def replace_input(self, node: onnx.NodeProto, index: int, tensor: str) -> None:
        """Make `node` read `tensor` at input `index`; what fed the old input alone goes away."""
        old = node.input[index]
        self.consumers[old] = [reader for reader in self.consumers[old] if reader is not node]
        node.input[index] = tensor
        self.consumers[tensor].append(node)
        self._remove_orphans([old])

    def append_input(self, node: onnx.NodeProto, tensor: str) -> None:
        """Give `node` one more input, `tensor` (a Conv's bias)."""
        node.input.append(tensor)
        self.consumers[tensor].append(node)

    def rename_output(self, node: onnx.NodeProto, index: int, tensor: str) -> None:
        """Let `node` produce `tensor` (a name whose old producer has been removed)."""
        del self.producer[node.output[index]]
        node.output[index] = tensor
        self.producer[tensor] = node

    def bypass(self, node: onnx.NodeProto, replacement: str) -> None:
        """Remove single-output `node`, whose input `replacement` no other node reads.

        `replacement`'s producer takes over the name of `node`'s output, so every reader (graph
        outputs and subgraphs included) keeps reading the same name.
        """
        output = node.output[0]
        self._detach(node)
        producer = self.producer[replacement]
        self.rename_output(producer, list(producer.output).index(replacement), output)
        self._remove_orphans(node.input)

    def remove(self, nodes: Iterable[onnx.NodeProto]) -> None:
        """Delete `nodes`, then every producer left without a reader, and unread initializers."""
        for node in nodes:
            self._detach(node)
            self._remove_orphans(node.input)

    def _detach(self, node: onnx.NodeProto) -> None:
        self._removed.add(id(node))
        for output in node.output:
            if self.producer.get(output) is node:
                del self.producer[output]
        for name in node.input:
            if name:
                self.consumers[name] = [reader for reader in self.consumers[name] if reader is not node]

    def _remove_orphans(self, tensors: Iterable[str]) -> None:
        pending = [name for name in tensors if name]
        while pending:
            producer = self.producer.get(pending.pop())
            if producer is not None and not any(self.readers(output) for output in producer.output if output):
                self._detach(producer)
                pending.extend(name for name in producer.input if name)
        self._drop_unread_initializers()

    def finish(self) -> None:
        """Write the surviving nodes back into the graph, in their original order."""
        kept = [node for node in self.nodes if id(node) not in self._removed]
        del self.graph.node[:]
        self.graph.node.extend(kept)
        self.nodes = list(kept)
        self._removed.clear()
        stale = [value for value in self.graph.value_info if value.name not in self.producer]
        for value in stale:
            self.graph.value_info.remove(value)

    def _drop_unread_initializers(self) -> None:
        """Drop unread initializers, and their entries among the graph inputs (which would else be
        inputs a run must feed)."""
        unread = [tensor for tensor in self.graph.initializer if not self.readers(tensor.name)]
        for tensor in unread:
            self.graph.initializer.remove(tensor)
            del self.initializers[tensor.name]
        names = {tensor.name for tensor in unread}
        for value in [value for value in self.graph.input if value.name in names]:
            self.graph.input.remove(value)


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Shapes by ONNX inference with data propagation (which follows Keras' Shape->Concat->Reshape)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return {}
    shapes = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [
                dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                for dim in value.type.tensor_type.shape.dim
            ]
    return shapes


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(item.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for item in node.attribute)


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    """Names the subgraphs of `node` (If, Loop, Scan) read, so that their producers count as read."""
    names: list[str] = []
    for item in node.attribute:
        for graph in (*([item.g] if item.type == onnx.AttributeProto.GRAPH else []), *item.graphs):
            for inner in graph.node:
                names.extend(inner.input)
                names.extend(_subgraph_inputs(inner))
    return names
