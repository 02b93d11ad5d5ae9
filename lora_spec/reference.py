"""The LoRA math in NumPy: the one definition every backend and the ONNX exporter are tested against.

Layouts are the LoRA paper's and PEFT's: a linear weight `W` is `(out, in)` and `y = x @ W.T + b`;
`A` is `(r, in)`, `B` is `(out, r)`, and the update is `delta_W = s * B @ A`. Inputs may have any
number of leading batch dimensions. A dropout mask is explicit (0 or 1/(1-p) per input element)
so that backends can be compared element for element.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import DTypeLike

from lora_spec import _conv
from lora_spec.config import LoRAConfig, is_weight_init

# A scaling is a number, or an array that broadcasts against the update (one value per output feature).
Scaling = float | np.ndarray


class Gradients(NamedTuple):
    """Gradients of a LoRA layer; `dx` is None for integer inputs, `db` None without a bias."""

    dx: np.ndarray | None
    dA: np.ndarray
    dB: np.ndarray
    db: np.ndarray | None


def _dropped(x: np.ndarray, dropout_mask: np.ndarray | None) -> np.ndarray:
    return x if dropout_mask is None else x * dropout_mask


def _rows(a: np.ndarray) -> np.ndarray:
    """Leading batch dimensions flattened into one."""
    return a.reshape(-1, a.shape[-1])


def init_lora_a(
    shape: tuple[int, ...], fan_in: int, config: LoRAConfig, rng: np.random.Generator, dtype: DTypeLike = np.float32
) -> np.ndarray:
    """A by kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), or N(0, 1/r)."""
    if is_weight_init(config.init):
        raise ValueError(
            f"init={config.init!r} computes A and B from the base weight: use "
            "lora_spec.inits.init_from_weight(W, config.init, r, s) instead."
        )
    if config.init == "gaussian":
        return rng.normal(0.0, 1.0 / shape[0], shape).astype(dtype)
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(dtype)


def init(
    in_features: int,
    out_features: int,
    config: LoRAConfig,
    rng: np.random.Generator,
    rank: int | None = None,
    dtype: DTypeLike = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """`(A, B)` for a linear layer: A `(r, in)` from `init_lora_a`, B `(out, r)` zeros, so delta_W = 0."""
    r = rank or config.r
    return init_lora_a((r, in_features), in_features, config, rng, dtype), np.zeros((out_features, r), dtype)


def forward(
    x: np.ndarray,
    W: np.ndarray,
    b: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    dropout_mask: np.ndarray | None = None,
) -> np.ndarray:
    """`y = x @ W.T + b + s * ((x * mask) @ A.T) @ B.T`."""
    y = x @ W.T if b is None else x @ W.T + b
    return y + s * ((_dropped(x, dropout_mask) @ A.T) @ B.T)


def backward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    grad_y: np.ndarray,
    dropout_mask: np.ndarray | None = None,
) -> Gradients:
    """Hand-written gradients of `sum(grad_y * forward(...))`.

    With `h = (x * mask) @ A.T`: `dB = s * grad_y.T @ h`, `dh = s * grad_y @ B`,
    `dA = dh.T @ (x * mask)`, `dx = grad_y @ W + (dh @ A) * mask`, `db = sum(grad_y)`.
    """
    x_dropped = _dropped(x, dropout_mask)
    hidden = x_dropped @ A.T
    grad_hidden = s * (grad_y @ B)
    return Gradients(
        dx=grad_y @ W + _dropped(grad_hidden @ A, dropout_mask),
        dA=_rows(grad_hidden).T @ _rows(x_dropped),
        dB=s * (_rows(grad_y).T @ _rows(hidden)),
        db=_rows(grad_y).sum(axis=0),
    )


def _scaled(product: np.ndarray, s: Scaling) -> np.ndarray:
    # In place when a scalar `s` keeps the product's dtype: the same values as `s * product`,
    # without a second full-size array (a merged weight can be gigabytes).
    if np.ndim(s) or np.result_type(product, s) != product.dtype:
        return s * product
    product *= s
    return product


def delta_weight(A: np.ndarray, B: np.ndarray, s: Scaling) -> np.ndarray:
    """`delta_W = s * B @ A`, `(out, in)`."""
    return _scaled(B @ A, s)


def embedding_init(
    num_embeddings: int,
    embedding_dim: int,
    config: LoRAConfig,
    rng: np.random.Generator,
    rank: int | None = None,
    dtype: DTypeLike = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """`(A, B)` for an embedding, as PEFT: A `(r, num_embeddings)` zeros, B `(dim, r)` ~ N(0, 1)."""
    r = rank or config.r
    return np.zeros((r, num_embeddings), dtype), rng.standard_normal((embedding_dim, r)).astype(dtype)


def embedding_forward(ids: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray, s: Scaling) -> np.ndarray:
    """`y = W[ids] + s * A.T[ids] @ B.T` for a table `W (num_embeddings, dim)`; no dropout."""
    return W[ids] + s * (A.T[ids] @ B.T)


def embedding_backward(ids: np.ndarray, A: np.ndarray, B: np.ndarray, s: Scaling, grad_y: np.ndarray) -> Gradients:
    """`dB = s * grad_y.T @ A.T[ids]`; dA scatters `s * grad_y @ B` back to the rows that were read."""
    grad_rows = s * (_rows(grad_y) @ B)
    dA_transposed = np.zeros((A.shape[1], A.shape[0]), grad_rows.dtype)
    np.add.at(dA_transposed, np.ravel(ids), grad_rows)
    return Gradients(dx=None, dA=dA_transposed.T, dB=s * (_rows(grad_y).T @ A.T[np.ravel(ids)]), db=None)


def embedding_delta_weight(A: np.ndarray, B: np.ndarray, s: Scaling) -> np.ndarray:
    """`delta_W = s * (B @ A).T`, `(num_embeddings, dim)` like the table."""
    return s * (B @ A).T


def conv2d_init(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    config: LoRAConfig,
    rng: np.random.Generator,
    groups: int = 1,
    rank: int | None = None,
    dtype: DTypeLike = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """`(A, B)` for a conv: A `(r, in/groups, kh, kw)`, B `(out, r/groups, 1, 1)` zeros.

    With `groups > 1` both low-rank convs are grouped like the base, so the update stays
    block-diagonal and merges exactly; `r` must then be a multiple of `groups`.
    """
    r = rank or config.r
    if r % groups:
        raise ValueError(f"rank {r} is not a multiple of the conv's groups={groups}: choose r divisible by {groups}.")
    shape = (r, in_channels // groups, *kernel_size)
    fan_in = int(np.prod(shape[1:]))
    return init_lora_a(shape, fan_in, config, rng, dtype), np.zeros((out_channels, r // groups, 1, 1), dtype)


def conv2d_forward(
    x: np.ndarray,
    W: np.ndarray,
    b: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    stride: _conv.Pair = (1, 1),
    padding: _conv.Pair = (0, 0),
    dilation: _conv.Pair = (1, 1),
    groups: int = 1,
    dropout_mask: np.ndarray | None = None,
) -> np.ndarray:
    """`y = conv(x, W) + b + s * conv1x1(conv(x * mask, A), B)`; A takes the base's geometry."""
    y = _conv.conv2d(x, W, stride, padding, dilation, groups)
    if b is not None:
        y = y + b[:, None, None]
    hidden = _conv.conv2d(_dropped(x, dropout_mask), A, stride, padding, dilation, groups)
    return y + s * _conv.conv2d(hidden, B, groups=groups)


def conv2d_backward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    grad_y: np.ndarray,
    stride: _conv.Pair = (1, 1),
    padding: _conv.Pair = (0, 0),
    dilation: _conv.Pair = (1, 1),
    groups: int = 1,
    dropout_mask: np.ndarray | None = None,
) -> Gradients:
    """Gradients of `sum(grad_y * conv2d_forward(...))`, by the chain rule through the three convs."""
    geometry = (stride, padding, dilation, groups)
    x_dropped = _dropped(x, dropout_mask)
    hidden = _conv.conv2d(x_dropped, A, *geometry)
    grad_hidden, dB = _conv.conv2d_grads(hidden, B, s * grad_y, groups=groups)
    grad_x_dropped, dA = _conv.conv2d_grads(x_dropped, A, grad_hidden, *geometry)
    grad_x_base, _ = _conv.conv2d_grads(x, W, grad_y, *geometry)
    return Gradients(
        dx=grad_x_base + _dropped(grad_x_dropped, dropout_mask), dA=dA, dB=dB, db=grad_y.sum(axis=(0, 2, 3))
    )


def conv2d_delta_weight(A: np.ndarray, B: np.ndarray, s: Scaling) -> np.ndarray:
    """`delta_W = s * B_g @ A_g` per group g, reshaped like `W (out, in/groups, kh, kw)`."""
    groups = A.shape[0] // B.shape[1]
    grouped_a = A.reshape(groups, A.shape[0] // groups, -1)
    grouped_b = B.reshape(groups, B.shape[0] // groups, B.shape[1])
    return s * (grouped_b @ grouped_a).reshape(B.shape[0], *A.shape[1:])


_DELTAS = {"linear": delta_weight, "embedding": embedding_delta_weight, "conv2d": conv2d_delta_weight}


def _add_delta(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, s: Scaling, layer: str, sign: int, overwrite_w: bool
) -> np.ndarray:
    # At least float32, so half-precision weights are not rounded before the sum; cast back once.
    compute = np.promote_types(W.dtype, np.float32)
    delta = _DELTAS[layer](A.astype(compute), B.astype(compute), s)
    # In place on a copy of W (or on W itself when the caller gives it up): the same sums, but no
    # extra full-size temporaries (exporting a multi-GB model merges one large weight after another).
    reuse = overwrite_w and isinstance(W, np.ndarray) and W.dtype == compute and W.flags.writeable
    merged = W if reuse else W.astype(compute)
    if sign > 0:
        merged += delta
    else:
        merged -= delta
    return merged.astype(W.dtype, copy=False)


def merge(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, s: Scaling, layer: str = "linear", *, overwrite_w: bool = False
) -> np.ndarray:
    """`W + delta_W`, computed in at least float32 and cast back to W's dtype once.

    `layer` picks the update's formula: "linear", "embedding" or "conv2d". With `overwrite_w`
    (as in SciPy's `overwrite_a`), the result may be computed in W's own memory, when W is a
    writeable array already in the compute dtype, instead of a copy; W's values are then lost.
    The result is the same bit for bit.
    """
    return _add_delta(W, A, B, s, layer, +1, overwrite_w)


def unmerge(
    W_merged: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    layer: str = "linear",
    *,
    overwrite_w: bool = False,
) -> np.ndarray:
    """`W_merged - delta_W`; exact only up to rounding, so backends keep the base weight instead.

    `overwrite_w` as in `merge`.
    """
    return _add_delta(W_merged, A, B, s, layer, -1, overwrite_w)
