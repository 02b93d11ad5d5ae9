"""`merge_onnx` with adapter files: `DIR[:WEIGHT]` parsing, weighted merges, shared weights copied, errors."""

import sys
import types

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lora_spec import AdapterWeights, LoRAConfig, reference, save_adapter_dir
from lora_spec.export import ExportError, cli, merge_onnx
from lora_spec.export.merge import parse_adapter
from lora_spec.export.verify import session
from tests import strategies
from tests.numerics import assert_close

RNG = np.random.default_rng(0)
W, BIAS, A, B = (RNG.standard_normal(shape).astype(np.float32) for shape in [(5, 4), (5,), (2, 4), (5, 2)])
X = RNG.standard_normal((3, 4)).astype(np.float32)


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("adapter", ("adapter", 1.0)),
        ("adapter:0.5", ("adapter", 0.5)),
        ("runs/a:b/adapter", ("runs/a:b/adapter", 1.0)),
        ("/data/run:2/adapter:-1e-1", ("/data/run:2/adapter", -0.1)),
        ("C:\\adapters\\one", ("C:\\adapters\\one", 1.0)),
    ],
    ids=["no-weight", "weight", "colon-in-path", "colon-in-path-and-weight", "drive-letter"],
)
def test_adapter_spec_splits_only_a_numeric_weight_suffix(spec, parsed):
    assert parse_adapter(spec) == parsed


def test_adapter_weight_must_be_finite():
    with pytest.raises(ExportError, match="not finite"):
        parse_adapter("adapter:inf")


def _base_model(folder, shared=None):
    layout = dict(strategies.PLAIN_LORA_LAYOUT, shared=shared)
    model = strategies.lora_graph(X, [(W, BIAS, A, B, 1.0)] * (2 if shared else 1), layout, lora=False)
    onnx.save(model, folder / "base.onnx")
    return folder / "base.onnx"


def test_adapter_directory_merges_weighted_into_the_base_graph(tmp_path, capsys):
    config = LoRAConfig(r=2, alpha=4, target_modules=["layer0"])
    save_adapter_dir(
        tmp_path / "adapter",
        config.to_peft_dict()
        if hasattr(config, "to_peft_dict")
        else {"r": 2, "lora_alpha": 4, "target_modules": ["layer0"], "peft_type": "LORA"},
        AdapterWeights(lora={"layer0": (A, B)}),
    )
    status = cli.main(["--merge", str(_base_model(tmp_path)), "--adapter", f"{tmp_path / 'adapter'}:0.5", "-q"])
    assert status == 0, capsys.readouterr().err
    output = session(tmp_path / "base.merged.onnx").run(None, {"x": X})[0]
    assert_close(output, X @ reference.merge(W, A, B, 0.5 * config.scaling).T + BIAS, np.float32)


@pytest.fixture
def stub_planner(monkeypatch):
    """A stand-in `adapter_merge` whose plan updates layer0's MatMul with a given value."""
    module = types.ModuleType("lora_spec.export.adapter_merge")
    calls = {}

    def plan_adapter_merge(model, read_tensor, adapters, allow_partial=False):
        calls.update(adapters=list(adapters), allow_partial=allow_partial, weight=read_tensor("base.weight"))
        update = types.SimpleNamespace(node_name="layer0.base", input_index=1, value=calls["value"])
        return types.SimpleNamespace(updates=[update], matched=[("layer0", "layer0.base")], unmatched=[])

    module.plan_adapter_merge = plan_adapter_merge
    monkeypatch.setitem(sys.modules, "lora_spec.export.adapter_merge", module)
    return calls


def test_adapter_update_of_a_shared_weight_goes_to_a_copy(tmp_path, stub_planner):
    stub_planner["value"] = (W.T * 2).astype(np.float32)
    result = merge_onnx(
        _base_model(tmp_path, shared="identity"),
        adapters=["one:0.25", ("two", 2.0)],
        allow_partial=True,
        progress=False,
    )
    assert stub_planner["adapters"] == [("one", 0.25), ("two", 2.0)] and stub_planner["allow_partial"]
    np.testing.assert_array_equal(stub_planner["weight"], W.T)
    assert result.adapter_matches == [("layer0", "layer0.base")]
    changed, untouched = session(result.output).run(None, {"x": X})
    assert_close(changed, X @ (2 * W).T + BIAS, np.float32)
    assert_close(untouched, X @ W.T + BIAS, np.float32)


def test_adapter_update_with_nan_fails_and_writes_nothing(tmp_path, stub_planner):
    stub_planner["value"] = np.full(W.T.shape, np.nan, np.float32)
    with pytest.raises(ExportError, match="NaN or inf"):
        merge_onnx(_base_model(tmp_path, shared="identity"), adapters=["one"], progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["base.onnx"]


def test_adapter_update_with_the_wrong_shape_fails_and_writes_nothing(tmp_path, stub_planner):
    stub_planner["value"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ExportError, match="does not fit the base weight"):
        merge_onnx(_base_model(tmp_path, shared="identity"), adapters=["one"], progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["base.onnx"]


def test_bad_adapter_directory_is_a_one_line_error(tmp_path, capsys):
    status = cli.main(["--merge", str(_base_model(tmp_path)), "--adapter", str(tmp_path / "absent")])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "absent" in err
    assert [path.name for path in tmp_path.iterdir()] == ["base.onnx"]
