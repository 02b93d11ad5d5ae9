"""The fold rules: a matched branch's `scale * A @ B` goes into the base weight, the branch goes away.

One rule per base product. The rules only translate layouts; the merge itself is the reference's
(`lora_spec.reference.merge`: computed in at least float32, cast back to the weight's dtype once).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import onnx

from lora_spec import reference
from lora_spec.export.graph import Graph, attribute
from lora_spec.export.patterns import WEIGHT_INPUT, Factor, LoRABranch

ReadTensor = Callable[[str], np.ndarray]
ReadValue = Callable[[], np.ndarray]
# The kind of branch a rule folds (a DoRA rule takes DoRA branches only).
BranchT = TypeVar("BranchT", bound=LoRABranch)
# (fold, weight, lora_a, lora_b) -> a function of the merged weight.
LayerCheck = Callable[["Fold[Any]", np.ndarray, np.ndarray, np.ndarray], Callable[[np.ndarray], None]]
_FLOAT, _DOUBLE = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
# (from, to) casts that every value survives, so casting back restores it bit for bit.
_EXACT_UPCASTS = {
    (onnx.TensorProto.FLOAT16, _FLOAT),
    (onnx.TensorProto.BFLOAT16, _FLOAT),
    (onnx.TensorProto.FLOAT16, _DOUBLE),
    (onnx.TensorProto.BFLOAT16, _DOUBLE),
    (_FLOAT, _DOUBLE),
}


class FoldRule(Generic[BranchT]):
    """Folding shared by the MatMul and Gemm rules; subclasses say how their node stores the weight."""

    op_type: str

    def check(self, graph: Graph, branch: BranchT) -> str | None:
        """The reason this branch cannot be folded, or None."""
        if graph.initializers[branch.weight].data_type not in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.BFLOAT16,
            onnx.TensorProto.DOUBLE,
        ):
            return "the base weight is not a float tensor"
        return None

    def weight_is_out_in(self, node: onnx.NodeProto) -> bool:
        """True when the node's weight is stored `(out, in)` like the reference's, else `(in, out)`."""
        raise NotImplementedError

    def alpha(self, node: onnx.NodeProto) -> float:
        """The factor the node applies to its product."""
        return 1.0

    def to_reference(self, node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
        return weight if self.weight_is_out_in(node) else weight.T

    def reference_factors(self, branch: BranchT, read_tensor: ReadTensor) -> tuple[np.ndarray, np.ndarray]:
        """A `(r, in)` and B `(out, r)` in the reference layout, from how the products read them."""
        return reference_factors(branch.lora_a, branch.lora_b, read_tensor)

    def output_scales(self, branch: BranchT) -> tuple[float | np.ndarray, float | np.ndarray]:
        """What the layer multiplies the base product and the low-rank product by (per output feature
        or for all): `branch.scale` on the branch, 1 on the base."""
        return 1.0, branch.scale

    def describe(self, fold: Fold[BranchT]) -> str:
        branch = fold.branch
        return (
            f"{fold.name}: {branch.weight} += {branch.scale:g} * {branch.lora_a.initializer} @ "
            f"{branch.lora_b.initializer}" + ("" if fold.target == branch.weight else f" (copied to {fold.target})")
        )

    def other_values(self, branch: BranchT) -> dict[str, np.ndarray]:
        """New values of tensors other than the weight (a rescaled bias), by initializer name."""
        return {}

    def merged_weight(self, branch: BranchT, weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray) -> np.ndarray:
        """The node's new weight, in its layout and dtype: `W + (scale / alpha) * B @ A`.

        Computed in `weight`'s own memory when it can be (a float32 array the caller owns).
        """
        scale = branch.scale / self.alpha(branch.base)
        if self.weight_is_out_in(branch.base):
            return reference.merge(weight, lora_a, lora_b, scale, overwrite_w=True)
        # (W.T + s B @ A).T == W + s A.T @ B.T: the reference's merge in the node's (in, out)
        # layout, so the weight is never copied through a transpose.
        return reference.merge(weight, lora_b.T, lora_a.T, scale, overwrite_w=True)

    def rewrite(self, graph: Graph, branch: BranchT) -> str:
        """Point the base at the initializer that will hold the merged weight and delete the branch.

        Returns that initializer's name: a copy when anything else reads the original weight.
        """
        detach_branch(graph, branch)
        target = branch.weight
        if graph.initializer_readers(target) > 1:
            target = graph.copy_initializer(target, f"{target}.merged")
        weight_input = WEIGHT_INPUT[self.op_type]
        if branch.base.input[weight_input] != target:
            graph.replace_input(branch.base, weight_input, target)
        return target


def detach_branch(graph: Graph, branch: LoRABranch) -> None:
    """Delete the branch: the base's output takes the name of the sum, so its readers read the base alone.

    A base product that other nodes also read is first duplicated for this branch alone (and
    `branch.base` becomes the copy), so that a later change to this base changes nothing else.
    """
    if branch.base_shared:
        branch.base_chain, branch.base_output = graph.duplicate_chain(branch.base_chain, before=branch.add)
        branch.base = branch.base_chain[0]
    graph.bypass(branch.add, branch.base_output)
    drop_no_op_casts(graph, branch.add.output[0], branch.base_chain, graph.initializers[branch.weight].data_type)


def drop_no_op_casts(graph: Graph, output: str, base_chain: list[onnx.NodeProto], weight_type: int) -> None:
    """Exporters cast the LoRA sum (now `output`, made by the base chain) back to the layer's dtype:
    on the base output alone that is a no-op, and so is a cast up that the base output took to meet
    a float32 branch."""
    cast = graph.only_reader(output)
    if cast is None or cast.op_type != "Cast":
        return
    types = [weight_type]
    for node in base_chain:
        types.append(attribute(node, "to") if node.op_type == "Cast" else types[-1])
    last = base_chain[-1]
    if attribute(cast, "to") == types[-1]:
        graph.bypass(cast, output)
    elif last.op_type == "Cast" and attribute(cast, "to") == types[-2] and (types[-2], types[-1]) in _EXACT_UPCASTS:
        graph.bypass(cast, output)
        graph.bypass(last, last.input[0])


class MatMulFold(FoldRule[LoRABranch]):
    """`x @ W` with `W (in, out)`."""

    op_type = "MatMul"

    def weight_is_out_in(self, node: onnx.NodeProto) -> bool:
        return False


class GemmFold(FoldRule[LoRABranch]):
    """`alpha * x @ op(W) + beta * C`, `op(W) = W.T` when `transB=1` (then `W (out, in)`)."""

    op_type = "Gemm"

    def weight_is_out_in(self, node: onnx.NodeProto) -> bool:
        return bool(attribute(node, "transB", 0))

    def alpha(self, node: onnx.NodeProto) -> float:
        return float(attribute(node, "alpha", 1.0))

    def check(self, graph: Graph, branch: LoRABranch) -> str | None:
        if self.alpha(branch.base) == 0:
            return "the base Gemm has alpha=0"
        return super().check(graph, branch)


class GatherFold(MatMulFold):
    """An embedding: `Gather(W, ids)` picks rows of `W (num, dim)`, a MatMul by one-hot ids.

    The reference's embedding merge `W + s * (B @ A).T` is the linear merge in this `(in, out)`
    layout, so the MatMul rule's arithmetic applies unchanged.
    """

    op_type = "Gather"


class ConvFold(FoldRule[LoRABranch]):
    """A 2-D convolution: ONNX stores `W (out, in/groups, kh, kw)`, A and B as the reference does."""

    op_type = "Conv"

    def weight_is_out_in(self, node: onnx.NodeProto) -> bool:
        return True

    def reference_factors(self, branch: LoRABranch, read_tensor: ReadTensor) -> tuple[np.ndarray, np.ndarray]:
        return read_tensor(branch.lora_a.initializer), read_tensor(branch.lora_b.initializer)

    def merged_weight(
        self, branch: LoRABranch, weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray
    ) -> np.ndarray:
        return reference.merge(weight, lora_a, lora_b, branch.scale, layer="conv2d", overwrite_w=True)


RULES = {rule.op_type: rule for rule in (MatMulFold(), GemmFold(), GatherFold(), ConvFold())}


def reference_factors(lora_a: Factor, lora_b: Factor, read_tensor: ReadTensor) -> tuple[np.ndarray, np.ndarray]:
    """A `(r, in)` and B `(out, r)` in the reference layout, from how the products read them."""
    stored_a, stored_b = read_tensor(lora_a.initializer), read_tensor(lora_b.initializer)
    return (stored_a if lora_a.transposed else stored_a.T), (stored_b if lora_b.transposed else stored_b.T)


@dataclasses.dataclass
class Fold(Generic[BranchT]):
    """A branch folded in the graph; `target` receives `merged_weight()` when the model is written.

    `previous` is the fold that already merged another branch into the same base weight (two
    adapters active at once): this one then starts from that merged value.
    """

    branch: BranchT
    rule: FoldRule[BranchT]
    target: str
    previous: Fold[Any] | None = None

    @property
    def name(self) -> str:
        return self.branch.name

    def describe(self) -> str:
        return self.rule.describe(self)

    def merged_weight(self, read_tensor: ReadTensor, check: LayerCheck | None = None) -> np.ndarray:
        """The target's new value, merged in the array `read_tensor` returned for the weight.

        `read_tensor` must return a fresh array per call (as `TensorSource.read` does): the merge
        overwrites it rather than copy a weight that may be hundreds of megabytes. `check(fold,
        weight, lora_a, lora_b)` sees every operand, read once, before the merge and returns
        what is then called with the merged value.
        """
        lora_a, lora_b = self.rule.reference_factors(self.branch, read_tensor)
        weight = self.previous.merged_weight(read_tensor, check) if self.previous else read_tensor(self.branch.weight)
        compare = check(self, weight, lora_a, lora_b) if check is not None else None
        merged = self.rule.merged_weight(self.branch, weight, lora_a, lora_b)
        if compare is not None:
            compare(merged)
        return merged


def shared_reshape_outputs(graph: Graph) -> set[str]:
    """Outputs of `Reshape`s that a `Reshape` and other nodes read: `rejoin_reshapes` candidates, noted
    before folding."""
    return {
        node.output[0]
        for node in graph.nodes
        if node.op_type == "Reshape"
        and len(graph.consumers.get(node.output[0], ())) > 1
        and any(reader.op_type == "Reshape" for reader in graph.consumers[node.output[0]])
    }


def rejoin_reshapes(graph: Graph, shared: set[str]) -> None:
    """Reshape straight from the source where folding left a `Reshape` read by a `Reshape` alone.

    A LoRA branch that reads a reshaped activation (GPT-2's `Conv1D` views its 3-D input as rows)
    keeps the exporter from merging the two reshapes, as it does in the base model's export; once
    the branch is gone, `Reshape(Reshape(x, s1), s2)` is `Reshape(x, s2)` for a constant `s2`
    without 0s (which copy a dim of the input; always, with `allowzero`).
    """
    for tensor in shared:
        first = graph.producer.get(tensor)
        readers = graph.consumers.get(tensor, [])
        if first is None or len(readers) != 1 or tensor in graph.graph_outputs:
            continue
        (second,) = readers
        target_shape = graph.constant(second.input[1]) if second.op_type == "Reshape" else None
        if second.input[0] != tensor or target_shape is None:
            continue
        if attribute(second, "allowzero", 0) or not np.any(target_shape == 0):
            graph.replace_input(second, 0, first.input[0])


def fuse_conv_bias_adds(graph: Graph, folds: Sequence[Fold[Any]], values: Mapping[str, object]) -> dict[str, ReadValue]:
    """Move the bias `Add` after each folded bias-free `Conv` into the `Conv`; the new biases' values by name.

    tf2onnx fuses a Keras `Conv2D`'s bias into the `Conv` of a base model, but not into one whose output
    a LoRA branch joins first, so the merged graph would keep one `Add` per layer that the base export lacks.
    A constant that another fold rewrites (in `values`) stays where it is.
    """
    biases: dict[str, ReadValue] = {}
    for fold in folds:
        conv = fold.branch.base
        output = conv.output[0]
        readers = graph.consumers.get(output, [])
        if conv.op_type != "Conv" or (len(conv.input) > 2 and conv.input[2]) or len(readers) != 1:
            continue
        (add,) = readers
        if add.op_type != "Add" or len(add.input) != 2 or output in graph.graph_outputs:
            continue
        stored = graph.initializer_behind(add.input[1] if add.input[0] == output else add.input[0])
        if stored is None or stored in values:
            continue
        weight, bias = graph.initializers[fold.target], graph.initializers[stored]
        channels, spatial = weight.dims[0], len(weight.dims) - 2
        shape = list(bias.dims)
        per_channel = len(shape) <= spatial + 2 and shape[-spatial - 1 :] == [channels] + [1] * spatial
        if not per_channel or set(shape[: -spatial - 1]) - {1} or bias.data_type != weight.data_type:
            continue
        value = np.asarray(graph.read_tensor(stored)).reshape(channels)
        fused = graph.copy_initializer(stored, f"{stored}.conv_bias")
        graph.initializers[fused].dims[:] = [channels]
        graph.append_input(conv, fused)
        graph.bypass(add, output)
        biases[fused] = functools.partial(np.asarray, value)
    return biases


# A pattern: its branches and the reasons near-matches were refused; and its rules by base op.
Finder = Callable[[Graph], tuple[list, list[str]]]


def fold_all(
    graph: Graph, patterns: Sequence[tuple[Finder, Mapping[str, FoldRule[Any]]]]
) -> tuple[list[Fold[Any]], list[str]]:
    """Fold every branch a rule accepts, pattern after pattern, again until none is left (stacked
    adapters fold one per pass); returns the folds and the reasons for the branches refused in the
    last pass."""
    folds: list[Fold[Any]] = []
    while True:
        folded, refusals = False, []
        for find_branches, rules in patterns:
            branches, reasons = find_branches(graph)
            refusals += reasons
            for branch in branches:
                rule = rules[branch.base.op_type]
                reason = rule.check(graph, branch)
                if reason:
                    refusals.append(f"{branch.name}: {reason}")
                    continue
                previous = next((fold for fold in reversed(folds) if fold.target == branch.weight), None)
                folds.append(Fold(branch, rule, rule.rewrite(graph, branch), previous))
                folded = True
        if not folded:
            return folds, refusals
