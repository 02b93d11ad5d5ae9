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
    st.lists(st.integers(1, MAX_BATCH_SIZE), min_size=1, max_size=MAX_BATCH_DIMS).map(tuple), key="batch_shape")
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
    return LinearCase(x=x, W=draw(base_weights(dtype)), b=bias, A=draw(lora_a(dtype)), B=draw(lora_b(dtype)),
                      s=draw(scales), dropout_mask=mask)


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
    return EmbeddingCase(ids=ids, W=draw(arrays((num, dim), dtype)), A=draw(arrays((r, num), dtype, 0.5)),
                         B=draw(arrays((dim, r), dtype, 0.5)), s=draw(scales))


@dataclasses.dataclass
class Conv2dCase:
    """A conv layer in PyTorch's layout, its adapter, its geometry, an input and a mask."""

    x: np.ndarray
    W: np.ndarray
    b: np.ndarray | None
    A: np.ndarray
    B: np.ndarray
    s: float
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    dropout_mask: np.ndarray | None

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
        s=draw(scales), stride=stride, padding=padding, dilation=dilation, groups=groups,
        dropout_mask=draw(dropout_masks(x.shape, dtype)) if dropout else None,
    )
