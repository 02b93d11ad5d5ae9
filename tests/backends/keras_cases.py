"""Keras LoRA layers built from the strategies' cases: the case's weights in Keras's layouts.

Shared by the Keras layer tests and the cross-backend test; import it after
`pytest.importorskip("keras")`.
"""

from __future__ import annotations

import numpy as np

from lora_spec.backends.keras_layers import LoRAConv2D, LoRADense, LoRAEmbedding

DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def lora_dense(case, **kwargs) -> LoRADense:
    """A built LoRADense holding the case's weights (kernel = W.T, lora_a = A.T, lora_b = B.T)."""
    out_features, _in_features = case.W.shape
    r = case.A.shape[0]
    layer = LoRADense(
        out_features, r=r, alpha=case.s * r, use_bias=case.b is not None, dtype=DTYPE_NAMES[case.x.dtype], **kwargs
    )
    layer.build(case.x.shape)
    layer.kernel.assign(case.W.T)
    if case.b is not None:
        layer.bias.assign(case.b)
    layer.set_lora_weights(case.A, case.B)
    return layer


def dense_output_and_gradients(layer: LoRADense, case, grad_y: np.ndarray) -> tuple[np.ndarray, dict]:
    """The layer's training output on the case (its dropout mask) and the gradients of `sum(y * grad_y)`,
    in the reference layout: `dx`, `dA`, `dB` and `db` (None without a bias)."""
    return layer_output_and_gradients(layer, case.x, case.dropout_mask, grad_y)


def layer_output_and_gradients(
    layer, x: np.ndarray, dropout_mask: np.ndarray | None, grad_y: np.ndarray
) -> tuple[np.ndarray, dict]:
    """A LoRA layer's training output on `x` (Keras's layout; token ids for an embedding) and the gradients of
    `sum(y * grad_y)`: `dx` (None for ids) in Keras's layout, `dA`, `dB` in the reference's, `dmagnitude` (a DoRA
    adapter's, in PEFT's shape) and `db` (None without a trained bias)."""
    import tensorflow as tf

    from lora_spec.dora import magnitude_shape

    adapter = layer.adapter()
    x = tf.constant(x)
    kwargs = {} if isinstance(layer, LoRAEmbedding) else {"dropout_mask": dropout_mask}
    sources = {"dA": adapter.lora_a, "dB": adapter.lora_b}
    if adapter.use_dora:
        sources["dmagnitude"] = adapter.magnitude
    if getattr(layer, "bias", None) is not None:
        sources["db"] = layer.bias
    with tf.GradientTape() as tape:
        if x.dtype.is_floating:
            tape.watch(x)
        y = layer(x, training=True, **kwargs)
        loss = tf.reduce_sum(y * grad_y)
    gradients = dict(zip(["dx", *sources], tape.gradient(loss, [x] + [v.value for v in sources.values()]), strict=True))
    gradients = {
        name: None if value is None else np.asarray(tf.convert_to_tensor(value)) for name, value in gradients.items()
    }
    gradients["dA"], gradients["dB"] = layer._factors_to_reference(adapter, gradients["dA"], gradients["dB"])
    if adapter.use_dora:
        magnitude = gradients["dmagnitude"]
        gradients["dmagnitude"] = magnitude.reshape(magnitude_shape(layer.lora_kind, magnitude.size))
    gradients.setdefault("db", None)
    return y.numpy(), gradients


def nhwc(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.ascontiguousarray(array.transpose(0, 2, 3, 1))


def reference_padding(case) -> tuple:
    """`np.pad` widths of the reference's conv padding on an NCHW array."""
    return (0, 0), (0, 0), (case.padding[0],) * 2, (case.padding[1],) * 2


def keras_can_run(case) -> bool:
    """Keras refuses strides and dilation above 1 together."""
    return max(case.stride) == 1 or max(case.dilation) == 1


def lora_conv2d(case, **kwargs) -> tuple[LoRAConv2D, np.ndarray, np.ndarray | None]:
    """A built LoRAConv2D holding the case's weights, with the case's input and dropout mask padded as
    the reference pads them, channels last (Keras pads only 'valid' or 'same')."""
    out_channels, _, height, width = case.W.shape
    r = case.A.shape[0]
    layer = LoRAConv2D(
        out_channels,
        (height, width),
        strides=case.stride,
        dilation_rate=case.dilation,
        groups=case.groups,
        use_bias=case.b is not None,
        r=r,
        alpha=case.s * r,
        dtype=DTYPE_NAMES[case.x.dtype],
        **kwargs,
    )
    pad = reference_padding(case)
    x = nhwc(np.pad(case.x, pad))
    layer.build(x.shape)
    layer.kernel.assign(case.W.transpose(2, 3, 1, 0))
    if case.b is not None:
        layer.bias.assign(case.b)
    layer.set_lora_weights(case.A, case.B)
    mask = None if case.dropout_mask is None else nhwc(np.pad(case.dropout_mask, pad))
    return layer, x, mask


def lora_embedding(case, **kwargs) -> LoRAEmbedding:
    """A built LoRAEmbedding holding the case's table and adapter."""
    r = case.A.shape[0]
    layer = LoRAEmbedding(*case.W.shape, r=r, alpha=case.s * r, dtype=DTYPE_NAMES[case.W.dtype], **kwargs)
    layer.build()
    layer.embeddings.assign(case.W)
    layer.set_lora_weights(case.A, case.B)
    return layer


def dora_layer(dora_case) -> tuple:
    """`(layer, x, dropout mask)`: a built Keras DoRA layer holding the case's weights and magnitude, and the
    case's input and mask in Keras's layout (a conv's padded as the reference pads it)."""
    case = dora_case.case
    if dora_case.layer == "linear":
        layer, x, mask = lora_dense(case, use_dora=True, train_bias=True), case.x, case.dropout_mask
    elif dora_case.layer == "embedding":
        layer, x, mask = lora_embedding(case, use_dora=True), case.ids, None
    else:
        layer, x, mask = lora_conv2d(case, use_dora=True, train_bias=True)
    layer.set_lora_weights(case.A, case.B, magnitude=dora_case.magnitude)
    return layer, x, mask
