"""The DoRA rule: a DoRA layer's whole expression folds into its base product's weight (and bias).

A DoRA layer (`lora_spec.dora`) computes, in evaluation, `f * (x W + s * x A B) + b` with `f = m/n`
per output feature, where the norm `n = ||W + s * B @ A||` depends on weights only. Exporters
write it in several forms:

- PEFT, PyTorch's TorchScript exporter: `base(x) + ((f - 1) * (base(x) - b) + (f * (x A B)) * s)`,
  with `f` computed in the graph from the weights (`EyeLike`, `MatMul`s, `ReduceL2`, `Div` of the
  magnitude, `Reshape`); a layer without bias has `(f - 1) * base(x)`; a convolution's `b` and
  `f` are `(1, out, 1, 1)`.
- PEFT, the dynamo exporter: the same sum with `f` and `f - 1` folded into `(1, out)` initializers.
- PEFT's embedding: `f * W[ids] + (f * (A.T[ids] @ B.T)) * s`.
- Keras's DoRA layers (to come with the backend's DoRA), exported by tf2onnx, are expected to read
  `(x @ kernel) * f + ((x @ lora_a) @ lora_b) * (s * f)` plus the bias (`Add` after the sum, or
  inside the base chain), with `f` computed from the variables or folded by tf2onnx: the same
  algebra, and the rule reads it without a pattern of its own (untested until that backend exists).

Rather than one pattern per form, the rule reads the expression that joins a base product and a
low-rank product pair as an affine sum `y = sum_i c_i * leaf_i` (`Add`, `Sub`, `Neg`, `Mul` and
`Div` by constants, float `Cast`s, `Identity`, inference `Dropout`, `Reshape`s that keep the last
dim), whose leaves are the base output (the base product with its bias `Add`s and `Cast`s), the
low-rank pair's output, and constants. A constant is any tensor computed from initializers alone,
evaluated by onnx's reference evaluator whatever ops made it; each coefficient must act per
output feature (a scalar, `(out,)`, `(1, out)`, or for a convolution `(1, out, 1, 1)`). With `C`
the base's total coefficient, `D` the pair's and `K` the constants' sum:

    y = C * (x W + b) + D * (x A B) + K  =  x (C * W + D * B @ A) + (C * b + K)

that is the base product with the weight `lora_spec.dora.merge_with_feature_scales(W, A, B, C, D)`
and the bias `C * b + K` (kept when the algebra leaves it as it was). The merged graph has
exactly the base model's nodes. An expression that the LoRA rule folds (`C = 1` and one `D` for
every feature) is left to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import onnx

from lora_spec import dora
from lora_spec.export.fold import RULES, Fold, FoldRule, ReadTensor, drop_no_op_casts
from lora_spec.export.graph import Graph, attribute
from lora_spec.export.patterns import (
    BASE_OPS,
    WEIGHT_INPUT,
    WEIGHT_RANK,
    Factor,
    LoRABranch,
    base_chain_to,
    base_dims,
    low_rank_chain,
    pair_mismatch,
    passthrough_input,
)

# Reading stops beyond this many nodes: a DoRA layer's expression has about ten.
_MAX_NODES = 64


@dataclasses.dataclass(frozen=True)
class Term:
    """`sign * prod(factors) / prod(divisors) * leaf`, one summand of an affine expression.

    `path` holds the tensors from the expression's output down to the leaf.
    """

    leaf: str
    sign: float
    factors: tuple[str, ...]
    divisors: tuple[str, ...]
    path: tuple[str, ...]


class AffineExpression:
    """The tensor `output` read as a sum of `Term`s, stopping at constants, products and `stops`.

    `terms` is None when the expression is not affine in its leaves (an activation, a product of
    two computed tensors, too many nodes); `nodes` are the nodes it consists of.
    """

    def __init__(self, graph: Graph, output: str, stops: Iterable[str] = ()) -> None:
        self.graph, self.stops = graph, set(stops)
        self.nodes: dict[int, onnx.NodeProto] = {}
        self.visits = 0
        self.terms = self._read(output, Term(output, 1.0, (), (), ()))

    def _read(self, tensor: str, term: Term) -> list[Term] | None:
        term = dataclasses.replace(term, leaf=tensor, path=(*term.path, tensor))
        graph = self.graph
        node = graph.producer.get(tensor)
        if tensor in self.stops or graph.is_constant(tensor) or node is None or node.op_type in BASE_OPS:
            return [term]
        self.visits += 1  # a tensor read twice is walked twice: bound the walk, not only the nodes
        if len(self.nodes) >= _MAX_NODES or self.visits > 4 * _MAX_NODES:
            return None
        self.nodes[id(node)] = node
        # Any Reshape: tf2onnx's Keras EinsumDense splits the features into heads on both sides, and a
        # coefficient after a Reshape must still act per feature (`_per_feature`).
        following = node.input[0] if node.op_type == "Reshape" else passthrough_input(graph, node)
        if following is not None:
            return self._read(following, term)
        op, inputs = node.op_type, list(node.input)
        if op == "Neg":
            return self._read(inputs[0], dataclasses.replace(term, sign=-term.sign))
        if op in ("Add", "Sub") and len(inputs) == 2:
            first = self._read(inputs[0], term)
            second = self._read(inputs[1], dataclasses.replace(term, sign=-term.sign) if op == "Sub" else term)
            return None if first is None or second is None else first + second
        if op == "Mul" and len(inputs) == 2:
            for constant, other in ((inputs[1], inputs[0]), (inputs[0], inputs[1])):
                if graph.is_constant(constant):
                    return self._read(other, dataclasses.replace(term, factors=(*term.factors, constant)))
        if op == "Div" and len(inputs) == 2 and graph.is_constant(inputs[1]):
            return self._read(inputs[0], dataclasses.replace(term, divisors=(*term.divisors, inputs[1])))
        return None


# A bias to change and its new value: `(the node holding it, its input index, value)`, or, when the
# expression's last node adds it, `(None, the initializer that held it, value)`.
BiasUpdate = tuple[onnx.NodeProto, int, np.ndarray] | tuple[None, str, np.ndarray]


@dataclasses.dataclass
class DoRABranch(LoRABranch):
    """A matched DoRA expression: a `LoRABranch` whose `add` is the expression's last node, plus the
    per-feature constants.

    The base chain takes over `add`'s output; `scale` is the low-rank pair's own; `weight_scale` (C) and `delta_scale`
    (D, `scale` included) are per output feature; `expression` holds the nodes that go; `bias` is the bias input to
    change and its new value, or None. When the base chain has no bias but the expression adds one
    (TensorFlow's graph optimizer moves a bias onto the low-rank side of the sum: `f * base + (pair + b)`),
    `bias` is `(None, the initializer that held it, new value)`, and `add` stays to add it.
    """

    weight_scale: np.ndarray
    delta_scale: np.ndarray
    expression: list[onnx.NodeProto]
    bias: BiasUpdate | None
    rescaled: bool = True  # False: plain LoRA whose bias the expression adds, no DoRA layer


def find_dora_branches(graph: Graph) -> tuple[list[DoRABranch], list[str]]:
    """Every DoRA expression of `graph` and the reasons DoRA-shaped ones were refused.

    An expression ends at an `Add` or `Sub` of two computed tensors: where the base and the update
    last join. Nodes applied to the whole sum after it (a bias `Add`, a scale, an activation's first
    step) stay, so that the merged graph keeps the base model's nodes. Expressions are read from the
    last node back, so a layer's outermost one is found first and its nodes are not read again as
    parts of smaller ones.
    """
    branches: list[DoRABranch] = []
    refusals: list[str] = []
    taken: set[int] = set()
    for node in reversed(graph.nodes):
        if (
            node.op_type not in ("Add", "Sub")
            or len(node.input) != 2
            or id(node) in taken
            or graph.producer.get(node.output[0]) is not node
            or any(map(graph.is_constant, node.input))
        ):
            continue
        found = match(graph, node)
        if found is None:
            continue
        if isinstance(found, DoRABranch):
            branches.append(found)
            taken.update(id(part) for part in found.expression)
        else:
            reason, expression = found
            refusals.append(f"{node.name or node.output[0]}: {reason}")
            taken.update(expression)
    return branches, refusals


def match(graph: Graph, node: onnx.NodeProto) -> DoRABranch | tuple[str, set[int]] | None:
    """The DoRA branch whose expression ends at `node`, `(reason, its nodes)` when it is refused,
    or None when it is not one (not affine, not one base product and one low-rank pair, or plain LoRA)."""
    output = node.output[0]
    products = AffineExpression(graph, output)
    if products.terms is None:
        return None
    leaves = list(dict.fromkeys(term.leaf for term in products.terms if not graph.is_constant(term.leaf)))
    found = _base_and_pair(graph, leaves)
    if found is None:
        return None
    base, weight, lora_leaf, (factors, pair_scale, branch_input, reshaped) = found
    refused = lambda reason: (reason, set(products.nodes))  # noqa: E731
    chain = _base_output_chain(graph, [term.path for term in products.terms if term.leaf == base.output[0]], base)
    if chain is None:
        return refused("the base product's output is not read as one tensor")
    base_output = chain[-1].output[0]
    expression = AffineExpression(graph, output, stops={base_output})
    if expression.terms is None or _read_elsewhere(graph, expression.nodes.values(), set(expression.nodes), output):
        return None  # its parts are needed elsewhere: the layer ends at an inner node, or cannot fold
    reason = pair_mismatch(graph, base, weight, factors, branch_input, reshaped)
    if reason:
        return refused(reason)
    convolution = base.op_type == "Conv"
    if convolution and any(part.op_type == "Reshape" for part in expression.nodes.values()):
        return refused("a Reshape moves a convolution's channels")
    features = graph.initializers[weight].dims[0] if convolution else base_dims(graph, base, weight)[1]
    sums = _coefficient_sums(graph, expression.terms, base_output, lora_leaf, features, convolution)
    if isinstance(sums, str):
        return refused(sums)
    weight_scale, delta_scale, constant, by_vector = sums
    # Plain LoRA, scaled by scalars only: the LoRA rule's. Not a DoRA factor that happens to be 1 (a DoRA
    # layer exported untrained), which the LoRA rule does not read, nor plain LoRA plus a bias that TensorFlow's
    # graph optimizer moved onto the low-rank side (`x W + (x A B + b)`, Keras's LoRA layers): this rule's.
    rescaled = not np.all(weight_scale == 1) or not np.all(delta_scale == delta_scale[0]) or by_vector
    if not rescaled and not constant.any():
        return None
    bias = _bias_update(graph, chain, weight_scale, constant, features, expression.terms)
    if isinstance(bias, str):
        return refused(bias)
    lora_a, lora_b = factors
    return DoRABranch(
        add=node,
        base=base,
        weight=weight,
        lora_a=lora_a,
        lora_b=lora_b,
        scale=pair_scale,
        base_output=base_output,
        base_chain=chain,
        base_shared=_read_elsewhere(graph, chain, set(expression.nodes) | set(map(id, chain))),
        weight_scale=weight_scale,
        delta_scale=delta_scale * pair_scale,
        expression=list(expression.nodes.values()),
        bias=bias,
        rescaled=rescaled,
    )


def _base_and_pair(
    graph: Graph, leaves: list[str]
) -> tuple[onnx.NodeProto, str, str, tuple[list[Factor], float, str, bool]] | None:
    """`(base product, its weight, the pair's output, low_rank_chain(...))` when the two computed
    leaves are one base product on an initializer and one low-rank pair, else None."""
    if len(leaves) != 2:
        return None
    for base_leaf, pair_leaf in (leaves, leaves[::-1]):
        reader = graph.only_reader(pair_leaf)
        pair = low_rank_chain(graph, pair_leaf, reader) if reader is not None else None
        base = graph.producer.get(base_leaf)
        if pair is None or base is None:
            continue
        weight = graph.initializer_behind(base.input[WEIGHT_INPUT[base.op_type]])
        if (
            weight is None
            or len(graph.initializers[weight].dims) != WEIGHT_RANK[base.op_type]
            or (base.op_type == "Gather" and attribute(base, "axis", 0) != 0)
        ):
            continue
        return base, weight, pair_leaf, pair
    return None


def _base_output_chain(graph: Graph, paths: list[tuple[str, ...]], base: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """The nodes from the base product to the tensor every path to it goes through, nearest the
    expression's output, that is a base chain (bias `Add`s, `Cast`s, `Identity`, `Reshape`s that keep
    the last dim), possibly ending with a `Reshape` that splits the features (into heads)."""
    for tensor in paths[0]:
        if all(tensor in path for path in paths[1:]):
            last = graph.producer.get(tensor)
            if last is not None and last.op_type == "Reshape" and passthrough_input(graph, last) is None:
                found, split = base_chain_to(graph, last.input[0], last), [last]
            else:
                found, split = base_chain_to(graph, tensor, None), []
            if isinstance(found, tuple) and found[0][0] is base:
                return found[0] + split
    return None


def _read_elsewhere(graph: Graph, nodes: Iterable[onnx.NodeProto], inside: set[int], output: str = "") -> bool:
    """Whether a tensor that `nodes` make, other than `output`, is a graph output or read by a node
    whose id is not in `inside` (deleting or changing it would change that reader)."""
    return any(
        tensor in graph.graph_outputs or any(id(reader) not in inside for reader in graph.consumers.get(tensor, ()))
        for node in nodes
        for tensor in node.output
        if tensor and tensor != output
    )


def _per_feature(value: np.ndarray, features: int, convolution: bool) -> np.ndarray | None:
    """A coefficient as a `(features,)` vector, or None when it varies along anything but the output
    features: a convolution's channels (the third axis from the end), or the last axis, or the last
    axes when a Reshape in the base chain split the features (into heads, as tf2onnx's Keras
    `EinsumDense` projections do; a Reshape splits row-major, so the coefficient flattens the same way)."""
    value = np.asarray(value, np.float64)
    if value.size == 1:
        return np.full(features, float(value.reshape(())))
    if value.size != features:
        return None
    if convolution:
        if value.ndim < 3 or value.shape[-3] != features:
            return None
    elif 1 in value.shape[next(index for index, size in enumerate(value.shape) if size != 1) :]:
        return None
    return value.reshape(-1).copy()


def _coefficient_sums(
    graph: Graph, terms: list[Term], base_output: str, pair_output: str, features: int, convolution: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool] | str:
    """`(C, D, K, whether the base or the pair is scaled by a vector)` per output feature, or the reason they
    cannot be read."""
    sums = {"base": np.zeros(features), "pair": np.zeros(features), "constant": np.zeros(features)}
    by_vector = False
    for term in terms:
        kind = "base" if term.leaf == base_output else "pair" if term.leaf == pair_output else "constant"
        if kind == "constant" and not graph.is_constant(term.leaf):
            return f"it adds {term.leaf}, which is neither the base output nor the low-rank branch"
        values = _evaluated(graph, term.factors + term.divisors + ((term.leaf,) if kind == "constant" else ()))
        if isinstance(values, str):
            return values
        coefficient = np.float64(term.sign)
        for name in term.factors + ((term.leaf,) if kind == "constant" else ()):
            coefficient = coefficient * values[name].astype(np.float64)
        for name in term.divisors:
            coefficient = coefficient / values[name].astype(np.float64)
        vector = _per_feature(coefficient, features, convolution)
        if vector is None:
            return f"a constant of shape {np.shape(coefficient)} does not act per output feature"
        sums[kind] += vector
        by_vector = by_vector or (kind != "constant" and np.size(coefficient) > 1)
    if not np.all(np.isfinite(np.concatenate(list(sums.values())))):
        return "its per-feature scales are not finite"
    return sums["base"], sums["pair"], sums["constant"], by_vector


def _evaluated(graph: Graph, names: tuple[str, ...]) -> dict[str, np.ndarray] | str:
    """The values of constants `names`, ancestors first (the graph keeps them: `f - 1` starts from `f`)."""
    order = {id(node): index for index, node in enumerate(graph.nodes)}
    values: dict[str, np.ndarray] = {}
    for name in sorted(set(names), key=lambda item: order.get(id(graph.producer.get(item)), -1)):
        value = graph.evaluate_constant(name)
        if value is None:
            return f"its constant {name} cannot be evaluated"
        values[name] = value
    return values


def _bias_holders(graph: Graph, chain: list[onnx.NodeProto]) -> list[tuple[onnx.NodeProto, int, float]]:
    """`(node, input index, factor)` of each bias the base chain adds (Gemm's C times beta, a Conv's
    bias, the constant of a bias `Add`)."""
    holders: list[tuple[onnx.NodeProto, int, float]] = []
    base = chain[0]
    if base.op_type in ("Gemm", "Conv") and len(base.input) > 2 and base.input[2]:
        holders.append((base, 2, float(attribute(base, "beta", 1.0)) if base.op_type == "Gemm" else 1.0))
    for node in chain[1:]:
        if node.op_type == "Add":
            holders.append((node, next(index for index in (0, 1) if graph.initializer_behind(node.input[index])), 1.0))
    return holders


def _bias_update(
    graph: Graph,
    chain: list[onnx.NodeProto],
    weight_scale: np.ndarray,
    constant: np.ndarray,
    features: int,
    terms: list[Term],
) -> BiasUpdate | str | None:
    """The bias the base chain adds, with `C * b + K`: `(holder node, input index, new value)`, None when
    it stays as it is, `(None, initializer, K)` when the chain has none and the expression adds one
    initializer of a value per feature (the last node will add it), or the reason it cannot hold the
    expression's constants."""
    holders = _bias_holders(graph, chain)
    if not holders:
        if np.all(constant == 0):
            return None
        added = [graph.initializer_behind(term.leaf) for term in terms if graph.is_constant(term.leaf)]
        if len(added) != 1 or added[0] is None or math.prod(graph.initializers[added[0]].dims) != features:
            return "it adds a constant, and the base product has no bias to hold it"
        initializer = graph.initializers[added[0]]
        return (
            None,
            added[0],
            constant.reshape(tuple(initializer.dims)).astype(
                onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type)
            ),
        )
    if len(holders) > 1:
        return "the base chain adds two biases"
    holder, index, factor = holders[0]
    stored = graph.evaluate_constant(holder.input[index])
    # A Conv's own bias input is a plain vector; everything else broadcasts against the output.
    old = (
        None
        if stored is None
        else _per_feature(
            stored * factor, features, convolution=chain[0].op_type == "Conv" and holder.op_type != "Conv"
        )
    )
    if stored is None or old is None:
        return "the base product's bias does not act per output feature"
    new = ((weight_scale * old + constant) / factor).astype(stored.dtype)
    if stored.size == new.size:
        new = new.reshape(stored.shape)
    elif np.all(new == new[0]):
        new = np.full(stored.shape, new[0], stored.dtype)
    else:
        return f"the bias of shape {stored.shape} cannot hold one value per output feature"
    if np.array_equal(new, stored):
        return None
    if graph.initializer_behind(holder.input[index]) is None:
        return "the bias to change is computed, not an initializer"
    return holder, index, new


class DoRAFoldRule(FoldRule[DoRABranch]):
    """Folds a `DoRABranch`: the base op's layout from its LoRA rule, the weight and bias per feature."""

    def __init__(self, lora_rule: FoldRule[LoRABranch]) -> None:
        self.lora_rule = lora_rule
        self.op_type = lora_rule.op_type

    def check(self, graph: Graph, branch: DoRABranch) -> str | None:
        return self.lora_rule.check(graph, branch)

    def weight_is_out_in(self, node: onnx.NodeProto) -> bool:
        return self.lora_rule.weight_is_out_in(node)

    def alpha(self, node: onnx.NodeProto) -> float:
        return self.lora_rule.alpha(node)

    def reference_factors(self, branch: DoRABranch, read_tensor: ReadTensor) -> tuple[np.ndarray, np.ndarray]:
        return self.lora_rule.reference_factors(branch, read_tensor)

    def output_scales(self, branch: DoRABranch) -> tuple[np.ndarray, np.ndarray]:
        return branch.weight_scale, branch.delta_scale

    def describe(self, fold: Fold[DoRABranch]) -> str:
        branch = fold.branch
        # After rewrite, a bias to change always has a node holding it.
        held = branch.bias
        change = "rescaled" if branch.rescaled else "added after the product"
        bias = f"; bias {held[0].input[held[1]]} {change}" if held is not None and held[0] is not None else ""
        pair = f"{branch.lora_a.initializer} @ {branch.lora_b.initializer}"
        update = (
            f"scaled per output feature (DoRA, {branch.weight_scale.min():.4g} to {branch.weight_scale.max():.4g}) "
            f"+= {pair}"
            if branch.rescaled
            else f"+= {branch.delta_scale[0]:g} * {pair}"
        )
        copied = "" if fold.target == branch.weight else f" (copied to {fold.target})"
        return f"{fold.name}: {branch.weight} {update}{copied}{bias}"

    def other_values(self, branch: DoRABranch) -> dict[str, np.ndarray]:
        bias = branch.bias
        if bias is None:
            return {}
        assert bias[0] is not None  # rewrite gave the bias a node to hold it
        holder, index, value = bias
        return {holder.input[index]: value}

    def merged_weight(
        self, branch: DoRABranch, weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray
    ) -> np.ndarray:
        """`C * W + (D / alpha) * delta` per output feature, in the node's layout and dtype."""
        # An (in, out) weight (MatMul, Gather's table) takes the update `(B @ A).T` and scales its
        # columns: the reference's embedding layout.
        layer = "linear" if self.weight_is_out_in(branch.base) else "embedding"
        if self.op_type == "Conv":
            layer = "conv2d"
        return dora.merge_with_feature_scales(
            weight,
            lora_a,
            lora_b,
            branch.weight_scale,
            branch.delta_scale / self.alpha(branch.base),
            layer,
            overwrite_w=True,
        )

    def rewrite(self, graph: Graph, branch: DoRABranch) -> str:
        """Delete the expression, let the base chain (copied when read elsewhere) produce its output,
        and point the base at the weight (and the bias holder at the bias) that will be merged."""
        if branch.base_shared:
            original = branch.base_chain
            branch.base_chain, branch.base_output = graph.duplicate_chain(original, before=branch.add)
            branch.base = branch.base_chain[0]
            bias = branch.bias
            if bias is not None and bias[0] is not None:
                holder, index, value = bias
                position = next(place for place, node in enumerate(original) if node is holder)
                branch.bias = (branch.base_chain[position], index, value)
        # The last node reads the base output first, so that deleting the rest keeps the base chain.
        graph.replace_input(branch.add, 0, branch.base_output)
        bias = branch.bias
        if bias is not None and bias[0] is None:
            # It stays, as the bias Add of the merged layer, reading its own copy of the bias.
            _, held_by, value = bias
            graph.replace_input(branch.add, 1, graph.copy_initializer(held_by, f"{held_by}.merged"))
            branch.bias = (branch.add, 1, -value if branch.add.op_type == "Sub" else value)
            graph.remove([node for node in branch.expression if node is not branch.add])
        else:
            graph.remove([node for node in branch.expression if node is not branch.add])
            graph.bypass(branch.add, branch.base_output)
        target = _own_initializer(graph, branch.base, WEIGHT_INPUT[self.op_type], branch.weight)
        bias = branch.bias
        if bias is not None:
            assert bias[0] is not None  # given a node above
            holder, index, _ = bias
            held = graph.initializer_behind(holder.input[index])
            assert held is not None  # _bias_update changes only a bias held by an initializer
            _own_initializer(graph, holder, index, held)
        drop_no_op_casts(graph, branch.add.output[0], branch.base_chain, graph.initializers[target].data_type)
        return target


def _own_initializer(graph: Graph, node: onnx.NodeProto, index: int, name: str) -> str:
    """Make `node` read initializer `name` at `index` directly, through a copy when others read it too."""
    target = name if graph.initializer_readers(name) <= 1 else graph.copy_initializer(name, f"{name}.merged")
    if node.input[index] != target:
        graph.replace_input(node, index, target)
    return target


DORA_RULES = {op: DoRAFoldRule(rule) for op, rule in RULES.items()}
