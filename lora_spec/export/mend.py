"""Ops an exporter leaves in a graph that ONNX does not have, rewritten in standard ops so it runs.

tf2onnx (1.17) has no conversion for TensorFlow's `Erfc`, which recent TensorFlow's `tf.nn.gelu`
uses for the exact GELU (`0.5 * x * erfc(-x / sqrt(2))`, TensorFlow 2.21 here): every Keras model
with a `"gelu"` activation then exports with an `Erfc` node that no ONNX runtime can load
(onnx/tensorflow-onnx#2347). `Erfc(x)` becomes `1 - Erf(x)`, the form PyTorch's and JAX's GELU
compute: it differs from `erfc` by at most one float unit at 1 (6e-8 in float32), which GELU
scales by |x|.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import TensorProto, helper

_DEFAULT_DOMAINS = ("", "ai.onnx")
_CAST_LIKE_OPSET = 15


def _opset(model: onnx.ModelProto) -> int:
    return max((entry.version for entry in model.opset_import if entry.domain in _DEFAULT_DOMAINS), default=1)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph below it (If, Loop and Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                yield from _graphs(subgraph)


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the graph's values, where shape inference finds them (ops it does not know
    stop it, the types of their inputs stay known)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    types = {value.name: value.type.tensor_type.elem_type for value in values if value.type.HasField("tensor_type")}
    types.update({tensor.name: tensor.data_type for tensor in inferred.graph.initializer})
    return types


def _erfc_as_one_minus_erf(node: onnx.NodeProto, element_type: int, cast_like: bool) -> list[onnx.NodeProto]:
    prefix = f"{node.name or node.output[0]}/mended"
    one = helper.make_tensor(f"{prefix}/one", element_type, [], [1])
    nodes = [
        helper.make_node("Constant", [], [one.name], name=one.name, value=one),
        helper.make_node("Erf", [node.input[0]], [f"{prefix}/erf"], name=f"{prefix}/erf"),
    ]
    one_name = one.name
    if cast_like:  # the one in the input's type, whatever it is
        one_name = f"{prefix}/one_like"
        nodes.append(helper.make_node("CastLike", [one.name, node.input[0]], [one_name], name=one_name))
    nodes.append(helper.make_node("Sub", [one_name, f"{prefix}/erf"], list(node.output), name=node.name or prefix))
    return nodes


def mend_missing_ops(model: onnx.ModelProto) -> list[str]:
    """Rewrite, in place, the ops of `model` that ONNX lacks and that have a standard form; return
    one line per kind of op rewritten (empty when there was none)."""
    graphs = [
        graph
        for graph in _graphs(model.graph)
        if any(node.op_type == "Erfc" and node.domain in _DEFAULT_DOMAINS for node in graph.node)
    ]
    if not graphs:
        return []
    cast_like = _opset(model) >= _CAST_LIKE_OPSET
    types = {} if cast_like else _element_types(model)
    mended = 0
    for graph in graphs:
        nodes = []
        for node in graph.node:
            element_type = TensorProto.FLOAT if cast_like else types.get(node.input[0]) if node.input else None
            if node.op_type == "Erfc" and node.domain in _DEFAULT_DOMAINS and element_type:
                nodes += _erfc_as_one_minus_erf(node, element_type, cast_like)
                mended += 1
            else:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    return (
        [f"{mended} Erfc node(s) as 1 - Erf: ONNX has no Erfc (tf2onnx leaves TensorFlow's, from its exact GELU)"]
        if mended
        else []
    )
