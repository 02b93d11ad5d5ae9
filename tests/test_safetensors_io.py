"""Our NumPy safetensors reader and writer against the reference implementation (the safetensors package)."""

import numpy as np
import pytest

from lora_spec import safetensors_io

DTYPES = [np.float16, np.float32, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_]


@pytest.mark.parametrize("dtype", DTYPES)
def test_files_we_write_are_read_identically_by_safetensors(tmp_path, dtype):
    numpy_backend = pytest.importorskip("safetensors.numpy")
    tensors = {"b.weight": (np.arange(12).reshape(3, 4) % 3).astype(dtype), "a": np.zeros((0, 2), dtype)}
    safetensors_io.save(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    theirs = numpy_backend.load_file(tmp_path / "x.safetensors")
    assert theirs.keys() == tensors.keys()
    for name, value in tensors.items():
        assert theirs[name].dtype == value.dtype
        np.testing.assert_array_equal(theirs[name], value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_files_safetensors_writes_are_read_identically_by_us(tmp_path, dtype):
    numpy_backend = pytest.importorskip("safetensors.numpy")
    tensors = {"x": (np.arange(6).reshape(2, 3) % 2).astype(dtype)}
    numpy_backend.save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    ours, metadata = safetensors_io.load(tmp_path / "x.safetensors")
    assert metadata == {"k": "v"} and ours["x"].dtype == dtype
    np.testing.assert_array_equal(ours["x"], tensors["x"])


def test_bfloat16_tensors_load_exactly_as_float32(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    values = torch.tensor([[1.5, -2.25, 3.0e-3], [65504.0, 1e-20, 0.0]], dtype=torch.bfloat16)
    safetensors_torch.save_file({"w": values}, tmp_path / "x.safetensors")
    ours, _ = safetensors_io.load(tmp_path / "x.safetensors")
    assert ours["w"].dtype == np.float32
    np.testing.assert_array_equal(ours["w"], values.float().numpy())


@pytest.mark.parametrize("content", [b"", b"\x05\x00", b"\xff" * 8 + b"{}", b"\x04\x00\x00\x00\x00\x00\x00\x00nope"])
def test_corrupt_files_raise_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(safetensors_io.SafetensorsError, match="is not a valid safetensors file") as error:
        safetensors_io.load(path)
    assert "\n" not in str(error.value)


def test_offsets_beyond_the_data_are_refused(tmp_path):
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 8)
    with pytest.raises(safetensors_io.SafetensorsError, match="outside the 8-byte data section"):
        safetensors_io.load(tmp_path / "x.safetensors")


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="convert it to float32"):
        safetensors_io.save(tmp_path / "x.safetensors", {"c": np.zeros(2, np.complex64)})
    assert list(tmp_path.iterdir()) == []
