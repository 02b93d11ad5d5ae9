"""External data and precision: only changed tensors are read, the layout is kept, half precision merges once."""

import hashlib

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
ml_dtypes = pytest.importorskip("ml_dtypes")

from onnx import numpy_helper

from lora_spec import reference
from lora_spec.export import merge_onnx, model_io
from lora_spec.export.verify import session
from tests import strategies
from tests.numerics import assert_close

RNG = np.random.default_rng(0)
W, BIAS, A, B = (RNG.standard_normal(shape).astype(np.float32) for shape in [(6, 8), (6,), (2, 8), (6, 2)])
X = RNG.standard_normal((3, 8)).astype(np.float32)
SCALE = 0.75


def _external_model(folder, layout=None):
    layout = dict(strategies.PLAIN_LORA_LAYOUT, **(layout or {}))
    model = strategies.lora_graph(X, [(W, BIAS, A, B, SCALE), (W, BIAS, A, B, SCALE)], layout, lora=True)
    path = folder / "model.onnx"
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return path


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("verify", ["full", "layers"])
def test_external_data_model_merges_into_its_own_data_file_and_leaves_the_input_untouched(tmp_path, verify):
    path = _external_model(tmp_path)
    digests = {name: _digest(tmp_path / name) for name in ("model.onnx", "model.onnx.data")}
    result = merge_onnx(path, verify=verify, progress=False)
    assert result.verification.mode == verify and result.verification.passed
    assert {name: _digest(tmp_path / name) for name in digests} == digests
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.merged.onnx",
        "model.merged.onnx.data",
        "model.onnx",
        "model.onnx.data",
    ]
    merged = onnx.load(result.output, load_external_data=False)
    locations = {
        entry.value for tensor in merged.graph.initializer for entry in tensor.external_data if entry.key == "location"
    }
    assert locations == {"model.merged.onnx.data"}
    expected = X @ reference.merge(W, A, B, SCALE).T + BIAS
    for output in session(result.output).run(None, {"x": X}):
        assert_close(output, expected, np.float32)


def test_lora_tensors_are_dropped_from_the_written_data(tmp_path):
    path = _external_model(tmp_path)
    result = merge_onnx(path, verify="off", progress=False)
    merged = onnx.load(result.output)  # loads the external data too
    names = sorted(tensor.name for tensor in merged.graph.initializer)
    assert not [name for name in names if "lora" in name]
    stored = {tensor.name: numpy_helper.to_array(tensor) for tensor in merged.graph.initializer}
    np.testing.assert_array_equal(stored["layer0.bias"], BIAS)


def test_only_changed_tensors_are_read(tmp_path, monkeypatch):
    path = _external_model(tmp_path)
    read = []
    original_read = model_io.TensorSource.read

    def recording_read(self, name):
        read.append(name)
        return original_read(self, name)

    monkeypatch.setattr(model_io.TensorSource, "read", recording_read)
    merge_onnx(path, verify="layers", progress=False)
    assert "layer0.bias" not in read and "layer1.bias" not in read
    assert set(read) <= {
        "layer0.weight",
        "layer1.weight",
        "layer0.lora_A.weight",
        "layer0.lora_B.weight",
        "layer1.lora_A.weight",
        "layer1.lora_B.weight",
        "layer0.scale",
        "layer1.scale",
    }


def test_float32_weights_are_merged_and_written_from_the_buffer_they_were_read_into(tmp_path, monkeypatch):
    """No full-size copy per weight: what a multi-GB merge's time and memory depend on."""
    path = _external_model(tmp_path)
    read, written = {}, {}
    original_read, original_as_stored = model_io.TensorSource.read, model_io._as_stored

    def recording_read(self, name):
        read[name] = original_read(self, name)
        return read[name]

    def recording_as_stored(tensor, value):
        written[tensor.name] = value
        return original_as_stored(tensor, value)

    monkeypatch.setattr(model_io.TensorSource, "read", recording_read)
    monkeypatch.setattr(model_io, "_as_stored", recording_as_stored)
    merge_onnx(path, verify="layers", progress=False)
    assert sorted(written) == ["layer0.weight", "layer1.weight"]
    for name, value in written.items():
        assert np.shares_memory(value, read[name]), name


def test_weights_are_merged_with_one_blas_thread_beside_the_other_workers(tmp_path, monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from lora_spec.export.fold import FoldRule

    path = _external_model(tmp_path)
    original, blas_threads = FoldRule.merged_weight, []

    def recording(self, *arguments):
        pools = threadpoolctl.threadpool_info()
        blas_threads.extend(pool["num_threads"] for pool in pools if pool["user_api"] == "blas")
        return original(self, *arguments)

    monkeypatch.setattr(FoldRule, "merged_weight", recording)
    merge_onnx(path, verify="layers", progress=False)
    assert blas_threads and set(blas_threads) == {1}


def test_merging_on_several_threads_writes_the_same_bytes_every_time(tmp_path):
    path = _external_model(tmp_path)
    results = [merge_onnx(path, tmp_path / f"run{index}.onnx", verify="layers", progress=False) for index in range(2)]
    assert _digest(tmp_path / "run0.onnx.data") == _digest(tmp_path / "run1.onnx.data")
    assert results[0].verification == results[1].verification


def test_a_weight_that_fails_to_merge_stops_the_other_workers_and_leaves_nothing(tmp_path, monkeypatch):
    from lora_spec.export.fold import FoldRule

    path = _external_model(tmp_path)
    original = FoldRule.merged_weight

    def failing_on_layer1(self, branch, *operands):
        if branch.weight == "layer1.weight":
            raise model_io.ExportError("layer1 cannot be merged")
        return original(self, branch, *operands)

    monkeypatch.setattr(FoldRule, "merged_weight", failing_on_layer1)
    with pytest.raises(model_io.ExportError, match="layer1 cannot be merged"):
        merge_onnx(path, verify="layers", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_external_weight_shared_by_two_layers_is_copied_not_changed_in_place(tmp_path):
    path = _external_model(tmp_path, {"shared": "identity"})
    result = merge_onnx(path, verify="full", progress=False)
    merged = onnx.load(result.output)
    weights = {
        tensor.name: numpy_helper.to_array(tensor)
        for tensor in merged.graph.initializer
        if tensor.name.startswith("base.weight")
    }
    assert len(weights) == 2
    for value in weights.values():
        np.testing.assert_allclose(value, reference.merge(W, A, B, SCALE).T, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "dtype, data_type",
    [(np.float16, onnx.TensorProto.FLOAT16), (ml_dtypes.bfloat16, onnx.TensorProto.BFLOAT16)],
    ids=["float16", "bfloat16"],
)
def test_half_precision_weights_are_merged_in_float32_and_cast_once(tmp_path, dtype, data_type):
    model = strategies.lora_graph(X, [(W, BIAS, A, B, SCALE)], strategies.PLAIN_LORA_LAYOUT, lora=True)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) == 2:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(dtype), tensor.name))
    onnx.save(model, tmp_path / "half.onnx")  # not runnable as is (mixed dtypes): merged without onnxruntime
    result = merge_onnx(tmp_path / "half.onnx", verify="layers", progress=False)
    assert result.verification.tolerance == 1e-2
    merged = {tensor.name: tensor for tensor in onnx.load(result.output).graph.initializer}
    weight = merged["layer0.weight"]
    assert weight.data_type == data_type
    expected = reference.merge(W.astype(dtype), A.astype(dtype), B.astype(dtype), SCALE)
    np.testing.assert_array_equal(numpy_helper.to_array(weight).astype(np.float32), expected.T.astype(np.float32))
