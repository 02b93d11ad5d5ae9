"""Ops an exporter leaves that ONNX lacks (tf2onnx's Erfc), rewritten so that onnxruntime runs the model."""

import math

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from lora_spec.export.mend import mend_missing_ops
from lora_spec.export.verify import session
from tests import strategies

_ELEMENT_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}
_ERROR_BOUND = {np.dtype(np.float32): 2e-7, np.dtype(np.float64): 4e-16}  # 1 - erf: about one unit at 1


class Erf(OpRun):
    """Erf for ONNX's reference evaluator in float64: its own is good to about 1e-8 only."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf)(x).astype(x.dtype),)


def _erfc_model(opset: int, element_type: int, in_subgraph: bool = False) -> onnx.ModelProto:
    erfc = helper.make_node("Erfc", ["x"], ["y"], name="gelu/Erfc")
    value = lambda name: helper.make_tensor_value_info(name, element_type, ["n"])  # noqa: E731
    if in_subgraph:  # an If whose branches both compute erfc(x) from the outer x
        branch = lambda name: helper.make_graph(  # noqa: E731
            [helper.make_node("Erfc", ["x"], [f"{name}_y"], name=f"{name}/Erfc")], name, [], [value(f"{name}_y")]
        )
        condition = helper.make_tensor("condition", TensorProto.BOOL, [], [True])
        erfc = helper.make_node("If", ["condition"], ["y"], then_branch=branch("then"), else_branch=branch("else"))
        graph = helper.make_graph([erfc], "g", [value("x")], [value("y")], initializer=[condition])
    else:
        graph = helper.make_graph([erfc], "g", [value("x")], [value("y")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray, tmp_path) -> np.ndarray:
    """The model's output in onnxruntime; in ONNX's reference evaluator for float64, whose Erf
    onnxruntime does not implement (the standard has it)."""
    path = tmp_path / "mended.onnx"
    onnx.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    if x.dtype == np.float64:
        return ReferenceEvaluator(model, new_ops=[Erf]).run(None, {"x": x})[0]
    return session(path).run(None, {"x": x})[0]


@given(data=st.data(), dtype=strategies.float_dtypes, opset=st.sampled_from([13, 15, 17]), in_subgraph=st.booleans())
def test_erfc_becomes_one_minus_erf_within_one_unit_at_one(tmp_path_factory, data, dtype, opset, in_subgraph):
    x = data.draw(strategies.arrays((data.draw(st.integers(1, 16)),), dtype, scale=4.0))
    model = _erfc_model(opset, _ELEMENT_TYPES[np.dtype(dtype)], in_subgraph)
    lines = mend_missing_ops(model)
    assert len(lines) == 1 and lines[0].startswith("2 Erfc" if in_subgraph else "1 Erfc")
    y = _run(model, x, tmp_path_factory.mktemp("mend"))
    assert y.dtype == x.dtype
    np.testing.assert_allclose(y, [math.erfc(value) for value in x], rtol=0, atol=_ERROR_BOUND[np.dtype(dtype)])


def test_a_model_without_missing_ops_is_left_as_it_is():
    model = _erfc_model(15, TensorProto.FLOAT)
    model.graph.node[0].op_type = "Erf"
    before = model.SerializeToString()
    assert mend_missing_ops(model) == []
    assert model.SerializeToString() == before


def test_an_erfc_of_unknown_type_before_opset_15_is_left_for_the_runtime_to_refuse():
    model = _erfc_model(13, TensorProto.FLOAT)
    model.graph.ClearField("input")  # x of unknown type: no typed 1 can be made without CastLike
    assert mend_missing_ops(model) == []
    assert model.graph.node[0].op_type == "Erfc"


def test_erfc_in_a_custom_domain_is_not_ours_to_rewrite():
    model = _erfc_model(15, TensorProto.FLOAT)
    model.graph.node[0].domain = "com.example"
    assert mend_missing_ops(model) == []


@pytest.mark.parametrize("opset", [13, 15])
def test_erfc_inputs_are_kept_in_half_precision(tmp_path, opset):
    model = _erfc_model(opset, TensorProto.FLOAT16)
    mend_missing_ops(model)
    x = np.linspace(-3, 3, 13).astype(np.float16)
    y = _run(model, x, tmp_path)
    assert y.dtype == np.float16
    np.testing.assert_allclose(np.float32(y), [math.erfc(value) for value in np.float64(x)], atol=2e-3)
