"""Matching LoRA branches: `base(x) + scale * ((x @ A) @ B)` in the forms exporters emit.

A match starts at an `Add`. One side must lead back to the base product (`MatMul` or `Gemm` on
an initializer, or for embeddings a `Gather` of rows of a table), possibly through a bias `Add`
and the `Reshape`s Keras/tf2onnx wraps around 3-D products (or a `Reshape` on each side alike, as
`EinsumDense` splits heads); the other side to exactly two products on initializers (the low-rank A then B),
possibly through `Mul`/`Div` by scalar constants (anywhere on the branch), `Cast`s between float
types, inference-mode `Dropout`, `Identity` and `Reshape`s that keep the last dimension (for an
embedding, A is a `Gather` of the transposed A table by the same ids; for a 2-D convolution, A
is a `Conv` with the base's geometry and B a grouped 1x1 `Conv`). Both sides must read the same
activation. Every tensor between the products and the `Add` must have
no other reader, or deleting the branch (or changing the base weight) would change it too.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx

from lora_spec.export.graph import FLOAT_TYPES, Graph, attribute

BASE_OPS = ("MatMul", "Gemm", "Gather", "Conv")
# Which input of a base op holds the weight and which the activation (Gather: the table and the ids).
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0, "Conv": 1}
ACTIVATION_INPUT = {"MatMul": 0, "Gemm": 0, "Gather": 1, "Conv": 0}
WEIGHT_RANK = {"MatMul": 2, "Gemm": 2, "Gather": 2, "Conv": 4}
_CONV_GEOMETRY = (("strides", None), ("pads", None), ("dilations", None), ("group", 1), ("auto_pad", b"NOTSET"))


@dataclasses.dataclass(frozen=True)
class Factor:
    """One low-rank matrix: the initializer a product reads, and whether the product transposes it."""

    initializer: str
    transposed: bool
    gathered: bool = False  # an embedding's A: rows of `(num, r)` picked by ids, not a product
    conv: onnx.NodeProto | None = dataclasses.field(default=None, compare=False)  # the Conv applying it


@dataclasses.dataclass
class LoRABranch:
    """A matched LoRA branch: the joining `Add`, the base product, and the branch's factors.

    `lora_a` maps the input features to the rank and `lora_b` the rank to the output features;
    `scale` is the product of the branch's constant multipliers (Gemm `alpha`s included).
    `base_output` is the `Add`'s input coming from the base side, `base_chain` the nodes from the
    base product to it; `base_shared` says something else reads them (an exporter's common
    subexpression elimination merges equal base products of layers that differ only in LoRA).
    """

    add: onnx.NodeProto
    base: onnx.NodeProto
    weight: str
    lora_a: Factor
    lora_b: Factor
    scale: float
    base_output: str
    base_chain: list[onnx.NodeProto]
    base_shared: bool

    @property
    def name(self) -> str:
        return self.base.name or self.base.output[0]


def find_branches(graph: Graph) -> tuple[list[LoRABranch], list[str]]:
    """Every LoRA branch of `graph`, and the reasons near-matches were refused (for the user)."""
    branches: list[LoRABranch] = []
    refusals: list[str] = []
    for node in graph.nodes:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        reasons: list[str] = []
        for base_side in (0, 1):
            found = match(graph, node, node.input[base_side], node.input[1 - base_side])
            if isinstance(found, LoRABranch):
                branches.append(found)
                break
            if found:
                reasons.append(found)
        else:
            refusals.extend(f"{node.name or node.output[0]}: {reason}" for reason in reasons)
    return branches, refusals


def no_branch_reason(graph: Graph, refused: list[str]) -> str:
    """Why `graph` gave no branch to fold, as " (reason)" for the user's one line, or "": how the model was
    exported when that rules every branch out (no weights, dropout in training mode), else the first refusal."""
    if not graph.initializers:
        return " (it holds no weights: export the model with its parameters, torch.onnx.export's export_params=True)"
    if any(_drops_in_training(graph, node) for node in graph.nodes):
        return " (its Dropout runs in training mode: export the model after model.eval())"
    return f" ({refused[0]})" if refused else ""


def _drops_in_training(graph: Graph, node: onnx.NodeProto) -> bool:
    """Whether `node` is a Dropout whose training_mode input is constant true (a training-mode export)."""
    if node.op_type != "Dropout" or len(node.input) < 3 or not node.input[2]:
        return False
    training_mode = graph.constant(node.input[2])
    return training_mode is not None and bool(np.all(training_mode))


def unrecognised_low_rank_products(graph: Graph) -> list[str]:
    """Notes on product pairs through a low rank (LoRA-like) that no branch took, for the user.

    Folding leaves them in the graph: the model stays right but keeps their cost, so the user
    hears of them. A pair already refused with a reason is not repeated.
    """
    notes = []
    for node in graph.nodes:
        if node.op_type == "Conv":
            note = _unfolded_conv_pair(graph, node)
            notes += [note] if note else []
            continue
        second = _product(graph, node, lora_a=False) if node.op_type in ("MatMul", "Gemm") else None
        if second is None or graph.producer.get(node.output[0]) is not node:
            continue
        first = graph.producer.get(_before_scalings(graph, second[2]))
        if first is None or first.op_type not in ("MatMul", "Gemm"):
            continue
        found = _product(graph, first, lora_a=False)
        if found is None:
            continue
        (features_in, rank), (_, features_out) = matrix_dims(graph, found[0]), matrix_dims(graph, second[0])
        if 2 * rank > min(features_in, features_out) or _joins_a_refused_add(graph, node):
            continue
        notes.append(
            f"{node.name or node.output[0]}: a rank-{rank} product pair ({first.name or first.output[0]} "
            "then this) is not added to a base product in a form lora-export knows, so it stays unmerged"
        )
    return notes


def _unfolded_conv_pair(graph: Graph, node: onnx.NodeProto) -> str | None:
    """A note on `node` when it is a LoRA B convolution (1x1, no bias) of a LoRA A convolution through a low rank
    that no branch took, else None. PEFT adapts 1-D and 3-D convolutions too, which lora-export does not fold."""
    second = _conv_weight(graph, node)
    first = graph.producer.get(_before_scalings(graph, node.input[0]))
    if second is None or first is None or graph.producer.get(node.output[0]) is not node:
        return None
    lora_a = _conv_weight(graph, first) if first.op_type == "Conv" else None
    if lora_a is None or len(lora_a) != len(second) or set(second[2:]) != {1}:
        return None
    rank, in_per_group, *kernel = lora_a
    if 2 * rank > min(in_per_group * math.prod(kernel), second[0]) or _joins_a_refused_add(graph, node):
        return None
    first_name = first.name or first.output[0]
    pair = f"{node.name or node.output[0]}: a rank-{rank} pair of {len(kernel)}-D convolutions ({first_name} then this)"
    if len(kernel) != 2:
        return f"{pair} stays unmerged: lora-export folds LoRA on 2-D convolutions only"
    return f"{pair} is not added to a base convolution in a form lora-export knows, so it stays unmerged"


def _conv_weight(graph: Graph, node: onnx.NodeProto) -> list[int] | None:
    """The dims of the initializer a bias-free `Conv` applies, else None."""
    weight = graph.initializer_behind(node.input[1]) if len(node.input) > 1 else None
    if weight is None or (len(node.input) > 2 and node.input[2]):
        return None
    dims = list(graph.initializers[weight].dims)
    return dims if len(dims) >= 3 else None


def _before_scalings(graph: Graph, tensor: str) -> str:
    """Walk back from `tensor` over no-op nodes and scalar scalings."""
    while tensor in graph.producer:
        node = graph.producer[tensor]
        following = passthrough_input(graph, node)
        if following is None:
            scaling = _scaling(graph, node)
            following = scaling[1] if scaling else None
        if following is None:
            return tensor
        tensor = following
    return tensor


def _joins_a_refused_add(graph: Graph, node: onnx.NodeProto) -> bool:
    reader = graph.only_reader(node.output[0])
    while (
        reader is not None
        and reader.op_type != "Add"
        and (passthrough_input(graph, reader) is not None or _scaling(graph, reader) is not None)
    ):
        reader = graph.only_reader(reader.output[0])
    return (
        reader is not None
        and reader.op_type == "Add"
        and len(reader.input) == 2
        and any(isinstance(match(graph, reader, reader.input[side], reader.input[1 - side]), str) for side in (0, 1))
    )


def match(graph: Graph, add: onnx.NodeProto, base_side: str, branch_side: str) -> LoRABranch | str | None:
    """The branch joined by `add`, the reason it is refused, or None when it is not LoRA-shaped."""
    paired = _paired_reshapes(graph, add, base_side, branch_side)
    base_start, base_reader = (paired[0].input[0], paired[0]) if paired else (base_side, add)
    branch_start, branch_reader = (paired[1].input[0], paired[1]) if paired else (branch_side, add)
    chain = low_rank_chain(graph, branch_start, branch_reader)
    if chain is None or graph.is_constant(base_start):
        # A product pair plus a constant is a layer's bias, not a near-miss: an embedding read by a
        # linear layer is a Gather then a MatMul, and its bias Add must not be reported as refused.
        return None
    factors, scale, branch_input, reshaped = chain
    found_chain = base_chain_to(graph, base_start, base_reader)
    if found_chain is None:
        return "the other input of the Add is not a MatMul/Gemm on an initializer"
    if isinstance(found_chain, str):
        return found_chain
    base_chain, base_shared = found_chain
    if paired:
        base_chain.append(paired[0])
        base_shared = base_shared or graph.only_reader(base_side) is not add
    base = base_chain[0]
    weight = graph.initializer_behind(base.input[WEIGHT_INPUT[base.op_type]])
    assert weight is not None  # base_chain_to ends a chain only at a product on an initializer
    reason = pair_mismatch(graph, base, weight, factors, branch_input, reshaped)
    if reason:
        return reason
    if not np.isfinite(scale):
        return f"the branch's scale is {scale}"
    lora_a, lora_b = factors
    return LoRABranch(
        add=add,
        base=base,
        weight=weight,
        lora_a=lora_a,
        lora_b=lora_b,
        scale=scale,
        base_output=base_side,
        base_chain=base_chain,
        base_shared=base_shared,
    )


def pair_mismatch(
    graph: Graph, base: onnx.NodeProto, weight: str, factors: list[Factor], branch_input: str, reshaped: bool
) -> str | None:
    """Why a base product and a low-rank pair (from `low_rank_chain`) are not one adapted layer, or None."""
    convolution = base.op_type == "Conv"
    if (convolution and reshaped) or any((factor.conv is not None) != convolution for factor in factors):
        return "a convolution and a matrix product are mixed in one branch"
    # Reshapes keep rows (the last dim) but move channels: a convolution's input must be the same tensor.
    base_input = activation_source(
        graph,
        base.input[ACTIVATION_INPUT[base.op_type]],
        reshapes=not convolution,
        transposed=base.op_type == "Gemm" and bool(attribute(base, "transA", 0)),
    )
    if base_input != activation_source(graph, branch_input, reshapes=not convolution):
        return "the LoRA branch and the base product read different inputs"
    lora_a, lora_b = factors
    if lora_a.gathered != (base.op_type == "Gather"):
        return "an embedding lookup and a matrix product are mixed in one branch"
    return (
        _conv_mismatch(graph, base, weight, lora_a, lora_b)
        if convolution
        else _shape_mismatch(graph, base, weight, lora_a, lora_b)
    )


def _paired_reshapes(
    graph: Graph, add: onnx.NodeProto, base_side: str, branch_side: str
) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The two `Reshape`s feeding `add` when both sides are reshaped alike, else None.

    Keras's `EinsumDense` (attention projections) splits its output into heads after the product,
    on the base and on the LoRA side, and tf2onnx keeps one `Reshape` per side. `reshape(P) +
    reshape(Q) == reshape(P + Q)` when P and Q have one shape and go to one target shape, so the
    branch is matched on the tensors before the reshapes.
    """
    base, branch = graph.producer.get(base_side), graph.producer.get(branch_side)
    if base is None or branch is None or base.op_type != "Reshape" or branch.op_type != "Reshape":
        return None
    if graph.only_reader(branch_side) is not add or attribute(base, "allowzero", 0) != attribute(
        branch, "allowzero", 0
    ):
        return None
    source_shape = graph.shape(base.input[0])
    if not source_shape or None in source_shape or source_shape != graph.shape(branch.input[0]):
        return None
    if base.input[1] != branch.input[1]:
        base_target, branch_target = graph.constant(base.input[1]), graph.constant(branch.input[1])
        if base_target is None or branch_target is None or not np.array_equal(base_target, branch_target):
            return None
    return base, branch


def low_rank_chain(graph: Graph, tensor: str, reader: onnx.NodeProto) -> tuple[list[Factor], float, str, bool] | None:
    """Walk back from `tensor` over two products on initializers: `(factors, scale, input)` or None."""
    factors: list[Factor] = []
    scale, reshaped = 1.0, False
    while len(factors) < 2:
        if graph.only_reader(tensor) is not reader:
            return None
        node = graph.producer.get(tensor)
        if node is None:
            return None
        step = passthrough_input(graph, node)
        reshaped = reshaped or (step is not None and node.op_type == "Reshape")
        if step is None:
            scaling = _scaling(graph, node)
            if scaling is not None:
                factor_scale, step = scaling
                scale *= factor_scale
        if step is None:
            product = _product(graph, node, lora_a=len(factors) == 1)
            if product is None:
                return None
            factor, alpha, step = product
            factors.insert(0, factor)
            scale *= alpha
        tensor, reader = step, node
    # A scale applied to the input before A belongs to the branch only while nothing else reads it.
    while graph.only_reader(tensor) is reader and tensor in graph.producer:
        node = graph.producer[tensor]
        scaling = _scaling(graph, node)
        if scaling is None:
            break
        scale *= scaling[0]
        tensor, reader = scaling[1], node
    return factors, scale, tensor, reshaped


def base_chain_to(
    graph: Graph, tensor: str, reader: onnx.NodeProto | None
) -> tuple[list[onnx.NodeProto], bool] | str | None:
    """`(nodes from the base product to tensor, read elsewhere?)`, through bias `Add`, `Identity`, `Reshape`,
    and `Cast` (PEFT adds a half-precision base output to the float32 branch after casting it up)."""
    chain: list[onnx.NodeProto] = []
    shared = False
    while True:
        shared = shared or graph.only_reader(tensor) is not reader
        node = graph.producer.get(tensor)
        if node is None:
            return None
        chain.insert(0, node)
        weight = graph.initializer_behind(node.input[WEIGHT_INPUT[node.op_type]]) if node.op_type in BASE_OPS else None
        if weight is not None:
            if len(graph.initializers[weight].dims) != WEIGHT_RANK[node.op_type]:
                return f"the base {node.op_type}'s weight has {len(graph.initializers[weight].dims)} dims"
            if node.op_type == "Gather" and attribute(node, "axis", 0) != 0:
                return "the base Gather does not pick rows of its table"
            return chain, shared
        if node.op_type == "Add":
            constant_sides = [index for index in (0, 1) if graph.initializer_behind(node.input[index]) is not None]
            if len(constant_sides) != 1:
                return None
            tensor, reader = node.input[1 - constant_sides[0]], node
            continue
        following = passthrough_input(graph, node)
        if following is None:
            return None
        tensor, reader = following, node


def passthrough_input(graph: Graph, node: onnx.NodeProto, casts: bool = True, reshapes: bool = True) -> str | None:
    """The input of a node that does not change the rows' values, else None."""
    op = node.op_type
    if op == "Identity":
        return node.input[0]
    if op == "Cast" and casts and attribute(node, "to") in FLOAT_TYPES:
        return node.input[0]
    if op == "Dropout" and _inference_dropout(graph, node):
        return node.input[0]
    if op == "Reshape" and reshapes and _keeps_last_dim(graph, node.input[0], node.output[0]):
        return node.input[0]
    return None


def _inference_dropout(graph: Graph, node: onnx.NodeProto) -> bool:
    mask_read = len(node.output) > 1 and node.output[1] and graph.readers(node.output[1])
    if mask_read:
        return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    training = graph.constant(node.input[2])
    return training is not None and not bool(np.asarray(training).any())


def _keeps_last_dim(graph: Graph, source: str, target: str) -> bool:
    """True when a reshape only regroups leading dims: it then acts on whole rows."""
    before, after = graph.shape(source), graph.shape(target)
    if not before or not after:
        return False
    # Equal sizes, or the same symbolic dim (shape inference names one unknown size once).
    return bool(before[-1]) and before[-1] == after[-1]


def _scaling(graph: Graph, node: onnx.NodeProto) -> tuple[float, str] | None:
    """`(factor, other input)` of a `Mul` or `Div` by a scalar constant, else None."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    sides = (1,) if node.op_type == "Div" else (1, 0)
    for side in sides:
        value = graph.constant(node.input[side])
        if value is not None and value.size == 1 and value.dtype.kind == "f":
            factor = float(value.reshape(()))
            if node.op_type == "Div":
                factor = 1.0 / factor if factor else float("inf")
            return factor, node.input[1 - side]
    return None


def _product(graph: Graph, node: onnx.NodeProto, lora_a: bool) -> tuple[Factor, float, str] | None:
    """`(factor, alpha, activation input)` of a MatMul or Gemm by a matrix initializer (or, for A, a
    Gather of its rows), else None."""
    if node.op_type not in BASE_OPS or (node.op_type == "Gather" and (not lora_a or attribute(node, "axis", 0))):
        return None
    weight = graph.initializer_behind(node.input[WEIGHT_INPUT[node.op_type]])
    if weight is None or len(graph.initializers[weight].dims) != WEIGHT_RANK[node.op_type]:
        return None
    if node.op_type == "Conv":
        has_bias = len(node.input) > 2 and node.input[2]
        return None if has_bias else (Factor(weight, transposed=False, conv=node), 1.0, node.input[0])
    if node.op_type == "Gather":
        return Factor(weight, transposed=False, gathered=True), 1.0, node.input[1]
    if node.op_type == "MatMul":
        return Factor(weight, transposed=False), 1.0, node.input[0]
    if attribute(node, "transA", 0) or (len(node.input) > 2 and node.input[2]):
        return None
    return (
        Factor(weight, transposed=bool(attribute(node, "transB", 0))),
        float(attribute(node, "alpha", 1.0)),
        node.input[0],
    )


def activation_source(graph: Graph, tensor: str, transposed: bool = False, reshapes: bool = True) -> tuple[str, bool]:
    """The tensor whose rows `tensor` holds, looking through no-op nodes and 2-D transposes."""
    while tensor in graph.producer:
        node = graph.producer[tensor]
        if node.op_type == "Transpose" and list(attribute(node, "perm", [])) == [1, 0]:
            tensor, transposed = node.input[0], not transposed
            continue
        following = None if transposed else passthrough_input(graph, node, reshapes=reshapes)
        if following is None:
            break
        tensor = following
    return tensor, transposed


def matrix_dims(graph: Graph, factor: Factor) -> tuple[int, int]:
    """`(in, out)` of the map a product applies with `factor`."""
    rows, columns = graph.initializers[factor.initializer].dims
    return (columns, rows) if factor.transposed else (rows, columns)


def base_dims(graph: Graph, base: onnx.NodeProto, weight: str) -> tuple[int, int]:
    """`(in, out)` of the base product."""
    transposed = base.op_type == "Gemm" and bool(attribute(base, "transB", 0))
    return matrix_dims(graph, Factor(weight, transposed))


def _shape_mismatch(graph: Graph, base: onnx.NodeProto, weight: str, lora_a: Factor, lora_b: Factor) -> str | None:
    features_in, features_out = base_dims(graph, base, weight)
    a_in, rank = matrix_dims(graph, lora_a)
    b_rank, b_out = matrix_dims(graph, lora_b)
    if (a_in, rank, b_out) != (features_in, b_rank, features_out):
        return (
            f"LoRA factors map {a_in}->{rank} and {b_rank}->{b_out} but the base weight maps "
            f"{features_in}->{features_out}"
        )
    return None


def _conv_mismatch(graph: Graph, base: onnx.NodeProto, weight: str, lora_a: Factor, lora_b: Factor) -> str | None:
    """Why A and B do not make an update that merges into the base conv, or None.

    A must see exactly what the base sees (same strides, pads, dilations, groups) and B must be
    a grouped 1x1 conv: then the update is block-diagonal per group, as the base's weight is.
    """
    conv_a, conv_b = lora_a.conv, lora_b.conv
    assert conv_a is not None and conv_b is not None  # the factors of a conv base are read by Convs
    for name, default in _CONV_GEOMETRY:
        if attribute(conv_a, name, default) != attribute(base, name, default):
            return (
                f"the LoRA A conv's {name} ({attribute(conv_a, name, default)}) differs from the base conv's "
                f"({attribute(base, name, default)}): its update cannot be merged"
            )
    groups = attribute(base, "group", 1)
    pointwise = (
        list(graph.initializers[lora_b.initializer].dims[2:]) == [1, 1]
        and set(attribute(conv_b, "strides", [1, 1])) == {1}
        and not any(attribute(conv_b, "pads", []))
        and set(attribute(conv_b, "dilations", [1, 1])) == {1}
        and attribute(conv_b, "group", 1) == groups
    )
    if not pointwise:
        return "the LoRA B conv is not a plain 1x1 conv grouped like the base"
    out_channels, in_per_group, *kernel = graph.initializers[weight].dims
    rank, a_in, *a_kernel = graph.initializers[lora_a.initializer].dims
    b_out, b_rank, _, _ = graph.initializers[lora_b.initializer].dims
    if (a_in, a_kernel, b_out, b_rank * groups) != (in_per_group, kernel, out_channels, rank):
        return (
            f"LoRA conv weights {[rank, a_in, *a_kernel]} and {[b_out, b_rank, 1, 1]} do not fit the base conv "
            f"{[out_channels, in_per_group, *kernel]} with groups={groups}"
        )
    return None
