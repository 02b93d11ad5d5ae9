"""Checking a merge: original against merged in onnxruntime, or each folded layer on its own.

Both report the largest absolute difference relative to the largest absolute expected output,
so one tolerance fits models of any output scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from lora_spec import reference
from lora_spec.export.fold import Fold
from lora_spec.export.graph import Graph, attribute
from lora_spec.export.model_io import ExportError, TensorSource, progress_bar, staged_model

if TYPE_CHECKING:
    import onnxruntime

DEFAULT_DYNAMIC_SIZE = 2
# Integer inputs reach an embedding's indices through these without changing values.
_INDEX_PASSTHROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


@dataclasses.dataclass
class Verification:
    """How a merge was checked and the largest relative difference found (mode "skipped": not checked)."""

    mode: str
    max_relative_difference: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_relative_difference <= self.tolerance

    def describe(self) -> str:
        if self.mode == "skipped":
            return (
                "not verified: the weights are above what --verify auto runs in onnxruntime (1 GiB, three copies "
                "in half the free memory); pass --verify full to check them"
            )
        what = {
            "full": "original vs merged in onnxruntime",
            "layers": "each folded layer in NumPy",
            "run": "merged model runs in onnxruntime with finite outputs; folded layers in NumPy",
            "served": "switchable model without adapter vs the original in onnxruntime",
            "packed": "switchable model with the adapter file vs the base merged with the same adapters in onnxruntime",
        }[self.mode]
        return (
            f"verified {what}: max |difference| / max |output| = {self.max_relative_difference:.3g} "
            f"(tolerance {self.tolerance:g})"
        )


def summary(lines: list[str], verification: Verification | None, output: Path | None) -> str:
    """What a `lora-export` mode did, one line each, then how it was checked and what it wrote."""
    lines = list(lines)
    if verification is not None:
        lines.append(verification.describe())
    if output is not None:
        lines.append(f"wrote {output}")
    return "\n".join(lines)


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """`max |actual - expected| / max |expected|`; inf when anything is not finite."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if not (np.isfinite(actual).all() and np.isfinite(expected).all()):
        return float("inf") if not np.array_equal(actual, expected, equal_nan=True) else 0.0
    scale = float(np.max(np.abs(expected), initial=0.0)) or 1.0
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def layer_check(
    fold: Fold,
    weight: np.ndarray,
    lora_a: np.ndarray,
    lora_b: np.ndarray,
    rng: np.random.Generator,
    rows: int = 2,
    features: int = 256,
) -> Callable[[np.ndarray], float]:
    """A function of the merged weight: the folded node's output with it against base + branch.

    The expected output is computed now, on random sparse rows, from the unmerged weight, which
    the merge may then overwrite. The rows are non-zero on at most `features` random input
    features, so only those slices of the weights are read: a merge goes wrong for whole matrices
    (a transpose, a scale), which any slice shows, and a check that read every weight twice
    would double the cost of a large merge.
    """
    node, rule = fold.branch.base, fold.rule
    compute = np.promote_types(weight.dtype, np.float32)
    if node.op_type == "Conv":
        return _conv_layer_check(fold, weight, lora_a, lora_b, rng, compute)
    picked = np.sort(rng.choice(lora_a.shape[1], min(features, lora_a.shape[1]), replace=False))

    def picked_inputs(matrix: np.ndarray) -> np.ndarray:  # (picked inputs, out), sliced in the stored layout
        return (matrix[:, picked].T if rule.weight_is_out_in(node) else matrix[picked]).astype(compute, copy=False)

    x = rng.standard_normal((rows, picked.size)).astype(compute)
    alpha = rule.alpha(node)
    weight_scale, branch_scale = rule.output_scales(fold.branch)
    branch = (x @ lora_a[:, picked].astype(compute).T) @ lora_b.astype(compute).T
    expected = alpha * weight_scale * (x @ picked_inputs(weight)) + branch_scale * branch
    return lambda merged: relative_difference(alpha * (x @ picked_inputs(merged)), expected)


def _conv_layer_check(
    fold: Fold,
    weight: np.ndarray,
    lora_a: np.ndarray,
    lora_b: np.ndarray,
    rng: np.random.Generator,
    compute: np.dtype,
) -> Callable[[np.ndarray], float]:
    """The merged conv against base conv + LoRA convs on one small random image (no padding: the
    update does not depend on it)."""
    node = fold.branch.base
    stride = tuple(attribute(node, "strides", [1, 1]))
    dilation = tuple(attribute(node, "dilations", [1, 1]))
    groups = attribute(node, "group", 1)
    reach = [dilation[axis] * (weight.shape[2 + axis] - 1) + 1 + stride[axis] for axis in range(2)]
    x = rng.standard_normal((1, weight.shape[1] * groups, *reach)).astype(compute)
    geometry = dict(stride=stride, dilation=dilation, groups=groups)
    lora_a, lora_b = (array.astype(compute) for array in (lora_a, lora_b))
    no_branch = (lora_a, np.zeros_like(lora_b), 0.0)
    per_channel = [np.reshape(scale, (-1, 1, 1)) for scale in fold.rule.output_scales(fold.branch)]
    base = reference.conv2d_forward(x, weight.astype(compute), None, *no_branch, **geometry)
    branch = reference.conv2d_forward(x, np.zeros_like(weight, compute), None, lora_a, lora_b, 1.0, **geometry)
    expected = per_channel[0] * base + per_channel[1] * branch
    return lambda merged: relative_difference(
        reference.conv2d_forward(x, merged.astype(compute), None, *no_branch, **geometry), expected
    )


def _embedding_sizes(graph: Graph) -> dict[str, int]:
    """For each graph input, the smallest table it indexes through `Gather` (token ids, positions)."""
    sizes: dict[str, int] = {}
    for value in graph.graph.input:
        pending, seen = [value.name], set()
        while pending:
            tensor = pending.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for node in graph.consumers.get(tensor, ()):
                if node.op_type in _INDEX_PASSTHROUGH and node.input[0] == tensor:
                    pending.append(node.output[0])
                elif node.op_type == "Gather" and node.input[1] == tensor:
                    table = graph.initializer_behind(node.input[0])
                    if table is not None:
                        dims = graph.initializers[table].dims
                        size = dims[attribute(node, "axis", 0) % len(dims)]
                        sizes[value.name] = min(size, sizes.get(value.name, size))
    return sizes


def random_inputs(
    graph: Graph, input_shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One random feed per graph input: dynamic dims small, token ids within their embedding's range."""
    tables = _embedding_sizes(graph)
    feeds = {}
    for value in graph.graph.input:
        if value.name in graph.initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = input_shapes.get(value.name) or tuple(
            dim.dim_value if dim.HasField("dim_value") else DEFAULT_DYNAMIC_SIZE for dim in tensor_type.shape.dim
        )
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu" and value.name in tables:
            feeds[value.name] = rng.integers(0, tables[value.name], shape).astype(dtype)
        else:  # masks and flags: all ones keeps every position attended
            feeds[value.name] = np.ones(shape, dtype)
    return feeds


def session(path: Path) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session that does not busy-wait between runs."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_LAYERS_HINT = "or check each folded layer in NumPy instead with --verify layers"


def run_model(
    path: Path,
    feeds: Mapping[str, np.ndarray],
    label: str,
    hint: str = _LAYERS_HINT,
    run_options: onnxruntime.RunOptions | None = None,
) -> list[Any]:
    """The outputs of the model at `path` (`label` names it to the user) on `feeds`, in onnxruntime.

    ExportError in one line when onnxruntime cannot load or run it (an op it lacks, an input
    that needs particular sizes), ending with `hint`: what the user can do instead.
    """
    try:
        return session(path).run(None, dict(feeds), run_options)
    except Exception as error:  # onnxruntime's errors derive from Exception only
        if not type(error).__module__.startswith("onnxruntime"):
            raise
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise ExportError(
            f"onnxruntime cannot run {label} on random inputs ({reason}); nothing was written: pass "
            f"--input-shape NAME=DIMS if an input needs particular sizes, {hint}."
        ) from None


def compare_outputs(actual: list, expected: list) -> float:
    """The largest relative difference over the float outputs of two runs."""
    differences = [
        relative_difference(got, want)
        for got, want in zip(actual, expected, strict=True)
        if np.asarray(want).dtype.kind == "f"
    ]
    return max(differences, default=0.0)


def compare_models(original: Path, merged: Path, feeds: Mapping[str, np.ndarray], original_label: str) -> float:
    """The largest relative difference over the float outputs of the two models on `feeds`."""
    expected = run_model(original, feeds, original_label)
    return compare_outputs(run_model(merged, feeds, "the merged model"), expected)


def non_finite_outputs(path: Path, feeds: Mapping[str, np.ndarray]) -> float:
    """inf when the model at `path` returns NaN or inf on `feeds`, else 0."""
    outputs = run_model(path, feeds, "the merged model")
    finite = all(np.isfinite(output).all() for output in outputs if np.asarray(output).dtype.kind == "f")
    return 0.0 if finite else float("inf")


@dataclasses.dataclass
class RunnableModel:
    """A model as onnxruntime can run it: the file at `source_path`, or, when `edited` is given, that
    graph (with the file's tensors), which `path()` writes beside another file for the comparison."""

    source_path: Path
    source: TensorSource
    edited: onnx.ModelProto | None = None

    @contextlib.contextmanager
    def path(self, beside: Path) -> Iterator[Path]:
        if self.edited is None:
            yield self.source_path
            return
        with (
            tempfile.TemporaryDirectory(dir=beside.parent) as folder,
            staged_model(self.edited, self.source, {}, Path(folder) / "original.onnx", progress_bar(False)) as path,
        ):
            yield path
