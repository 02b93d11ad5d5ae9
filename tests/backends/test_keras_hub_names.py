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

import lora_spec.keras as lora
from lora_spec import dora, safetensors_io
from lora_spec.backends.keras_hub_names import TransformersNames
from lora_spec.backends.keras_hub_recording import is_kernel
from tests.backends import keras_hub_models as hub

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
    peft_outputs, base_outputs = (
        np.load(folder / name / "peft_outputs.npy"),
        np.load(folder / name / "base_outputs.npy"),
    )
    assert result["peft"] <= limit
    assert np.max(np.abs(peft_outputs - base_outputs)) > 100 * limit
    model = peft.PeftModel.from_pretrained(
        hub.transformers_model(name, folder / name / "checkpoint"), str(output / name / "keras")
    )
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


@pytest.fixture(scope="module", autouse=True)
def other_backends(request, prepared):
    """The subprocesses of the selected backends, started with the module so that they run beside its other
    tests (the suite has two cores, and these tests wait on them last)."""
    selected = {item.name for item in request.session.items}
    processes = {}
    for backend, options in OTHER_BACKENDS.items():
        if (
            f"{test_adapters_cross_on_keras_jax_and_torch_backends.__name__}[{backend}]" not in selected
            or importlib.util.find_spec(backend) is None
        ):
            continue
        environment = {
            **os.environ,
            "KERAS_BACKEND": backend,
            "PYTHONPATH": str(ROOT),
            **{key: value for key, value in options.items() if key.isupper()},
        }
        command = [
            sys.executable,
            str(ROOT / "tests" / "backends" / "keras_hub_models.py"),
            str(prepared),
            str(prepared / backend),
            str(options["steps"]),
            *options["names"],
        ]
        (prepared / backend).mkdir()
        # Files, not pipes: a full pipe would stall one process while the test waits on the other.
        with open(prepared / backend / "stdout", "w") as stdout, open(prepared / backend / "stderr", "w") as stderr:
            processes[backend] = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=stdout, stderr=stderr)
    yield processes
    for process in processes.values():
        process.kill()
        process.wait()


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
        tensor = next(
            value for key, value in tensors.items() if key == placement.key or key.endswith("." + placement.key)
        )
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
    keys = {
        names.class_path(bare, class_name): bare for bare, members in names.fed.items() if is_kernel(*members[0][1:])
    }
    assert set(keys) <= set(exported)
    for key, bare in keys.items():
        np.testing.assert_array_equal(names.values(bare, {}), keras.ops.convert_to_numpy(exported[key]), err_msg=key)


@pytest.mark.parametrize("name", hub.CASES)
def test_architecture_rows_name_the_state_dicts_of_transformers_classes(prepared, name):
    model = hub.keras_task(name, prepared / name / "checkpoint")
    names = TransformersNames(model)
    architecture = names.architecture
    hf_model = hub.transformers_model(name, prepared / name / "checkpoint")
    assert type(hf_model).__name__ == architecture.default_class
    assert type(hf_model).base_model_prefix == architecture.base_prefix
    assert type(hf_model.base_model).__name__ == architecture.bare
    for class_name, state in (
        (architecture.default_class, hf_model.state_dict()),
        (architecture.bare, hf_model.base_model.state_dict()),
    ):
        keys = {
            names.class_path(bare, class_name)
            for bare in names.fed
            if class_name == architecture.causal_lm or bare.split(".")[0] not in architecture.head
        }
        assert keys <= set(state), sorted(keys - set(state))


# -- GPT-2's fused attention -------------------------------------------------------------------------------


def test_gpt2_query_key_value_are_written_as_c_attn_at_three_times_the_rank(prepared, tmp_path):
    model = hub.train(
        "gpt2",
        lora.apply(
            hub.keras_task("gpt2", prepared / "gpt2" / "checkpoint"),
            naming="transformers",
            target_modules=["c_attn"],
            r=2,
            alpha=3,
        ),
    )
    lora.save_adapter(model, tmp_path, naming="transformers")
    tensors, _ = safetensors_io.load(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # Every c_attn holds three rank-2 adapters of scaling 3/2: rank 6, and alpha 9 keeps the scaling.
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (6, 9, True)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    lora_a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    lora_b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert lora_a.shape == (6, 32) and lora_b.shape == (96, 6)
    # The backbone's own name depends on how many were built before (Keras numbers them).
    layers = {path.partition(".")[2]: layer for path, layer in lora.lora_layers(model)}
    for block, part in enumerate(("query", "key", "value")):
        a, b = layers[f"transformer_layer_0.self_attention.{part}"].lora_weights()
        np.testing.assert_array_equal(lora_a[2 * block : 2 * block + 2], a)
        np.testing.assert_array_equal(lora_b[32 * block : 32 * block + 32, 2 * block : 2 * block + 2], b)
        off_diagonal = np.delete(lora_b[32 * block : 32 * block + 32], np.s_[2 * block : 2 * block + 2], axis=1)
        assert not off_diagonal.any()


def test_a_bare_backbone_exchanges_adapters_with_the_bare_transformers_model(prepared, tmp_path):
    checkpoint = prepared / "gpt2" / "checkpoint"
    backbone = keras_hub.models.Backbone.from_preset(str(checkpoint))
    lora.load_adapter(backbone, prepared / "gpt2" / "peft")  # named for GPT2LMHeadModel: transformer.h.0...
    hidden = backbone(hub.keras_inputs("gpt2"))
    logits = keras.ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))
    assert np.max(np.abs(logits - np.load(prepared / "gpt2" / "peft_outputs.npy"))) <= 1e-5
    lora.save_adapter(backbone, tmp_path, naming="transformers", transformers_class=transformers.GPT2Model)
    tensors, _ = safetensors_io.load(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.h.0.attn.c_attn.lora_A.weight" in tensors
    bare = peft.PeftModel.from_pretrained(hub.transformers_model("gpt2", checkpoint).transformer, str(tmp_path))
    with torch.no_grad():
        expected = bare.eval()(input_ids=torch.tensor(hub.TOKEN_IDS, dtype=torch.long)).last_hidden_state.numpy()
    assert np.max(np.abs(keras.ops.convert_to_numpy(hidden) - expected)) <= 1e-5
    task = lora.load_adapter(hub.keras_task("gpt2", checkpoint), tmp_path)  # bare names: h.0.attn.c_attn...
    assert np.max(np.abs(hub.keras_outputs("gpt2", task) - logits)) <= 1e-5


def test_named_adapters_cross_under_their_names(prepared, tmp_path):
    checkpoint = prepared / "llama" / "checkpoint"
    model = hub.keras_task("llama", checkpoint)
    lora.apply(model, naming="transformers", target_modules=["q_proj", "v_proj"], r=2)
    lora.apply(
        model, adapter_name="head", naming="transformers", target_modules=["up_proj"], r=4, modules_to_save=["lm_head"]
    )
    for seed, name in enumerate(("default", "head")):
        lora.set_adapter(model, name)
        hub.train("llama", model, steps=0, seed=seed)
    lora.save_adapter(model, tmp_path, naming="transformers")  # "head" in tmp_path/head, as PEFT keeps it
    net = peft.PeftModel.from_pretrained(hub.transformers_model("llama", checkpoint), str(tmp_path))
    net.load_adapter(str(tmp_path / "head"), adapter_name="head")
    reloaded = lora.load_adapter(hub.keras_task("llama", checkpoint), tmp_path)
    for name in ("default", "head"):
        lora.set_adapter(model, name)
        lora.set_adapter(reloaded, name)
        net.set_adapter(name)
        expected = hub.keras_outputs("llama", model)
        assert np.max(np.abs(hub.transformers_outputs(net.eval()) - expected)) <= 1e-5
        assert np.max(np.abs(hub.keras_outputs("llama", reloaded) - expected)) <= 1e-5


# -- heads and biases --------------------------------------------------------------------------------------

EXTRAS = {
    "llama": dict(modules_to_save=["lm_head"]),  # untied: KerasHub's reverse embeddings
    "bert": dict(modules_to_save=["pooler"], bias="lora_only"),
    "gpt2": dict(bias="all"),
    "qwen2": dict(bias="lora_only"),  # the query, key and value projections' biases
}


@pytest.mark.parametrize("name", EXTRAS)
def test_heads_and_biases_cross_both_ways_with_equal_outputs(prepared, tmp_path, name):
    checkpoint, options = prepared / name / "checkpoint", EXTRAS[name]
    base = np.load(prepared / name / "base_outputs.npy")
    model = hub.keras_task(name, checkpoint)
    limit = tolerance(np.max(np.abs(hub.keras_outputs(name, model) - base)))
    peft_model = hub.peft_adapter(name, checkpoint, tmp_path / "peft", **options)
    expected = hub.transformers_outputs(peft_model)
    lora.load_adapter(model, tmp_path / "peft")
    assert np.max(np.abs(hub.keras_outputs(name, model) - expected)) <= limit

    trained = lora.apply(
        hub.keras_task(name, checkpoint),
        naming="transformers",
        target_modules=list(hub.CASES[name].targets),
        r=hub.RANK,
        alpha=hub.ALPHA,
        **{**hub.CASES[name].options, **options},
    )
    hub.train(name, trained, steps=1)
    lora.save_adapter(trained, tmp_path / "keras", naming="transformers")
    loaded = peft.PeftModel.from_pretrained(hub.transformers_model(name, checkpoint), str(tmp_path / "keras"))
    assert np.max(np.abs(hub.transformers_outputs(loaded.eval()) - hub.keras_outputs(name, trained))) <= limit


# -- DoRA ---------------------------------------------------------------------------------------------------

# What the Keras DoRA adapters are trained on: for GPT-2, the query and value layers but not the key, so that
# c_attn is saved with rows the adapter leaves out.
DORA_TARGETS = {
    "llama": dict(naming="transformers", target_modules=list(hub.CASES["llama"].targets), **hub.CASES["llama"].options),
    "gpt2": dict(target_modules=["query", "value", "feedforward_output_dense"]),
}


@pytest.mark.parametrize("name", DORA_TARGETS)
def test_dora_adapters_cross_both_ways_with_equal_outputs(prepared, tmp_path, name):
    checkpoint = prepared / name / "checkpoint"
    base = np.load(prepared / name / "base_outputs.npy")
    model = hub.keras_task(name, checkpoint)
    limit = tolerance(np.max(np.abs(hub.keras_outputs(name, model) - base)))
    # Random A, B and magnitudes, far from the norms at which DoRA would be LoRA.
    peft_model = hub.peft_adapter(name, checkpoint, tmp_path / "peft", use_dora=True)
    lora.load_adapter(model, tmp_path / "peft")
    assert np.max(np.abs(hub.keras_outputs(name, model) - hub.transformers_outputs(peft_model))) <= limit
    for _, layer in lora.lora_layers(model):
        norm = dora.weight_norm(layer.base_weight(), *layer.lora_weights(), layer.adapter().scaling)
        assert not np.allclose(layer.lora_magnitude(), norm, rtol=0.1)

    trained = lora.apply(
        hub.keras_task(name, checkpoint), r=hub.RANK, alpha=hub.ALPHA, use_dora=True, **DORA_TARGETS[name]
    )
    hub.train(name, trained, steps=1)
    expected = hub.keras_outputs(name, trained)
    assert np.max(np.abs(expected - base)) > 100 * limit
    lora.save_adapter(trained, tmp_path / "keras", naming="transformers")
    loaded = peft.PeftModel.from_pretrained(hub.transformers_model(name, checkpoint), str(tmp_path / "keras"))
    assert np.max(np.abs(hub.transformers_outputs(loaded.eval()) - expected)) <= limit
    reloaded = lora.load_adapter(hub.keras_task(name, checkpoint), tmp_path / "keras")
    assert np.max(np.abs(hub.keras_outputs(name, reloaded) - expected)) <= 1e-5


def test_a_keras_file_of_an_adapted_keras_hub_model_reloads_its_adapters(prepared, tmp_path):
    """KerasHub's blocks create their projections in their own build, so loading rebuilds them as plain
    layers: each turns back into the LoRA layer the file holds."""
    checkpoint = prepared / "llama" / "checkpoint"
    model = lora.apply(hub.keras_task("llama", checkpoint), r=2, use_dora=True, **DORA_TARGETS["llama"])
    hub.train("llama", model, steps=0)
    expected = hub.keras_outputs("llama", model)
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert np.max(np.abs(hub.keras_outputs("llama", restored) - expected)) == 0
    assert [path.partition(".")[2] for path, _ in lora.lora_layers(restored)] == [
        path.partition(".")[2] for path, _ in lora.lora_layers(model)
    ]
    lora.save_adapter(restored, tmp_path / "adapter", naming="transformers")
    loaded = peft.PeftModel.from_pretrained(hub.transformers_model("llama", checkpoint), str(tmp_path / "adapter"))
    assert np.max(np.abs(hub.transformers_outputs(loaded.eval()) - expected)) <= 1e-5


def test_dora_rows_of_layers_without_the_adapter_are_saved_at_their_base_norms(prepared, tmp_path):
    checkpoint = prepared / "gpt2" / "checkpoint"
    model = lora.apply(hub.keras_task("gpt2", checkpoint), target_modules=["query"], r=2, use_dora=True)
    # Another adapter on the key, merged into its kernel: the norms are those of the base weight still.
    lora.apply(model, adapter_name="other", target_modules=["key"], r=2)
    lora.set_adapter(model, ["default", "other"])
    hub.train("gpt2", model, steps=0)
    lora.merge(model)
    lora.save_adapter(model, tmp_path, adapter_name="default", naming="transformers")
    tensors, _ = safetensors_io.load(tmp_path / "adapter_model.safetensors")
    base, _ = safetensors_io.load(checkpoint / "model.safetensors")
    c_attn = next(value for key, value in base.items() if key.endswith("h.0.attn.c_attn.weight"))  # Conv1D: (in, out)
    magnitude = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"]
    key_rows = np.s_[32:64]
    np.testing.assert_allclose(magnitude[key_rows], np.linalg.norm(c_attn, axis=0)[key_rows], rtol=1e-6)
    assert not np.allclose(magnitude[:32], np.linalg.norm(c_attn, axis=0)[:32], rtol=0.1)


# -- bad input: one line, model unchanged -------------------------------------------------------------------


def _snapshot(model) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(variable).copy() for variable in model.weights]


def assert_refused(model, action, *fragments, error=ValueError):
    """`action` fails with one line holding `fragments`, and `model` keeps its weights and gets no LoRA."""
    before = _snapshot(model)
    with pytest.raises(error) as raised:
        action()
    message = str(raised.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message
    assert not list(lora.lora_layers(model))
    assert all(np.array_equal(a, b) for a, b in zip(before, _snapshot(model), strict=True))


def _edited_adapter(source: Path, target: Path, edit) -> Path:
    """A copy of the adapter at `source` whose tensors `edit(dict)` changed."""
    tensors, _ = safetensors_io.load(source / "adapter_model.safetensors")
    target.mkdir()
    safetensors_io.save(target / "adapter_model.safetensors", edit(dict(tensors)), metadata={"format": "pt"})
    (target / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    return target


def test_adapter_of_another_architecture_is_refused_naming_its_first_key(prepared):
    model = hub.keras_task("gpt2", prepared / "gpt2" / "checkpoint")
    assert_refused(
        model,
        lambda: lora.load_adapter(model, prepared / "llama" / "peft"),
        "adapter key base_model.model.model.layers.",
        "names no module of transformers' gpt2 model",
    )


def test_adapter_of_another_size_is_refused_naming_the_tensor(prepared, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    wider = _edited_adapter(
        prepared / "llama" / "peft",
        tmp_path / "wider",
        lambda tensors: {**tensors, key: np.zeros((hub.RANK, 48), np.float32)},
    )
    model = hub.keras_task("llama", prepared / "llama" / "checkpoint")
    assert_refused(
        model,
        lambda: lora.load_adapter(model, wider),
        "tensor A of 'model.layers.1.self_attn.q_proj'",
        "(4, 48)",
        "another model size",
    )
    deeper = _edited_adapter(
        prepared / "llama" / "peft",
        tmp_path / "deeper",
        lambda tensors: {name.replace(".layers.1.", ".layers.5."): value for name, value in tensors.items()},
    )
    assert_refused(model, lambda: lora.load_adapter(model, deeper), "model.layers.5.", "names no module")


def test_unconverted_pissa_adapters_are_refused_by_name(prepared, tmp_path):
    checkpoint = prepared / "gemma" / "checkpoint"
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
    peft.get_peft_model(hub.transformers_model("gemma", checkpoint), config).save_pretrained(tmp_path / "peft")
    model = hub.keras_task("gemma", checkpoint)
    assert_refused(model, lambda: lora.load_adapter(model, tmp_path / "peft"), "init='pissa' is not supported")
    lora.apply(model, naming="transformers", target_modules=["q_proj"], r=2, init="pissa")
    with pytest.raises(ValueError, match="init='pissa' is not supported"):
        lora.save_adapter(model, tmp_path / "keras", naming="transformers", convert_to_lora=False)
    assert not (tmp_path / "keras").exists()


@pytest.mark.parametrize("target, fragment", [("lm_head", "computes the logits"), ("embed_tokens", "embed_tokens")])
def test_adapters_on_the_embeddings_and_head_are_refused(prepared, tmp_path, target, fragment):
    config = peft.LoraConfig(r=2, target_modules=["q_proj", target])
    net = hub.randomize_peft(
        peft.get_peft_model(hub.transformers_model("llama", prepared / "llama" / "checkpoint"), config)
    )
    net.save_pretrained(tmp_path)
    model = hub.keras_task("llama", prepared / "llama" / "checkpoint")
    assert_refused(model, lambda: lora.load_adapter(model, tmp_path), fragment, "ReversibleEmbedding")
    assert_refused(model, lambda: lora.apply(model, naming="transformers", target_modules=[target]), fragment)


def test_tied_embedding_as_module_to_save_is_refused(prepared):
    model = hub.keras_task("gpt2", prepared / "gpt2" / "checkpoint")
    assert_refused(
        model, lambda: lora.apply(model, naming="transformers", modules_to_save=["wte"]), "tied to the output head"
    )


def test_architectures_without_transformers_naming_are_refused_by_name():
    unsupported = keras_hub.models.DistilBertBackbone(
        vocabulary_size=16, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=8
    )
    assert_refused(
        unsupported, lambda: lora.apply(unsupported, naming="transformers"), "DistilBertBackbone", "Llama3Backbone"
    )
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="q_proj")])
    assert_refused(plain, lambda: lora.apply(plain, naming="transformers"), "needs a KerasHub backbone")


def test_unsupported_keras_hub_version_is_refused_naming_the_supported_ones(prepared, monkeypatch):
    model = hub.keras_task("gemma", prepared / "gemma" / "checkpoint")
    monkeypatch.setattr(keras_hub, "__version__", "0.31.1")
    for action in (
        lambda: lora.apply(model, naming="transformers"),
        lambda: lora.load_adapter(model, prepared / "gemma" / "peft"),
    ):
        assert_refused(model, action, "KerasHub 0.32, not 0.31.1", error=ImportError)


def test_naming_arguments_are_checked(prepared, tmp_path):
    model = hub.keras_task("gemma", prepared / "gemma" / "checkpoint")
    assert_refused(model, lambda: lora.apply(model, naming="hf"), "naming='hf' is invalid")
    lora.apply(model, naming="transformers", r=2)
    for arguments, fragment in (
        (dict(naming="hf"), "naming='hf' is invalid"),
        (dict(transformers_class="GemmaModel"), "pass naming='transformers'"),
        (
            dict(naming="transformers", transformers_class="GPT2LMHeadModel"),
            "not a class of this model's architecture (gemma)",
        ),
    ):
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            lora.save_adapter(model, tmp_path, **arguments)
        assert not list(tmp_path.iterdir())


# -- the other backends, last: their subprocesses ran beside the tests above ------------------------------


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_adapters_cross_on_keras_jax_and_torch_backends(prepared, other_backends, backend):
    if backend not in other_backends:
        pytest.skip(f"{backend} is not installed")
    assert other_backends[backend].wait(timeout=600) == 0, (prepared / backend / "stderr").read_text()[-3000:]
    results = json.loads((prepared / backend / "stdout").read_text().strip().splitlines()[-1])
    assert results["backend"] == backend
    for name in OTHER_BACKENDS[backend]["names"]:
        check_both_directions(prepared, prepared / backend, name, results[name])
