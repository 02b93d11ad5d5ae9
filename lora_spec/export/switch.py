"""The switch rules: a compute node gets a LoRA branch whose factors are inputs a run may override.

The branch is `base(x) + (x @ A) @ B` with `A = <module path>.lora_A` and `B = <module path>.lora_B`,
initializers that are also listed among the graph inputs: onnxruntime then lets a run replace
them (`RunOptions.add_active_adapter`, or feeds of those names). The graph holds no scaling: the
factors carry it. A rank-0 pair (`A` of `in x 0`, `B` of `0 x out`) adds zeros, so by default the
model is the base model. The sum comes after the base's bias, so onnxruntime's fusion of a
`MatMul` with its bias `Add` still applies.

One rule per base op (the nodes it matches are the adapter-merge planner's weight sites: a
`Gather` of rows, a 2-D `Conv`), each with `factor_shapes` (the inputs' dims), `served_factors`
(the reference's `A (r, in)`, `B (out, r)` in the inputs' layout) and `rewrite` (the branch's
nodes); the module's nodes are checked to agree before any rewrite (`switchable.py`), and any
other op is refused by name (onnxruntime's `FusedMatMul`, say, from a graph it optimized):

| op | A | B | branch |
|---|---|---|---|
| MatMul, Gemm | `[in, r]` | `[r, out]` | `MatMul(MatMul(x, A), B)` (x untransposed first for a Gemm's `transA`) |
| Gather (embedding rows) | `[num_embeddings, r]` | `[r, dim]` | `MatMul(Gather(A, ids), B)` |
| Conv (2-D) | `[r, in/groups, kh, kw]` | `[out, r/groups, 1, 1]` | `Conv(Conv(x, A), B)` (A: the base's geometry) |
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lora_spec.export.adapter_merge import WeightSite
from lora_spec.export.graph import Graph, attribute
from lora_spec.export.model_io import ExportError
from lora_spec.export.patterns import LoRABranch, find_branches

LORA_A, LORA_B = ".lora_A", ".lora_B"
_CONV_GEOMETRY = ("strides", "pads", "dilations", "group", "auto_pad", "kernel_shape")


def input_names(path: str) -> tuple[str, str]:
    """The names of module `path`'s factors among the graph inputs: `<path>.lora_A`, `<path>.lora_B`."""
    return path + LORA_A, path + LORA_B


class SwitchRule:
    """Switching a linear layer (MatMul, Gemm): `x @ A @ B` on the node's input rows."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    rank_axes = (1, 0)  # the axis of A's and of B's dims that is the rank

    def factor_shapes(self, site: WeightSite, rank: int | str) -> tuple[list, list]:
        """The dims of A and B for the weight `site` reads, at `rank` (a number, or a dim's name)."""
        features_out, features_in = site.reference_shape()
        return [features_in, rank], [rank, features_out]

    def served_factors(self, lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reference's `A (r, in)` and `B (out, r)` (scaling included) as the inputs hold them."""
        return lora_a.T, lora_b.T

    def rewrite(self, graph: Graph, node: onnx.NodeProto, lora_a: str, lora_b: str) -> tuple[list, str]:
        """The branch's nodes, reading the node's input, and the name of the update they compute."""
        nodes, features = [], node.input[0]
        if attribute(node, "transA", 0):  # a Gemm reading x.T: the branch reads x
            features = graph.fresh_name(f"{lora_a}/input")
            nodes.append(helper.make_node("Transpose", [node.input[0]], [features], name=features, perm=[1, 0]))
        rows = graph.fresh_name(f"{lora_a}/rows")
        update = graph.fresh_name(f"{lora_b}/update")
        return [
            *nodes,
            helper.make_node("MatMul", [features, lora_a], [rows], name=rows),
            helper.make_node("MatMul", [rows, lora_b], [update], name=update),
        ], update


class GatherSwitch(SwitchRule):
    """An embedding: `Gather(A, ids) @ B`, A's rows picked by the base's ids. The reference's embedding
    `A (r, num)`, `B (dim, r)` transpose to the inputs like a linear layer's."""

    op_types = ("Gather",)

    def factor_shapes(self, site: WeightSite, rank: int | str) -> tuple[list, list]:
        rows, dim = site.reference_shape()
        return [rows, rank], [rank, dim]

    def rewrite(self, graph: Graph, node: onnx.NodeProto, lora_a: str, lora_b: str) -> tuple[list, str]:
        rows = graph.fresh_name(f"{lora_a}/rows")
        update = graph.fresh_name(f"{lora_b}/update")
        return [
            helper.make_node("Gather", [lora_a, node.input[1]], [rows], name=rows, axis=0),
            helper.make_node("MatMul", [rows, lora_b], [update], name=update),
        ], update


class ConvSwitch(SwitchRule):
    """A 2-D convolution: A a conv with the base's geometry, B a 1x1 conv grouped like the base, both in
    the reference's (and ONNX's) layout."""

    op_types = ("Conv",)
    rank_axes = (0, 1)

    def factor_shapes(self, site: WeightSite, rank: int | str) -> tuple[list, list]:
        features_out, in_per_group, *kernel = site.reference_shape()
        groups = int(attribute(site.node, "group", 1))
        rank_per_group = rank // groups if isinstance(rank, int) else (rank if groups == 1 else f"{rank}/{groups}")
        return [rank, in_per_group, *kernel], [features_out, rank_per_group, 1, 1]

    def served_factors(self, lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return lora_a, lora_b

    def rewrite(self, graph: Graph, node: onnx.NodeProto, lora_a: str, lora_b: str) -> tuple[list, str]:
        low = graph.fresh_name(f"{lora_a}/low")
        update = graph.fresh_name(f"{lora_b}/update")
        geometry = {
            item.name: helper.get_attribute_value(item) for item in node.attribute if item.name in _CONV_GEOMETRY
        }
        return [
            helper.make_node("Conv", [node.input[0], lora_a], [low], name=low, **geometry),
            helper.make_node(
                "Conv", [low, lora_b], [update], name=update, kernel_shape=[1, 1], group=attribute(node, "group", 1)
            ),
        ], update


RULES = {op: rule for rule in (SwitchRule(), GatherSwitch(), ConvSwitch()) for op in rule.op_types}


@dataclasses.dataclass
class SwitchableModule:
    """One module made switchable: its path, its compute nodes (several when the model runs it more
    than once), the rule for their op, the element type of their weights, and the default factors
    (as the inputs hold them; None means rank 0, the base model)."""

    path: str
    sites: list[WeightSite]
    rule: SwitchRule
    element_type: int
    default: tuple[np.ndarray, np.ndarray] | None = None
    origin: str = ""

    def factor_shapes(self, rank: int | str) -> tuple[list, list]:
        return self.rule.factor_shapes(self.sites[0], rank)

    def rank_zero(self) -> tuple[np.ndarray, np.ndarray]:
        """Factors of rank 0 in the weights' dtype: the branch adds nothing."""
        dtype = numpy_dtype_of(self.element_type)
        a_shape, b_shape = self.factor_shapes(0)
        return np.zeros(a_shape, dtype), np.zeros(b_shape, dtype)

    def describe(self) -> str:
        lora_a, lora_b = input_names(self.path)
        dims_a, dims_b = self.factor_shapes("r")
        nodes = ", ".join(site.node.name or site.node.output[0] for site in self.sites)
        default = "" if self.default is None else f", default rank {self.default[0].shape[self.rule.rank_axes[0]]}"
        return f"{self.path}: inputs {lora_a} {dims_a} and {lora_b} {dims_b} at {nodes}{default}" + (
            f" ({self.origin})" if self.origin else ""
        )


def numpy_dtype_of(element_type: int) -> np.dtype:
    """The NumPy dtype of an ONNX element type (bfloat16 as `ml_dtypes.bfloat16`)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(element_type))


def switch_module(graph: Graph, module: SwitchableModule) -> None:
    """Give every compute node of `module` its branch, reading the module's two factor inputs, which are
    added here (initialized to `module.default`, else rank 0)."""
    names = input_names(module.path)
    taken = [name for name in names if name in graph.initializers or name in graph.producer]
    if taken:
        raise ExportError(
            f"cannot name the inputs of module {module.path}: the graph already has a tensor "
            f"{taken[0]!r}; rename it in the exported model."
        )
    values = module.default if module.default is not None else module.rank_zero()
    for name, value, dims in zip(names, values, module.factor_shapes(f"r_{module.path}"), strict=True):
        stored = np.ascontiguousarray(np.asarray(value).astype(numpy_dtype_of(module.element_type)))
        graph.add_initializer(numpy_helper.from_array(stored, name))
        graph.add_input(name, module.element_type, dims)
    for site in module.sites:
        node = graph.producer[site.node.output[0]]
        branch, update = module.rule.rewrite(graph, node, *names)
        join = _join(graph, node)
        output = join.output[0]
        base_output = graph.fresh_name(f"{output}/base")
        graph.rename_output(join, 0, base_output)
        add = helper.make_node("Add", [base_output, update], [output], name=graph.fresh_name(f"{module.path}/lora_add"))
        graph.insert_after(join, [*branch, add])


def _join(graph: Graph, node: onnx.NodeProto) -> onnx.NodeProto:
    """Where the branch joins: after a `MatMul`'s bias `Add` when that is its only reader, else after the node.

    A `MatMul` followed by its bias stays one `Gemm` or fused `MatMul` in onnxruntime.
    """
    reader = graph.only_reader(node.output[0])
    if (
        node.op_type == "MatMul"
        and reader is not None
        and reader.op_type == "Add"
        and any(graph.initializer_behind(name) is not None for name in reader.input if name != node.output[0])
    ):
        return reader
    return node


@dataclasses.dataclass
class ServedModule:
    """A switchable module of a served model: its path, the branches reading its factor inputs, and their rule."""

    path: str
    branches: list[LoRABranch]
    rule: SwitchRule

    def rank_zero(self, graph: Graph) -> tuple[np.ndarray, np.ndarray]:
        """Factors of rank 0 shaped like the module's inputs (float32: the caller casts them)."""
        shapes = [list(graph.initializers[name].dims) for name in input_names(self.path)]
        for shape, axis in zip(shapes, self.rule.rank_axes, strict=True):
            shape[axis] = 0
        a_shape, b_shape = shapes
        return np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)


def served_modules(graph: Graph) -> dict[str, ServedModule]:
    """The switchable modules of a model by the input-name contract: branches whose factors are the
    overridable inputs `<path>.lora_A` and `<path>.lora_B`."""
    overridable = {value.name for value in graph.graph.input if value.name in graph.initializers}
    modules: dict[str, ServedModule] = {}
    branches, _ = find_branches(graph)
    for branch in branches:
        lora_a, lora_b = branch.lora_a.initializer, branch.lora_b.initializer
        path = lora_a.removesuffix(LORA_A)
        if lora_a.endswith(LORA_A) and input_names(path) == (lora_a, lora_b) and {lora_a, lora_b} <= overridable:
            modules.setdefault(path, ServedModule(path, [], RULES[branch.base.op_type])).branches.append(branch)
    return modules
