"""Tiny Keras models exported by the exporter tests: an MLP (2-D and 3-D inputs), attention and convolutions."""

import keras
import numpy as np

from tests.export.onnx_roundtrip import INPUT_SHAPES


def mlp(dims: int) -> keras.Model:
    inputs = keras.Input(INPUT_SHAPES[dims][1:])
    hidden = keras.layers.Dense(6, activation="gelu", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def attention(dims: int) -> keras.Model:
    inputs = keras.Input(INPUT_SHAPES[dims][1:])
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, name="attention")(inputs, inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(attended))


def cnn(dims: int) -> keras.Model:
    images = keras.Input(INPUT_SHAPES[dims][1:])
    hidden = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv1")(images)
    hidden = keras.layers.Conv2D(5, 3, dilation_rate=2, padding="same", name="conv2")(hidden)
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(hidden))


CASES = {
    "2d": (mlp, 2, ["hidden", "head"]),
    "3d": (mlp, 3, ["hidden", "head"]),
    "attention": (attention, 3, ["query", "key", "value", "attention_output"]),
    "cnn": (cnn, 4, ["conv1", "conv2"]),
}


def with_biases(base: keras.Model, x: np.ndarray) -> keras.Model:
    """`base` built on `x`, its biases set off zero: tf2onnx drops a zero bias, and a trained model has none."""
    base(x)
    rng = np.random.default_rng(3)
    for variable in base.weights:
        if variable.name == "bias":
            variable.assign(rng.standard_normal(variable.shape).astype(np.float32))
    return base


def adapted(base: keras.Model, targets, r: int = 2, alpha: float = 6, seed: int = 2, **options) -> keras.Model:
    """A copy of `base` with `lora_spec.keras` LoRA on `targets` (`options`: more `LoRAConfig` fields), B random
    (the branch shows) and DoRA magnitudes off their initial norms."""
    import lora_spec.keras as lora

    model = keras.models.clone_model(base)
    model.set_weights(base.get_weights())
    lora.apply(model, r=r, alpha=alpha, target_modules=targets, **options)
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if "lora_b" in variable.path:
            variable.assign(rng.standard_normal(variable.shape).astype(np.float32))
        if "lora_magnitude_vector" in variable.path:
            variable.assign(variable.numpy() * rng.uniform(0.5, 2.0, variable.shape).astype(np.float32))
    return model
