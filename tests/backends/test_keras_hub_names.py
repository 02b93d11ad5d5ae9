"""KerasHub models exchange adapters with Hugging Face transformers and PEFT (`naming="transformers"`).

Every required architecture, both ways, on tiny random checkpoints (`keras_hub_models`): PEFT's
adapters run in KerasHub with PEFT's outputs, and adapters trained in KerasHub run in PEFT with
KerasHub's, on Keras's TensorFlow backend here and on JAX and torch in subprocesses. The
tolerance is set by the two base models' own difference (KerasHub's ports are not all exact).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora_spec.keras as lora  # noqa: E402
from lora_spec import safetensors_io  # noqa: E402
from lora_spec.backends import keras_hub_architectures  # noqa: E402
from lora_spec.backends.keras_hub_names import TransformersNames  # noqa: E402
from lora_spec.backends.keras_hub_recording import is_kernel  # noqa: E402
from tests.backends import keras_hub_models as hub  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="needs Keras's TensorFlow backend")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub")
    hub.prepare(folder, list(hub.CASES))
    return folder


def tolerance(base_difference: float) -> float:
    """How far two adapted models may differ when their base models differ by `base_difference`."""
    return 1e-5 + 10 * base_difference


def check_both_directions(folder: Path, output: Path, name: str, result: dict) -> None:
    """The KerasHub model with PEFT's adapter gave PEFT's outputs, and its own trained adapter, saved with
    transformers' names in `output`, gives in PEFT the outputs it gave in KerasHub; each adapter visibly
    changes them."""
    limit = tolerance(result["base"])
    peft_outputs, base_outputs = np.load(folder / name / "peft_outputs.npy"), np.load(folder / name / "base_outputs.npy")
    assert result["peft"] <= limit
    assert np.max(np.abs(peft_outputs - base_outputs)) > 100 * limit
    model = peft.PeftModel.from_pretrained(hub.transformers_model(name, folder / name / "checkpoint"),
                                           str(output / name / "keras"))
    keras_outputs = np.load(output / name / "keras_outputs.npy")
    assert np.max(np.abs(hub.transformers_outputs(model.eval()) - keras_outputs)) <= limit
    assert np.max(np.abs(keras_outputs - base_outputs)) > 100 * limit
    config = json.loads((output / name / "keras" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(hub.CASES[name].targets)


@pytest.mark.parametrize("name", hub.CASES)
def test_adapters_cross_between_peft_and_keras_hub_with_equal_outputs(prepared, name):
    output = prepared / "tensorflow"
    result = hub.run_on_this_backend(prepared, output, [name])[name]
    check_both_directions(prepared, output, name, result)
    if name == "llama":  # the yardstick: KerasHub's Llama port is exact to float32 rounding
        assert result["base"] < 1e-6


# Keras's JAX backend compiles a program per operation and shape, which makes even tiny KerasHub models take
# seconds each: there XLA compiles without optimisation passes, and it runs one architecture of each mapping
# (per-head kernels with grouped-query attention, the fused Conv1D, an encoder with biases) with a random
# adapter; the training steps run on TensorFlow and torch, which run every architecture.
OTHER_BACKENDS = {
    "jax": dict(names=["llama", "gpt2", "bert"], steps=0, XLA_FLAGS="--xla_backend_optimization_level=0"),
    "torch": dict(names=list(hub.CASES), steps=2),
}


@pytest.fixture(scope="module")
def other_backends(prepared):
    """The subprocesses of both backends, started together: each holds one of the two cores the suite runs on."""
    processes = {}
    for backend, options in OTHER_BACKENDS.items():
        if importlib.util.find_spec(backend) is None:
            continue
        environment = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT),
                       **{key: value for key, value in options.items() if key.isupper()}}
        command = [sys.executable, str(ROOT / "tests" / "backends" / "keras_hub_models.py"), str(prepared),
                   str(prepared / backend), str(options["steps"]), *options["names"]]
        (prepared / backend).mkdir()
        # Files, not pipes: a full pipe would stall one process while the test waits on the other.
        with open(prepared / backend / "stdout", "w") as stdout, open(prepared / backend / "stderr", "w") as stderr:
            processes[backend] = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=stdout, stderr=stderr)
    yield processes
    for process in processes.values():
        process.kill()
        process.wait()


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_adapters_cross_on_keras_jax_and_torch_backends(prepared, other_backends, backend):
    if backend not in other_backends:
        pytest.skip(f"{backend} is not installed")
    assert other_backends[backend].wait(timeout=600) == 0, (prepared / backend / "stderr").read_text()[-3000:]
    results = json.loads((prepared / backend / "stdout").read_text().strip().splitlines()[-1])
    assert results["backend"] == backend
    for name in OTHER_BACKENDS[backend]["names"]:
        check_both_directions(prepared, prepared / backend, name, results[name])


# -- the mapping is KerasHub's ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", hub.CASES)
def test_recorded_mapping_reproduces_what_keras_hub_loads(prepared, name):
    model = hub.keras_task(name, prepared / name / "checkpoint")
    tensors, _ = safetensors_io.load(prepared / name / "checkpoint" / "model.safetensors")
    names = TransformersNames(model)
    ported = [(layer, variable) for members in names.fed.values() for _, layer, variable in members]
    assert {id(variable) for _, variable in ported} == {id(variable) for variable in model.backbone.weights}
    for layer, variable in ported:
        placement = names.recording.placement(layer, variable)
        tensor = next(value for key, value in tensors.items() if key == placement.key or key.endswith("." + placement.key))
        assert tensor.shape == placement.shape
        np.testing.assert_array_equal(tensor.reshape(-1)[placement.index], keras.ops.convert_to_numpy(variable))


# KerasHub 0.32 has no exporter for Qwen3 and BERT, and its Gemma exporter keeps the first key and value head
# only (`key_dense.weights[0][0]`), which is Gemma's multi-query attention but not Gemma 2's grouped one.
EXPORTED = [name for name in hub.CASES if name not in ("qwen3", "bert", "gemma2")]


@pytest.mark.parametrize("name", EXPORTED)
def test_saved_layouts_are_those_of_keras_hub_exporter(prepared, name):
    from keras_hub.src.utils.transformers.export.hf_exporter import MODEL_EXPORTERS

    model = hub.keras_task(name, prepared / name / "checkpoint")
    names = TransformersNames(model)
    exported = MODEL_EXPORTERS[type(model.backbone).__name__](model.backbone, include_lm_head=True)
    class_name = names.architecture.default_class
    # The linear layers adapters are on (KerasHub's Gemma exporter writes Gemma 2's norms under Gemma's names).
    keys = {names.class_path(bare, class_name): bare for bare, members in names.fed.items()
            if is_kernel(*members[0][1:])}
    assert set(keys) <= set(exported)
    for key, bare in keys.items():
        np.testing.assert_array_equal(names.values(bare), keras.ops.convert_to_numpy(exported[key]), err_msg=key)


@pytest.mark.parametrize("name", hub.CASES)
def test_architecture_rows_name_the_state_dicts_of_transformers_classes(prepared, name):
    model = hub.keras_task(name, prepared / name / "checkpoint")
    names = TransformersNames(model)
    architecture = names.architecture
    hf_model = hub.transformers_model(name, prepared / name / "checkpoint")
    assert type(hf_model).__name__ == architecture.default_class
    assert type(hf_model).base_model_prefix == architecture.base_prefix
    assert type(hf_model.base_model).__name__ == architecture.bare
    for class_name, state in ((architecture.default_class, hf_model.state_dict()),
                              (architecture.bare, hf_model.base_model.state_dict())):
        keys = {names.class_path(bare, class_name) for bare in names.fed
                if class_name == architecture.causal_lm or bare.split(".")[0] not in architecture.head}
        assert keys <= set(state), sorted(keys - set(state))


# -- GPT-2's fused attention -------------------------------------------------------------------------------

def test_gpt2_query_key_value_are_written_as_c_attn_at_three_times_the_rank(prepared, tmp_path):
    model = hub.train("gpt2", lora.apply(hub.keras_task("gpt2", prepared / "gpt2" / "checkpoint"),
                                                   naming="transformers", target_modules=["c_attn"], r=2, alpha=3))
    lora.save_adapter(model, tmp_path, naming="transformers")
    tensors, _ = safetensors_io.load(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (2, 3, True)
    assert config["rank_pattern"] == {r"transformer\.h\.0\.attn\.c_attn": 6, r"transformer\.h\.1\.attn\.c_attn": 6}
    assert config["alpha_pattern"] == {r"transformer\.h\.0\.attn\.c_attn": 9, r"transformer\.h\.1\.attn\.c_attn": 9}
    lora_a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    lora_b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert lora_a.shape == (6, 32) and lora_b.shape == (96, 6)
    layers = dict(lora.lora_layers(model))
    for block, part in enumerate(("query", "key", "value")):
        a, b = layers[f"gpt2_backbone.transformer_layer_0.self_attention.{part}"].lora_weights()
        np.testing.assert_array_equal(lora_a[2 * block:2 * block + 2], a)
        np.testing.assert_array_equal(lora_b[32 * block:32 * block + 32, 2 * block:2 * block + 2], b)
        off_diagonal = np.delete(lora_b[32 * block:32 * block + 32], np.s_[2 * block:2 * block + 2], axis=1)
        assert not off_diagonal.any()
