"""`make_switchable`: one ONNX model whose LoRA factors are inputs, so a run picks its adapter.

The LoRA branches an exporter left in the graph, and the target modules of adapter folders, become
branches whose factors `<module path>.lora_A` / `.lora_B` are overridable inputs (`switch.py`).
By default they have rank 0: the model is the base model until a run activates an adapter file
(`lora-export --pack`) or feeds the factors.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from lora_spec.export import verify as checks
from lora_spec.export.adapter_merge import AdapterMergeError, AdapterTargets, WeightSite, resolve_adapters, weight_sites
from lora_spec.export.dora_fold import DoRABranch, find_dora_branches
from lora_spec.export.fold import RULES as FOLD_RULES
from lora_spec.export.fold import ReadTensor, detach_branch
from lora_spec.export.graph import Graph
from lora_spec.export.model_io import (
    ExportError,
    NoLoRABranchError,
    VerificationError,
    checked_staged_model,
    copy_model,
    progress_bar,
)
from lora_spec.export.naming import layer_module, normalized
from lora_spec.export.options import (
    check_tolerance,
    default_tolerance,
    open_input,
    parse_adapter,
    refuse_dora,
    resolve_mode,
)
from lora_spec.export.options import (
    verify_mode as checked_verify_mode,
)
from lora_spec.export.patterns import LoRABranch, find_branches, no_branch_reason, unrecognised_low_rank_products
from lora_spec.export.switch import RULES, SwitchableModule, SwitchRule, input_names, numpy_dtype_of, switch_module

SERVE_VERIFY_MODES = ("auto", "full", "off")
_HINT = "or skip the check with --no-verify"


@dataclasses.dataclass
class SwitchableResult:
    """What `make_switchable` did: the modules made switchable, the full tensors made overridable, the
    check, and the written path."""

    output: Path | None
    modules: list[str]
    overridable: list[str]
    refused: list[str]
    verification: checks.Verification | None
    mended: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        lines = [f"mended {line}" for line in self.mended]
        lines += [f"switchable {line}" for line in self.modules]
        lines += [f"overridable {line}" for line in self.overridable]
        lines += [f"not switchable: {reason}" for reason in self.refused]
        return checks.summary(lines, self.verification, self.output)


def default_output(model: Path) -> Path:
    """`<name>.switchable.onnx` beside `model`."""
    stem = model.stem if model.suffix == ".onnx" else model.name
    return model.with_name(f"{stem}.switchable.onnx")


@dataclasses.dataclass
class _Exported:
    """An exporter's LoRA branch, detached: its module path, base node output, and factors in the
    served layout (its scaling folded into B)."""

    path: str
    base_output: str
    rule: SwitchRule
    factors: tuple[np.ndarray, np.ndarray]
    module: SwitchableModule | None = None


def make_switchable(
    model: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    adapters: Sequence[str | os.PathLike] = (),
    keep_default: bool = False,
    allow_partial: bool = False,
    verify: str | bool = "auto",
    tolerance: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> SwitchableResult:
    """Write `output`: the ONNX model at `model` with every LoRA module's factors as overridable inputs.

    The LoRA branches the exporter left in the graph, and the modules that the adapter folders in
    `adapters` target (found by module path as `merge_onnx(adapters=...)` finds them), get the
    branch `base(x) + (x @ A) @ B` with inputs `<module path>.lora_A` (`[in, r]`) and
    `<module path>.lora_B` (`[r, out]`; see `lora_spec.export.switch` for embeddings and convs),
    scaling included in the factors. Their default is rank 0 (the base model); with
    `keep_default`, the factors the model was exported with. Full tensors the adapters carry
    (`modules_to_save` heads, trained biases) become overridable inputs too, defaulting to the
    base's values. `output` defaults to `<name>.switchable.onnx` beside the input (external data,
    if any, streamed to `<output>.data`); the input is never modified.

    `verify` ("auto", "full", "off"): onnxruntime runs the written model without any adapter and
    the original (the base, or with `keep_default` the exported model) on the same random inputs,
    and, for exported branches, the written model fed the exported factors against the original;
    "auto" skips this above 1 GiB of weights. `tolerance` bounds max |difference| / max |output|
    (default 1e-4, 1e-2 for half precision). `dry_run` lists the modules and writes nothing.

    Raises `ExportError` with a one-line message; `NoLoRABranchError` when the model has no LoRA
    branch and no adapter is given, `VerificationError` when the check fails.
    """
    source_path = Path(model)
    mode = checked_verify_mode(verify, SERVE_VERIFY_MODES)
    check_tolerance(tolerance)
    directories = [_unweighted(adapter) for adapter in adapters]
    for directory in directories:
        refuse_dora(directory)
    target = Path(output) if output is not None else default_output(source_path)
    opened = open_input(source_path, target, input_shapes, dry_run)
    onnx_model, source, mended, original, shapes = (
        opened.model,
        opened.source,
        opened.mended,
        opened.runnable,
        opened.shapes,
    )

    graph = Graph(onnx_model, source.read)
    exported, refused = _detach_exported(graph, source.read)
    refused += unrecognised_low_rank_products(graph)
    if not exported and not directories:
        raise NoLoRABranchError(
            f"no LoRA branch found in {source_path}{no_branch_reason(graph, refused)}: export the model with its "
            "adapter unmerged, or pass --adapter DIR to make the adapters' target modules switchable."
        )
    if keep_default and not exported:
        raise ExportError(
            f"--keep-default keeps the LoRA branches exported in the model, but {source_path} has "
            "none: drop --keep-default (the default is then the base model)."
        )
    graph.finish()
    mode = "off" if dry_run else resolve_mode(mode, source, too_large="off")
    base = copy_model(onnx_model) if exported and not keep_default and mode == "full" else None

    sites = weight_sites(onnx_model)
    modules = _exported_modules(exported, sites, keep_default)
    targets = _resolve(onnx_model, sites, modules, directories, allow_partial)
    if targets is not None:
        _add_adapter_modules(modules, targets)
    overridable, copies = _full_tensor_inputs(graph, targets, source.read)
    for module in modules.values():
        _check_module(module)
    result = SwitchableResult(
        None, [module.describe() for module in modules.values()], overridable, refused, None, mended
    )
    if dry_run:
        return result
    for module in modules.values():
        switch_module(graph, module)
    graph.finish()

    tolerance = tolerance or default_tolerance(module.element_type for module in modules.values())
    with checked_staged_model(
        onnx_model,
        source,
        copies,
        target,
        progress_bar(progress),
        original if original is not None else source_path,
        "switchable",
    ) as staged:
        if mode == "off" and verify in ("auto", True):
            result.verification = checks.Verification("skipped", 0.0, tolerance)
        if mode == "full":
            runnable = checks.RunnableModel(source_path, source, original)
            expected = checks.RunnableModel(source_path, source, base) if base is not None else runnable
            result.verification = _verification(graph, shapes, seed, staged, runnable, expected, exported, tolerance)
    result.output = target
    return result


def _unweighted(adapter: str | os.PathLike) -> str | os.PathLike:
    if isinstance(adapter, str):
        directory, weight = parse_adapter(adapter)
        if directory != adapter:
            raise ExportError(
                f"--adapter {adapter} has a weight ({weight:g}), which making a model switchable does "
                f"not use: pass {directory}, and give weights when packing (--pack ... --adapter "
                f"{directory}:{weight:g})."
            )
    elif not isinstance(adapter, os.PathLike):
        raise ExportError(f"adapter {adapter!r} is not a folder path: pass the adapter directories.")
    return adapter


def _detach_exported(graph: Graph, read_tensor: ReadTensor) -> tuple[list[_Exported], list[str]]:
    """Detach every LoRA branch the exporter left, keeping what it was; refuse a module with two (stacked),
    and a DoRA layer."""
    expressions = find_dora_branches(graph)[0]
    dora_layers = [layer for layer in expressions if layer.rescaled]
    if dora_layers:
        raise ExportError(
            f"node {dora_layers[0].name} is a DoRA layer: DoRA rescales each column of the adapted "
            "weight, which is not an additive low-rank input, so it cannot be switched per run: merge "
            "it (lora-export --merge), or serve LoRA adapters on the base model's export."
        )
    for expression in expressions:
        _move_bias_after_the_branch(graph, expression)
    branches, refused = find_branches(graph)
    exported = []
    for branch in branches:
        rule = RULES[branch.base.op_type]
        lora_a, lora_b = FOLD_RULES[branch.base.op_type].reference_factors(branch, read_tensor)
        factors = rule.served_factors(lora_a, branch.scale * lora_b)
        path = _exported_path(graph, branch)
        detach_branch(graph, branch)
        exported.append(_Exported(path, branch.base.output[0], rule, factors))
    stacked, _ = find_branches(graph)
    if stacked:
        raise ExportError(
            f"node {stacked[0].name} has two LoRA branches (stacked adapters), and a switchable "
            "module has one pair of factors: merge one of them first (lora-export --merge)."
        )
    return exported, refused


def _move_bias_after_the_branch(graph: Graph, branch: DoRABranch) -> None:
    """Rewrite `base + (pair + b)` as `(base + pair) + b`: TensorFlow's graph optimizer moves a Keras layer's bias
    onto the low-rank side, and a switchable branch must be the pair alone. Other forms are left to be refused."""
    outer = branch.add
    if outer.op_type != "Add" or branch.base_output not in outer.input:
        return
    inner = graph.producer.get(outer.input[1 - list(outer.input).index(branch.base_output)])
    if inner is None or inner.op_type != "Add" or graph.readers(inner.output[0]) != 1:
        return
    constants = [index for index, tensor in enumerate(inner.input) if graph.is_constant(tensor)]
    if len(constants) != 1:
        return
    bias, pair = inner.input[constants[0]], inner.input[1 - constants[0]]
    summed = outer.output[0]
    graph.rename_output(outer, 0, graph.fresh_name(f"{summed}.without_bias"))
    name = graph.fresh_name(f"{outer.name}.bias")
    # Indexed before the inner Add goes, so that the bias keeps a reader throughout.
    graph.insert_after(outer, [onnx.helper.make_node("Add", [outer.output[0], bias], [summed], name=name)])
    graph.replace_input(outer, list(outer.input).index(inner.output[0]), pair)


def _exported_path(graph: Graph, branch: LoRABranch) -> str:
    """The module path of an exported branch: the layer that sums base and branch, as the exporter recorded
    it (else the base's), made exact by a parameter name the exporter kept for the base (PEFT's TorchScript
    names start below its wrappers: `model.mlp.0` for `base_model.model.mlp.0`); else that name; else the
    base node's name."""
    kept = []
    for node in branch.base_chain:
        for tensor in node.input:
            name = graph.initializer_behind(tensor)
            if name and name.endswith((".weight", ".bias")) and not any(mark in name for mark in ("/", "::")):
                kept.append(normalized(name.rpartition(".")[0]))
    recorded = layer_module(branch.add) or layer_module(branch.base)
    if recorded:
        return next((path for path in kept if recorded == path or recorded.endswith("." + path)), recorded)
    return kept[0] if kept else branch.base.name or branch.base.output[0]


def _exported_modules(
    exported: list[_Exported], sites: list[WeightSite], keep_default: bool
) -> dict[str, SwitchableModule]:
    """One module per distinct exported adapter: the branches of a module the model runs twice have equal
    factors and join one module (named by its first branch); different factors under one name get a suffix."""
    by_output = {site.node.output[0]: site for site in sites}
    modules: dict[str, SwitchableModule] = {}
    groups: list[tuple[_Exported, SwitchableModule]] = []
    for branch in exported:
        site = by_output.get(branch.base_output)
        if site is None:
            raise ExportError(
                f"the LoRA branch of module {branch.path} adds to node output {branch.base_output!r}, "
                "whose weight the graph does not hold as a float initializer: please report this with "
                "the model."
            )
        module = next((module for first, module in groups if _same_adapter(first, branch)), None)
        if module is None:
            path, counter = branch.path, 1
            while path in modules:
                path, counter = f"{branch.path}_{counter}", counter + 1
            module = SwitchableModule(
                path,
                [],
                branch.rule,
                site.weight.element_type,
                branch.factors if keep_default else None,
                "exported branch",
            )
            modules[path] = module
            groups.append((branch, module))
        site.paths.add(module.path)
        module.sites.append(site)
        branch.module = module
    return modules


def _same_adapter(first: _Exported, other: _Exported) -> bool:
    return first.rule is other.rule and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first.factors, other.factors, strict=True)
    )


def _resolve(
    model: onnx.ModelProto,
    sites: list[WeightSite],
    modules: dict[str, SwitchableModule],
    directories: list,
    allow_partial: bool,
) -> AdapterTargets | None:
    if not directories:
        return None
    try:
        return resolve_adapters(
            model, [(directory, 1.0) for directory in directories], allow_partial, sites, verb="make switchable"
        )
    except AdapterMergeError as error:
        raise ExportError(str(error).splitlines()[0]) from None


def _add_adapter_modules(modules: dict[str, SwitchableModule], targets: AdapterTargets) -> None:
    """Each adapter module whose compute nodes have no module yet becomes one, named by the adapter's path."""
    module_of = {site.node.output[0]: module for module in modules.values() for site in module.sites}
    for target in targets.lora:
        for site in target.sites:
            if site.node.output[0] in module_of:
                continue
            module = modules.get(target.path)
            if site.node.op_type not in RULES:
                raise ExportError(
                    f"module {target.path} runs at node {site.node.name!r}, a {site.node.op_type}, which "
                    f"--switchable does not switch (it switches {', '.join(sorted(RULES))}): make the "
                    "model switchable from the exporter's graph, before onnxruntime optimizes it."
                )
            if module is None:
                module = modules[target.path] = SwitchableModule(
                    target.path,
                    [],
                    RULES[site.node.op_type],
                    site.weight.element_type,
                    origin=f"adapter {target.adapter.directory}",
                )
            module.sites.append(site)
            module_of[site.node.output[0]] = module


def _check_module(module: SwitchableModule) -> None:
    """Refuse a module whose nodes disagree on the weight's shape, type or kind: one pair of factors serves all."""
    for site in module.sites:
        first = module.sites[0]
        if (site.reference_shape(), site.weight.element_type, site.node.op_type in module.rule.op_types) != (
            first.reference_shape(),
            module.element_type,
            True,
        ):
            raise ExportError(
                f"module {module.path} runs at nodes {first.node.name!r} and {site.node.name!r} with "
                "weights of different shapes, types or kinds: one pair of factors cannot serve both; "
                "check the adapter's module paths."
            )


def _full_tensor_inputs(
    graph: Graph, targets: AdapterTargets | None, read_tensor: ReadTensor
) -> tuple[list[str], dict[str, Callable[[], np.ndarray]]]:
    """List the tensors the adapters replace as a whole among the graph inputs; one that other nodes
    also read (exporters store equal tensors once) is first copied for the adapter's readers.

    Returns a line per input and the values of the copies, by name.
    """
    if targets is None:
        return [], {}
    nodes = {node.name: node for node in graph.nodes if node.name}
    exposed: list[str] = []
    copies: dict[str, Callable[[], np.ndarray]] = {}
    for target in targets.full:
        readers: dict[str, list] = {}
        for location, _, _ in target.locations:
            readers.setdefault(location.initializer.name, []).append(location)
        for name, locations in readers.items():
            exposed_name = name
            if graph.initializer_readers(name) > len(locations):
                exposed_name = graph.copy_initializer(name, f"{target.key}.switchable")
                copies[exposed_name] = functools.partial(read_tensor, name)
                for location in locations:
                    graph.replace_input(nodes[location.consumer], location.input_index, exposed_name)
            if exposed_name not in exposed:
                tensor = graph.initializers[exposed_name]
                graph.add_input(exposed_name, tensor.data_type, tensor.dims)
                exposed.append(exposed_name)
    return [f"{name} {list(graph.initializers[name].dims)} (full tensor)" for name in exposed], copies


def _verification(
    graph: Graph,
    shapes: Mapping[str, tuple[int, ...]],
    seed: int,
    staged: Path,
    runnable: checks.RunnableModel,
    expected: checks.RunnableModel,
    exported: list[_Exported],
    tolerance: float,
) -> checks.Verification:
    """The written model without adapter against `expected` (the input, or the base the input was
    exported from), and, if that is the base, fed the exported factors against the input."""
    feeds = checks.random_inputs(graph, shapes, np.random.default_rng(seed))
    served = checks.run_model(staged, feeds, "the switchable model", _HINT)
    with runnable.path(beside=staged) as original_path:
        original = checks.run_model(original_path, feeds, f"the input model {runnable.source_path}", _HINT)
    if expected is runnable:
        differences = [checks.compare_outputs(served, original)]
    else:
        with expected.path(beside=staged) as base_path:
            base = checks.run_model(base_path, feeds, "the base model", _HINT)
        factors: dict[str, np.ndarray] = {}
        for branch in exported:
            module = branch.module
            assert module is not None  # every exported branch was given its module when switched
            dtype = numpy_dtype_of(module.element_type)
            factors.update(
                zip(input_names(module.path), (value.astype(dtype) for value in branch.factors), strict=True)
            )
        adapted = checks.run_model(staged, {**feeds, **factors}, "the switchable model", _HINT)
        differences = [checks.compare_outputs(served, base), checks.compare_outputs(adapted, original)]
    verification = checks.Verification("served", max(differences), tolerance)
    if not verification.passed:
        raise VerificationError(
            f"the switchable model differs from {runnable.source_path} by {verification.max_relative_difference:.3g} "
            f"of its largest output, above the tolerance {tolerance:g}: nothing was written; check the model, or "
            "raise --tolerance if this precision is expected."
        )
    return verification
