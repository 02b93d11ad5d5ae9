"""Folding generated LoRA graphs: the merged graph computes the reference's merged forward, with the base's nodes."""

import collections

import numpy as np
import pytest
from hypothesis import given

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from lora_spec.export import merge_onnx
from lora_spec.export.verify import session
from tests import strategies
from tests.numerics import assert_close

COMPUTE_OPS = ("MatMul", "Gemm", "Mul", "Div", "Add")


def _merge(tmp_path_factory, case: strategies.LoRAGraphCase, verify: str = "full"):
    folder = tmp_path_factory.mktemp("fold")
    onnx.save(case.model, folder / "model.onnx")
    result = merge_onnx(folder / "model.onnx", verify=verify, progress=False)
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
def test_layer_by_layer_verification_reads_every_layout_right(tmp_path_factory, case):
    """The check that large models get: each weight merged in place, against its branch."""
    result, merged = _merge(tmp_path_factory, case, verify="layers")
    assert result.verification.mode == "layers" and result.verification.passed, case.layout
    outputs = session(merged).run(None, {"x": case.x})
    for output, expected in zip(outputs, case.expected, strict=True):
        assert_close(output, expected, np.float32, factor=20)


@given(strategies.lora_graph_cases())
def test_merged_graph_has_the_compute_nodes_of_the_base_model(tmp_path_factory, case):
    _, merged = _merge(tmp_path_factory, case)
    assert _compute_ops(onnx.load(merged)) == _compute_ops(case.base_model), case.layout


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


def test_two_adapters_stacked_on_one_layer_both_fold_into_its_weight(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from lora_spec import reference

    rng = np.random.default_rng(0)
    weight, x = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    adapters = [
        (rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((5, 2)).astype(np.float32), s)
        for s in (0.5, 2.0)
    ]
    arrays, nodes, total = {"weight": weight.T}, [helper.make_node("MatMul", ["x", "weight"], ["sum0"])], "sum0"
    for index, (lora_a, lora_b, scale) in enumerate(adapters):
        arrays.update({f"a{index}": lora_a.T, f"b{index}": lora_b.T, f"s{index}": np.float32(scale)})
        nodes += [
            helper.make_node("MatMul", ["x", f"a{index}"], [f"low{index}"]),
            helper.make_node("MatMul", [f"low{index}", f"b{index}"], [f"up{index}"]),
            helper.make_node("Mul", [f"up{index}", f"s{index}"], [f"scaled{index}"]),
            helper.make_node("Add", [total, f"scaled{index}"], [f"sum{index + 1}"]),
        ]
        total = f"sum{index + 1}"
    graph = helper.make_graph(
        nodes,
        "stacked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info(total, TensorProto.FLOAT, [3, 5])],
        [numpy_helper.from_array(np.ascontiguousarray(value), name) for name, value in arrays.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    result = merge_onnx(tmp_path / "m.onnx", verify="layers", progress=False)
    assert len(result.folds) == 2 and [node.op_type for node in onnx.load(result.output).graph.node] == ["MatMul"]
    merged = weight
    for lora_a, lora_b, scale in adapters:
        merged = reference.merge(merged, lora_a, lora_b, scale)
    assert_close(session(result.output).run(None, {"x": x})[0], x @ merged.T, np.float32)


@pytest.mark.parametrize("branch_target", [(3, 5, 2), (3, 2, 5)], ids=["same split", "other split"])
def test_a_branch_reshaped_like_its_base_folds_and_one_reshaped_otherwise_does_not(tmp_path, branch_target):
    """Keras's EinsumDense splits heads after the product on both sides of the LoRA sum."""
    from onnx import TensorProto, helper, numpy_helper

    from lora_spec import reference

    rng = np.random.default_rng(0)
    weight, x = rng.standard_normal((10, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    lora_a, lora_b = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((10, 2)).astype(np.float32)
    arrays = {
        "weight": weight.T,
        "a": lora_a.T,
        "b": lora_b.T,
        "heads": np.array([3, 5, 2]),
        "branch_heads": np.array(branch_target),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "weight"], ["base"]),
        helper.make_node("Reshape", ["base", "heads"], ["base_heads"]),
        helper.make_node("MatMul", ["x", "a"], ["low"]),
        helper.make_node("MatMul", ["low", "b"], ["up"]),
        helper.make_node("Reshape", ["up", "branch_heads"], ["up_heads"]),
        helper.make_node("Add", ["base_heads", "up_heads"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5, 2])],
        [numpy_helper.from_array(np.ascontiguousarray(value), name) for name, value in arrays.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    if branch_target != (3, 5, 2):
        with pytest.raises(ValueError, match="no LoRA branch"):
            merge_onnx(tmp_path / "m.onnx", verify="full", progress=False)
        return
    result = merge_onnx(tmp_path / "m.onnx", verify="full", progress=False)
    assert [node.op_type for node in onnx.load(result.output).graph.node] == ["MatMul", "Reshape"]
    expected = (x @ reference.merge(weight, lora_a, lora_b, 1.0).T).reshape(3, 5, 2)
    assert_close(session(result.output).run(None, {"x": x})[0], expected, np.float32)


def _graph_with_a_sum_joined_branch(path, with_add_branch: bool):
    """A LoRA branch joined by `Sum`, a form the matcher does not take, and optionally one joined by `Add`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in [
            ("w1", (8, 8)),
            ("a1", (8, 2)),
            ("b1", (2, 8)),
            ("w2", (8, 8)),
            ("a2", (8, 2)),
            ("b2", (2, 8)),
        ]
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["base1"]),
        helper.make_node("MatMul", ["x", "a1"], ["low1"]),
        helper.make_node("MatMul", ["low1", "b1"], ["up1"], name="odd_join_b"),
        helper.make_node("Sum", ["base1", "up1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["base2"]),
    ]
    output = "base2"
    if with_add_branch:
        nodes += [
            helper.make_node("MatMul", ["h", "a2"], ["low2"]),
            helper.make_node("MatMul", ["low2", "b2"], ["up2"]),
            helper.make_node("Add", ["base2", "up2"], ["y"]),
        ]
        output = "y"
    graph = helper.make_graph(
        nodes,
        "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [3, 8])],
        [numpy_helper.from_array(value, name) for name, value in arrays.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def test_a_low_rank_pair_left_unfolded_is_reported_not_passed_over(tmp_path):
    _graph_with_a_sum_joined_branch(tmp_path / "m.onnx", with_add_branch=True)
    result = merge_onnx(tmp_path / "m.onnx", verify="full", progress=False)
    assert len(result.folds) == 1
    assert result.refused == [
        "odd_join_b: a rank-2 product pair (low1 then this) is not added to a base product in "
        "a form lora-export knows, so it stays unmerged"
    ]
    assert "not folded: odd_join_b" in result.describe()


def test_a_graph_whose_only_pair_is_not_recognised_names_it_in_the_error(tmp_path):
    _graph_with_a_sum_joined_branch(tmp_path / "m.onnx", with_add_branch=False)
    with pytest.raises(ValueError, match=r"no LoRA branch found in .*\(odd_join_b: a rank-2 product pair"):
        merge_onnx(tmp_path / "m.onnx", verify="full", progress=False)


@pytest.mark.parametrize(("target", "rejoined"), [([-1, 8], True), ([0, -1, 8], False)])
def test_a_reshape_of_a_reshape_is_rejoined_only_when_its_shape_copies_no_input_dim(tmp_path, target, rejoined):
    """A branch read the first reshape's output; once folded, `Reshape(Reshape(x, s1), s2)` becomes `Reshape(x, s2)`,
    unless s2 has a 0, which copies a dim of its input: here the 2 of `(2, 3, 8)`, where x has 6."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.export.onnx_graphs import make_model

    rng = np.random.default_rng(0)
    arrays = {
        "heads": np.array([2, 3, 8]),
        "rows": np.array(target),
        "out_rows": np.array([*target[:-1], 5]),
        "weight": rng.standard_normal((8, 5)).astype(np.float32),
        "lora_A": rng.standard_normal((8, 2)).astype(np.float32),
        "lora_B": rng.standard_normal((2, 5)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Reshape", ["x", "heads"], ["merged_heads"]),
        helper.make_node("Reshape", ["merged_heads", "rows"], ["as_rows"]),
        helper.make_node("MatMul", ["as_rows", "weight"], ["base"]),
        helper.make_node("MatMul", ["merged_heads", "lora_A"], ["low"]),
        helper.make_node("MatMul", ["low", "lora_B"], ["up"]),
        helper.make_node("Reshape", ["up", "out_rows"], ["up_rows"]),
        helper.make_node("Add", ["base", "up_rows"], ["y"]),
    ]
    initializers = [numpy_helper.from_array(value, name) for name, value in arrays.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 8])]
    onnx.save(make_model(nodes, initializers, inputs), tmp_path / "model.onnx")
    x = rng.standard_normal((6, 8)).astype(np.float32)
    (expected,) = session(tmp_path / "model.onnx").run(None, {"x": x})
    result = merge_onnx(tmp_path / "model.onnx", verify="full", progress=False)
    nodes = [node.op_type for node in onnx.load(result.output).graph.node]
    assert nodes == ["Reshape", "MatMul"] if rejoined else ["Reshape", "Reshape", "MatMul"]
    (output,) = session(result.output).run(None, {"x": x})
    assert output.shape == expected.shape
    assert_close(output, expected, np.float32, factor=10)
