"""Verification inputs and measures: token ids within their embedding, small dynamic dims, relative differences."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

from lora_spec.export import merge_onnx, verify
from lora_spec.export.graph import Graph

VOCABULARY = 7
RNG = np.random.default_rng(0)


def _token_model() -> onnx.ModelProto:
    """ids -> embedding -> LoRA linear; `mask` (int) multiplies the output; `ids` reach Gather through a Cast."""
    arrays = {
        "table": RNG.standard_normal((VOCABULARY, 4)),
        "weight": RNG.standard_normal((4, 3)),
        "lora_a": RNG.standard_normal((4, 2)),
        "lora_b": RNG.standard_normal((2, 3)),
        "scale": np.array(2.0),
    }
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "ids64"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "weight"], ["base"]),
        helper.make_node("MatMul", ["hidden", "lora_a"], ["low"]),
        helper.make_node("MatMul", ["low", "lora_b"], ["update"]),
        helper.make_node("Mul", ["update", "scale"], ["scaled"]),
        helper.make_node("Add", ["base", "scaled"], ["sum"]),
        helper.make_node("Cast", ["mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sum", "mask_float"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "sequence"]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "sequence", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 3])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _graph(model) -> Graph:
    return Graph(model, lambda name: numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)))


def test_random_token_ids_stay_within_the_embedding_they_index():
    feeds = verify.random_inputs(_graph(_token_model()), {"ids": (4, 50)}, np.random.default_rng(0))
    assert feeds["ids"].dtype == np.int32 and feeds["ids"].shape == (4, 50)
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() == VOCABULARY - 1


def test_dynamic_dims_are_small_and_unindexed_integer_inputs_are_ones():
    feeds = verify.random_inputs(_graph(_token_model()), {}, np.random.default_rng(0))
    assert feeds["ids"].shape == (verify.DEFAULT_DYNAMIC_SIZE,) * 2
    np.testing.assert_array_equal(feeds["mask"], np.ones((2, 2, 1), np.int64))


def test_token_model_merges_with_full_verification_and_input_shape_override(tmp_path):
    onnx.save(_token_model(), tmp_path / "tokens.onnx")
    result = merge_onnx(
        tmp_path / "tokens.onnx", verify="full", input_shapes={"ids": (2, 9), "mask": (2, 9, 1)}, progress=False
    )
    assert result.verification.mode == "full" and result.verification.passed
    assert [node.op_type for node in onnx.load(result.output).graph.node].count("MatMul") == 1


@pytest.mark.parametrize(
    "actual, expected, difference",
    [
        ([1.0, 2.0], [1.0, 2.0], 0.0),
        ([1.0, 2.1], [1.0, 2.0], 0.05),
        ([0.0, 0.0], [0.0, 0.0], 0.0),
        ([np.nan, 1.0], [0.0, 1.0], np.inf),
    ],
    ids=["equal", "relative-to-largest-output", "all-zero", "nan"],
)
def test_relative_difference_is_measured_against_the_largest_expected_output(actual, expected, difference):
    assert verify.relative_difference(np.array(actual), np.array(expected)) == pytest.approx(difference)


@pytest.mark.parametrize("mode", ["full", "layers"])
def test_a_wrong_merge_is_caught_by_either_verification_and_nothing_is_written(tmp_path, monkeypatch, mode):
    from lora_spec.export import VerificationError
    from lora_spec.export.fold import FoldRule

    onnx.save(_token_model(), tmp_path / "tokens.onnx")
    monkeypatch.setattr(FoldRule, "merged_weight", lambda self, branch, weight, lora_a, lora_b: weight)
    with pytest.raises(VerificationError, match="above the tolerance"):
        merge_onnx(tmp_path / "tokens.onnx", verify=mode, progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["tokens.onnx"]
