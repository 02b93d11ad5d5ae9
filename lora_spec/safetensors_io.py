"""The safetensors format in NumPy alone, so the core reads and writes adapters without a framework.

A file is an 8-byte little-endian header length, a JSON header mapping each name to its dtype,
shape and byte range, then the raw little-endian data. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from lora_spec._files import write_bytes_atomic

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(dtype): name for name, dtype in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A file that is not valid safetensors."""


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to `path` atomically (a reader never sees a partial file)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise ValueError(
                f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store here: convert it to float32."
            )
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    write_bytes_atomic(path, len(header_bytes).to_bytes(8, "little") + header_bytes + b"".join(chunks))


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read `(tensors, metadata)`; bfloat16 tensors come back as float32 (exactly)."""
    with open(path, "rb") as file:
        blob = file.read()
    try:
        header_length = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 or 8 + header_length > len(blob):
            raise ValueError("header length points past the end of the file")
        header = json.loads(blob[8 : 8 + header_length])
        metadata = header.pop("__metadata__", None) or {}
        data = memoryview(blob)[8 + header_length :]
        return {name: _tensor(entry, data) for name, entry in header.items()}, metadata
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise SafetensorsError(f"{path} is not a valid safetensors file ({error}): re-save the adapter.") from None


def _tensor(entry: Mapping, data: memoryview) -> np.ndarray:
    begin, end = entry["data_offsets"]
    shape = tuple(int(n) for n in entry["shape"])
    if not 0 <= begin <= end <= len(data):
        raise ValueError(f"data offsets {begin}..{end} outside the {len(data)}-byte data section")
    if entry["dtype"] == "BF16":
        raw = np.frombuffer(data[begin:end], dtype="<u2")
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if entry["dtype"] not in _DTYPES:
        raise ValueError(f"unsupported dtype {entry['dtype']}")
    dtype = np.dtype(_DTYPES[entry["dtype"]]).newbyteorder("<")
    if (end - begin) != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"{end - begin} bytes do not hold shape {shape} of {entry['dtype']}")
    return np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
