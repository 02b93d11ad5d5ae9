"""The Keras layers' one-pass GELU: the exact GELU and its gradient within float rounding."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from lora_spec.backends.keras_activations import activation_of
from lora_spec.backends.keras_layers import LoRAConv2D, LoRADense, LoRAEinsumDense
from tests import strategies
from tests.numerics import assert_close

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="needs Keras's TensorFlow backend")


def _keras_gelu_and_gradient(z: tf.Tensor, upstream: tf.Tensor, gelu) -> tuple[np.ndarray, np.ndarray]:
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = gelu(z)
    return y.numpy(), tape.gradient(y, z, output_gradients=upstream).numpy()


def _one_pass_gelu():
    return activation_of(LoRADense(1, activation="gelu"), training=True)


def _exact_gelu_and_gradient(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GELU and its derivative in float64, with `erfc` so that the negative tail keeps its precision."""
    z = np.asarray(z, np.float64)
    cdf = np.vectorize(lambda value: 0.5 * math.erfc(-value / math.sqrt(2)))(z)
    return z * cdf, cdf + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


# Worst error allowed, relative to max(1, |exact|): float32's is Keras's own worst error times five.
_ERROR_BOUND = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6}


def _assert_near_exact_gelu(z: np.ndarray, upstream: np.ndarray) -> None:
    y, gradient = _keras_gelu_and_gradient(tf.constant(z), tf.constant(upstream), _one_pass_gelu())
    exact_y, exact_derivative = _exact_gelu_and_gradient(z)
    bound = _ERROR_BOUND[z.dtype]
    assert y.dtype == z.dtype and gradient.dtype == z.dtype
    assert np.all(np.abs(y - exact_y) <= bound * np.maximum(1, np.abs(exact_y)))
    exact_gradient = upstream * exact_derivative
    assert np.all(np.abs(gradient - exact_gradient) <= bound * np.maximum(1, np.abs(exact_gradient)))


@given(st.data(), strategies.float_dtypes)
def test_outputs_and_gradients_are_the_exact_gelus(data, dtype):
    shape = data.draw(strategies.batch_shapes)
    _assert_near_exact_gelu(
        data.draw(strategies.arrays(shape, dtype, scale=4.0)), data.draw(strategies.arrays(shape, dtype))
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_whole_range_and_the_far_negative_tail_are_the_exact_gelus(dtype):
    z = np.linspace(-12, 12, 20001, dtype=dtype)
    _assert_near_exact_gelu(z, np.ones_like(z))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_at_least_as_close_to_the_exact_gelu_as_kerass(dtype):
    z = tf.cast(tf.linspace(-8.0, 8.0, 1601), dtype)
    exact_y, exact_gradient = _exact_gelu_and_gradient(tf.cast(z, tf.float64).numpy())
    keras_y, keras_gradient = _keras_gelu_and_gradient(z, tf.ones_like(z), keras.activations.gelu)
    y, gradient = _keras_gelu_and_gradient(z, tf.ones_like(z), _one_pass_gelu())
    assert y.dtype == keras_y.dtype
    worst = lambda actual, exact: np.max(np.abs(np.float64(actual) - exact))  # noqa: E731
    assert worst(y, exact_y) <= worst(keras_y, exact_y)
    assert worst(gradient, exact_gradient) <= worst(keras_gradient, exact_gradient)


@pytest.mark.parametrize(
    "make",
    [
        lambda activation: LoRADense(5, r=2, activation=activation),
        lambda activation: LoRAEinsumDense("ab,bc->ac", 5, r=2, activation=activation),
        lambda activation: LoRAConv2D(3, 2, r=2, activation=activation),
    ],
    ids=["dense", "einsum_dense", "conv2d"],
)
def test_layers_with_gelu_train_as_with_kerass_gelu_and_still_save_it_as_gelu(make):
    keras.utils.set_random_seed(0)
    layer = make("gelu")
    x = tf.constant(
        np.random.default_rng(0).standard_normal((2, 6, 6, 4) if isinstance(layer, LoRAConv2D) else (3, 4)), tf.float32
    )
    layer.build(x.shape)
    layer.lora_b.assign(np.random.default_rng(1).standard_normal(layer.lora_b.shape))
    one_pass = activation_of(layer, training=True)
    assert one_pass is not keras.activations.gelu and activation_of(layer) is keras.activations.gelu
    assert layer.get_config()["activation"] == "gelu"
    assert activation_of(type(layer).from_config(layer.get_config()), training=True) is one_pass  # kept on reload

    def gradients():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
        return tape.gradient(loss, [x, layer.lora_a.value, layer.lora_b.value])

    one_pass_gradients = gradients()
    layer.activation = lambda z: keras.activations.gelu(z)  # another function: the plain path
    for actual, expected in zip(one_pass_gradients, gradients(), strict=True):
        assert_close(actual, expected, np.float32, factor=4)


def test_other_activations_are_applied_as_given():
    relu_layer = LoRADense(2, activation="relu")
    assert activation_of(relu_layer, training=True) is relu_layer.activation


def test_inference_applies_kerass_gelu_bit_for_bit():
    layer = LoRADense(5, r=2, activation="gelu")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    plain = keras.layers.Dense(5, activation="gelu")
    plain.build(x.shape)
    layer.build(x.shape)
    layer.kernel.assign(plain.kernel)
    np.testing.assert_array_equal(layer(x), plain(x))


def test_gradients_are_the_same_under_xla():
    keras.utils.set_random_seed(0)
    layer = LoRADense(5, r=2, activation="gelu")
    x = tf.constant(np.random.default_rng(0).standard_normal((3, 4)), tf.float32)
    layer.build(x.shape)
    layer.lora_b.assign(np.random.default_rng(1).standard_normal(layer.lora_b.shape))

    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
        return tape.gradient(loss, [layer.lora_a.value, layer.lora_b.value])

    for actual, expected in zip(tf.function(gradients, jit_compile=True)(), gradients(), strict=True):
        assert_close(actual, expected, np.float32, factor=4)
