"""Keras LoRA layers built from the strategies' cases: the case's weights in Keras's layouts.

Shared by the Keras layer tests and the cross-backend test; import it after
`pytest.importorskip("keras")`.
"""

from __future__ import annotations

import numpy as np

from lora_spec.backends.keras_layers import LoRAConv2D, LoRADense

DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def lora_dense(case, **kwargs) -> LoRADense:
    """A built LoRADense holding the case's weights (kernel = W.T, lora_a = A.T, lora_b = B.T)."""
    out_features, in_features = case.W.shape
    r = case.A.shape[0]
    layer = LoRADense(out_features, r=r, alpha=case.s * r, use_bias=case.b is not None,
                      dtype=DTYPE_NAMES[case.x.dtype], **kwargs)
    layer.build(case.x.shape)
    layer.kernel.assign(case.W.T)
    if case.b is not None:
        layer.bias.assign(case.b)
    layer.set_lora_weights(case.A, case.B)
    return layer


def dense_output_and_gradients(layer: LoRADense, case, grad_y: np.ndarray) -> tuple[np.ndarray, dict]:
    """The layer's training output on the case (its dropout mask) and the gradients of `sum(y * grad_y)`,
    in the reference layout: `dx`, `dA`, `dB` and `db` (None without a bias)."""
    import tensorflow as tf

    x = tf.constant(case.x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, dropout_mask=case.dropout_mask)
        loss = tf.reduce_sum(y * grad_y)
    sources = [x, layer.lora_a.value, layer.lora_b.value] + ([layer.bias.value] if case.b is not None else [])
    gradients = tape.gradient(loss, sources)
    return y.numpy(), {"dx": gradients[0].numpy(), "dA": gradients[1].numpy().T, "dB": gradients[2].numpy().T,
                       "db": gradients[3].numpy() if case.b is not None else None}


def nhwc(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def reference_padding(case) -> tuple:
    """`np.pad` widths of the reference's conv padding on an NCHW array."""
    return (0, 0), (0, 0), (case.padding[0],) * 2, (case.padding[1],) * 2


def keras_can_run(case) -> bool:
    """Keras refuses strides and dilation above 1 together."""
    return max(case.stride) == 1 or max(case.dilation) == 1


def lora_conv2d(case) -> tuple[LoRAConv2D, np.ndarray, np.ndarray | None]:
    """A built LoRAConv2D holding the case's weights, with the case's input and dropout mask padded as
    the reference pads them, channels last (Keras pads only 'valid' or 'same')."""
    out_channels, _, height, width = case.W.shape
    r = case.A.shape[0]
    layer = LoRAConv2D(out_channels, (height, width), strides=case.stride, dilation_rate=case.dilation,
                       groups=case.groups, use_bias=case.b is not None, r=r, alpha=case.s * r,
                       dtype=DTYPE_NAMES[case.x.dtype])
    pad = reference_padding(case)
    x = nhwc(np.pad(case.x, pad))
    layer.build(x.shape)
    layer.kernel.assign(case.W.transpose(2, 3, 1, 0))
    if case.b is not None:
        layer.bias.assign(case.b)
    layer.set_lora_weights(case.A, case.B)
    mask = None if case.dropout_mask is None else nhwc(np.pad(case.dropout_mask, pad))
    return layer, x, mask
