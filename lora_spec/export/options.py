"""Checks of the options every `lora-export` mode takes: verification, tolerance, output, input shapes, adapters.

Each raises `ExportError` with one line naming the value and the fix, before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import onnx

from lora_spec.adapter_io import CONFIG_NAME
from lora_spec.export.mend import mend_missing_ops
from lora_spec.export.model_io import ExportError, TensorSource, copy_model, data_path_for, load_graph

VERIFY_MODES = ("auto", "full", "layers", "off")  # and "run": "full" when adapter files change the outputs
# "auto" runs both models in onnxruntime up to this size of weights; above it (or when three
# copies would not fit in half the free memory) each folded layer is checked on its own.
FULL_VERIFY_LIMIT = 2**30
HALF_PRECISION = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclasses.dataclass
class InputModel:
    """A mode's input model: its graph (ops ONNX lacks mended, `mended` saying which), the reader of
    its tensors, the mended graph before any edit (`runnable`: None when the file itself runs), and
    the checked dims of its inputs for verification."""

    path: Path
    model: onnx.ModelProto
    source: TensorSource
    mended: list[str]
    runnable: onnx.ModelProto | None
    shapes: dict[str, tuple[int, ...]]


def open_input(path: Path, target: Path, shapes: Mapping[str, Sequence[int]] | None, dry_run: bool) -> InputModel:
    """The model at `path` without its external data, checked against writing `target` (unless `dry_run`)."""
    model = load_graph(path)
    source = TensorSource(model, path)
    mended = mend_missing_ops(model)
    if not dry_run:
        check_output(path, target, source)
    return InputModel(
        path, model, source, mended, copy_model(model) if mended else None, input_shapes(model, shapes or {})
    )


def verify_mode(verify: str | bool, modes: Sequence[str] = VERIFY_MODES) -> str:
    """`verify` as one of `modes` (True is "auto", False "off")."""
    if verify is True or verify is False:
        return "auto" if verify else "off"
    if verify not in modes:
        raise ExportError(f"verify must be one of {', '.join(modes)}, got {verify!r}.")
    return verify


def resolve_mode(mode: str, source: TensorSource, too_large: str = "layers") -> str:
    """ "full" for "auto" when the weights fit (`FULL_VERIFY_LIMIT`, three copies in half the free
    memory), else `too_large`; any other mode as it is."""
    if mode != "auto":
        return mode
    weights = source.total_bytes()
    return "full" if weights <= FULL_VERIFY_LIMIT and 3 * weights <= _available_memory() / 2 else too_large


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_tolerance(tolerance: float | None) -> None:
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise ExportError(f"tolerance must be a positive number, got {tolerance!r}: e.g. 1e-4.")


def default_tolerance(data_types: Iterable[int]) -> float:
    """1e-2 when any of the tensors written is float16 or bfloat16, else 1e-4."""
    return 1e-2 if any(data_type in HALF_PRECISION for data_type in data_types) else 1e-4


def check_output(source_path: Path, target: Path, source: TensorSource) -> None:
    """Refuse an output that would overwrite the input or its data, or that has no folder."""
    resolved = target.resolve()
    if resolved == source_path.resolve():
        raise ExportError(
            f"output {target} is the input model: choose another path with -o; the input is never modified."
        )
    if resolved in source.data_files:
        raise ExportError(f"output {target} is the input's external data: choose another -o.")
    if data_path_for(target).resolve() in source.data_files:
        raise ExportError(f"output data {data_path_for(target)} is the input's external data: choose another -o.")
    if not resolved.parent.is_dir():
        raise ExportError(f"output folder {target.parent} does not exist: create it or choose another -o.")


def input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """`shapes` checked against the model's inputs (initializers, which a run may override, excluded)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = {
        value.name: len(value.type.tensor_type.shape.dim)
        for value in model.graph.input
        if value.name not in initializers
    }
    checked = {}
    for name, dims in shapes.items():
        if name not in inputs:
            raise ExportError(
                f"--input-shape names {name!r}, which is not an input of the model: its inputs are "
                f"{', '.join(inputs) or 'none'}."
            )
        dims = tuple(int(dim) for dim in dims)
        if len(dims) != inputs[name] or any(dim <= 0 for dim in dims):
            raise ExportError(
                f"--input-shape {name}={','.join(map(str, dims))} does not fit: the input has "
                f"{inputs[name]} dims, each a positive size."
            )
        checked[name] = dims
    return checked


def parse_adapter(spec: str) -> tuple[str, float]:
    """`DIR[:WEIGHT]` -> `(DIR, WEIGHT)`; only a suffix that parses as a number is a weight, so paths may hold ':'."""
    head, separator, tail = spec.rpartition(":")
    if separator and head:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(weight):
            raise ExportError(f"adapter weight {tail!r} in {spec!r} is not finite: use a number such as {head}:0.5.")
        return head, weight
    return spec, 1.0


def adapter_specs(
    adapters: Sequence[tuple[str | os.PathLike, float] | str | os.PathLike],
) -> list[tuple[str | os.PathLike, float]]:
    """Each adapter as `(directory, weight)`, from a pair, a `"DIR[:WEIGHT]"` string or a path (weight 1)."""
    return [
        parse_adapter(spec)
        if isinstance(spec, str)
        else (spec, 1.0)
        if isinstance(spec, os.PathLike)
        else (spec[0], float(spec[1]))
        for spec in adapters
    ]


def refuse_dora(directory: str | os.PathLike) -> None:
    """Refuse a DoRA adapter (`"use_dora": true`) by name: it rescales each column of the adapted
    weight, which no additive low-rank input can express, so it cannot be switched per run."""
    try:
        config = json.loads((Path(directory) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return  # reading the adapter reports a missing or corrupt config, with its fix
    if isinstance(config, dict) and config.get("use_dora"):
        raise ExportError(
            f"adapter {os.fspath(directory)} is a DoRA adapter (use_dora): DoRA rescales each column "
            "of the adapted weight, which is not an additive low-rank input, so it cannot be switched "
            "per run: merge it into the model instead."
        )
