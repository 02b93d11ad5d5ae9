"""Reading only the graph and the tensors being changed, and writing the merged model atomically.

A model with external data is never loaded whole: the graph is read without its data, a tensor
is read from its data file only when it changes, and the output's data file is built by copying
the input's ranges (in the kernel where it can: `os.copy_file_range`) and writing the changed
tensors at their places. Tensors of deleted LoRA branches are dropped from the output's data.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from lora_spec._files import atomic_path

# A `tqdm`-like wrapper of an iterable (`progress_bar`): the items, given options such as `desc`.
Progress = Callable[..., Iterable[Any]]

ALIGNMENT = 4096
COPY_CHUNK = 64 * 2**20
# Tensors merged and written at once: both cores of a small machine busy, two weights in memory.
WORKERS = 2


class ExportError(ValueError):
    """A bad input to `merge_onnx`; the message is one line, `exit_code` the command's status."""

    exit_code = 1


class NoLoRABranchError(ExportError):
    """The graph has no LoRA branch to fold (and no adapter was given)."""

    exit_code = 3


class VerificationError(ExportError):
    """The written model's outputs differ from the expected ones by more than the tolerance."""

    exit_code = 4


def load_graph(path: Path) -> onnx.ModelProto:
    """The model at `path` without its external data; one-line errors for missing or corrupt files."""
    if not path.is_file():
        raise ExportError(f"{path} does not exist or is not a file: pass the path of an .onnx model.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as error:
        raise ExportError(
            f"{path} is not a readable ONNX model ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'corrupt or truncated'}): "
            "check that the file is complete and was written by an ONNX exporter."
        ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise ExportError(f"{path} is not an ONNX model (no graph nodes): pass an .onnx file written by an exporter.")
    return model


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of `model` (the graph, and inline tensors)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def numpy_dtype(tensor: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def byte_size(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) * numpy_dtype(tensor).itemsize


class TensorSource:
    """Reads the input model's initializers by name: inline ones from the proto, external ones from disk.

    Holds references to the input's tensors as loaded, so reads see the input even after the
    graph has been edited; every external reference is checked up front (inside the model's
    folder, file present, range within the file).
    """

    def __init__(self, model: onnx.ModelProto, model_path: Path) -> None:
        self.folder = model_path.resolve().parent
        self.tensors = {tensor.name: tensor for tensor in model.graph.initializer}
        self.external: dict[str, tuple[Path, int, int]] = {}
        for tensor in model.graph.initializer:
            if is_external(tensor):
                self.external[tensor.name] = self._locate(tensor, model_path)

    @property
    def has_external_data(self) -> bool:
        return bool(self.external)

    @property
    def data_files(self) -> set[Path]:
        return {location for location, _, _ in self.external.values()}

    def total_bytes(self) -> int:
        return sum(byte_size(tensor) for tensor in self.tensors.values())

    def _locate(self, tensor: onnx.TensorProto, model_path: Path) -> tuple[Path, int, int]:
        fields = _external_fields(tensor)
        location = fields.get("location", "")
        path = (self.folder / location).resolve()
        if not location or Path(location).is_absolute() or not path.is_relative_to(self.folder):
            raise ExportError(
                f"tensor {tensor.name!r} of {model_path} points to external data {location!r} outside "
                f"the model's folder {self.folder}: keep the data file beside the model."
            )
        if not path.is_file():
            raise ExportError(
                f"external data {location!r} of {model_path} (tensor {tensor.name!r}) is missing: "
                f"put it in {self.folder}."
            )
        offset = int(fields.get("offset", 0))
        length = int(fields.get("length", byte_size(tensor)))
        if length != byte_size(tensor) or offset + length > path.stat().st_size:
            raise ExportError(
                f"external data {location!r} of {model_path} is truncated or does not match tensor "
                f"{tensor.name!r} (needs bytes {offset}..{offset + byte_size(tensor)}, file has "
                f"{path.stat().st_size}): re-export the model."
            )
        return path, offset, length

    def read(self, name: str) -> np.ndarray:
        """The input's tensor `name` (external data read from disk, only this tensor)."""
        tensor = self.tensors[name]
        if name not in self.external:
            return numpy_helper.to_array(tensor)
        path, offset, _ = self.external[name]
        values = np.fromfile(
            path, dtype=numpy_dtype(tensor), count=int(np.prod(tensor.dims, dtype=np.int64)), offset=offset
        )
        return values.reshape(tuple(tensor.dims))


def _copy_range(source: Path, offset: int, length: int, target: int, target_offset: int) -> None:
    """Copy bytes `offset..offset+length` of `source` to `target_offset` of the open descriptor
    `target`, without holding them (positional, so workers can copy and write at once)."""
    with open(source, "rb", buffering=0) as reader:
        copied_total = 0
        while copied_total < length:
            size = min(length - copied_total, COPY_CHUNK)
            position = offset + copied_total
            try:
                copied = os.copy_file_range(reader.fileno(), target, size, position, target_offset + copied_total)
            except OSError:  # file systems or kernels without it: plain reads and writes
                copied = 0
            if not copied:
                copied = os.pwrite(target, os.pread(reader.fileno(), size, position), target_offset + copied_total)
            if not copied:
                raise ExportError(
                    f"external data {source} ended at byte {position}, before {offset + length}: re-export the model."
                )
            copied_total += copied


def _write_at(target: int, value: np.ndarray, offset: int) -> None:
    data = value.reshape(-1).view(np.uint8).data
    while data:
        written = os.pwrite(target, data, offset)
        data, offset = data[written:], offset + written


def _as_stored(tensor: onnx.TensorProto, value: np.ndarray) -> np.ndarray:
    dtype = numpy_dtype(tensor)
    if value.dtype != dtype or value.shape != tuple(tensor.dims):
        raise ExportError(
            f"new value of {tensor.name!r} is {value.dtype}{list(value.shape)}, but the tensor is "
            f"{dtype}{list(tensor.dims)}: the update does not fit the base weight."
        )
    return np.ascontiguousarray(value)


def _set_location(
    tensor: onnx.TensorProto, location: str, offset: int | None = None, length: int | None = None
) -> None:
    fields = _external_fields(tensor)
    fields["location"] = location
    if offset is not None:
        fields.update(offset=str(offset), length=str(length))
    fields.pop("checksum", None)
    del tensor.external_data[:]
    for key, value in fields.items():
        tensor.external_data.add(key=key, value=value)


def _write_data(
    model: onnx.ModelProto,
    source: TensorSource,
    values: Mapping[str, Callable[[], np.ndarray]],
    data_path: Path,
    progress: Progress,
) -> None:
    """Write every external (or new external) tensor of `model` into `data_path`, in input order.

    Each tensor's place in the file is known up front (the sizes, aligned), so `WORKERS` threads
    each compute and write one tensor at a time, new values and copies of unchanged ones alike:
    merging and disk I/O overlap on every core, and at most `WORKERS` new values are held at once.
    """
    external = [tensor for tensor in model.graph.initializer if is_external(tensor)]
    external.sort(key=lambda tensor: source.external.get(tensor.name, (Path(), 0, 0))[:2])
    places, end = [], 0
    for tensor in external:
        offset = end + (-end % ALIGNMENT)
        places.append(offset)
        end = offset + byte_size(tensor)
        _set_location(tensor, data_path.name, offset, byte_size(tensor))  # here: protobuf is not thread-safe

    def write(tensor: onnx.TensorProto, offset: int) -> None:
        if tensor.name in values:
            _write_at(target.fileno(), _as_stored(tensor, values[tensor.name]()), offset)
        else:
            path, source_offset, length = source.external[tensor.name]
            _copy_range(path, source_offset, length, target.fileno(), offset)

    # "r+b", not "wb": the staged file exists (empty), and truncating it makes ext4 (auto_da_alloc)
    # start writing every dirty page back to disk on close, which took 0.5 s for 2 GB here.
    with (
        open(data_path, "r+b", buffering=0) as target,
        _one_blas_thread(),
        concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as workers,
    ):
        jobs = [workers.submit(write, tensor, offset) for tensor, offset in zip(external, places, strict=True)]
        try:
            for job in progress(
                concurrent.futures.as_completed(jobs), total=len(jobs), desc="writing tensors", unit="tensor"
            ):
                job.result()
        except BaseException:
            for job in jobs:
                job.cancel()
            raise


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS on one thread while the workers merge: the parallelism is theirs.

    BLAS threads that compete with the workers for the cores stall each other: on 2 cores a
    4096 x 4096 rank-16 product took twice as long with two BLAS threads beside a writer as with
    one. Without threadpoolctl, BLAS keeps its own setting.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _write_inline(model: onnx.ModelProto, values: Mapping[str, Callable[[], np.ndarray]], progress: Progress) -> None:
    inline = {tensor.name: tensor for tensor in model.graph.initializer if not is_external(tensor)}
    # Every new value first: a value may be computed from a tensor that another one replaces.
    computed = {
        name: _as_stored(inline[name], compute())
        for name, compute in progress(list(values.items()), desc="merging", unit="weight")
        if name in inline
    }
    for name, value in computed.items():
        inline[name].CopyFrom(numpy_helper.from_array(value, name))


@contextlib.contextmanager
def staged_model(
    model: onnx.ModelProto,
    source: TensorSource,
    values: Mapping[str, Callable[[], np.ndarray]],
    target: Path,
    progress: Progress,
) -> Iterator[Path]:
    """Write `model` with the new tensor `values` to temporary files beside `target`; yield the .onnx.

    The body checks the staged files; when it returns, the data file is renamed into place first
    and the .onnx last, so no reader ever sees a model pointing at missing or partial data. When
    it raises, both temporary files are removed and nothing is renamed.
    """
    external = source.has_external_data
    with (
        atomic_path(target) as staged_onnx,
        atomic_path(data_path_for(target)) if external else contextlib.nullcontext() as staged_data,
    ):
        if staged_data is not None:  # external data
            _write_data(model, source, values, staged_data, progress)
        _write_inline(model, values, progress)
        staged_onnx.write_bytes(model.SerializeToString())
        yield staged_onnx
        if external:
            for tensor in model.graph.initializer:
                if is_external(tensor):
                    _set_location(tensor, data_path_for(target).name)
            staged_onnx.write_bytes(model.SerializeToString())


def checker_error(model: Path | onnx.ModelProto) -> str | None:
    """The first line of onnx.checker's complaint about the model (at a path, or in memory), or None."""
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model))
    except onnx.checker.ValidationError as error:
        return str(error).splitlines()[0]
    return None


@contextlib.contextmanager
def checked_staged_model(
    model: onnx.ModelProto,
    source: TensorSource,
    values: Mapping[str, Callable[[], np.ndarray]],
    target: Path,
    progress: Progress,
    runnable_input: Path | onnx.ModelProto,
    what: str,
) -> Iterator[Path]:
    """`staged_model`, refused (ExportError, nothing written) when onnx.checker refuses the staged model
    while it accepts the input (`runnable_input`): an input it already refuses cannot come out valid,
    so then only our edit is ours to check. `what` names the output in the message ("merged")."""
    input_is_valid = checker_error(runnable_input) is None
    with staged_model(model, source, values, target, progress) as staged:
        error = checker_error(staged) if input_is_valid else None
        if error:
            raise ExportError(
                f"the {what} model fails onnx.checker ({error}): nothing was written; please report "
                "this with the model."
            )
        yield staged


def data_path_for(target: Path) -> Path:
    """`<name>.onnx.data` beside `target`."""
    return target.with_name(target.name + ".data")


def progress_bar(enabled: bool) -> Progress:
    """A `tqdm`-like wrapper of iterables: a bar on a terminal when `enabled`, else the iterable itself."""

    def bar(items: Iterable[Any], **options: Any) -> Iterable[Any]:
        if not enabled:
            return items
        from tqdm import tqdm

        return tqdm(items, disable=None, leave=False, **options)

    return bar
