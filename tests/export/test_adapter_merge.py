"""Planning adapter merges on hand-built graphs: layouts, naming schemes, weights, precision, errors.

Each graph is one layer built with `onnx.helper`; the plan is written into a copy of the model
and run in onnxruntime, then compared with the NumPy reference.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec import reference
from lora_spec.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from lora_spec.config import LoRAConfig
from tests import strategies
from tests.numerics import assert_close

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from lora_spec.export.adapter_merge import AdapterMergeError, AdapterMergePlan, plan_adapter_merge
from tests.export.onnx_graphs import (
    LINEAR_LAYOUTS,
    NAMINGS,
    PATH,
    apply_plan,
    conv_model,
    embedding_model,
    initializer_reader,
    linear_model,
    make_model,
    make_node,
    run,
    write_adapter,
)


def merged_linear(weight, adapters) -> np.ndarray:
    """`W + sum_k weight_k * s_k * B_k @ A_k` in float64."""
    return weight + sum(
        w * reference.delta_weight(a.astype(np.float64), b.astype(np.float64), s) for a, b, s, w in adapters
    )


# --- properties ---------------------------------------------------------------------------------------------

adapter_weights = st.floats(-2.0, 2.0, allow_nan=False).filter(lambda w: abs(w) > 1e-3)


@st.composite
def weighted_adapters(draw):
    """1 to 3 `(A, B, scaling parameters, weight)` for one `block.proj` of drawn in/out features."""
    features_in, features_out = draw(strategies.in_features), draw(strategies.out_features)
    adapters = []
    for _ in range(draw(st.integers(1, 3))):
        rank = draw(st.integers(1, strategies.MAX_RANK))
        adapters.append(
            (
                draw(strategies.arrays((rank, features_in), np.float32, 0.5)),
                draw(strategies.arrays((features_out, rank), np.float32, 0.5)),
                draw(st.floats(0.5, 16.0)),
                draw(st.booleans()),
                draw(adapter_weights),
            )
        )
    return adapters


@given(
    adapters=weighted_adapters(),
    weight=strategies.base_weights(np.float32),
    x=strategies.inputs(np.float32),
    layout=st.sampled_from(LINEAR_LAYOUTS),
    naming=st.sampled_from(NAMINGS),
    alpha=st.sampled_from([1.0, 0.5, 2.0]),
)
def test_weighted_merge_of_linear_adapters_equals_numpy_in_every_layout_and_naming(
    adapters, weight, x, layout, naming, alpha
):
    x = x.reshape(-1, x.shape[-1])
    bias = np.linspace(-1, 1, weight.shape[0])
    model = linear_model(weight, bias, layout, naming, alpha=alpha if layout.startswith(("gemm", "fused")) else 1.0)
    with tempfile.TemporaryDirectory() as folder:
        specs, expected = [], []
        for number, (lora_a, lora_b, lora_alpha, rslora, adapter_weight) in enumerate(adapters):
            directory = write_adapter(
                Path(folder) / str(number), {PATH: (lora_a, lora_b)}, alpha=lora_alpha, use_rslora=rslora
            )
            scaling = LoRAConfig(r=lora_a.shape[0], alpha=lora_alpha, use_rslora=rslora).scaling
            specs.append((directory, adapter_weight))
            expected.append((lora_a, lora_b, scaling, adapter_weight))
        plan = plan_adapter_merge(model, initializer_reader(model), specs)
    assert len(plan.updates) == 1 and plan.unmatched == []
    assert {path for path, _ in plan.matched} == {PATH}
    merged_weight = merged_linear(weight.astype(np.float64), expected)
    assert_close(run(apply_plan(model, plan), x=x), x @ merged_weight.T + bias, np.float32, factor=4)


@given(case=strategies.embedding_cases(np.float32), naming=st.sampled_from(NAMINGS))
def test_embedding_merge_equals_reference_forward(case, naming):
    model = embedding_model(case.W, naming)
    rank = case.A.shape[0]
    with tempfile.TemporaryDirectory() as folder:
        directory = write_adapter(Path(folder), {PATH: (case.A, case.B)}, embeddings=[PATH], alpha=case.s * rank)
        plan = plan_adapter_merge(model, initializer_reader(model), [(directory, 1.0)])
    expected = reference.embedding_forward(case.ids, case.W.astype(np.float64), case.A, case.B, case.s)
    assert_close(run(apply_plan(model, plan), ids=case.ids.astype(np.int64)), expected, np.float32, factor=4)


@given(case=strategies.conv2d_cases(np.float32, dropout=False))
def test_grouped_conv_merge_equals_reference_unmerged_forward(case):
    model = conv_model(case)
    rank = case.A.shape[0]
    with tempfile.TemporaryDirectory() as folder:
        directory = write_adapter(Path(folder), {PATH: (case.A, case.B)}, alpha=case.s * rank)
        plan = plan_adapter_merge(model, initializer_reader(model), [(directory, 1.0)])
    expected = reference.conv2d_forward(
        case.x.astype(np.float64), case.W, case.b, case.A, case.B, case.s, **case.geometry
    )
    assert_close(run(apply_plan(model, plan), x=case.x), expected, np.float32, factor=8)


def test_conv_kernel_stored_in_keras_layout_behind_a_transpose_is_updated_in_that_layout(tmp_path):
    """tf2onnx may keep Keras's `(kh, kw, in, out)` kernel and transpose it to ONNX's `(out, in, kh, kw)`."""
    rng = np.random.default_rng(3)
    weight, lora_a, lora_b = (
        rng.standard_normal((4, 3, 2, 2)),
        rng.standard_normal((2, 3, 2, 2)),
        rng.standard_normal((4, 2, 1, 1)),
    )
    stored = np.transpose(weight, (2, 3, 1, 0)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Transpose", ["kernel"], ["w"], name="model_1/conv_1/transpose", perm=[3, 2, 0, 1]),
        make_node("Conv", ["x", "w"], "y", "model_1/conv_1/Conv2D"),
    ]
    model = make_model(nodes, [numpy_helper.from_array(stored, "kernel")], [x])
    directory = write_adapter(tmp_path / "a", {"conv": (lora_a, lora_b)}, alpha=4.0)
    (update,) = plan_for(model, [(directory, 1.0)]).updates
    assert (update.node_name, update.input_index) == ("model_1/conv_1/transpose", 0)
    expected = np.transpose(weight + reference.conv2d_delta_weight(lora_a, lora_b, 2.0), (2, 3, 1, 0))
    np.testing.assert_allclose(update.value, expected, rtol=1e-5, atol=1e-5)


# --- fixtures for the example tests -------------------------------------------------------------------------

RNG = np.random.default_rng(7)
WEIGHT = RNG.standard_normal((3, 4)).astype(np.float32)
LORA_A = RNG.standard_normal((2, 4)).astype(np.float32)
LORA_B = RNG.standard_normal((3, 2)).astype(np.float32)


@pytest.fixture
def adapter(tmp_path) -> Path:
    return write_adapter(tmp_path / "adapter", {PATH: (LORA_A, LORA_B)}, alpha=4.0)


def plan_for(model, adapters, **options) -> AdapterMergePlan:
    return plan_adapter_merge(model, initializer_reader(model), adapters, **options)


# --- precision ------------------------------------------------------------------------------------------------


def _half_model(stored: np.ndarray, data_type: int) -> onnx.ModelProto:
    """MatMul on a half-precision weight `(in, out)` through a Cast to float32."""
    if data_type == TensorProto.BFLOAT16:
        tensor = helper.make_tensor(f"{PATH}.weight", data_type, stored.shape, stored.tobytes(), raw=True)
    else:
        tensor = numpy_helper.from_array(stored, f"{PATH}.weight")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, stored.shape[0]])
    nodes = [
        helper.make_node("Cast", [f"{PATH}.weight"], ["w32"], name="cast", to=TensorProto.FLOAT),
        make_node("MatMul", ["x", "w32"], "y", "/block/proj/MatMul"),
    ]
    return make_model(nodes, [tensor], [x])


def test_float16_weight_is_merged_in_float32_and_cast_once(adapter):
    model = _half_model(WEIGHT.T.astype(np.float16), TensorProto.FLOAT16)
    (update,) = plan_for(model, [(adapter, 1.0)]).updates
    assert (update.node_name, update.input_index) == ("cast", 0)
    expected = reference.merge(WEIGHT.astype(np.float16), LORA_A, LORA_B, 4.0 / 2).T
    assert update.value.dtype == np.float16
    np.testing.assert_array_equal(update.value, expected)


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return values.astype(ml_dtypes.bfloat16).view(np.uint16)


@pytest.mark.parametrize("representation", ["uint16_bits", "ml_dtypes"])
def test_bfloat16_weight_is_merged_in_float32_and_rounded_once(adapter, representation):
    bits = _bfloat16_bits(WEIGHT.T)
    model = _half_model(bits, TensorProto.BFLOAT16)
    reader = initializer_reader(model) if representation == "ml_dtypes" else (lambda name: bits)
    (update,) = plan_adapter_merge(model, reader, [(adapter, 1.0)]).updates
    base = (bits.astype(np.uint32) << 16).view(np.float32)
    expected = _bfloat16_bits(base + reference.delta_weight(LORA_A, LORA_B, 2.0).T)
    np.testing.assert_array_equal(np.asarray(update.value).view(np.uint16), expected)
    assert update.value.dtype == reader(f"{PATH}.weight").dtype
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    assert_close(
        run(apply_plan(model, plan_for(model, [(adapter, 1.0)])), x=x),
        x @ (base.T + 2.0 * LORA_B @ LORA_A).T,
        np.float16,
        factor=8,
    )


# --- weights, sharing, full tensors ----------------------------------------------------------------------------


def test_adapter_with_weight_zero_changes_nothing_but_is_matched(adapter):
    model = linear_model(WEIGHT, np.zeros(3), "matmul")
    plan = plan_for(model, [(adapter, 0.0)])
    assert plan.updates == [] and plan.matched == [(PATH, "n0")]


def test_two_adapters_on_one_node_accumulate_into_one_update(adapter, tmp_path):
    other = write_adapter(tmp_path / "other", {PATH: (LORA_A * 3, LORA_B)}, alpha=2.0)
    model = linear_model(WEIGHT, np.zeros(3), "gemm_trans_b")
    (update,) = plan_for(model, [(adapter, 0.5), [str(other), -1]]).updates
    expected = WEIGHT + 0.5 * 2.0 * LORA_B @ LORA_A - 1.0 * 1.0 * LORA_B @ (LORA_A * 3)
    np.testing.assert_allclose(update.value, expected, rtol=1e-5, atol=1e-5)


def test_modules_sharing_one_initializer_through_identity_get_separate_updates(tmp_path):
    """The TorchScript exporter stores equal weights once: each module's update must start from it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    nodes = [
        helper.make_node("Identity", ["shared"], ["shared_again"], name="identity"),
        make_node("MatMul", ["x", "shared"], "h", "/first/MatMul"),
        make_node("MatMul", ["x", "shared_again"], "y", "/second/MatMul"),
    ]
    model = make_model(nodes, [numpy_helper.from_array(WEIGHT.T.copy(), "shared")], [x])
    directory = write_adapter(tmp_path / "a", {"first": (LORA_A, LORA_B), "second": (LORA_A, -LORA_B)}, alpha=2.0)
    plan = plan_for(model, [(directory, 1.0)])
    values = {(update.node_name, update.input_index): update.value for update in plan.updates}
    np.testing.assert_allclose(values["/first/MatMul", 1], (WEIGHT + LORA_B @ LORA_A).T, rtol=1e-6)
    np.testing.assert_allclose(values["/second/MatMul", 1], (WEIGHT - LORA_B @ LORA_A).T, rtol=1e-6)


def test_modules_to_save_and_bias_replace_the_base_and_deltas_add_on_top(tmp_path):
    head, bias = RNG.standard_normal((3, 4)), RNG.standard_normal(3)
    directory = write_adapter(tmp_path / "a", {PATH: (LORA_A, LORA_B)}, extra={f"{PATH}.bias": bias}, alpha=2.0)
    saved = write_adapter(tmp_path / "saved", {}, extra={"head.weight": head}, r=1)
    head_model = linear_model(WEIGHT, np.zeros(3), "gemm", naming="torchscript_node")
    model = linear_model(WEIGHT, np.zeros(3), "matmul", naming="dynamo_metadata")
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    merged = run(apply_plan(model, plan_for(model, [(directory, 0.5)])), x=x)
    assert_close(merged, x @ (WEIGHT + 0.5 * LORA_B @ LORA_A).T + bias, np.float32)
    head_model.graph.node[0].name = "/head/Gemm"
    assert_close(run(apply_plan(head_model, plan_for(head_model, [(saved, 1.0)])), x=x), x @ head.T, np.float32)


def test_a_full_tensor_from_two_weighted_adapters_is_refused_unless_one_weighs_zero(tmp_path):
    first = write_adapter(tmp_path / "first", {}, extra={f"{PATH}.weight": WEIGHT * 2}, r=1)
    second = write_adapter(tmp_path / "second", {}, extra={f"{PATH}.weight": WEIGHT * 3}, r=1)
    model = linear_model(WEIGHT, np.zeros(3), "gemm_trans_b")
    with pytest.raises(AdapterMergeError, match=r"two adapters replace the weight read by node 'n0'.*weight 0"):
        plan_for(model, [(first, 1.0), (second, 1.0)])
    (update,) = plan_for(model, [(first, 0.0), (second, 0.5)]).updates
    np.testing.assert_array_equal(update.value, WEIGHT * 3)


def test_fan_in_fan_out_full_weight_is_read_in_conv1d_layout(tmp_path):
    square = RNG.standard_normal((4, 4)).astype(np.float32)
    directory = write_adapter(tmp_path / "a", {}, extra={f"{PATH}.weight": square}, r=1)
    config = json.loads((directory / CONFIG_NAME).read_text())
    (directory / CONFIG_NAME).write_text(json.dumps({**config, "fan_in_fan_out": True}))
    model = linear_model(np.zeros((4, 4), np.float32), np.zeros(4), "gemm", naming="torchscript_node")
    (update,) = plan_for(model, [(directory, 1.0)]).updates
    np.testing.assert_array_equal(update.value, square)  # Conv1D's (in, out) is Gemm transB=0's operand


# --- matching -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call_scope", ["", "StatefulPartitionedCall/"])
def test_keras_uniquified_scopes_match_the_layer_they_belong_to(tmp_path, call_scope):
    """TensorFlow names layer `dense` `dense_1` and layer `dense_1` `dense_1_2` in an exported graph."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    weights = {
        f"{call_scope}functional_1/dense_1/Cast/ReadVariableOp:0": WEIGHT.T,
        f"{call_scope}functional_1/dense_1_2/Cast/ReadVariableOp:0": -WEIGHT.T,
    }
    nodes = [
        make_node("MatMul", ["x", name], f"y{number}", name.replace("Cast/ReadVariableOp:0", "MatMul"))
        for number, name in enumerate(weights)
    ]
    model = make_model(
        nodes, [numpy_helper.from_array(value.copy(), name) for name, value in weights.items()], [x], "y0"
    )
    directory = write_adapter(tmp_path / "a", {"dense": (LORA_A, LORA_B), "dense_1": (LORA_A, 2 * LORA_B)})
    plan = plan_for(model, [(directory, 1.0)])
    assert sorted(plan.matched) == [
        ("dense", f"{call_scope}functional_1/dense_1/MatMul"),
        ("dense_1", f"{call_scope}functional_1/dense_1_2/MatMul"),
    ]


@pytest.mark.parametrize(
    "adapter_path, graph_path",
    [
        ("bert.encoder.layer.0.query", "encoder.layer.0.query"),  # adapter of a model with a head, graph of its body
        ("encoder.layer.0.query", "wrapper.encoder.layer.0.query"),  # graph exported from a wrapper
        ("encoder.layer.0.query", "base_model.model.encoder.layer.0.query.base_layer"),  # from a PEFT model
    ],
)
def test_module_paths_match_by_unique_dotted_suffix(tmp_path, adapter_path, graph_path):
    model = linear_model(WEIGHT, np.zeros(3), "matmul")
    model.graph.initializer[0].name = model.graph.node[0].input[1] = f"{graph_path}.weight"
    directory = write_adapter(tmp_path / "a", {adapter_path: (LORA_A, LORA_B)})
    assert plan_for(model, [(directory, 1.0)]).matched == [(adapter_path, "n0")]


@pytest.mark.parametrize("prefix", ["", "model/"], ids=["lora_spec", "peft-wrapped"])
def test_a_torchscript_module_run_twice_is_merged_at_both_calls_and_a_module_named_like_a_repeat_is_not(
    tmp_path, prefix
):
    """TorchScript names a second call `mlp.0_1`; its bias is still the kept `mlp.0.bias` (or PEFT's
    `base_model.model.mlp.0.bias`). A module really named `mlp.0_1` would read its own bias."""
    kept = "base_model.model." if prefix else ""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    nodes = [
        make_node("Gemm", ["x", f"{kept}mlp.0.weight", f"{kept}mlp.0.bias"], "y", f"/{prefix}mlp/mlp.0/Gemm", transB=1),
        make_node("MatMul", ["x", "onnx::MatMul_9"], "h", f"/{prefix}mlp/mlp.0_1/MatMul"),
        make_node("Add", [f"{kept}mlp.0.bias", "h"], "z", f"/{prefix}mlp/mlp.0_1/Add"),
        make_node("MatMul", ["x", "onnx::MatMul_10"], "g", f"/{prefix}mlp/mlp.2_1/MatMul"),
        make_node("Add", ["mlp.2_1.bias", "g"], "w", f"/{prefix}mlp/mlp.2_1/Add"),
    ]
    initializers = [
        numpy_helper.from_array(value, name)
        for name, value in [
            (f"{kept}mlp.0.weight", WEIGHT),
            (f"{kept}mlp.0.bias", np.zeros(3, np.float32)),
            ("onnx::MatMul_9", WEIGHT.T.copy()),
            ("onnx::MatMul_10", WEIGHT.T.copy()),
            ("mlp.2_1.bias", np.zeros(3, np.float32)),
        ]
    ]
    model = make_model(nodes, initializers, [x])
    directory = write_adapter(tmp_path / "a", {"mlp.0": (LORA_A, LORA_B), "mlp.2": (LORA_A, LORA_B)})
    plan = plan_for(model, [(directory, 1.0)], allow_partial=True)
    assert plan.matched == [("mlp.0", f"/{prefix}mlp/mlp.0/Gemm"), ("mlp.0", f"/{prefix}mlp/mlp.0_1/MatMul")]
    assert plan.unmatched == ["mlp.2"]


def test_an_ambiguous_suffix_matches_nothing(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    nodes = [
        make_node("MatMul", ["x", f"layer.{number}.query.weight"], f"y{number}", f"n{number}") for number in (0, 1)
    ]
    initializers = [numpy_helper.from_array(WEIGHT.T.copy(), f"layer.{number}.query.weight") for number in (0, 1)]
    model = make_model(nodes, initializers, [x], "y0")
    directory = write_adapter(tmp_path / "a", {"query": (LORA_A, LORA_B), "layer.1.query": (LORA_A, LORA_B)})
    plan = plan_for(model, [(directory, 1.0)], allow_partial=True)
    assert plan.unmatched == ["query"] and plan.matched == [("layer.1.query", "n1")]


def test_a_saved_batch_norm_step_counter_is_not_a_key_to_merge(tmp_path):
    counter = {"bn.num_batches_tracked": np.array(7, np.int64)}
    directory = write_adapter(tmp_path / "a", {PATH: (LORA_A, LORA_B)}, extra=counter)
    plan = plan_for(linear_model(WEIGHT, np.zeros(3), "matmul"), [(directory, 1.0)])
    assert plan.unmatched == [] and plan.matched == [(PATH, "n0")]


def test_an_integer_table_is_never_taken_for_an_embedding(tmp_path):
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, None)
    table = numpy_helper.from_array(np.arange(12, dtype=np.int64).reshape(4, 3), f"{PATH}.weight")
    model = make_model([make_node("Gather", [f"{PATH}.weight", "ids"], "y", "/block/proj/Gather")], [table], [ids])
    directory = write_adapter(tmp_path / "a", {PATH: (np.ones((2, 4)), np.ones((3, 2)))}, embeddings=[PATH])
    with pytest.raises(AdapterMergeError, match="1 of 1 adapter keys matched no weight"):
        plan_for(model, [(directory, 1.0)])


def test_allow_partial_merges_what_matches_and_lists_the_rest(tmp_path):
    directory = write_adapter(
        tmp_path / "a",
        {PATH: (LORA_A, LORA_B), "missing.layer": (LORA_A, LORA_B)},
        extra={"missing.head.weight": WEIGHT},
    )
    model = linear_model(WEIGHT, np.zeros(3), "matmul")
    plan = plan_for(model, [(directory, 1.0)], allow_partial=True)
    assert plan.unmatched == ["missing.layer", "missing.head.weight"] and len(plan.updates) == 1


# --- errors ---------------------------------------------------------------------------------------------------


def test_unmatched_keys_raise_one_line_naming_them_and_the_graph_modules(tmp_path):
    directory = write_adapter(tmp_path / "a", {PATH: (LORA_A, LORA_B), "missing.layer": (LORA_A, LORA_B)})
    model = linear_model(WEIGHT, np.zeros(3), "matmul", naming="torchscript_node")
    with pytest.raises(AdapterMergeError) as error:
        plan_for(model, [(directory, 1.0)])
    message = str(error.value)
    assert "\n" not in message and "1 of 2 adapter keys matched no weight" in message
    assert "missing.layer" in message and "block.proj" in message and "allow_partial=True" in message


def test_an_adapter_matching_nothing_raises_even_with_allow_partial(tmp_path):
    directory = write_adapter(tmp_path / "a", {"elsewhere": (LORA_A, LORA_B)})
    with pytest.raises(AdapterMergeError, match="nothing to merge"):
        plan_for(linear_model(WEIGHT, np.zeros(3), "matmul"), [(directory, 1.0)], allow_partial=True)


def _corrupt(directory: Path, change) -> Path:
    change(directory)
    return directory


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "absent", "cannot read adapter .*absent: adapter directory .* does not exist"),
        (
            lambda d: _corrupt(write_adapter(d / "a", {PATH: (LORA_A, LORA_B)}), lambda a: (a / WEIGHTS_NAME).unlink()),
            f"has no {WEIGHTS_NAME}",
        ),
        (
            lambda d: _corrupt(
                write_adapter(d / "a", {PATH: (LORA_A, LORA_B)}), lambda a: (a / WEIGHTS_NAME).write_bytes(b"\x00" * 3)
            ),
            "not a valid safetensors file",
        ),
        (
            lambda d: _corrupt(
                write_adapter(d / "a", {PATH: (LORA_A, LORA_B)}),
                lambda a: (a / CONFIG_NAME).write_text(
                    json.dumps({**json.loads((a / CONFIG_NAME).read_text()), "layer_replication": [[0, 1]]})
                ),
            ),
            "layer_replication=.* is not supported",
        ),
        (
            lambda d: write_adapter(d / "a", {PATH: (LORA_A[:, :3], LORA_B)}),
            r"module block.proj has lora_A \(2, 3\) and lora_B \(3, 2\), which do not fit the weight \(3, 4\)",
        ),
        (
            lambda d: write_adapter(d / "a", {PATH: (LORA_A, LORA_B)}, r=2, rank_pattern={"proj": 4}),
            "module block.proj has rank 2 in the file but 4 by its config",
        ),
        (
            lambda d: write_adapter(d / "a", {PATH: (LORA_A.astype(np.int32), LORA_B)}),
            f"tensor {PATH}.lora_A has dtype int32, not a floating point type",
        ),
        (
            lambda d: write_adapter(d / "a", {PATH: (LORA_A[:, :, None], LORA_B)}),
            "module block.proj has a 3-D lora_A, which is neither a linear",
        ),
        (
            lambda d: write_adapter(d / "a", {}, extra={f"{PATH}.weight": WEIGHT.T}, r=1),
            rf"tensor {PATH}.weight has shape \(4, 3\) but the graph's tensor read by node 'n0' is \(3, 4\)",
        ),
    ],
)
def test_bad_adapters_raise_naming_the_file_or_key(tmp_path, make, message):
    model = linear_model(WEIGHT, np.zeros(3), "gemm_trans_b")
    with pytest.raises(AdapterMergeError, match=message) as error:
        plan_for(model, [(make(tmp_path), 1.0)])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_adapter_tensors_are_refused_by_name(tmp_path, bad):
    directory = write_adapter(tmp_path / "a", {PATH: (LORA_A, LORA_B)})
    from lora_spec import safetensors_io

    tensors, metadata = safetensors_io.load(directory / WEIGHTS_NAME)
    tensors[f"base_model.model.{PATH}.lora_B.weight"] = np.full_like(LORA_B, bad)
    safetensors_io.save(directory / WEIGHTS_NAME, tensors, metadata)
    with pytest.raises(AdapterMergeError, match=f"tensor {PATH}.lora_B holds NaN or inf"):
        plan_for(linear_model(WEIGHT, np.zeros(3), "matmul"), [(directory, 1.0)])


@pytest.mark.parametrize(
    "model, reader, adapters, error, message",
    [
        (b"onnx bytes", None, None, TypeError, "model is a bytes: pass an onnx.ModelProto"),
        (None, "not callable", None, TypeError, "read_tensor='not callable' is not callable"),
        (None, None, [], TypeError, r"adapters=\[\] is invalid: pass a non-empty list"),
        (None, None, "adapter_dir", TypeError, "adapters='adapter_dir' is invalid"),
        (None, None, [("a",)], TypeError, r"adapter entry \('a',\) is invalid: use a \(directory, weight\) pair"),
        (None, None, [("a", float("nan"))], ValueError, "adapter a has weight nan: use a finite number"),
        (None, None, [("a", True)], ValueError, "adapter a has weight True"),
    ],
)
def test_bad_arguments_raise_one_clear_line(model, reader, adapters, error, message):
    default = linear_model(WEIGHT, np.zeros(3), "matmul")
    with pytest.raises(error, match=message):
        plan_adapter_merge(
            default if model is None else model,
            reader or initializer_reader(default),
            adapters if adapters is not None else [("a", 1.0)],
        )


def test_a_reader_returning_the_wrong_shape_is_named(adapter):
    model = linear_model(WEIGHT, np.zeros(3), "matmul")
    with pytest.raises(AdapterMergeError, match=r"read_tensor\('block.proj.weight'\) returned shape \(2,\)"):
        _ = plan_adapter_merge(model, lambda name: np.zeros(2, np.float32), [(adapter, 1.0)]).updates[0].value


def test_a_plan_reads_each_weight_only_when_its_value_is_asked_for(adapter):
    model = linear_model(WEIGHT, np.zeros(3), "matmul")
    reads = []

    def reader(name):
        reads.append(name)
        return WEIGHT.T.astype(np.float32)

    plan = plan_adapter_merge(model, reader, [(adapter, 1.0)])
    assert reads == []
    _ = plan.updates[0].value
    assert reads == ["block.proj.weight"]
