"""The Keras layers on Keras's PyTorch and JAX backends, against the NumPy reference.

`KERAS_BACKEND` is fixed when Keras is first imported, so the test runs this module as a script
in a fresh interpreter with `KERAS_BACKEND` set and reads the JSON it prints.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _checks() -> dict:
    import keras
    import numpy as np

    import lora_spec.keras as lora
    from lora_spec import dora, reference

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    mask = (rng.random(x.shape) > 0.3) / 0.7
    layer = lora.LoRADense(5, r=2, alpha=6)
    layer.build(x.shape)
    layer.set_lora_weights(rng.standard_normal((2, 6)), rng.standard_normal((5, 2)))
    A, B = layer.lora_weights()
    W, b = layer.base_weight(), keras.ops.convert_to_numpy(layer.bias)
    expected = {
        "forward": reference.forward(x, W, b, A, B, layer.scaling, mask),
        "merged": reference.forward(x, W, b, A, B, layer.scaling),
    }
    actual = {"forward": layer(x, dropout_mask=mask.astype(np.float32))}
    kernel = keras.ops.convert_to_numpy(layer.kernel).copy()
    layer.merge()
    actual["merged"] = layer(x)
    layer.unmerge()

    # DoRA: the reference's forward (dropout mask included) and merge, the norm detached in training.
    dora_layer = lora.LoRADense(5, r=2, alpha=6, use_dora=True)
    dora_layer.build(x.shape)
    magnitude = rng.uniform(0.5, 2.0, 5)
    dora_layer.set_lora_weights(A, B, magnitude=magnitude)
    W, b = dora_layer.base_weight(), keras.ops.convert_to_numpy(dora_layer.bias)
    expected |= {
        "dora": dora.dora_forward(x, W, b, A, B, dora_layer.scaling, magnitude, mask),
        "dora_merged": dora.dora_forward(x, W, b, A, B, dora_layer.scaling, magnitude),
    }
    actual["dora"] = dora_layer(x, dropout_mask=mask.astype(np.float32))
    dora_layer.merge()
    actual["dora_merged"] = dora_layer(x)
    dora_model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="fc1")])
    lora.apply(dora_model, r=2, use_dora=True, target_modules=["fc1"])
    dora_before = {v.name: keras.ops.convert_to_numpy(v).copy() for v in dora_model.weights}
    dora_model.compile(optimizer="adam", loss="mse")
    dora_model.fit(x, rng.standard_normal((4, 4)), epochs=2, verbose=0)

    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="fc1"), keras.layers.Dense(3, name="head")]
    )
    lora.apply(model, r=2, dropout=0.1)  # dropout draws from the layer's seed generator inside the compiled step
    weights = {f"{layer.name}/{v.name}": v for layer in model.layers for v in layer.weights}
    before = {name: keras.ops.convert_to_numpy(v).copy() for name, v in weights.items()}
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, rng.standard_normal((4, 3)), epochs=2, verbose=0)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)

    # A second adapter: switching in the compiled model, and rows routed per adapter through predict.
    lora.apply(model, adapter_name="other", r=3, target_modules=["fc1"])
    fc1 = model.get_layer("fc1")
    fc1.set_lora_weights(*(rng.standard_normal(shape) for shape in ((3, 6), (8, 3))), "other")
    default_output = keras.ops.convert_to_numpy(model(x))
    lora.set_adapter(model, "other")
    other_output = model.predict(x, verbose=0)
    lora.set_adapter(model, "default")
    ids = np.asarray([1, 0, -1, 1], np.int32)
    routed = lora.RoutedModel(model).predict([x, ids], batch_size=2, verbose=0)
    with lora.disable_adapters(model):
        base_output = keras.ops.convert_to_numpy(model(x))
    expected_routed = np.stack([other_output[0], default_output[1], base_output[2], other_output[3]])
    return {
        "switch_changed_outputs": bool(not np.allclose(other_output, default_output)),
        "routed_error": float(np.max(np.abs(routed - expected_routed))),
        "reload_error": float(np.max(np.abs(keras.ops.convert_to_numpy(loaded(x) - model(x))))),
        "reload_trainable": sorted(
            f"{layer.name}/{v.name}" for layer in loaded.layers for v in layer.trainable_weights
        ),
        "backend": keras.backend.backend(),
        "relative_errors": {
            name: float(np.max(np.abs(keras.ops.convert_to_numpy(actual[name]) - value)) / np.max(np.abs(value)))
            for name, value in expected.items()
        },
        "unmerge_exact": bool(np.array_equal(keras.ops.convert_to_numpy(layer.kernel), kernel)),
        "changed": sorted(
            name for name, v in weights.items() if not np.array_equal(before[name], keras.ops.convert_to_numpy(v))
        ),
        "dora_changed": sorted(
            v.name for v in dora_model.weights if not np.array_equal(dora_before[v.name], keras.ops.convert_to_numpy(v))
        ),
    }


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_lora_dense_matches_the_reference_and_trains_on_another_keras_backend(backend):
    for module in ("keras", backend):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    environment = {**os.environ, "KERAS_BACKEND": backend}
    completed = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    assert all(error < 2e-6 for error in result["relative_errors"].values()), result["relative_errors"]
    assert result["unmerge_exact"]
    assert result["reload_error"] == 0.0
    assert result["reload_trainable"] == ["fc1/lora_a", "fc1/lora_b"]
    assert result["changed"] == ["fc1/lora_a", "fc1/lora_b"]
    assert result["switch_changed_outputs"] and result["routed_error"] < 1e-5
    assert result["dora_changed"] == ["lora_a", "lora_b", "lora_magnitude_vector"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_checks()))
