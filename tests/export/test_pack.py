"""`pack_adapter`: what the `.onnx_adapter` file holds, weighted packs against `merge_onnx`, precision, checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.numerics import assert_close

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper

from lora_spec.export import VerificationError, make_switchable, merge_onnx, pack_adapter
from lora_spec.export import pack as pack_module
from lora_spec.export.pack import active_adapter
from lora_spec.export.verify import session
from tests.export.onnx_graphs import make_model, make_node, write_adapter

RNG = np.random.default_rng(11)
X = RNG.standard_normal((3, 4)).astype(np.float32)


def _two_layers(folder: Path, dtype=np.float32) -> Path:
    """`first` (4 -> 5) then `second` (5 -> 3), MatMuls in `dtype`."""
    element_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info("x", element_type, [None, 4])
    nodes = [
        make_node("MatMul", ["x", "first.weight"], "h", "/first/MatMul"),
        make_node("MatMul", ["h", "second.weight"], "y", "/second/MatMul"),
    ]
    initializers = [
        numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)
        for name, shape in [("first.weight", (4, 5)), ("second.weight", (5, 3))]
    ]
    model = make_model(nodes, initializers, [x])
    model.graph.output[0].type.tensor_type.elem_type = element_type
    onnx.save(model, folder / "base.onnx")
    return folder / "base.onnx"


@pytest.fixture
def served(tmp_path) -> tuple[Path, Path, Path]:
    """A switchable model of `first` and `second`, and two adapters: one on `first` (rank 2), one on both (rank 3)."""
    one = write_adapter(
        tmp_path / "one", {"first": (RNG.standard_normal((2, 4)), RNG.standard_normal((5, 2)))}, alpha=4.0
    )
    both = write_adapter(
        tmp_path / "both",
        {
            "first": (RNG.standard_normal((3, 4)), RNG.standard_normal((5, 3))),
            "second": (RNG.standard_normal((3, 5)), RNG.standard_normal((3, 3))),
        },
        alpha=1.5,
    )
    result = make_switchable(_two_layers(tmp_path), adapters=[one, both], progress=False)
    return result.output, one, both


def _parameters(path: Path) -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}


def test_the_file_holds_every_factor_input_with_rank_zero_where_no_adapter_reaches(served, tmp_path):
    model, one, _ = served
    result = pack_adapter(model, [one], tmp_path / "one.onnx_adapter")
    parameters = _parameters(result.output)
    assert {name: value.shape for name, value in parameters.items()} == {
        "first.lora_A": (4, 2),
        "first.lora_B": (2, 5),
        "second.lora_A": (5, 0),
        "second.lora_B": (0, 3),
    }
    assert result.describe().splitlines()[:2] == [
        f"pack first: rank 2 from 1 x {one} (first)",
        "pack second: rank 0 from no adapter targets it",
    ]


def test_a_weighted_pack_equals_merging_the_same_weighted_adapters(served, tmp_path):
    model, one, both = served
    adapters = [(one, 0.7), (both, -0.4)]
    result = pack_adapter(model, adapters, tmp_path / "mix.onnx_adapter")
    assert result.verification.mode == "packed" and result.verification.passed
    assert _parameters(result.output)["first.lora_A"].shape == (4, 5)
    merged = merge_onnx(tmp_path / "base.onnx", tmp_path / "merged.onnx", adapters=adapters, progress=False)
    options, _adapter = active_adapter(result.output)
    assert_close(
        session(model).run(None, {"x": X}, options)[0],
        session(merged.output).run(None, {"x": X})[0],
        np.float32,
        factor=4,
    )


def test_one_session_switches_adapters_per_run_and_runs_the_base_without_one(served, tmp_path):
    model, one, both = served
    runner = session(model)
    outputs = {}
    for name, adapter in [("one", one), ("both", both), ("one again", one)]:
        options, _adapter = active_adapter(
            pack_adapter(model, [adapter], tmp_path / f"{name}.onnx_adapter", verify="off").output
        )
        outputs[name] = runner.run(None, {"x": X}, options)[0]
    base = session(tmp_path / "base.onnx").run(None, {"x": X})[0]
    for name, adapter in [("one", one), ("both", both)]:
        merged = merge_onnx(tmp_path / "base.onnx", tmp_path / f"{name}.onnx", adapters=[adapter], progress=False)
        assert_close(outputs[name], session(merged.output).run(None, {"x": X})[0], np.float32, factor=4)
    np.testing.assert_array_equal(outputs["one again"], outputs["one"])
    np.testing.assert_array_equal(runner.run(None, {"x": X})[0], base)


def test_two_active_adapter_files_do_not_add_up(served, tmp_path):
    """What the README says: onnxruntime sets each active file's inputs in turn, and every file sets
    them all, so one file applies (onnxruntime 1.32: the one added first); a weighted pack adds up."""
    model, one, both = served
    files = [
        pack_adapter(model, [adapter], tmp_path / f"{number}.onnx_adapter", verify="off").output
        for number, adapter in enumerate((one, both))
    ]
    mixed = pack_adapter(model, [one, both], tmp_path / "mixed.onnx_adapter", verify="off").output
    runner, adapters = session(model), [ort.LoraAdapter() for _ in range(3)]
    outputs = []
    for active in ([0], [1], [0, 1], [1, 0]):
        options = ort.RunOptions()
        for index in active:
            adapters[index].Load(str(files[index]))
            options.add_active_adapter(adapters[index])
        outputs.append(runner.run(None, {"x": X}, options)[0])
    adapters[2].Load(str(mixed))
    options = ort.RunOptions()
    options.add_active_adapter(adapters[2])
    summed = runner.run(None, {"x": X}, options)[0]
    for both_active in outputs[2:]:
        assert any(np.array_equal(both_active, single) for single in outputs[:2])
        assert not np.allclose(both_active, summed)


def test_a_float16_model_gets_a_float16_adapter(tmp_path):
    one = write_adapter(
        tmp_path / "one", {"first": (RNG.standard_normal((2, 4)), RNG.standard_normal((5, 2)))}, alpha=2.0
    )
    model = make_switchable(_two_layers(tmp_path, np.float16), adapters=[one], progress=False).output
    result = pack_adapter(model, [one], tmp_path / "one.onnx_adapter")
    assert result.verification.tolerance == 1e-2 and result.verification.passed
    assert {value.dtype for value in _parameters(result.output).values()} == {np.dtype(np.float16)}


def test_a_failed_check_raises_and_writes_no_file(served, tmp_path, monkeypatch):
    model, one, _ = served
    monkeypatch.setattr(pack_module.checks, "compare_outputs", lambda actual, expected: 0.5)
    with pytest.raises(VerificationError, match=r"differs from the base merged with the same adapters by 0\.5"):
        pack_adapter(model, [one], tmp_path / "one.onnx_adapter")
    assert not any(path.name.endswith(".onnx_adapter") or ".onnx_adapter." in path.name for path in tmp_path.iterdir())
