"""The switch rules on hand-built one-layer graphs: every layer kind, switched per run, equals the reference.

A base graph (MatMul/Gemm/FusedMatMul, Gather, Conv) is made switchable from adapter folders, the
adapters are packed into an onnxruntime adapter file, and the model run with it active equals the
NumPy reference's layer with `W + sum_k weight_k * delta_k`; without it, the base layer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec import reference
from tests import strategies
from tests.numerics import assert_close

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from lora_spec.export import ExportError, make_switchable, pack_adapter
from lora_spec.export.pack import active_adapter
from lora_spec.export.verify import session
from tests.export.onnx_graphs import (
    PATH,
    conv_model,
    embedding_model,
    linear_model,
    make_model,
    make_node,
    write_adapter,
)

_DELTAS = {
    "linear": reference.delta_weight,
    "embedding": reference.embedding_delta_weight,
    "conv2d": reference.conv2d_delta_weight,
}


def _base_graph(case: strategies.AdapterSetCase, layout: str):
    """The layer's ONNX graph (float32) at module `block.proj`, its feeds, and its output for a weight `W`."""
    layer = case.base
    if case.layer == "embedding":
        return embedding_model(layer.W), {"ids": layer.ids.astype(np.int64)}, lambda W: W[layer.ids]
    if case.layer == "conv2d":
        x = layer.x.astype(np.float32)
        return (
            conv_model(layer),
            {"x": x},
            lambda W: reference.conv2d_forward(
                x.astype(np.float64), W, layer.b, layer.A, np.zeros(layer.B.shape), 0.0, **layer.geometry
            ),
        )
    x = layer.x.reshape(-1, layer.x.shape[-1]).astype(np.float32)
    bias = layer.b if layer.b is not None else np.zeros(layer.W.shape[0])
    return linear_model(layer.W, bias, layout), {"x": x}, lambda W: x @ W.T + bias


@given(case=strategies.adapter_set_cases(), layout=st.sampled_from(["matmul", "gemm", "gemm_trans_b"]))
def test_packed_adapters_switched_per_run_equal_the_reference_weighted_merge(case, layout):
    model, feeds, forward = _base_graph(case, layout)
    base_weight = case.W
    merged = base_weight + sum(
        weight * _DELTAS[case.layer](*adapter) for adapter, weight in zip(case.adapters, case.weights, strict=True)
    )
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        onnx.save(model, folder / "base.onnx")
        specs = [
            (
                write_adapter(
                    folder / str(number),
                    {PATH: (adapter.A, adapter.B)},
                    embeddings=[PATH] if case.layer == "embedding" else (),
                    alpha=adapter.s * adapter.A.shape[0],
                ),
                weight,
            )
            for number, (adapter, weight) in enumerate(zip(case.adapters, case.weights, strict=True))
        ]
        served = make_switchable(folder / "base.onnx", adapters=[specs[0][0]], verify="off", progress=False).output
        packed = pack_adapter(served, specs, folder / "packed.onnx_adapter", verify="off").output
        runner = session(served)
        options, _adapter = active_adapter(packed)
        switched, plain = runner.run(None, feeds, options)[0], runner.run(None, feeds)[0]
    assert_close(switched, forward(merged), np.float32, factor=20)
    assert_close(plain, forward(base_weight), np.float32, factor=4)


def test_a_gemm_reading_its_input_transposed_gets_a_branch_reading_it_untransposed(tmp_path):
    weight = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, None])
    node = make_node("Gemm", ["x", f"{PATH}.weight"], "y", "/block/proj/Gemm", transA=1, transB=1)
    onnx.save(make_model([node], [numpy_helper.from_array(weight, f"{PATH}.weight")], [x]), tmp_path / "base.onnx")
    lora_a, lora_b = np.ones((2, 4), np.float32), np.full((3, 2), 0.5, np.float32)
    adapter = write_adapter(tmp_path / "adapter", {PATH: (lora_a, lora_b)}, alpha=2.0)
    served = make_switchable(tmp_path / "base.onnx", adapters=[adapter], progress=False).output
    packed = pack_adapter(served, [adapter], tmp_path / "a.onnx_adapter").output
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    options, _adapter = active_adapter(packed)
    assert_close(
        session(served).run(None, {"x": x}, options)[0],
        x.T @ reference.merge(weight, lora_a, lora_b, 1.0).T,
        np.float32,
    )


def test_a_node_of_another_op_is_refused_by_name(tmp_path):
    """onnxruntime's FusedMatMul (a graph it optimized) is adapted by `--merge --adapter`, not switched."""
    onnx.save(linear_model(np.ones((3, 4)), np.zeros(3), "fused_matmul"), tmp_path / "base.onnx")
    adapter = write_adapter(tmp_path / "adapter", {PATH: (np.ones((2, 4)), np.ones((3, 2)))})
    with pytest.raises(
        ExportError,
        match=r"module block\.proj runs at node 'n0', a FusedMatMul, which --switchable "
        r"does not switch \(it switches Conv, Gather, Gemm, MatMul\)",
    ):
        make_switchable(tmp_path / "base.onnx", adapters=[adapter], progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "base.onnx"]


@pytest.fixture
def served_linear(tmp_path):
    """`block.proj` as MatMul + bias Add, made switchable from a rank-2 adapter."""
    rng = np.random.default_rng(2)
    onnx.save(
        linear_model(rng.standard_normal((3, 4)).astype(np.float32), np.ones(3), "matmul"), tmp_path / "base.onnx"
    )
    adapter = write_adapter(tmp_path / "adapter", {PATH: (np.ones((2, 4)), np.ones((3, 2)))})
    return make_switchable(tmp_path / "base.onnx", adapters=[adapter], progress=False).output


def test_factors_are_rank_zero_initializers_that_the_graph_lists_as_inputs_with_a_symbolic_rank(served_linear):
    model = onnx.load(served_linear)
    inputs = {
        value.name: [dim.dim_value or dim.dim_param for dim in value.type.tensor_type.shape.dim]
        for value in model.graph.input
    }
    initializers = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    assert inputs[f"{PATH}.lora_A"] == [4, f"r_{PATH}"] and inputs[f"{PATH}.lora_B"] == [f"r_{PATH}", 3]
    assert initializers[f"{PATH}.lora_A"] == [4, 0] and initializers[f"{PATH}.lora_B"] == [0, 3]
    overridable = {value.name for value in session(served_linear).get_overridable_initializers()}
    assert {f"{PATH}.lora_A", f"{PATH}.lora_B"} <= overridable


def test_the_branch_joins_after_the_bias_add_so_onnxruntime_still_fuses_matmul_and_bias(served_linear):
    nodes = onnx.load(served_linear).graph.node
    producers = {output: node for node in nodes for output in node.output}
    base = next(node for node in nodes if node.name == "n0")
    readers = [node for node in nodes if base.output[0] in node.input]
    assert [node.name for node in readers] == ["add"]
    join = next(node for node in nodes if node.op_type == "Add" and node.name != "add")
    assert producers[join.input[0]].name == "add" and join.output[0] == "y"
    assert producers[join.input[1]].input[1] == f"{PATH}.lora_B"
