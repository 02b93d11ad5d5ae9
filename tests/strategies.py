"""Hypothesis strategies shared by every test of the reference, the backends and the exporter.

Built in layers: sizes, then arrays, then whole layer cases whose arrays agree in shape. Sizes
that must agree within one example (`in`, `out`, `r`) are drawn from `st.shared`, so separate
strategies (`inputs()`, `base_weights()`, ...) used in one test see the same values. Arrays are
generated from a drawn seed with NumPy, which is far faster than element-wise drawing and
still shrinks through the sizes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

MAX_FEATURES = 8
MAX_RANK = 4
MAX_BATCH_DIMS = 2
MAX_BATCH_SIZE = 3
MAX_VOCABULARY = 12
MAX_CHANNELS_PER_GROUP = 3
MAX_IMAGE_SIZE = 6
MAX_KERNEL = 3
MAX_GROUPS = 2
MAX_DROPOUT = 0.8

float_dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)
scales = st.floats(0.05, 8.0, allow_nan=False, allow_infinity=False)

in_features = st.shared(st.integers(1, MAX_FEATURES), key="in_features")
out_features = st.shared(st.integers(1, MAX_FEATURES), key="out_features")
ranks = st.shared(st.integers(1, MAX_RANK), key="rank")
batch_shapes = st.shared(
    st.lists(st.integers(1, MAX_BATCH_SIZE), min_size=1, max_size=MAX_BATCH_DIMS).map(tuple), key="batch_shape"
)
dropout_probabilities = st.floats(0.0, MAX_DROPOUT)


@st.composite
def arrays(draw, shape, dtype=np.float64, scale: float = 1.0) -> np.ndarray:
    """Normal values of a drawn magnitude (0.1x to 10x `scale`), so tolerances see varied sizes."""
    magnitude = draw(st.sampled_from([0.1, 1.0, 10.0])) * scale
    return (np.random.default_rng(draw(seeds)).standard_normal(shape) * magnitude).astype(dtype)


@st.composite
def dropout_masks(draw, shape, dtype=np.float64) -> np.ndarray | None:
    """None (no dropout) or an inverted-dropout mask: 0 or 1/(1-p) per element."""
    if draw(st.booleans()):
        return None
    p = draw(dropout_probabilities)
    keep = np.random.default_rng(draw(seeds)).random(shape) >= p
    return (keep / (1 - p)).astype(dtype)


def inputs(dtype=np.float64):
    """`x (*batch, in)`."""
    return st.tuples(batch_shapes, in_features).flatmap(lambda s: arrays((*s[0], s[1]), dtype))


def base_weights(dtype=np.float64):
    """`W (out, in)`."""
    return st.tuples(out_features, in_features).flatmap(lambda s: arrays(s, dtype, scale=0.5))


def lora_a(dtype=np.float64):
    """`A (r, in)`."""
    return st.tuples(ranks, in_features).flatmap(lambda s: arrays(s, dtype, scale=0.5))


def lora_b(dtype=np.float64):
    """`B (out, r)`, non-zero so that the low-rank path shows in every output."""
    return st.tuples(out_features, ranks).flatmap(lambda s: arrays(s, dtype, scale=0.5))


@dataclasses.dataclass
class LinearCase:
    """One linear layer with an adapter and an input: everything `reference.forward` takes."""

    x: np.ndarray
    W: np.ndarray
    b: np.ndarray | None
    A: np.ndarray
    B: np.ndarray
    s: float
    dropout_mask: np.ndarray | None

    @property
    def dtype(self):
        return self.x.dtype


@st.composite
def linear_cases(draw, dtype=None, dropout: bool = True) -> LinearCase:
    """A linear layer, its adapter, an input and (optionally) a dropout mask, all in one dtype."""
    dtype = dtype or draw(float_dtypes)
    x = draw(inputs(dtype))
    bias = draw(st.none() | st.tuples(out_features).flatmap(lambda s: arrays(s, dtype)))
    mask = draw(dropout_masks(x.shape, dtype)) if dropout else None
    return LinearCase(
        x=x,
        W=draw(base_weights(dtype)),
        b=bias,
        A=draw(lora_a(dtype)),
        B=draw(lora_b(dtype)),
        s=draw(scales),
        dropout_mask=mask,
    )


@dataclasses.dataclass
class EmbeddingCase:
    """An embedding table `W (num, dim)`, ids, `A (r, num)`, `B (dim, r)` and the scaling."""

    ids: np.ndarray
    W: np.ndarray
    A: np.ndarray
    B: np.ndarray
    s: float


@st.composite
def embedding_cases(draw, dtype=None) -> EmbeddingCase:
    dtype = dtype or draw(float_dtypes)
    num, dim, r = draw(st.integers(1, MAX_VOCABULARY)), draw(out_features), draw(ranks)
    batch = draw(batch_shapes)
    ids = np.random.default_rng(draw(seeds)).integers(0, num, batch)
    return EmbeddingCase(
        ids=ids,
        W=draw(arrays((num, dim), dtype)),
        A=draw(arrays((r, num), dtype, 0.5)),
        B=draw(arrays((dim, r), dtype, 0.5)),
        s=draw(scales),
    )


@dataclasses.dataclass
class Conv2dCase(LinearCase):
    """A conv layer in PyTorch's layout, its adapter, an input and a mask, plus its geometry."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def geometry(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


@st.composite
def conv2d_cases(draw, dtype=None, dropout: bool = True, max_groups: int = MAX_GROUPS) -> Conv2dCase:
    """A grouped conv whose output is at least 1x1; r is a multiple of groups."""
    dtype = dtype or draw(float_dtypes)
    groups = draw(st.integers(1, max_groups))
    in_channels = groups * draw(st.integers(1, MAX_CHANNELS_PER_GROUP))
    out_channels = groups * draw(st.integers(1, MAX_CHANNELS_PER_GROUP))
    r = groups * draw(st.integers(1, max(1, MAX_RANK // groups)))
    kernel = (draw(st.integers(1, MAX_KERNEL)), draw(st.integers(1, MAX_KERNEL)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, kernel[0] - 1)), draw(st.integers(0, kernel[1] - 1)))
    reach = [dilation[i] * (kernel[i] - 1) + 1 - 2 * padding[i] for i in range(2)]
    height = draw(st.integers(max(1, reach[0]), max(1, reach[0]) + MAX_IMAGE_SIZE))
    width = draw(st.integers(max(1, reach[1]), max(1, reach[1]) + MAX_IMAGE_SIZE))
    x = draw(arrays((draw(st.integers(1, 2)), in_channels, height, width), dtype))
    return Conv2dCase(
        x=x,
        W=draw(arrays((out_channels, in_channels // groups, *kernel), dtype, 0.5)),
        b=draw(st.none() | arrays((out_channels,), dtype)),
        A=draw(arrays((r, in_channels // groups, *kernel), dtype, 0.5)),
        B=draw(arrays((out_channels, r // groups, 1, 1), dtype, 0.5)),
        s=draw(scales),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        dropout_mask=draw(dropout_masks(x.shape, dtype)) if dropout else None,
    )


@dataclasses.dataclass
class DoRACase:
    """A layer case (`LinearCase`, `EmbeddingCase` or ungrouped `Conv2dCase`) and a DoRA magnitude for it."""

    layer: str
    case: LinearCase | EmbeddingCase | Conv2dCase
    magnitude: np.ndarray


LAYER_CASES = {
    "linear": linear_cases,
    "embedding": embedding_cases,
    "conv2d": lambda dtype=None, dropout=True: conv2d_cases(dtype=dtype, dropout=dropout, max_groups=1),
}


@st.composite
def dora_cases(draw, layer: str, dtype=None, dropout: bool = True) -> DoRACase:
    """A `layer` ("linear", "embedding" or "conv2d") with its adapter and a magnitude as training
    leaves it: the adapter's weight norm times 0.5 to 2 per output feature, in PEFT's shape.

    The adapted weight's norm is at least 1/20 of what its parts could add up to (`||W|| + s ||(|B| @ |A|)||` per
    feature): where `W + s B @ A` cancels almost to zero, `m / n` carries the parts' float32 rounding magnified by
    the cancellation, in every implementation alike, and no tolerance scaled to the output holds."""
    from lora_spec import dora

    options = {} if layer == "embedding" else {"dropout": dropout}
    case = draw(LAYER_CASES[layer](dtype=dtype, **options))
    norm = dora.weight_norm(case.W, case.A, case.B, case.s, layer)
    zeros_a, zeros_b = np.zeros_like(case.A), np.zeros_like(case.B)
    parts = dora.weight_norm(case.W, zeros_a, zeros_b, case.s, layer) + dora.weight_norm(
        np.zeros_like(case.W), np.abs(case.A), np.abs(case.B), case.s, layer
    )
    assume(bool(np.all(norm >= parts / 20)))
    factors = np.random.default_rng(draw(seeds)).uniform(0.5, 2.0, norm.shape)
    return DoRACase(layer=layer, case=case, magnitude=(norm * factors).astype(case.W.dtype))


# --- ONNX graphs with LoRA branches (the exporter's tests) -------------------------------------------------------

ONNX_OPSET = 17


@dataclasses.dataclass
class LoRAGraphCase:
    """An ONNX graph of one or two LoRA layers on input `x`, and each output as the reference merges it.

    `layout` records the drawn choices (base op, transposes, scale position, no-op nodes,
    shared initializers) so that a failure says which form broke. `base_model` is the same
    graph built without the LoRA branches.
    """

    model: object
    base_model: object
    x: np.ndarray
    expected: list
    layout: dict


PLAIN_LORA_LAYOUT = dict(
    base="MatMul",
    reshaped=False,
    trans_b=False,
    alpha=1.0,
    bias="add_before",
    lora_a_op="MatMul",
    lora_b_op="MatMul",
    lora_a_trans=False,
    lora_b_trans=False,
    product_alpha=1.0,
    scale_at="after",
    scale_op="Mul",
    scale_first=False,
    add_base_first=True,
    cast=False,
    identity=False,
    dropout=False,
    shared=None,
)


@st.composite
def lora_graph_layouts(draw, three_d: bool) -> dict:
    """The drawn form of a LoRA layer as exporters write it."""
    base = "MatMul" if three_d and not draw(st.booleans()) else draw(st.sampled_from(["MatMul", "Gemm"]))
    reshaped = three_d and base == "Gemm"  # Gemm is 2-D: Keras/tf2onnx-style Reshape around the products
    product_ops = ["MatMul", "Gemm"] if reshaped or not three_d else ["MatMul"]
    return dict(
        base=base,
        reshaped=reshaped,
        trans_a=base == "Gemm" and draw(st.booleans()),  # the base reads Transpose(x) with transA=1
        trans_b=draw(st.booleans()),
        alpha=draw(st.sampled_from([1.0, 0.5, 2.0])),
        bias=draw(
            st.sampled_from(["gemm", "add_before", "add_after"] if base == "Gemm" else ["add_before", "add_after"])
        ),
        lora_a_op=draw(st.sampled_from(product_ops)),
        lora_b_op=draw(st.sampled_from(product_ops)),
        lora_a_trans=draw(st.booleans()),
        lora_b_trans=draw(st.booleans()),
        product_alpha=draw(st.sampled_from([1.0, 2.0])),
        scale_at=draw(st.sampled_from(["after", "between", "before", "folded"])),
        scale_op=draw(st.sampled_from(["Mul", "Div"])),
        scale_first=draw(st.booleans()),
        add_base_first=draw(st.booleans()),
        cast=draw(st.booleans()),
        identity=draw(st.booleans()),
        dropout=draw(st.booleans()),
        shared=draw(st.sampled_from([None, "direct", "identity"])),
    )


def _merged_forward(x, W, b, A, B, s):
    from lora_spec import reference

    merged = reference.merge(W.astype(np.float64), A.astype(np.float64), B.astype(np.float64), s)
    y = x.astype(np.float64) @ merged.T
    return y if b is None else y + b


@st.composite
def lora_graph_cases(draw) -> LoRAGraphCase:
    """One layer `x @ W.T + b + s * (x @ A.T) @ B.T`, or two reading one input and one stored base weight."""
    case = draw(linear_cases(dtype=np.float32, dropout=False))
    three_d = case.x.ndim == 3
    layout = draw(lora_graph_layouts(three_d))
    x = case.x
    if layout["base"] == "Gemm" and not layout["reshaped"]:
        x = x.reshape(-1, x.shape[-1])
    b = case.b if case.b is not None else np.zeros(case.W.shape[0], np.float32)
    layers = [(case.W, b, case.A, case.B, case.s)]
    if layout["shared"]:
        # Same base weight stored once; the second adapter's B is all zeros, as at initialisation.
        layers.append((case.W, b, case.A[::-1].copy(), np.zeros_like(case.B), case.s))
    model = lora_graph(x, layers, layout, lora=True)
    base_model = lora_graph(x, layers, layout, lora=False)
    expected = [_merged_forward(x, *layer) for layer in layers]
    return LoRAGraphCase(model=model, base_model=base_model, x=x, expected=expected, layout=layout)


def lora_graph(x: np.ndarray, layers: list, layout: dict, lora: bool):
    """An ONNX model of `layers` (each `(W, b, A, B, s)`) on an input shaped like `x`, in `layout`'s form."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers, outputs = [], {}, []

    def constant(name, value, dtype=np.float32):
        initializers[name] = numpy_helper.from_array(np.asarray(value, dtype), name)
        return name

    def node(op, inputs, name, **attributes):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def product(op, tensor, matrix, trans, alpha, name):
        """`tensor @ matrix` as MatMul, or Gemm storing `matrix` transposed when `trans`."""
        if op == "MatMul":
            return node("MatMul", [tensor, constant(f"{name}.weight", matrix)], name)
        stored = (matrix.T if trans else matrix) / alpha
        return node("Gemm", [tensor, constant(f"{name}.weight", stored)], name, transB=int(trans), alpha=alpha)

    features_in = x.shape[-1]
    source = node("Identity", ["x"], "x_identity") if layout["identity"] else "x"
    rows = (
        node("Reshape", [source, constant("rows_shape", [-1, features_in], np.int64)], "x_rows")
        if layout["reshaped"]
        else source
    )
    for index, (W, b, A, B, s) in enumerate(layers):
        prefix = f"layer{index}"
        weight_name = "base.weight" if layout["shared"] else f"{prefix}.weight"
        stored = W.T if layout["base"] == "MatMul" else (W if layout["trans_b"] else W.T) / layout["alpha"]
        constant(weight_name, stored)
        weight_input = weight_name
        if layout["shared"] == "identity":
            weight_input = node("Identity", [weight_name], f"{prefix}.weight_identity")
        base_rows = (
            node("Transpose", [rows], f"{prefix}.rows_transposed", perm=[1, 0]) if layout.get("trans_a") else rows
        )
        inputs = [base_rows, weight_input] + ([constant(f"{prefix}.bias", b)] if layout["bias"] == "gemm" else [])
        attributes = (
            dict(transA=int(layout.get("trans_a", False)), transB=int(layout["trans_b"]), alpha=layout["alpha"])
            if layout["base"] == "Gemm"
            else {}
        )
        base = node(layout["base"], inputs, f"{prefix}.base", **attributes)
        if layout["bias"] == "add_before":
            base = node("Add", [constant(f"{prefix}.bias", b), base], f"{prefix}.bias_add")
        if lora:
            scale = s if layout["scale_op"] == "Mul" else 1.0 / s
            scale_name = constant("lora.scale" if layout["shared"] else f"{prefix}.scale", scale)

            def scaled(tensor, name, scale_name=scale_name):
                pair = (
                    [scale_name, tensor]
                    if layout["scale_first"] and layout["scale_op"] == "Mul"
                    else [tensor, scale_name]
                )
                return node(layout["scale_op"], pair, name)

            branch = node("Cast", [rows], f"{prefix}.cast_in", to=TensorProto.FLOAT) if layout["cast"] else rows
            if layout["dropout"]:
                branch = node("Dropout", [branch], f"{prefix}.dropout")
            if layout["scale_at"] == "before":
                branch = scaled(branch, f"{prefix}.scale_before")
            branch = product(
                layout["lora_a_op"], branch, A.T, layout["lora_a_trans"], layout["product_alpha"], f"{prefix}.lora_A"
            )
            if layout["scale_at"] == "between":
                branch = scaled(branch, f"{prefix}.scale_between")
            lora_b = B.T * s if layout["scale_at"] == "folded" else B.T
            branch = product(layout["lora_b_op"], branch, lora_b, layout["lora_b_trans"], 1.0, f"{prefix}.lora_B")
            if layout["scale_at"] == "after":
                branch = scaled(branch, f"{prefix}.scale_after")
            if layout["cast"]:
                branch = node("Cast", [branch], f"{prefix}.cast_out", to=TensorProto.FLOAT)
            pair = [base, branch] if layout["add_base_first"] else [branch, base]
            base = node("Add", pair, f"{prefix}.lora_add")
        if layout["bias"] == "add_after":
            base = node("Add", [base, constant(f"{prefix}.bias", b)], f"{prefix}.bias_add")
        if layout["reshaped"]:
            base = node(
                "Reshape",
                [base, constant(f"{prefix}.out_shape", [*x.shape[:-1], W.shape[0]], np.int64)],
                f"{prefix}.unrows",
            )
        outputs.append((node("Identity", [base], f"y{index}"), [*x.shape[:-1], W.shape[0]]))
    graph = helper.make_graph(
        nodes,
        "lora",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        list(initializers.values()),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=8)


@dataclasses.dataclass
class LoRAEmbeddingGraphCase:
    """An ONNX embedding lookup with a LoRA branch, as exporters write it, and the reference's merged lookup."""

    model: object
    ids: np.ndarray
    expected: np.ndarray
    layout: dict


@st.composite
def lora_embedding_graph_cases(draw) -> LoRAEmbeddingGraphCase:
    """`W[ids] + s * (A.T[ids] @ B.T)`: the base and the A table both `Gather`ed by the same ids."""
    from onnx import TensorProto, helper, numpy_helper

    from lora_spec import reference

    case = draw(embedding_cases(dtype=np.float32))
    layout = dict(
        scale_at=draw(st.sampled_from(["after", "between", "folded"])),
        identity=draw(st.booleans()),
        lora_b_op=draw(st.sampled_from(["MatMul", "Gemm"])),
        add_base_first=draw(st.booleans()),
    )
    ids = case.ids.reshape(-1) if layout["lora_b_op"] == "Gemm" else case.ids  # Gemm needs 2-D rows
    lora_b = (case.B.T * case.s if layout["scale_at"] == "folded" else case.B.T).astype(np.float32)
    initializers = [
        numpy_helper.from_array(case.W, "table"),
        numpy_helper.from_array(case.A.T.copy(), "lora_A"),
        numpy_helper.from_array(lora_b, "lora_B"),
        numpy_helper.from_array(np.float32(case.s), "scale"),
    ]
    table = "table"
    nodes = []
    if layout["identity"]:
        nodes.append(helper.make_node("Identity", ["table"], ["table_identity"]))
        table = "table_identity"
    nodes += [
        helper.make_node("Gather", [table, "ids"], ["base"]),
        helper.make_node("Gather", ["lora_A", "ids"], ["rows"]),
    ]
    hidden = "rows"
    if layout["scale_at"] == "between":
        nodes.append(helper.make_node("Mul", ["rows", "scale"], ["scaled_rows"]))
        hidden = "scaled_rows"
    nodes.append(helper.make_node(layout["lora_b_op"], [hidden, "lora_B"], ["update"]))
    update = "update"
    if layout["scale_at"] == "after":
        nodes.append(helper.make_node("Mul", ["scale", "update"], ["scaled_update"]))
        update = "scaled_update"
    nodes.append(helper.make_node("Add", ["base", update] if layout["add_base_first"] else [update, "base"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*ids.shape, case.W.shape[1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=8)
    merged = reference.merge(
        case.W.astype(np.float64), case.A.astype(np.float64), case.B.astype(np.float64), case.s, layer="embedding"
    )
    return LoRAEmbeddingGraphCase(model=model, ids=ids, expected=merged[ids], layout=layout)


@dataclasses.dataclass
class LoRAConvGraphCase:
    """An ONNX 2-D convolution with a LoRA branch (A: conv with the base's geometry, B: grouped 1x1)."""

    model: object
    x: np.ndarray
    expected: np.ndarray


@st.composite
def lora_conv_graph_cases(draw) -> LoRAConvGraphCase:
    """`conv(x, W) + b + s * conv1x1(conv(x, A), B)` from `conv2d_cases`, and the reference's merged conv."""
    from onnx import TensorProto, helper, numpy_helper

    from lora_spec import reference

    case = draw(conv2d_cases(dtype=np.float32, dropout=False))
    geometry = dict(
        strides=list(case.stride), dilations=list(case.dilation), group=case.groups, pads=[*case.padding, *case.padding]
    )
    arrays = {"weight": case.W, "lora_A": case.A, "lora_B": case.B, "scale": np.float32(case.s)}
    base_inputs = ["x", "weight"]
    if case.b is not None:
        arrays["bias"] = case.b
        base_inputs.append("bias")
    nodes = [
        helper.make_node("Conv", base_inputs, ["base"], kernel_shape=list(case.W.shape[2:]), **geometry),
        helper.make_node("Conv", ["x", "lora_A"], ["low"], kernel_shape=list(case.A.shape[2:]), **geometry),
        helper.make_node("Conv", ["low", "lora_B"], ["update"], kernel_shape=[1, 1], group=case.groups),
        helper.make_node("Mul", ["update", "scale"], ["scaled"]),
        helper.make_node("Add", ["base", "scaled"], ["y"]),
    ]
    merged = reference.merge(
        case.W.astype(np.float64), case.A.astype(np.float64), case.B.astype(np.float64), case.s, layer="conv2d"
    )
    expected = reference.conv2d_forward(
        case.x.astype(np.float64),
        merged,
        case.b,
        case.A.astype(np.float64),
        np.zeros(case.B.shape),
        0.0,
        **case.geometry,
    )
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(case.x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(expected.shape))],
        [numpy_helper.from_array(np.asarray(value, np.float32), name) for name, value in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=8)
    return LoRAConvGraphCase(model=model, x=case.x, expected=expected)


# --- several adapters on one layer (combinations, routed batches) --------------------------------------------------

MAX_ADAPTERS = 3


@dataclasses.dataclass
class AdapterSetCase:
    """Several adapters on one layer, each `(A, B, s)` with a weight: the layer and its input are `base`'s (a
    `LinearCase`, `EmbeddingCase` or `Conv2dCase`, whose own adapter is ignored) and `W` is its weight."""

    base: object
    adapters: list
    weights: list
    layer: str
    magnitudes: list = dataclasses.field(default_factory=list)  # per adapter: a DoRA magnitude, or None

    @property
    def W(self) -> np.ndarray:
        return self.base.W


@st.composite
def adapter_set_cases(
    draw, layer: str | None = None, equal_ranks: bool = False, max_groups: int = MAX_GROUPS
) -> AdapterSetCase:
    """1 to `MAX_ADAPTERS` adapters of their own rank and scaling (equal ranks on request) on one
    linear, embedding or grouped conv layer, in float64, with weights of either sign."""
    from lora_spec.multi_adapter import Factors

    layer = layer or draw(st.sampled_from(["linear", "embedding", "conv2d"]))
    count = draw(st.integers(1, MAX_ADAPTERS))
    rank_draws = st.integers(1, MAX_RANK)
    shared_rank = draw(rank_draws)
    ranks = [shared_rank if equal_ranks else draw(rank_draws) for _ in range(count)]
    if layer == "conv2d":
        base = draw(conv2d_cases(dtype=np.float64, dropout=False, max_groups=max_groups))
        groups, kernel = base.groups, base.W.shape[2:]
        ranks = [groups * r for r in ranks]

        def a_shape(r):
            return (r, base.W.shape[1], *kernel)

        def b_shape(r):
            return (base.W.shape[0], r // groups, 1, 1)
    elif layer == "embedding":  # the table is (num_embeddings, dim): A reads its rows, B makes its columns
        base = draw(embedding_cases(dtype=np.float64))
        a_shape, b_shape = (lambda r: (r, base.W.shape[0])), (lambda r: (base.W.shape[1], r))
    else:
        base = draw(linear_cases(dtype=np.float64, dropout=False))
        a_shape, b_shape = (lambda r: (r, base.W.shape[1])), (lambda r: (base.W.shape[0], r))
    adapters = [
        Factors(draw(arrays(a_shape(r), np.float64, 0.5)), draw(arrays(b_shape(r), np.float64, 0.5)), draw(scales))
        for r in ranks
    ]
    weights = [draw(st.sampled_from([1.0, 0.5, -0.7, 2.0])) for _ in adapters]
    return AdapterSetCase(base=base, adapters=adapters, weights=weights, layer=layer)


@st.composite
def dora_adapter_set_cases(draw, layer: str | None = None) -> AdapterSetCase:
    """`adapter_set_cases` on an ungrouped layer where some adapters (at least one) are DoRA adapters, each
    with a magnitude as training leaves it: its weight norm times 0.5 to 2 per output feature."""
    from lora_spec import dora

    case = draw(adapter_set_cases(layer, max_groups=1))
    is_dora = draw(st.lists(st.booleans(), min_size=len(case.adapters), max_size=len(case.adapters)).filter(any))
    rng = np.random.default_rng(draw(seeds))
    norms = [dora.weight_norm(case.W, adapter.A, adapter.B, adapter.s, case.layer) for adapter in case.adapters]
    case.magnitudes = [
        norm * rng.uniform(0.5, 2.0, norm.shape) if use else None for norm, use in zip(norms, is_dora, strict=True)
    ]
    return case


# --- weights that PiSSA and OLoRA start from ----------------------------------------------------------------------

WEIGHT_INITS = ("pissa", "pissa_niter_0", "pissa_niter_3", "olora")


@st.composite
def weight_init_cases(draw, dtype=np.float64) -> tuple[np.ndarray, int, float, str]:
    """`(W, r, s, init)`: a base weight, a rank that fits it, a scaling and one of the inits computed from the
    weight (`lora_spec.inits`)."""
    W = draw(base_weights(dtype))
    return W, draw(st.integers(1, min(W.shape))), draw(scales), draw(st.sampled_from(WEIGHT_INITS))


def low_rank_weight(shape: tuple[int, int], rank: int, seed: int = 0, gap: float = 1.0) -> np.ndarray:
    """A weight of exactly `rank` directions (singular values 4 down to 1, distinct), plus `gap` times noise."""
    rng = np.random.default_rng(seed)
    left = np.linalg.qr(rng.standard_normal((shape[0], rank)))[0]
    right = np.linalg.qr(rng.standard_normal((shape[1], rank)))[0]
    noise = rng.standard_normal(shape) * gap
    return (left * np.linspace(4.0, 1.0, rank)) @ right.T + noise


@st.composite
def spectral_gap_weight_init_cases(draw, dtype=np.float64, noise=1e-6) -> tuple[np.ndarray, int, float, str]:
    """As `weight_init_cases`, on a weight whose top r singular values are distinct and far above the others
    (`noise` times Gaussian noise), so that every init's A and B are unique up to the sign of each rank component."""
    shape = (draw(out_features), draw(in_features))
    r = draw(st.integers(1, min(shape)))
    W = low_rank_weight(shape, r, draw(seeds), gap=noise).astype(dtype)
    return W, r, draw(scales), draw(st.sampled_from(WEIGHT_INITS))


# --- ONNX graphs with DoRA layers -----------------------------------------------------------------------------------

DORA_GRAPH_FORMS = ("torchscript", "dynamo", "keras")


@dataclasses.dataclass
class DoRAGraphCase:
    """An ONNX graph of one linear DoRA layer on input `x`, the same graph without the adapter, and
    the reference's output. `form` says how the layer is written:

    - "torchscript": PEFT's `base + ((f - 1) * (base - b) + (f * x A B) * s)` with `f = m / n`
      computed in the graph from W, A, B and m (`ReduceL2`, `Div`, `Reshape`), as TorchScript keeps it;
    - "dynamo": the same sum with `f` and `f - 1` stored as `(1, out)` initializers;
    - "keras": `(x W) * f + (x A B) * (s * f)`, then the bias `Add`.
    """

    model: object
    base_model: object
    x: np.ndarray
    expected: np.ndarray
    form: str
    base: str
    bias: bool


@st.composite
def dora_graph_cases(draw) -> DoRAGraphCase:
    from onnx import TensorProto, helper, numpy_helper

    from lora_spec import dora

    dora_case = draw(dora_cases("linear", np.float32, dropout=False))
    case, magnitude = dora_case.case, dora_case.magnitude
    form = draw(st.sampled_from(DORA_GRAPH_FORMS))
    base_op = "MatMul" if form == "keras" or case.x.ndim == 3 else draw(st.sampled_from(["MatMul", "Gemm"]))
    bias = case.b is not None
    out = case.W.shape[0]
    factor = (magnitude / dora.weight_norm(case.W, case.A, case.B, case.s)).astype(np.float32)
    arrays = {
        "weight": case.W.T if base_op == "MatMul" else case.W,
        "lora_A": case.A.T,
        "lora_B": case.B.T,
        "scale": np.float32(case.s),
        "one": np.float32(1.0),
    }
    if bias:
        arrays["bias"] = case.b
    nodes = []

    def node(op, inputs, name, **attributes):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def base_product(with_bias: bool) -> str:
        if base_op == "Gemm":
            return node("Gemm", ["x", "weight"] + (["bias"] if with_bias else []), "base", transB=1)
        product = node("MatMul", ["x", "weight"], "base")
        return node("Add", [product, "bias"], "base_bias") if with_bias else product

    def finish(output: str):
        graph = helper.make_graph(
            nodes,
            "dora",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(case.x.shape))],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, [*case.x.shape[:-1], out])],
            [
                numpy_helper.from_array(
                    np.asarray(value, np.int64 if np.asarray(value).dtype.kind == "i" else np.float32), name
                )
                for name, value in arrays.items()
                if any(name in item.input for item in nodes)
            ],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=8)

    base_model = finish(node("Identity", [base_product(bias)], "y"))
    nodes.clear()
    lora = node("MatMul", [node("MatMul", ["x", "lora_A"], "lora_a"), "lora_B"], "lora_b")
    if form == "keras":
        arrays |= {"factor": factor, "lora_factor": factor * case.s}
        total = node(
            "Add",
            [node("Mul", [base_product(False), "factor"], "rescaled"), node("Mul", [lora, "lora_factor"], "update")],
            "dora",
        )
        output = node("Add", [total, "bias"], "dora_bias") if bias else total
    else:
        if form == "dynamo":
            arrays |= {"factor": factor.reshape(1, out), "factor_minus_one": factor.reshape(1, out) - 1}
            factor_name, minus_one = "factor", "factor_minus_one"
        else:
            arrays |= {
                "magnitude": magnitude,
                "weight_out_in": case.W,
                "lora_B_ref": case.B,
                "lora_A_ref": case.A,
                "row": np.array([1, -1], np.int64),
            }
            update = node("Mul", [node("MatMul", ["lora_B_ref", "lora_A_ref"], "delta"), "scale"], "scaled_delta")
            norm = node("ReduceL2", [node("Add", ["weight_out_in", update], "adapted")], "norm", axes=[1], keepdims=0)
            factor_name = node("Reshape", [node("Div", ["magnitude", norm], "ratio"), "row"], "factor")
            minus_one = node("Sub", [factor_name, "one"], "factor_minus_one")
        base = base_product(bias)
        without_bias = node("Sub", [base, "bias"], "base_without_bias") if bias else base
        rescaled = node("Mul", [minus_one, without_bias], "rescaled")
        update = node("Mul", [node("Mul", [factor_name, lora], "lora_rescaled"), "scale"], "update")
        output = node("Add", [base, node("Add", [rescaled, update], "dora_terms")], "dora")
    model = finish(node("Identity", [output], "y"))
    expected = dora.dora_forward(
        case.x.astype(np.float64), case.W.astype(np.float64), case.b, case.A, case.B, case.s, magnitude
    )
    return DoRAGraphCase(
        model=model, base_model=base_model, x=case.x, expected=expected, form=form, base=base_op, bias=bias
    )


# --- Keras layers that are blocks of one transformers layer (KerasHub's GPT-2 q/k/v in c_attn) -------------------

MAX_FUSED_LAYERS = 3


@dataclasses.dataclass
class FusedLinearCase:
    """Keras layers, each `(rows, columns, A, B, s)`, whose weights are blocks of one `(out, in)` transformers
    weight: rows and columns are where a layer's `(out, in)` indices sit in it; some rows may belong to none."""

    out_features: int
    in_features: int
    layers: list


@st.composite
def fused_linear_cases(draw) -> FusedLinearCase:
    """1 to `MAX_FUSED_LAYERS` layers of their own size, rank and scaling, in float64, whose rows are disjoint
    parts of a shuffled `range(out)` and whose columns are each a shuffle of `range(in)`."""
    fan_in = draw(st.integers(1, MAX_FEATURES))
    sizes = draw(st.lists(st.integers(1, MAX_FEATURES), min_size=1, max_size=MAX_FUSED_LAYERS))
    out = sum(sizes) + draw(st.integers(0, 2))
    rng = np.random.default_rng(draw(seeds))
    rows, layers, start = rng.permutation(out), [], 0
    for size in sizes:
        rank = draw(st.integers(1, MAX_RANK))
        layers.append(
            (
                rows[start : start + size],
                rng.permutation(fan_in),
                draw(arrays((rank, fan_in), np.float64, 0.5)),
                draw(arrays((size, rank), np.float64, 0.5)),
                draw(scales),
            )
        )
        start += size
    return FusedLinearCase(out_features=out, in_features=fan_in, layers=layers)
