"""`make_switchable` on hand-built graphs: exported LoRA branches in every form exporters write, full
tensors, external data, and the inputs it refuses."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

from tests import strategies
from tests.numerics import assert_close

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from lora_spec.export import ExportError, NoLoRABranchError, make_switchable, pack_adapter
from lora_spec.export.pack import active_adapter
from lora_spec.export.verify import session
from tests.export.onnx_graphs import PATH, make_model, make_node, write_adapter


def _factor_initializers(path: Path) -> dict[str, np.ndarray]:
    return {
        tensor.name: numpy_helper.to_array(tensor)
        for tensor in onnx.load(path).graph.initializer
        if tensor.name.endswith((".lora_A", ".lora_B"))
    }


@given(case=strategies.lora_graph_cases())
def test_exported_branches_give_the_base_by_default_and_the_adapted_model_with_their_factors(case):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        onnx.save(case.model, folder / "model.onnx")
        onnx.save(case.base_model, folder / "base.onnx")
        result = make_switchable(folder / "model.onnx", progress=False)
        kept = make_switchable(
            folder / "model.onnx", folder / "kept.onnx", keep_default=True, verify="off", progress=False
        )
        served = session(result.output)
        defaults = _factor_initializers(kept.output)
        base = session(folder / "base.onnx").run(None, {"x": case.x})
        switched = served.run(None, {"x": case.x, **defaults})
        plain = served.run(None, {"x": case.x})
        kept_outputs = session(kept.output).run(None, {"x": case.x})
        ranks = {
            name: value.shape[1 if name.endswith("lora_A") else 0]
            for name, value in _factor_initializers(result.output).items()
        }
    assert result.verification.passed and len(result.modules) == len(case.expected)
    assert len(ranks) == 2 * len(case.expected) and set(ranks.values()) == {0}
    for got, want in zip(plain, base, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, adapted, want in zip(switched, kept_outputs, case.expected, strict=True):
        assert_close(got, want, np.float32, factor=10)
        assert_close(adapted, want, np.float32, factor=10)


@given(case=strategies.lora_embedding_graph_cases() | strategies.lora_conv_graph_cases())
def test_exported_embedding_and_conv_branches_keep_their_adapter_on_request(case):
    feeds = {"ids": case.ids} if hasattr(case, "ids") else {"x": case.x}
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(case.model, Path(folder) / "model.onnx")
        result = make_switchable(Path(folder) / "model.onnx", progress=False)
        kept = make_switchable(
            Path(folder) / "model.onnx", Path(folder) / "kept.onnx", keep_default=True, progress=False
        )
        output = session(kept.output).run(None, feeds)[0]
    assert result.verification.passed and kept.verification.passed
    assert_close(output, case.expected, np.float32, factor=10)


RNG = np.random.default_rng(5)
WEIGHT, OTHER, BIAS = (RNG.standard_normal(shape).astype(np.float32) for shape in [(3, 4), (3, 4), (3,)])
X = RNG.standard_normal((2, 4)).astype(np.float32)


def _two_layers_sharing_a_bias(folder: Path, external: bool = False) -> Path:
    """`/block/proj/Gemm` and `/other/Gemm` reading one stored bias, as exporters store equal tensors once."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    nodes = [
        make_node("Gemm", ["x", f"{PATH}.weight", "bias"], "y", "/block/proj/Gemm", transB=1),
        make_node("Gemm", ["x", "other.weight", "bias"], "z", "/other/Gemm", transB=1),
    ]
    initializers = [
        numpy_helper.from_array(WEIGHT, f"{PATH}.weight"),
        numpy_helper.from_array(OTHER, "other.weight"),
        numpy_helper.from_array(BIAS, "bias"),
    ]
    model = make_model(nodes, initializers, [x])
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    onnx.save(model, folder / "base.onnx", save_as_external_data=external, location="base.onnx.data", size_threshold=0)
    return folder / "base.onnx"


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_a_trained_bias_becomes_an_input_of_its_module_alone_and_switches_with_the_adapter(tmp_path, external):
    base = _two_layers_sharing_a_bias(tmp_path, external)
    trained_bias = np.array([5.0, -5.0, 1.0], np.float32)
    lora_a, lora_b = RNG.standard_normal((2, 4)), RNG.standard_normal((3, 2))
    adapter = write_adapter(
        tmp_path / "adapter", {PATH: (lora_a, lora_b)}, extra={f"{PATH}.bias": trained_bias}, alpha=2.0
    )
    result = make_switchable(base, adapters=[adapter], progress=False)
    assert result.overridable == [f"{PATH}.bias.switchable [3] (full tensor)"]
    assert (tmp_path / "base.switchable.onnx.data").is_file() == external
    packed = pack_adapter(result.output, [adapter], tmp_path / "a.onnx_adapter")
    assert packed.verification.passed
    served = session(result.output)
    options, _adapter = active_adapter(packed.output)
    (y, z), (y_base, z_base) = served.run(None, {"x": X}, options), served.run(None, {"x": X})
    merged = WEIGHT + lora_b.astype(np.float32) @ lora_a.astype(np.float32)
    assert_close(y, X @ merged.T + trained_bias, np.float32)
    assert_close(y_base, X @ WEIGHT.T + BIAS, np.float32)
    assert_close(z, X @ OTHER.T + BIAS, np.float32)
    np.testing.assert_array_equal(z, z_base)


def test_a_lora_tensor_the_exporter_stored_once_for_two_modules_becomes_inputs_of_each(tmp_path):
    """Exporters store equal tensors once (two B still at zero): each module gets its own inputs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    nodes = []
    for module, output in (("query", "q"), ("value", "v")):
        nodes += [
            make_node("MatMul", ["x", f"{module}.weight_t"], f"{module}_base", f"/{module}/base_layer/MatMul"),
            make_node("MatMul", ["x", f"{module}.a"], f"{module}_low", f"/{module}/MatMul"),
            make_node("MatMul", [f"{module}_low", "shared_b"], f"{module}_update", f"/{module}/MatMul_1"),
            make_node("Add", [f"{module}_base", f"{module}_update"], output, f"/{module}/Add"),
        ]
    values = {
        "query.weight_t": WEIGHT.T,
        "value.weight_t": OTHER.T,
        "query.a": RNG.standard_normal((4, 2)),
        "value.a": RNG.standard_normal((4, 2)),
        "shared_b": np.zeros((2, 3)),
    }
    model = make_model(
        nodes,
        [numpy_helper.from_array(np.asarray(value, np.float32), name) for name, value in values.items()],
        [x],
        "q",
    )
    model.graph.output.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, None))
    onnx.save(model, tmp_path / "model.onnx")
    result = make_switchable(tmp_path / "model.onnx", keep_default=True, progress=False)
    assert [line.split(":")[0] for line in result.modules] == ["query", "value"]
    factors = _factor_initializers(result.output)
    assert set(factors) == {"query.lora_A", "query.lora_B", "value.lora_A", "value.lora_B"}
    update = np.ones((2, 3), np.float32)
    query, value = session(result.output).run(None, {"x": X, "query.lora_B": update})
    assert_close(query, X @ WEIGHT.T + (X @ values["query.a"].astype(np.float32)) @ update, np.float32)
    assert_close(value, X @ OTHER.T, np.float32)


def _stacked(folder: Path) -> Path:
    """Two LoRA branches added one after the other to one base product."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    nodes = [
        make_node("MatMul", ["x", "w"], "base", "base"),
        make_node("MatMul", ["x", "a1"], "h1", "a1"),
        make_node("MatMul", ["h1", "b1"], "u1", "b1"),
        make_node("Add", ["base", "u1"], "s1", "add1"),
        make_node("MatMul", ["x", "a2"], "h2", "a2"),
        make_node("MatMul", ["h2", "b2"], "u2", "b2"),
        make_node("Add", ["s1", "u2"], "y", "add2"),
    ]
    shapes = {"w": (4, 3), "a1": (4, 1), "b1": (1, 3), "a2": (4, 1), "b2": (1, 3)}
    initializers = [
        numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name) for name, shape in shapes.items()
    ]
    onnx.save(make_model(nodes, initializers, [x]), folder / "model.onnx")
    return folder / "model.onnx"


def _plain(folder: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    model = make_model(
        [make_node("MatMul", ["x", f"{PATH}.weight"], "y", "/block/proj/MatMul")],
        [numpy_helper.from_array(WEIGHT.T.copy(), f"{PATH}.weight")],
        [x],
    )
    onnx.save(model, folder / "model.onnx")
    return folder / "model.onnx"


@pytest.mark.parametrize(
    "make, options, error, message",
    [
        (_plain, {}, NoLoRABranchError, "no LoRA branch found in .*pass --adapter DIR"),
        (
            _plain,
            {"keep_default": True, "adapters": ["{folder}/adapter"]},
            ExportError,
            "--keep-default keeps the LoRA branches exported in the model, but .* has none",
        ),
        (_stacked, {}, ExportError, "node base has two LoRA branches \\(stacked adapters\\).*merge one of them first"),
        (
            _plain,
            {"adapters": ["{folder}/adapter:0.5"]},
            ExportError,
            "has a weight \\(0.5\\), which making a model switchable does not use",
        ),
    ],
    ids=["nothing-to-switch", "keep-default-without-branches", "stacked-branches", "weighted-adapter"],
)
def test_models_and_options_it_cannot_switch_are_refused_in_one_line_writing_nothing(
    tmp_path, make, options, error, message
):
    model = make(tmp_path)
    write_adapter(tmp_path / "adapter", {PATH: (np.ones((2, 4)), np.ones((3, 2)))})
    options = {
        key: [item.format(folder=tmp_path) for item in value] if key == "adapters" else value
        for key, value in options.items()
    }
    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(error, match=message) as raised:
        make_switchable(model, progress=False, **options)
    assert "\n" not in str(raised.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == before


@settings(max_examples=5)
@given(case=strategies.dora_graph_cases())
def test_an_exported_dora_layer_is_refused_by_name(case):
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(case.model, Path(folder) / "model.onnx")
        with pytest.raises(
            ExportError,
            match="is a DoRA layer: DoRA rescales each column of the adapted weight, "
            "which is not an additive low-rank input",
        ):
            make_switchable(Path(folder) / "model.onnx", progress=False)
        assert [path.name for path in Path(folder).iterdir()] == ["model.onnx"]


def test_a_dry_run_lists_the_modules_and_writes_nothing(tmp_path):
    model = _plain(tmp_path)
    adapter = write_adapter(tmp_path / "adapter", {PATH: (np.ones((2, 4)), np.ones((3, 2)))})
    result = make_switchable(model, adapters=[adapter], dry_run=True)
    assert result.output is None and result.describe().startswith(
        f"switchable {PATH}: inputs {PATH}.lora_A [4, 'r'] and {PATH}.lora_B ['r', 3] at /block/proj/MatMul"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "model.onnx"]
