"""`pack_adapter`: adapter folders as one ONNX Runtime adapter file (`.onnx_adapter`) for a switchable model.

The file holds every factor input of the served model (`<module path>.lora_A` / `.lora_B`): the
adapters' factors where they target the module, rank 0 elsewhere, so that nothing of another
adapter stays active; and the full tensors the adapters carry. Several adapters become one by the
reference's exact `cat` combination (`lora_spec.multi_adapter.combine`: ranks concatenated,
weight times scaling on A, scaling 1). Tensors are in the dtype of the served model's inputs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from lora_spec._files import atomic_path
from lora_spec.export import verify as checks
from lora_spec.export.adapter_merge import AdapterMergeError, AdapterTargets, resolve_adapters, weight_sites
from lora_spec.export.fold import detach_branch
from lora_spec.export.graph import Graph
from lora_spec.export.merge import merge_onnx
from lora_spec.export.model_io import ExportError, TensorSource, VerificationError, copy_model
from lora_spec.export.options import (
    adapter_specs,
    check_tolerance,
    default_tolerance,
    open_input,
    refuse_dora,
    resolve_mode,
)
from lora_spec.export.options import (
    verify_mode as checked_verify_mode,
)
from lora_spec.export.switch import ServedModule, input_names, numpy_dtype_of, served_modules
from lora_spec.export.switchable import SERVE_VERIFY_MODES
from lora_spec.multi_adapter import Factors, combine

_HINT = "or skip the check with --no-verify"


@dataclasses.dataclass
class PackResult:
    """What `pack_adapter` did: each module's packed rank and sources, the full tensors, the keys left
    out (with `allow_partial`), the check, and the written path."""

    output: Path | None
    modules: list[str]
    full_tensors: list[str]
    unmatched: list[str]
    verification: checks.Verification | None

    def describe(self) -> str:
        lines = [f"pack {line}" for line in self.modules]
        lines += [f"pack {line}" for line in self.full_tensors]
        lines += [f"not packed: {key}" for key in self.unmatched]
        return checks.summary(lines, self.verification, self.output)


def pack_adapter(
    served: str | os.PathLike,
    adapters: Sequence[tuple[str | os.PathLike, float] | str],
    output: str | os.PathLike,
    *,
    allow_partial: bool = False,
    verify: str | bool = "auto",
    tolerance: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> PackResult:
    """Write `output`, an ONNX Runtime adapter file of `adapters` for the switchable model at `served`.

    `adapters` are PEFT-format folders (ours, PEFT's, Keras's), each `(dir, weight)` or
    `"DIR[:WEIGHT]"`; their modules are found in `served` as `merge_onnx(adapters=...)` finds them.
    Activate the file per run with onnxruntime's `LoraAdapter` and `RunOptions.add_active_adapter`.

    `verify` ("auto", "full", "off"): onnxruntime runs `served` with the file active and the base
    (`served` without its branches) merged with the same adapters by `merge_onnx`, on the same
    random inputs; "auto" skips this above 1 GiB of weights. `tolerance` bounds max |difference| /
    max |output| (default 1e-4, 1e-2 for half precision). `progress` shows the merge's bars.

    Raises `ExportError` with a one-line message: a served model that is not switchable, a DoRA
    adapter, adapters that do not fit it (naming the module), keys matching nothing (unless
    `allow_partial`), two adapters carrying one full tensor; `VerificationError` when the check fails.
    """
    served_path, target = Path(served), Path(output)
    mode = checked_verify_mode(verify, SERVE_VERIFY_MODES)
    check_tolerance(tolerance)
    specs = adapter_specs(adapters)
    if not specs:
        raise ExportError("no adapter to pack: pass at least one --adapter DIR[:WEIGHT].")
    for directory, _ in specs:
        refuse_dora(directory)
    opened = open_input(served_path, target, input_shapes, dry_run)
    model, source, shapes = opened.model, opened.source, opened.shapes
    graph = Graph(model, source.read)
    modules = served_modules(graph)
    if not modules:
        raise ExportError(
            f"{served_path} is not switchable: it has no LoRA inputs <module>.lora_A/.lora_B; make it "
            "with lora-export --switchable."
        )
    targets = _resolve(model, modules, specs, allow_partial)
    packed, lines, unmatched = _module_factors(graph, modules, targets, served_path, allow_partial)
    full, full_lines = _full_tensors(graph, targets, served_path)
    result = PackResult(None, lines, full_lines, targets.unmatched + unmatched, None)
    if dry_run:
        return result
    tensors = {**packed, **full}
    mode = resolve_mode(mode, source, too_large="off")
    tolerance = tolerance or default_tolerance(graph.initializers[name].data_type for name in tensors)
    with atomic_path(target) as staged:
        write_adapter_file(staged, tensors)
        if mode == "off" and verify in ("auto", True):
            result.verification = checks.Verification("skipped", 0.0, tolerance)
        if mode == "full":
            result.verification = _verification(
                graph, served_path, source, staged, specs, allow_partial, shapes, seed, tolerance, progress
            )
    result.output = target
    return result


def _resolve(
    model: onnx.ModelProto,
    modules: dict[str, ServedModule],
    specs: list[tuple[str | os.PathLike, float]],
    allow_partial: bool,
) -> AdapterTargets:
    """The adapters' keys matched on the served model's compute nodes (not its branches), each base node of
    a module also known by the module's path."""
    lora_inputs = {name for module in modules.values() for name in input_names(module.path)}
    module_of = {branch.base.output[0]: module.path for module in modules.values() for branch in module.branches}
    sites = [site for site in weight_sites(model) if site.weight.initializer.name not in lora_inputs]
    for site in sites:
        if site.node.output[0] in module_of:
            site.paths.add(module_of[site.node.output[0]])
    try:
        return resolve_adapters(model, specs, allow_partial, sites, verb="pack")
    except AdapterMergeError as error:
        raise ExportError(str(error).splitlines()[0]) from None


def _module_factors(
    graph: Graph, modules: dict[str, ServedModule], targets: AdapterTargets, served_path: Path, allow_partial: bool
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Each module's two inputs: the `cat` combination of the adapters targeting it, else rank 0."""
    module_of = {branch.base.output[0]: module for module in modules.values() for branch in module.branches}
    contributions: dict[str, dict[tuple[str, str], tuple[Factors, float]]] = {path: {} for path in modules}
    unmatched = []
    for target in targets.lora:
        for site in target.sites:
            module = module_of.get(site.node.output[0])
            if module is None:
                if not allow_partial:
                    raise ExportError(
                        f"adapter {target.adapter.directory}: module {target.path} (node "
                        f"{site.node.name!r}) is not switchable in {served_path}: make the served model "
                        f"with lora-export --switchable ... --adapter {target.adapter.directory}, or "
                        "pass --allow-partial to pack the rest."
                    )
                unmatched.append(f"{target.path} (node {site.node.name!r} is not switchable)")
                continue
            if target.adapter.weight:
                lora_a, lora_b = target.adapter.tensors.lora[target.path]
                factors = Factors(lora_a, lora_b, target.adapter.config.scaling_for(target.path))
                contributions[module.path][(target.adapter.directory, target.path)] = (factors, target.adapter.weight)
    tensors, lines = {}, []
    for path, module in modules.items():
        names = input_names(path)
        element_type = graph.initializers[names[0]].data_type
        parts = list(contributions[path].values())
        if parts:
            lora_a, lora_b = combine([factors for factors, _ in parts], [weight for _, weight in parts], "cat")
            values = module.rule.served_factors(lora_a, lora_b)
        else:
            values = module.rank_zero(graph)
        for name, value in zip(names, values, strict=True):
            tensors[name] = np.ascontiguousarray(value.astype(numpy_dtype_of(element_type)))
        sources = (
            " + ".join(
                f"{weight:g} x {directory} ({key})" for (directory, key), (_, weight) in contributions[path].items()
            )
            or "no adapter targets it"
        )
        lines.append(f"{path}: rank {sum(factors.A.shape[0] for factors, _ in parts)} from {sources}")
    return tensors, lines, unmatched


def _full_tensors(graph: Graph, targets: AdapterTargets, served_path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The full tensors of the adapters with a non-zero weight, by the served input they override."""
    overridable = {value.name for value in graph.graph.input if value.name in graph.initializers}
    tensors: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    lines: list[str] = []
    for target in targets.full:
        if not target.adapter.weight:
            continue
        source = f"{target.adapter.directory} ({target.key})"
        for location, value, _ in target.locations:
            name = location.initializer.name
            if name not in overridable:
                raise ExportError(
                    f"adapter {target.adapter.directory} carries {target.key}, which {served_path} does "
                    "not take as an input: make the served model with lora-export --switchable ... "
                    f"--adapter {target.adapter.directory}."
                )
            if name in sources and sources[name] != source:
                raise ExportError(
                    f"two adapters carry the full tensor {name}: {sources[name]} and {source}; a file "
                    "sets it once: pack one of them, or give the other weight 0."
                )
            if name not in sources:
                tensors[name] = np.ascontiguousarray(value.astype(numpy_dtype_of(location.initializer.data_type)))
                sources[name] = source
                lines.append(f"{name}: full tensor from {source}")
    return tensors, lines


def write_adapter_file(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """An ONNX Runtime adapter file at `path` holding `tensors` by name (onnxruntime's `AdapterFormat`)."""
    import onnxruntime

    if not hasattr(onnxruntime, "AdapterFormat"):
        raise ExportError(
            f"writing .onnx_adapter files needs onnxruntime 1.20 or later, not "
            f"{onnxruntime.__version__}: pip install -U onnxruntime."
        )
    values = {}
    for name, value in tensors.items():
        if value.dtype.name == "bfloat16":  # onnxruntime builds these from their bits only
            values[name] = onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(
                value.view(np.uint16), onnx.TensorProto.BFLOAT16
            )
        else:
            values[name] = onnxruntime.OrtValue.ortvalue_from_numpy(value)
    adapter = onnxruntime.AdapterFormat()
    adapter.set_parameters(values)
    adapter.export_adapter(str(path))


def active_adapter(path: Path) -> tuple:
    """`(RunOptions, LoraAdapter)`: onnxruntime run options with the adapter file at `path` active.

    The options hold only a pointer to the adapter: keep the adapter referenced while they are used.
    """
    import onnxruntime

    adapter = onnxruntime.LoraAdapter()
    adapter.Load(str(path))
    options = onnxruntime.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter


def _verification(
    graph: Graph,
    served_path: Path,
    source: TensorSource,
    staged: Path,
    specs: list[tuple[str | os.PathLike, float]],
    allow_partial: bool,
    shapes: Mapping[str, tuple[int, ...]],
    seed: int,
    tolerance: float,
    progress: bool,
) -> checks.Verification:
    """The served model with the staged file active against the base (the served model without its
    branches) merged with the same adapters by `merge_onnx`."""
    base = Graph(copy_model(graph.model), source.read)
    for module in served_modules(base).values():
        for branch in module.branches:
            detach_branch(base, branch)
    base.finish()
    feeds = checks.random_inputs(graph, shapes, np.random.default_rng(seed))
    with checks.RunnableModel(served_path, source, base.model).path(beside=staged) as base_path:
        merged = merge_onnx(
            base_path,
            base_path.with_name("merged.onnx"),
            adapters=specs,
            allow_partial=allow_partial,
            verify="off",
            progress=progress,
        )
        assert merged.output is not None  # merge_onnx writes the model it returns when not a dry run
        expected = checks.run_model(merged.output, feeds, "the base merged with the adapters", _HINT)
    options, _adapter = active_adapter(staged)
    actual = checks.run_model(served_path, feeds, "the switchable model with the adapter file", _HINT, options)
    verification = checks.Verification("packed", checks.compare_outputs(actual, expected), tolerance)
    if not verification.passed:
        raise VerificationError(
            f"{served_path} with the adapter file differs from the base merged with the same adapters by "
            f"{verification.max_relative_difference:.3g} of its largest output, above the tolerance {tolerance:g}: "
            "nothing was written; check the adapters, or raise --tolerance if this precision is expected."
        )
    return verification
