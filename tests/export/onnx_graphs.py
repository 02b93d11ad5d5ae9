"""Hand-built one-layer ONNX graphs and adapter folders, shared by the adapter-merge, switchable and pack tests.

Each graph is one layer of module `block.proj` built with `onnx.helper`, its weight named as an
exporter names it (`NAMINGS`) and laid out as an exporter stores it (`LINEAR_LAYOUTS`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lora_spec.adapter_io import AdapterWeights, save_adapter_dir
from lora_spec.config import LoRAConfig
from lora_spec.export.adapter_merge import AdapterMergePlan
from tests import strategies

PATH = "block.proj"
LINEAR_LAYOUTS = ("matmul", "matmul_transpose", "gemm_trans_b", "gemm", "fused_matmul")
NAMINGS = ("initializer", "torchscript_node", "dynamo_metadata", "dynamo_namespace", "keras")


# --- graphs -------------------------------------------------------------------------------------------


def module_names(naming: str, op: str) -> tuple[str, str, list]:
    """`(initializer name, node name, metadata)` of the weight of module `block.proj` under `naming`."""
    if naming == "initializer":
        return f"{PATH}.weight", "n0", []
    if naming == "torchscript_node":
        return "onnx::MatMul_7", f"/block/proj/{op}", []
    if naming == "dynamo_metadata":
        return "val_3", "node_linear", [("pkg.torch.onnx.name_scopes", "['', 'block', 'block.proj', 'linear']")]
    if naming == "dynamo_namespace":
        namespace = ": M/block: B/block.proj: torch.nn.modules.linear.Linear/linear: aten.linear.default"
        return "val_3", "node_linear", [("namespace", namespace)]
    return "model_1/block_1/proj_1/Cast/ReadVariableOp:0", f"model_1/block_1/proj_1/{op}", []


def make_model(nodes, initializers, inputs, output: str = "y") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], initializer=initializers
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def make_node(op: str, inputs: list[str], output: str, name: str, metadata=(), **attributes) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, [output], name=name, **attributes)
    for key, value in metadata:
        node.metadata_props.add(key=key, value=value)
    return node


def linear_model(
    weight: np.ndarray, bias: np.ndarray, layout: str, naming: str = "initializer", alpha: float = 1.0
) -> onnx.ModelProto:
    """`y = x @ weight.T + bias` for `x (batch, in)`, the weight stored as `layout` wants it.

    `fused_matmul` is onnxruntime's `FusedMatMul` (transB=1, alpha) from an optimized graph.
    """
    op = {"gemm": "Gemm", "gemm_trans_b": "Gemm", "fused_matmul": "FusedMatMul"}.get(layout, "MatMul")
    weight_name, node_name, metadata = module_names(naming, op)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[1]])
    bias_tensor = numpy_helper.from_array(bias.astype(np.float32), "bias")
    if layout == "gemm_trans_b":
        stored, nodes = (
            weight / alpha,
            [make_node("Gemm", ["x", weight_name, "bias"], "y", node_name, metadata, transB=1, alpha=alpha)],
        )
    elif layout == "gemm":
        stored, nodes = (
            weight.T / alpha,
            [make_node("Gemm", ["x", weight_name, "bias"], "y", node_name, metadata, alpha=alpha)],
        )
    elif layout == "fused_matmul":
        stored, nodes = (
            weight / alpha,
            [
                make_node(
                    "FusedMatMul",
                    ["x", weight_name],
                    "xw",
                    node_name,
                    metadata,
                    domain="com.microsoft",
                    transB=1,
                    alpha=alpha,
                ),
                make_node("Add", ["xw", "bias"], "y", "add"),
            ],
        )
    else:
        stored, read = weight.T, weight_name
        nodes = []
        if layout == "matmul_transpose":
            stored, read = weight, "weight_t"
            nodes.append(helper.make_node("Transpose", [weight_name], [read], name="transpose", perm=[1, 0]))
        nodes += [
            make_node("MatMul", ["x", read], "xw", node_name, metadata),
            make_node("Add", ["xw", "bias"], "y", "add"),
        ]
    initializers = [numpy_helper.from_array(np.ascontiguousarray(stored, np.float32), weight_name), bias_tensor]
    return make_model(nodes, initializers, [x])


def embedding_model(table: np.ndarray, naming: str = "initializer") -> onnx.ModelProto:
    weight_name, node_name, metadata = module_names(naming, "Gather")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, None)
    return make_model(
        [make_node("Gather", [weight_name, "ids"], "y", node_name, metadata)],
        [numpy_helper.from_array(table.astype(np.float32), weight_name)],
        [ids],
    )


def conv_model(case: strategies.Conv2dCase) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    inputs = ["x", f"{PATH}.weight"] + (["bias"] if case.b is not None else [])
    initializers = [numpy_helper.from_array(case.W.astype(np.float32), f"{PATH}.weight")]
    if case.b is not None:
        initializers.append(numpy_helper.from_array(case.b.astype(np.float32), "bias"))
    pads = [case.padding[0], case.padding[1], case.padding[0], case.padding[1]]
    node = make_node(
        "Conv",
        inputs,
        "y",
        "/block/proj/Conv",
        strides=list(case.stride),
        pads=pads,
        dilations=list(case.dilation),
        group=case.groups,
    )
    return make_model([node], initializers, [x])


# --- plans, files and sessions ----------------------------------------------------------------------------


def initializer_reader(model: onnx.ModelProto):
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    return lambda name: numpy_helper.to_array(tensors[name])


def apply_plan(model: onnx.ModelProto, plan: AdapterMergePlan) -> onnx.ModelProto:
    """A copy of `model` whose updated inputs each read a new initializer holding the update's value."""
    merged = onnx.ModelProto()
    merged.CopyFrom(model)
    initializers = {tensor.name: tensor for tensor in merged.graph.initializer}
    producers = {output: node for node in merged.graph.node for output in node.output}
    nodes = {node.name: node for node in merged.graph.node}
    for number, update in enumerate(plan.updates):
        node = nodes[update.node_name]
        source = node.input[update.input_index]
        while source not in initializers:
            source = producers[source].input[0]
        name = f"{source}.merged{number}"
        if initializers[source].data_type == TensorProto.BFLOAT16 and update.value.dtype == np.uint16:
            tensor = helper.make_tensor(
                name, TensorProto.BFLOAT16, update.value.shape, update.value.tobytes(), raw=True
            )
        else:
            tensor = numpy_helper.from_array(update.value, name)
        merged.graph.initializer.append(tensor)
        node.input[update.input_index] = name
    return merged


def run(model: onnx.ModelProto, **feeds: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def write_adapter(
    directory: Path,
    lora: dict,
    embeddings=(),
    extra=None,
    r: int | None = None,
    alpha: float = 1.0,
    magnitudes=None,
    **config,
) -> Path:
    """An adapter directory holding `lora` pairs `(A, B)`, `extra` full tensors and DoRA `magnitudes`."""
    rank = r or next(iter(lora.values()))[0].shape[0]
    peft = LoRAConfig(r=rank, alpha=alpha, use_dora=bool(magnitudes), **config).to_peft_dict(
        [path.rsplit(".", 1)[-1] for path in lora] or None
    )
    save_adapter_dir(
        directory,
        peft,
        AdapterWeights(
            lora=dict(lora), embeddings=set(embeddings), extra=extra or {}, magnitudes=dict(magnitudes or {})
        ),
    )
    return directory
