"""LoRA under TensorFlow's own scale-out engine: a `MirroredStrategy` training step on 2 logical CPU devices.

Logical devices must be configured before TensorFlow starts, so the test runs this module as a
script in a fresh interpreter and reads the JSON it prints.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPLICAS = 2


def _training_step() -> dict:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS)
    import keras
    import numpy as np

    import lora_spec.keras as lora

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="gelu", name="fc1"),
                keras.layers.Dense(16, activation="gelu", name="fc2"),
                keras.layers.Dense(4, name="head"),
            ]
        )
        lora.apply(model, r=4, alpha=8, dropout=0.1)
        model.compile(optimizer=keras.optimizers.AdamW(0.01), loss="mse")
    before = {f"{layer.name}/{v.name}": v.numpy().copy() for layer in model.layers for v in layer.weights}
    rng = np.random.default_rng(0)
    model.fit(rng.standard_normal((16, 8)), rng.standard_normal((16, 4)), batch_size=16, epochs=1, verbose=0)
    after = {f"{layer.name}/{v.name}": v for layer in model.layers for v in layer.weights}
    replicas_agree = all(
        np.array_equal(*(np.asarray(value) for value in strategy.experimental_local_results(variable.value)))
        for variable in after.values()
    )
    return {
        "replicas": strategy.num_replicas_in_sync,
        "replicas_agree": bool(replicas_agree),
        "mirrored": type(model.get_layer("fc1").lora_a.value).__name__,
        "changed": sorted(name for name, value in before.items() if not np.array_equal(value, after[name].numpy())),
    }


def test_mirrored_strategy_step_on_two_devices_changes_only_lora_weights():
    pytest.importorskip("tensorflow")
    environment = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    completed = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["replicas"] == REPLICAS and result["replicas_agree"]
    assert result["mirrored"] == "MirroredVariable"
    assert result["changed"] == ["fc1/lora_a", "fc1/lora_b", "fc2/lora_a", "fc2/lora_b"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_training_step()))
