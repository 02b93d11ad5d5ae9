"""Folding generated LoRA graphs: the merged graph computes the reference's merged forward, with the base's nodes."""

import collections

import numpy as np
import pytest
from hypothesis import given

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from lora_spec.export import merge_onnx  # noqa: E402
from lora_spec.export.verify import session  # noqa: E402
from tests import strategies  # noqa: E402
from tests.numerics import assert_close  # noqa: E402

COMPUTE_OPS = ("MatMul", "Gemm", "Mul", "Div", "Add")


def _merge(tmp_path_factory, case: strategies.LoRAGraphCase):
    folder = tmp_path_factory.mktemp("fold")
    onnx.save(case.model, folder / "model.onnx")
    result = merge_onnx(folder / "model.onnx", verify="full", progress=False)
    return result, folder / "model.merged.onnx"


def _compute_ops(model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node if node.op_type in COMPUTE_OPS)


@given(strategies.lora_graph_cases())
def test_merged_graph_computes_the_reference_merged_forward(tmp_path_factory, case):
    result, merged = _merge(tmp_path_factory, case)
    outputs = session(merged).run(None, {"x": case.x})
    for output, expected in zip(outputs, case.expected, strict=True):
        assert_close(output, expected, np.float32, factor=20)
    assert result.verification.passed, case.layout


@given(strategies.lora_graph_cases())
def test_merged_graph_has_the_compute_nodes_of_the_base_model(tmp_path_factory, case):
    _, merged = _merge(tmp_path_factory, case)
    assert _compute_ops(onnx.load(merged)) == _compute_ops(case.base_model), case.layout


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sign", [+1, -1], ids=["merge", "unmerge"])
def test_reference_merge_in_place_leaves_w_untouched_and_equals_the_plain_sum(dtype, sign):
    """The exporter relies on the reference's merge for multi-GB weights; it must not modify W."""
    from lora_spec import reference

    rng = np.random.default_rng(0)
    weight, lora_a, lora_b = (rng.standard_normal(shape).astype(dtype) for shape in [(6, 5), (2, 5), (6, 2)])
    original = weight.copy()
    compute = np.promote_types(dtype, np.float32)
    delta = 0.5 * (lora_b.astype(compute) @ lora_a.astype(compute))
    function = reference.merge if sign > 0 else reference.unmerge
    result = function(weight, lora_a, lora_b, 0.5)
    np.testing.assert_array_equal(weight, original)
    np.testing.assert_array_equal(result, (weight.astype(compute) + sign * delta).astype(dtype))
    assert result.dtype == dtype


@given(strategies.lora_embedding_graph_cases())
def test_merged_embedding_lookup_is_the_reference_merged_table(tmp_path_factory, case):
    folder = tmp_path_factory.mktemp("embedding")
    onnx.save(case.model, folder / "model.onnx")
    result = merge_onnx(folder / "model.onnx", verify="full", progress=False)
    merged = onnx.load(result.output)
    assert [node.op_type for node in merged.graph.node] == ["Gather"], case.layout
    assert_close(session(result.output).run(None, {"ids": case.ids})[0], case.expected, np.float32, factor=20)


@given(strategies.lora_conv_graph_cases())
def test_merged_conv_is_the_reference_merged_conv(tmp_path_factory, case):
    folder = tmp_path_factory.mktemp("conv")
    onnx.save(case.model, folder / "model.onnx")
    result = merge_onnx(folder / "model.onnx", verify="layers", progress=False)
    assert [node.op_type for node in onnx.load(result.output).graph.node] == ["Conv"]
    assert result.verification.passed
    assert_close(session(result.output).run(None, {"x": case.x})[0], case.expected, np.float32, factor=20)
