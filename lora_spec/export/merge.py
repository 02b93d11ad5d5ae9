"""`merge_onnx`: fold a model's LoRA branches (and adapter files) into its base weights, verified."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from lora_spec.export import verify as checks
from lora_spec.export.dora_fold import DORA_RULES, find_dora_branches
from lora_spec.export.fold import (
    RULES,
    Fold,
    ReadTensor,
    fold_all,
    fuse_conv_bias_adds,
    rejoin_reshapes,
    shared_reshape_outputs,
)
from lora_spec.export.graph import Graph
from lora_spec.export.model_io import (
    ExportError,
    NoLoRABranchError,
    TensorSource,
    VerificationError,
    checked_staged_model,
    progress_bar,
)
from lora_spec.export.options import (
    adapter_specs,
    check_tolerance,
    default_tolerance,
    open_input,
    parse_adapter,
    resolve_mode,
)
from lora_spec.export.options import (
    verify_mode as checked_verify_mode,
)
from lora_spec.export.patterns import find_branches, no_branch_reason, unrecognised_low_rank_products
from lora_spec.export.verify import RunnableModel

if TYPE_CHECKING:
    from lora_spec.export.adapter_merge import AdapterMergePlan, WeightUpdate

__all__ = ["MergeResult", "VerificationError", "default_output", "merge_onnx", "parse_adapter"]


@dataclasses.dataclass
class MergeResult:
    """What `merge_onnx` did: the folds, the adapter matches, the check, and the written path."""

    output: Path | None
    folds: list[str]
    adapter_matches: list[tuple[str, str]]
    refused: list[str]
    verification: checks.Verification | None
    mended: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        lines = [f"mended {line}" for line in self.mended]
        lines += [f"fold {line}" for line in self.folds]
        lines += [f"adapter {path} -> {node}" for path, node in self.adapter_matches]
        lines += [f"not folded: {reason}" for reason in self.refused]
        return checks.summary(lines, self.verification, self.output)


def default_output(model: Path) -> Path:
    """`<name>.merged.onnx` beside `model`."""
    return model.with_name(f"{model.stem}.merged.onnx" if model.suffix == ".onnx" else f"{model.name}.merged.onnx")


def merge_onnx(
    model: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    adapters: Sequence[tuple[str | os.PathLike, float] | str] = (),
    allow_partial: bool = False,
    verify: str | bool = "auto",
    tolerance: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> MergeResult:
    """Fold the LoRA branches of the ONNX model at `model` into its base weights; write `output`.

    `output` defaults to `<name>.merged.onnx` beside the input (external data, if the input has
    any, goes to `<output>.data`); the input is never modified and nothing is left on disk on
    failure. `adapters` are PEFT adapter directories, each `(dir, weight)` or `"DIR[:WEIGHT]"`,
    merged into the base weights by module path. `verify` is "auto" (onnxruntime on both models
    when they fit in memory, else each folded layer in NumPy), "full", "layers" or "off" (False);
    `tolerance` bounds max |difference| / max |output| (default 1e-4, 1e-2 for float16/bfloat16
    weights). `input_shapes` fixes the dims of graph inputs for verification. With `dry_run`,
    nothing is written and the result lists what would be merged. Ops an exporter leaves that
    ONNX lacks (tf2onnx's `Erfc`) are first rewritten in standard ops (`lora_spec.export.mend`),
    listed in `result.mended`, and verification compares against the mended original.

    Raises `ExportError` (a ValueError) with a one-line message; `NoLoRABranchError` when there is
    nothing to merge, `VerificationError` when the check fails.
    """
    source_path = Path(model)
    verify_mode = checked_verify_mode(verify)
    check_tolerance(tolerance)
    target = Path(output) if output is not None else default_output(source_path)
    opened = open_input(source_path, target, input_shapes, dry_run)
    onnx_model, source, mended, runnable_original, shapes = (
        opened.model,
        opened.source,
        opened.mended,
        opened.runnable,
        opened.shapes,
    )
    adapter_plan = _plan_adapters(onnx_model, source, adapters, allow_partial)

    graph = Graph(onnx_model, source.read)
    reshaped = shared_reshape_outputs(graph)
    folds, refused = fold_all(graph, [(find_dora_branches, DORA_RULES), (find_branches, RULES)])
    rejoin_reshapes(graph, reshaped)
    refused += unrecognised_low_rank_products(graph)
    values = _fold_values(folds, source.read)
    values.update(fuse_conv_bias_adds(graph, folds, values))
    values.update(_adapter_values(graph, adapter_plan, {fold.branch.base.name for fold in folds}))
    if not values:
        raise NoLoRABranchError(
            f"no LoRA branch found in {source_path}{no_branch_reason(graph, refused)}: export the model with its "
            "adapter unmerged, or pass --adapter DIR to merge adapter files."
        )
    result = MergeResult(
        None,
        [fold.describe() for fold in folds],
        list(adapter_plan.matched) if adapter_plan else [],
        refused,
        None,
        mended,
    )
    if dry_run:
        return result
    graph.finish()

    mode = resolve_mode(verify_mode, source)
    if adapter_plan is not None and mode == "full":
        # Adapters change the outputs on purpose: the merged model is run (finite outputs) but not
        # compared with the original, and folded branches are checked layer by layer.
        mode = "run"
    rng = np.random.default_rng(seed)
    tolerance = tolerance or default_tolerance(
        graph.initializers[name].data_type for name in values if name in graph.initializers
    )
    layer_differences: list[float] = []
    if mode in ("layers", "run"):
        values = _with_layer_checks(values, folds, source.read, rng, layer_differences)
    with checked_staged_model(
        onnx_model,
        source,
        values,
        target,
        progress_bar(progress),
        runnable_original if runnable_original is not None else source_path,
        "merged",
    ) as staged:
        if mode != "off":
            original = RunnableModel(source_path, source, runnable_original)
            result.verification = _verification(
                mode, original, staged, graph, shapes, rng, layer_differences, tolerance
            )
    result.output = target
    return result


def _verification(
    mode: str,
    original: RunnableModel,
    staged: Path,
    graph: Graph,
    shapes: Mapping[str, tuple[int, ...]],
    rng: np.random.Generator,
    layer_differences: list[float],
    tolerance: float,
) -> checks.Verification:
    """The check of the staged model in `mode`; raises VerificationError above the tolerance."""
    source_path = original.source_path
    feeds = checks.random_inputs(graph, shapes, rng) if mode in ("full", "run") else {}
    if mode == "full":
        with original.path(beside=staged) as original_path:
            difference = checks.compare_models(original_path, staged, feeds, f"the input model {source_path}")
    elif mode == "run":
        difference = max(checks.non_finite_outputs(staged, feeds), *layer_differences, 0.0)
    else:
        difference = max(layer_differences, default=0.0)
    verification = checks.Verification(mode, difference, tolerance)
    if not verification.passed:
        raise VerificationError(
            f"the merged model differs from {source_path} by {difference:.3g} of its largest "
            f"output, above the tolerance {tolerance:g}: nothing was written; check the model, "
            "or raise --tolerance if this precision is expected."
        )
    return verification


def _plan_adapters(
    model: onnx.ModelProto,
    source: TensorSource,
    adapters: Sequence[tuple[str | os.PathLike, float] | str],
    allow_partial: bool,
) -> AdapterMergePlan | None:
    if not adapters:
        return None
    specs = adapter_specs(adapters)
    try:
        from lora_spec.export.adapter_merge import plan_adapter_merge
    except ImportError:
        raise ExportError(
            "merging adapter files needs lora_spec.export.adapter_merge, which this installation "
            "lacks: update lora-spec."
        ) from None
    try:
        return plan_adapter_merge(model, source.read, specs, allow_partial=allow_partial)
    except ExportError:
        raise
    except ValueError as error:
        raise ExportError(str(error).splitlines()[0]) from None


def _fold_values(folds: list[Fold[Any]], read_tensor: ReadTensor) -> dict[str, Callable[[], np.ndarray]]:
    values: dict[str, Callable[[], np.ndarray]] = {}
    for fold in folds:
        values[fold.target] = functools.partial(fold.merged_weight, read_tensor)
        values.update({name: _constant(value) for name, value in fold.rule.other_values(fold.branch).items()})
    return values


def _constant(value: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: value


def _adapter_values(
    graph: Graph, plan: AdapterMergePlan | None, folded_nodes: set[str]
) -> dict[str, Callable[[], np.ndarray]]:
    """Point each updated node at its own weight (copied when shared) and return the new values."""
    if plan is None:
        return {}
    nodes = {node.name: node for node in graph.nodes if node.name}
    values: dict[str, Callable[[], np.ndarray]] = {}
    for update in plan.updates:
        node = nodes.get(update.node_name)
        if node is None or update.input_index >= len(node.input):
            raise ExportError(
                f"adapter update names node {update.node_name!r} input {update.input_index}, "
                "which the graph does not have."
            )
        if update.node_name in folded_nodes:
            raise ExportError(
                f"node {update.node_name!r} has a LoRA branch in the graph and an adapter update: "
                "merge one of them first."
            )
        weight = graph.initializer_behind(node.input[update.input_index])
        if weight is None:
            raise ExportError(f"input {update.input_index} of node {update.node_name!r} is not an initializer.")
        target = weight
        if graph.initializer_readers(weight) > 1 or weight in values:
            target = graph.copy_initializer(weight, f"{weight}.merged")
        if node.input[update.input_index] != target:
            graph.replace_input(node, update.input_index, target)
        # Computed when written, one weight at a time, so the merge never holds every new weight.
        values[target] = functools.partial(_finite_value, update)
    return values


def _finite_value(update: WeightUpdate) -> np.ndarray:
    value = np.asarray(update.value)
    if value.dtype.kind == "f" and not np.isfinite(value.astype(np.float32)).all():
        raise ExportError(f"the adapter update of {update.node_name!r} has NaN or inf values: fix the adapter.")
    return value


def _with_layer_checks(
    values: Mapping[str, Callable[[], np.ndarray]],
    folds: list[Fold[Any]],
    read_tensor: ReadTensor,
    rng: np.random.Generator,
    differences: list[float],
) -> dict[str, Callable[[], np.ndarray]]:
    """`values` whose fold computations also check the folded layer against its branch."""
    # A generator per fold, drawn now: the folds run on several threads, in no fixed order.
    seeds = rng.integers(2**63, size=len(folds))
    generators = {id(fold): np.random.default_rng(seed) for fold, seed in zip(folds, seeds, strict=True)}

    def check(
        fold: Fold[Any], weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray
    ) -> Callable[[np.ndarray], None]:
        difference = checks.layer_check(fold, weight, lora_a, lora_b, generators[id(fold)])
        return lambda merged: differences.append(difference(merged))

    checked = dict(values)
    for fold in folds:
        checked[fold.target] = functools.partial(fold.merged_weight, read_tensor, check)
    return checked
