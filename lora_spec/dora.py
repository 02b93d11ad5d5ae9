"""DoRA (weight-decomposed low-rank adaptation, arXiv 2402.09353) in NumPy, exactly as PEFT computes it.

A DoRA adapter is a LoRA adapter `(A, B, s)` plus a trained magnitude `m`, one value per output
feature. With `n = ||W + s * delta||` per output feature, a constant for the backward pass (the
paper's section 4.3; PEFT detaches it), and `d` the dropout:

    y = W x + b + (m/n - 1) * (W d(x)) + (m/n) * s * B A d(x)

Without dropout that is `(m/n) * (W + s * delta)` applied to `x`, plus `b`: the merged weight. The
magnitude starts at `n` of the initial adapter (`||W||` when B = 0), where DoRA equals LoRA.

"Per output feature" uses PEFT's axes, and magnitudes have PEFT's stored shapes:

- linear: `W (out, in)`, `delta = B @ A`; `n` is the norm of each row; `m (out,)`. Hugging Face's
  `Conv1D` (GPT-2, `fan_in_fan_out`) stores `W` transposed: pass `W.T`; `m` stays `(out,)`.
- embedding: table `W (num, dim)`, `delta = (B @ A).T`; `n` is the norm of each column, over the
  whole vocabulary; `m (dim,)`; `y = (m/n) * (W + s * delta)[ids]`. No dropout, as in PEFT.
- conv2d: `W (out, in, kh, kw)`; `n` is the norm of each output channel's filter; `m (1, out, 1, 1)`.
  Grouped convolutions are refused: PEFT's DoRA reshapes their update into the wrong channels,
  so no DoRA file of a grouped convolution means the same thing to PEFT and to lora_spec.

Norms are computed in at least float32: a float16 weight's squares overflow long before its norm
does. `layer` names the kind of layer, as in `lora_spec.reference.merge`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from lora_spec import _conv, reference
from lora_spec.reference import Scaling, _dropped, _rows

LAYERS = ("linear", "embedding", "conv2d")
# The axis of the weight that indexes output features (the embedding's table is (num, dim)).
_FEATURE_AXIS = {"linear": 0, "embedding": 1, "conv2d": 0}


class DoRAGradients(NamedTuple):
    """Gradients of a DoRA layer; `dx` is None for integer inputs, `db` None without a bias."""

    dx: np.ndarray | None
    dA: np.ndarray
    dB: np.ndarray
    dmagnitude: np.ndarray
    db: np.ndarray | None


def magnitude_shape(layer: str, features: int) -> tuple[int, ...]:
    """PEFT's stored shape of a magnitude for a layer with `features` output features."""
    return (1, features, 1, 1) if layer == "conv2d" else (features,)


def _check_groups(groups: int) -> None:
    if groups != 1:
        raise ValueError(
            f"DoRA on a grouped convolution (groups={groups}) is not supported: PEFT's DoRA puts the "
            "update of a grouped convolution in the wrong channels, so its files would not agree with "
            "ours; use plain LoRA on grouped convolutions."
        )


def check_supported(layer: str, A: np.ndarray, B: np.ndarray) -> None:
    """Refuse in one line a layer kind DoRA does not have, or a grouped convolution's adapter."""
    if layer not in LAYERS:
        raise ValueError(f"layer={layer!r} is invalid: use one of {', '.join(map(repr, LAYERS))}.")
    if layer == "conv2d":
        _check_groups(A.shape[0] // B.shape[1])


def _adapted(W: np.ndarray, A: np.ndarray, B: np.ndarray, s: Scaling, layer: str) -> np.ndarray:
    """`W + s * delta` in at least float32, in W's layout."""
    compute = np.promote_types(W.dtype, np.float32)
    return reference.merge(W.astype(compute), A.astype(compute), B.astype(compute), s, layer, overwrite_w=True)


def _feature_norms(adapted: np.ndarray, layer: str) -> np.ndarray:
    """The norm of each output feature's slice of `adapted`, in PEFT's magnitude shape."""
    axis = _FEATURE_AXIS[layer]
    others = tuple(index for index in range(adapted.ndim) if index != axis)
    return np.sqrt(np.sum(np.square(adapted), axis=others)).reshape(magnitude_shape(layer, adapted.shape[axis]))


def weight_norm(W: np.ndarray, A: np.ndarray, B: np.ndarray, s: Scaling, layer: str = "linear") -> np.ndarray:
    """`n = ||W + s * delta||` per output feature, in PEFT's magnitude shape, computed in at least float32."""
    check_supported(layer, A, B)
    return _feature_norms(_adapted(W, A, B, s, layer), layer)


def init_magnitude(W: np.ndarray, A: np.ndarray, B: np.ndarray, s: Scaling, layer: str = "linear") -> np.ndarray:
    """The magnitude a DoRA adapter starts with: `weight_norm` of the initial adapter, so DoRA starts as LoRA."""
    return weight_norm(W, A, B, s, layer)


def _factor(
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    magnitude: np.ndarray,
    layer: str,
    norm: np.ndarray | None,
) -> np.ndarray:
    """`m / n` in the magnitude's shape; `norm` None computes n from the adapter."""
    check_supported(layer, A, B)
    features = W.shape[_FEATURE_AXIS[layer]]
    expected = magnitude_shape(layer, features)
    if np.shape(magnitude) != expected:
        raise ValueError(
            f"DoRA magnitude has shape {np.shape(magnitude)}, but this {layer} layer has {features} output "
            f"features, so PEFT's shape is {expected}: the magnitude belongs to another layer."
        )
    return magnitude / (weight_norm(W, A, B, s, layer) if norm is None else norm)


def _feature_column(vector: np.ndarray, layer: str, ndim: int) -> np.ndarray:
    """A per-feature vector shaped to broadcast along the feature axis of a weight with `ndim` dims."""
    shape = [1] * ndim
    shape[_FEATURE_AXIS[layer]] = -1
    return np.reshape(vector, shape)


# --- linear -----------------------------------------------------------------------------------------------------


def dora_forward(
    x: np.ndarray,
    W: np.ndarray,
    b: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    magnitude: np.ndarray,
    dropout_mask: np.ndarray | None = None,
    norm: np.ndarray | None = None,
) -> np.ndarray:
    """`y = x @ W.T + b + (m/n - 1) * (d(x) @ W.T) + (m/n) * s * (d(x) @ A.T) @ B.T`, d the dropout mask.

    `norm` is `n` when the caller has it (a backend caches it; the gradient test holds it fixed),
    else it is computed from W, A and B.
    """
    factor = _factor(W, A, B, s, magnitude, "linear", norm)
    x_dropped = _dropped(x, dropout_mask)
    y = x @ W.T if b is None else x @ W.T + b
    return y + (factor - 1) * (x_dropped @ W.T) + factor * s * ((x_dropped @ A.T) @ B.T)


def dora_backward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    magnitude: np.ndarray,
    grad_y: np.ndarray,
    dropout_mask: np.ndarray | None = None,
    norm: np.ndarray | None = None,
) -> DoRAGradients:
    """Hand-written gradients of `sum(grad_y * dora_forward(...))`, with `n` held constant.

    With `f = m/n`, `h = d(x) @ A.T` and `g = grad_y`: `dm = sum(g * (d(x) @ W.T + s * h @ B.T)) / n`,
    `dB = s * (g*f).T @ h`, `dh = s * (g*f) @ B`, `dA = dh.T @ d(x)`,
    `dx = g @ W + d((g*(f-1)) @ W + dh @ A)`, `db = sum(g)`.
    """
    norm = weight_norm(W, A, B, s) if norm is None else norm
    factor = _factor(W, A, B, s, magnitude, "linear", norm)
    x_dropped = _dropped(x, dropout_mask)
    hidden = x_dropped @ A.T
    scaled_grad = grad_y * factor
    grad_hidden = s * (scaled_grad @ B)
    direction = x_dropped @ W.T + s * (hidden @ B.T)
    return DoRAGradients(
        dx=grad_y @ W + _dropped((grad_y * (factor - 1)) @ W + grad_hidden @ A, dropout_mask),
        dA=_rows(grad_hidden).T @ _rows(x_dropped),
        dB=s * (_rows(scaled_grad).T @ _rows(hidden)),
        dmagnitude=_rows(grad_y * direction).sum(axis=0) / norm,
        db=_rows(grad_y).sum(axis=0),
    )


# --- embedding --------------------------------------------------------------------------------------------------


def dora_embedding_forward(
    ids: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    magnitude: np.ndarray,
    norm: np.ndarray | None = None,
) -> np.ndarray:
    """`y = (m/n) * (W[ids] + s * A.T[ids] @ B.T)` for a table `W (num, dim)`; no dropout."""
    factor = _factor(W, A, B, s, magnitude, "embedding", norm)
    return factor * reference.embedding_forward(ids, W, A, B, s)


def dora_embedding_backward(
    ids: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    magnitude: np.ndarray,
    grad_y: np.ndarray,
    norm: np.ndarray | None = None,
) -> DoRAGradients:
    """Gradients of `sum(grad_y * dora_embedding_forward(...))`, `n` held constant: the LoRA
    embedding's gradients of `grad_y * m/n`, and `dm = sum(grad_y * (W + s * delta)[ids]) / n`."""
    norm = weight_norm(W, A, B, s, "embedding") if norm is None else norm
    factor = _factor(W, A, B, s, magnitude, "embedding", norm)
    lora = reference.embedding_backward(ids, A, B, s, grad_y * factor)
    direction = reference.embedding_forward(ids, W, A, B, s)
    return DoRAGradients(
        dx=None, dA=lora.dA, dB=lora.dB, dmagnitude=_rows(grad_y * direction).sum(axis=0) / norm, db=None
    )


# --- conv2d -----------------------------------------------------------------------------------------------------


def dora_conv2d_forward(
    x: np.ndarray,
    W: np.ndarray,
    b: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    magnitude: np.ndarray,
    stride: _conv.Pair = (1, 1),
    padding: _conv.Pair = (0, 0),
    dilation: _conv.Pair = (1, 1),
    groups: int = 1,
    dropout_mask: np.ndarray | None = None,
    norm: np.ndarray | None = None,
) -> np.ndarray:
    """`y = conv(x, W) + b + (m/n - 1) * conv(d(x), W) + (m/n) * s * conv1x1(conv(d(x), A), B)`.

    `m/n` is `(1, out, 1, 1)`, so it scales output channels. `groups` must be 1 (see the module).
    """
    _check_groups(groups)
    factor = _factor(W, A, B, s, magnitude, "conv2d", norm)
    geometry = (stride, padding, dilation, groups)
    x_dropped = _dropped(x, dropout_mask)
    y = _conv.conv2d(x, W, *geometry)
    if b is not None:
        y = y + b[:, None, None]
    update = _conv.conv2d(_conv.conv2d(x_dropped, A, *geometry), B)
    return y + (factor - 1) * _conv.conv2d(x_dropped, W, *geometry) + factor * s * update


def dora_conv2d_backward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    magnitude: np.ndarray,
    grad_y: np.ndarray,
    stride: _conv.Pair = (1, 1),
    padding: _conv.Pair = (0, 0),
    dilation: _conv.Pair = (1, 1),
    groups: int = 1,
    dropout_mask: np.ndarray | None = None,
    norm: np.ndarray | None = None,
) -> DoRAGradients:
    """Gradients of `sum(grad_y * dora_conv2d_forward(...))`, `n` held constant, by the chain rule
    through the convolutions (as `dora_backward`, with channels for features)."""
    _check_groups(groups)
    norm = weight_norm(W, A, B, s, "conv2d") if norm is None else norm
    factor = _factor(W, A, B, s, magnitude, "conv2d", norm)
    geometry = (stride, padding, dilation, groups)
    x_dropped = _dropped(x, dropout_mask)
    hidden = _conv.conv2d(x_dropped, A, *geometry)
    grad_hidden, dB = _conv.conv2d_grads(hidden, B, s * factor * grad_y)
    grad_x_update, dA = _conv.conv2d_grads(x_dropped, A, grad_hidden, *geometry)
    grad_x_rescaled, _ = _conv.conv2d_grads(x_dropped, W, (factor - 1) * grad_y, *geometry)
    grad_x_base, _ = _conv.conv2d_grads(x, W, grad_y, *geometry)
    direction = _conv.conv2d(x_dropped, W, *geometry) + s * _conv.conv2d(hidden, B)
    return DoRAGradients(
        dx=grad_x_base + _dropped(grad_x_rescaled + grad_x_update, dropout_mask),
        dA=dA,
        dB=dB,
        dmagnitude=np.sum(grad_y * direction, axis=(0, 2, 3), keepdims=True) / norm,
        db=grad_y.sum(axis=(0, 2, 3)),
    )


# --- merge ------------------------------------------------------------------------------------------------------


def dora_merge(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, s: Scaling, magnitude: np.ndarray, layer: str = "linear"
) -> np.ndarray:
    """`(m/n) * (W + s * delta)` per output feature, computed in at least float32 and cast back to
    W's dtype once: the weight whose plain layer computes the DoRA layer in evaluation.

    Keep `weight_norm(W, A, B, s, layer)` (or W itself) to undo it: `dora_unmerge` needs `n`,
    which the merged weight no longer determines.
    """
    check_supported(layer, A, B)
    adapted = _adapted(W, A, B, s, layer)
    factor = _factor(W, A, B, s, magnitude, layer, _feature_norms(adapted, layer))
    adapted *= _feature_column(factor, layer, adapted.ndim)
    return adapted.astype(W.dtype, copy=False)


def dora_unmerge(
    W_merged: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    s: Scaling,
    magnitude: np.ndarray,
    norm: np.ndarray,
    layer: str = "linear",
) -> np.ndarray:
    """`W_merged / (m/n) - s * delta`, `n` the norm at merge time; exact only up to rounding, so
    backends keep the base weight instead, as for LoRA."""
    compute = np.promote_types(W_merged.dtype, np.float32)
    factor = _factor(W_merged, A, B, s, magnitude, layer, norm)
    unscaled = W_merged.astype(compute) / _feature_column(factor, layer, W_merged.ndim)
    return reference.unmerge(unscaled, A.astype(compute), B.astype(compute), s, layer, overwrite_w=True).astype(
        W_merged.dtype, copy=False
    )


def merge_adapters(
    W: np.ndarray,
    adapters: Sequence[tuple[np.ndarray, np.ndarray, float]],
    magnitudes: Sequence[np.ndarray | None],
    layer: str = "linear",
) -> np.ndarray:
    """What several active adapters `(A, B, s)` of one layer add up to in evaluation, as one weight.

    Each adapter's update is taken against `W` as if it ran alone: `s * delta` for plain LoRA
    (magnitude None), `(m/n - 1) * W + (m/n) * s * delta` for DoRA (PEFT's sum when DoRA adapters
    come first), so the weight is `(1 + sum(m/n - 1)) * W + sum((m/n) * s * delta)`. One DoRA
    adapter is `dora_merge`. Computed in at least float32, cast to W's dtype once.
    """
    if len(adapters) == 1 and magnitudes[0] is not None:
        return dora_merge(W, *adapters[0], magnitudes[0], layer)
    compute = np.promote_types(W.dtype, np.float32)
    features = W.shape[_FEATURE_AXIS[layer]]
    weight_scale = np.ones(features, compute)
    parts_a, parts_b = [], []
    for (A, B, s), magnitude in zip(adapters, magnitudes, strict=True):
        delta_scale = np.full(features, s, compute)
        if magnitude is not None:
            factor = _factor(W, A, B, s, magnitude, layer, None).reshape(-1)
            weight_scale += factor - 1
            delta_scale *= factor
        parts_a.append(A.astype(compute))
        # B's first axis indexes the output features in every layout: scaling its rows scales theirs.
        parts_b.append(B.astype(compute) * delta_scale.reshape((-1,) + (1,) * (B.ndim - 1)))
    return merge_with_feature_scales(
        W, np.concatenate(parts_a, axis=0), np.concatenate(parts_b, axis=1), weight_scale, 1.0, layer
    )


def merge_with_feature_scales(
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    weight_scale: Scaling,
    delta_scale: Scaling,
    layer: str = "linear",
    *,
    overwrite_w: bool = False,
) -> np.ndarray:
    """`weight_scale * W + delta_scale * delta(A, B)` per output feature, in W's layout and dtype.

    The scales are scalars or vectors over the output features (any shape holding `out` values).
    DoRA's merge is `weight_scale = delta_scale / s = m/n`; the ONNX exporter folds graphs whose
    per-feature constants it evaluates into this form. Computed in at least float32 and cast once;
    with `overwrite_w`, in W's own memory when W is a writeable array of the compute dtype.
    """
    check_supported(layer, A, B)
    compute = np.promote_types(W.dtype, np.float32)
    reuse = overwrite_w and isinstance(W, np.ndarray) and W.dtype == compute and W.flags.writeable
    merged = W if reuse else W.astype(compute)
    merged *= _feature_column(np.asarray(weight_scale, compute).reshape(-1), layer, merged.ndim)
    delta = reference._DELTAS[layer](A.astype(compute), B.astype(compute), 1.0)
    delta *= _feature_column(np.asarray(delta_scale, compute).reshape(-1), layer, delta.ndim)
    merged += delta
    return merged.astype(W.dtype, copy=False)
