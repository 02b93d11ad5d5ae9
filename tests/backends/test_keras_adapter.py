"""Keras adapter files: PEFT's format, round trips, refusals, and adapters moving to and from PyTorch and PEFT."""

import collections
import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

import lora_spec.keras as lora
from lora_spec import safetensors_io

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="needs Keras's TensorFlow backend")

SEQUENCE, VOCABULARY, WIDTH = 5, 10, 8
IDS = np.random.default_rng(0).integers(0, VOCABULARY, (3, SEQUENCE))
TARGETS = dict(target_modules=["embed", "fc1", "fc2"], modules_to_save=["head"], r=4, alpha=8)


def keras_base(seed=0) -> keras.Model:
    """Module paths `embed`, `encoder.fc1`, `encoder.fc2`, `norm`, `head`: those of `TorchNet`."""
    keras.utils.set_random_seed(seed)
    encoder = keras.Sequential(
        [
            keras.Input((SEQUENCE, WIDTH)),
            keras.layers.Dense(16, activation="gelu", name="fc1"),
            keras.layers.Dense(16, name="fc2"),
        ],
        name="encoder",
    )
    ids = keras.Input((SEQUENCE,), dtype="int32")
    hidden = encoder(keras.layers.Embedding(VOCABULARY, WIDTH, name="embed")(ids))
    hidden = keras.layers.LayerNormalization(epsilon=1e-5, name="norm")(hidden)
    return keras.Model(ids, keras.layers.Dense(3, name="head")(hidden))


def randomize(model, seed=1):
    """Non-zero adapters, biases and saved modules, so that every tensor shows in the outputs."""
    rng = np.random.default_rng(seed)
    for weight in model.trainable_weights:
        weight.assign(rng.standard_normal(weight.shape) * 0.3)
    return model


def test_saved_keys_and_config_follow_peft(tmp_path):
    lora.save_adapter(lora.apply(keras_base(), **TARGETS, bias="lora_only"), tmp_path)
    tensors, _ = safetensors_io.load(tmp_path / "adapter_model.safetensors")
    assert {key: value.shape for key, value in tensors.items()} == {
        "base_model.model.embed.lora_embedding_A": (4, VOCABULARY),
        "base_model.model.embed.lora_embedding_B": (WIDTH, 4),
        "base_model.model.encoder.fc1.lora_A.weight": (4, WIDTH),
        "base_model.model.encoder.fc1.lora_B.weight": (16, 4),
        "base_model.model.encoder.fc1.base_layer.bias": (16,),
        "base_model.model.encoder.fc2.lora_A.weight": (4, 16),
        "base_model.model.encoder.fc2.lora_B.weight": (16, 4),
        "base_model.model.encoder.fc2.base_layer.bias": (16,),
        "base_model.model.head.weight": (3, 16),
        "base_model.model.head.bias": (3,),
    }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["bias"]) == ("LORA", 4, 8, "lora_only")
    assert sorted(config["target_modules"]) == ["embed", "encoder.fc1", "encoder.fc2"]
    assert config["modules_to_save"] == ["head"]


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_save_then_load_reproduces_the_adapted_model(tmp_path, bias):
    model = randomize(lora.apply(keras_base(), **TARGETS, bias=bias))
    lora.save_adapter(model, tmp_path)
    loaded = lora.load_adapter(keras_base(), tmp_path)
    np.testing.assert_array_equal(loaded(IDS), model(IDS))
    assert lora.trainable_parameters(loaded) == lora.trainable_parameters(model)


def test_adapter_of_a_model_reloaded_from_a_keras_file_keeps_per_layer_ranks(tmp_path):
    model = randomize(lora.apply(keras_base(), target_modules=["fc1", "fc2"], r=4, rank_pattern={"fc2": 2}))
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    lora.save_adapter(restored, tmp_path / "adapter")
    loaded = lora.load_adapter(keras_base(), tmp_path / "adapter")
    assert [layer.r for _, layer in lora.lora_layers(loaded)] == [4, 2]
    np.testing.assert_array_equal(loaded(IDS), model(IDS))


def test_loading_into_an_adapted_model_swaps_the_weights(tmp_path):
    model = randomize(lora.apply(keras_base(), **TARGETS))
    lora.save_adapter(model, tmp_path)
    other = randomize(lora.apply(keras_base(), **TARGETS), seed=5)
    assert lora.load_adapter(other, tmp_path) is other
    np.testing.assert_array_equal(other(IDS), model(IDS))


def _weights(model):
    return [w.numpy().copy() for w in model.weights]


def test_loading_a_file_of_another_rank_replaces_the_adapter(tmp_path):
    source = randomize(lora.apply(keras_base(), **TARGETS))
    lora.save_adapter(source, tmp_path)
    model = lora.apply(keras_base(), **{**TARGETS, "r": 2})
    lora.load_adapter(model, tmp_path)
    assert {layer.r for _, layer in lora.lora_layers(model)} == {4}
    np.testing.assert_array_equal(model(IDS), source(IDS))


@pytest.mark.parametrize("target", ["adapted", "base"])
def test_a_file_that_does_not_fit_is_refused_and_the_model_is_untouched(tmp_path, target):
    lora.save_adapter(randomize(lora.apply(keras_base(), **TARGETS)), tmp_path)
    model = lora.apply(keras_base(), **TARGETS) if target == "adapted" else keras_base()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["fc1"]}))
    before = _weights(model)
    with pytest.raises(ValueError, match=r"adapter key base_model.model.embed.lora_embedding_A names no LoRA target"):
        lora.load_adapter(model, tmp_path)
    for old, new in zip(before, _weights(model), strict=True):
        np.testing.assert_array_equal(old, new)
    assert len(list(lora.lora_layers(model))) == (3 if target == "adapted" else 0)


def test_a_shape_mismatch_names_the_tensor(tmp_path):
    lora.save_adapter(lora.apply(keras_base(), **TARGETS), tmp_path)
    narrower = keras.Sequential(
        [
            keras.Input((SEQUENCE,), dtype="int32"),
            keras.layers.Embedding(VOCABULARY, 4, name="embed"),
            keras.layers.Dense(16, name="fc1"),
            keras.layers.Dense(16, name="fc2"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    with pytest.raises(
        ValueError, match=r"adapter tensor B of 'embed' has shape \(8, 4\), but this model needs \(4, 4\)"
    ):
        lora.load_adapter(narrower, tmp_path)


def test_missing_directory_and_unadapted_model_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"adapter directory .* does not exist"):
        lora.load_adapter(keras_base(), tmp_path / "missing")
    with pytest.raises(ValueError, match=r"this model has no LoRA adapter: call lora_spec\.keras\.apply"):
        lora.save_adapter(keras_base(), tmp_path)
    with pytest.raises(TypeError, match=r"model must be a keras\.Model or keras\.layers\.Layer, not str"):
        lora.save_adapter("model.keras", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_attention_biases_are_stored_flat_as_pytorch_linear_biases_and_load_back(tmp_path):
    from tests.backends.test_keras_model import attention_model

    model = randomize(lora.apply(attention_model(), r=2, target_modules=["query", "value"], bias="lora_only"))
    lora.save_adapter(model, tmp_path)
    tensors, _ = safetensors_io.load(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.attention.query.base_layer.bias"].shape == (8,)
    assert tensors["base_model.model.attention.query.lora_B.weight"].shape == (8, 2)
    np.testing.assert_array_equal(lora.load_adapter(attention_model(), tmp_path)(IDS), model(IDS))


# -- PyTorch ------------------------------------------------------------------------------------


def _torch_net(torch):
    nn = torch.nn

    class TorchNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCABULARY, WIDTH)
            self.encoder = nn.Sequential(
                collections.OrderedDict(fc1=nn.Linear(WIDTH, 16), act=nn.GELU(), fc2=nn.Linear(16, 16))
            )
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.norm(self.encoder(self.embed(ids))))

    return TorchNet


def torch_twin(torch, model: keras.Model):
    """The PyTorch model with `model`'s base weights (Dense kernels transposed)."""
    net = _torch_net(torch)().eval()
    layers = dict(lora.named_layers(model))
    with torch.no_grad():
        net.embed.weight.copy_(torch.tensor(layers["embed"].embeddings.numpy()))
        for path in ("encoder.fc1", "encoder.fc2", "head"):
            linear = net.get_submodule(path)
            linear.weight.copy_(torch.tensor(layers[path].kernel.numpy().T))
            linear.bias.copy_(torch.tensor(layers[path].bias.numpy()))
        net.norm.weight.copy_(torch.tensor(layers["norm"].gamma.numpy()))
        net.norm.bias.copy_(torch.tensor(layers["norm"].beta.numpy()))
    return net


def randomize_torch(torch, net):
    """`randomize` for a PyTorch model: every trainable tensor drawn afresh."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _torch_outputs(torch, net):
    with torch.no_grad():
        return net(torch.tensor(IDS)).numpy()


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_adapter_trained_in_pytorch_runs_in_keras_with_the_same_outputs(tmp_path, bias):
    torch = pytest.importorskip("torch")
    lora_torch = pytest.importorskip("lora_spec.torch")
    base = keras_base()
    net = lora_torch.apply(torch_twin(torch, base), **TARGETS, bias=bias)
    randomize_torch(torch, net)
    lora_torch.save_adapter(net, tmp_path)
    keras_model = lora.load_adapter(base, tmp_path)
    np.testing.assert_allclose(keras_model(IDS), _torch_outputs(torch, net.eval()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_adapter_trained_in_keras_runs_in_pytorch_and_peft_with_the_same_outputs(tmp_path, bias):
    torch = pytest.importorskip("torch")
    lora_torch = pytest.importorskip("lora_spec.torch")
    peft = pytest.importorskip("peft")
    model = randomize(lora.apply(keras_base(), **TARGETS, bias=bias))
    lora.save_adapter(model, tmp_path)
    expected = model(IDS).numpy()
    net = lora_torch.load_adapter(torch_twin(torch, keras_base()), tmp_path)
    np.testing.assert_allclose(_torch_outputs(torch, net.eval()), expected, rtol=0, atol=1e-5)
    peft_net = peft.PeftModel.from_pretrained(torch_twin(torch, keras_base()), str(tmp_path))
    np.testing.assert_allclose(_torch_outputs(torch, peft_net.eval()), expected, rtol=0, atol=1e-5)


def test_adapter_saved_by_peft_runs_in_keras_with_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = keras_base()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["embed", "fc1", "fc2"],
        modules_to_save=["head"],
        bias="lora_only",
        use_rslora=True,
    )
    net = peft.get_peft_model(torch_twin(torch, base), config)
    randomize_torch(torch, net)
    net.save_pretrained(str(tmp_path))
    keras_model = lora.load_adapter(base, tmp_path)
    assert dict(lora.lora_layers(keras_model))["encoder.fc1"].scaling == pytest.approx(4.0)
    np.testing.assert_allclose(keras_model(IDS), _torch_outputs(torch, net.eval()), rtol=0, atol=1e-5)


IMAGES = np.random.default_rng(2).standard_normal((2, 6, 5, 4)).astype(np.float32)  # channels last


def keras_cnn(groups: int) -> keras.Model:
    """Module paths `conv` (a 3x3 conv) and `head` (1x1): those of `torch_cnn`'s model."""
    keras.utils.set_random_seed(3)
    images = keras.Input(IMAGES.shape[1:])
    hidden = keras.layers.Conv2D(6, 3, padding="same", groups=groups, activation="relu", name="conv")(images)
    return keras.Model(images, keras.layers.Conv2D(2, 1, name="head")(hidden))


def torch_cnn(torch, model: keras.Model):
    """The PyTorch twin of `keras_cnn` with `model`'s base weights (kernels `(kh, kw, in, out)` to
    `(out, in, kh, kw)`)."""
    nn = torch.nn
    layers = dict(lora.named_layers(model))
    net = nn.Module()
    net.conv, net.head = nn.Conv2d(4, 6, 3, padding=1, groups=layers["conv"].groups), nn.Conv2d(6, 2, 1)
    net.forward = lambda images: net.head(torch.relu(net.conv(images)))
    with torch.no_grad():
        for path in ("conv", "head"):
            net.get_submodule(path).weight.copy_(torch.tensor(layers[path].kernel.numpy().transpose(3, 2, 0, 1)))
            net.get_submodule(path).bias.copy_(torch.tensor(layers[path].bias.numpy()))
    return net.eval()


def _torch_cnn_outputs(torch, net):
    with torch.no_grad():
        return net(torch.tensor(IMAGES.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_adapters_move_between_keras_and_pytorch_with_the_same_outputs(tmp_path, groups):
    torch = pytest.importorskip("torch")
    lora_torch = pytest.importorskip("lora_spec.torch")
    model = randomize(lora.apply(keras_cnn(groups), target_modules=["conv", "head"], r=2, alpha=3))
    lora.save_adapter(model, tmp_path / "keras")
    net = lora_torch.load_adapter(torch_cnn(torch, keras_cnn(groups)), tmp_path / "keras")
    np.testing.assert_allclose(_torch_cnn_outputs(torch, net), model(IMAGES), rtol=0, atol=1e-5)
    if groups == 1:  # PEFT's adapters of grouped convs have another shape (see the reference)
        peft = pytest.importorskip("peft")
        peft_net = peft.PeftModel.from_pretrained(torch_cnn(torch, keras_cnn(groups)), str(tmp_path / "keras"))
        np.testing.assert_allclose(_torch_cnn_outputs(torch, peft_net.eval()), model(IMAGES), rtol=0, atol=1e-5)

    trained = lora_torch.apply(torch_cnn(torch, keras_cnn(groups)), target_modules=["conv", "head"], r=4)
    randomize_torch(torch, trained)
    lora_torch.save_adapter(trained, tmp_path / "torch")
    keras_model = lora.load_adapter(keras_cnn(groups), tmp_path / "torch")
    np.testing.assert_allclose(keras_model(IMAGES), _torch_cnn_outputs(torch, trained.eval()), rtol=0, atol=1e-5)


# -- DoRA --------------------------------------------------------------------------------------


def _pytorch_dora_readers(torch):
    """`{name: load(net, folder)}`: PEFT, and lora_spec.torch once it has DoRA."""
    peft = pytest.importorskip("peft")
    lora_torch = pytest.importorskip("lora_spec.torch")
    readers = {"peft": lambda net, folder: peft.PeftModel.from_pretrained(net, str(folder))}
    try:
        lora_torch.apply(torch_twin(torch, keras_base()), target_modules=["fc1"], use_dora=True)
        readers["lora_spec.torch"] = lora_torch.load_adapter
    except ValueError as error:
        assert "is not supported by the PyTorch" in str(error)
    return readers


def test_dora_adapter_files_have_peft_keys_and_shapes_and_load_back(tmp_path):
    model = randomize(lora.apply(keras_base(), **TARGETS, use_dora=True))
    lora.save_adapter(model, tmp_path)
    tensors, _ = safetensors_io.load(tmp_path / "adapter_model.safetensors")
    assert {key: value.shape for key, value in tensors.items() if "magnitude" in key} == {
        "base_model.model.embed.lora_magnitude_vector": (WIDTH,),
        "base_model.model.encoder.fc1.lora_magnitude_vector": (16,),
        "base_model.model.encoder.fc2.lora_magnitude_vector": (16,),
    }
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    loaded = lora.load_adapter(keras_base(), tmp_path)
    np.testing.assert_array_equal(loaded(IDS), model(IDS))
    assert all(layer.adapter().use_dora for _, layer in lora.lora_layers(loaded))


def test_dora_adapter_trained_in_keras_runs_in_pytorch_with_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    model = randomize(lora.apply(keras_base(), **TARGETS, use_dora=True))
    lora.save_adapter(model, tmp_path)
    for load in _pytorch_dora_readers(torch).values():
        net = load(torch_twin(torch, keras_base()), tmp_path)
        np.testing.assert_allclose(_torch_outputs(torch, net.eval()), model(IDS), rtol=0, atol=1e-5)


def test_dora_adapter_saved_by_peft_runs_in_keras_with_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = keras_base()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed", "fc1", "fc2"], modules_to_save=["head"], use_dora=True
    )
    net = peft.get_peft_model(torch_twin(torch, base), config)
    randomize_torch(torch, net)
    net.save_pretrained(str(tmp_path))
    keras_model = lora.load_adapter(base, tmp_path)
    np.testing.assert_allclose(keras_model(IDS), _torch_outputs(torch, net.eval()), rtol=0, atol=1e-5)


def test_conv_dora_adapters_move_between_keras_and_pytorch_with_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = randomize(lora.apply(keras_cnn(1), target_modules=["conv", "head"], r=2, alpha=3, use_dora=True))
    lora.save_adapter(model, tmp_path / "keras")
    tensors, _ = safetensors_io.load(tmp_path / "keras" / "adapter_model.safetensors")
    assert tensors["base_model.model.conv.lora_magnitude_vector"].shape == (1, 6, 1, 1)
    peft_net = peft.PeftModel.from_pretrained(torch_cnn(torch, keras_cnn(1)), str(tmp_path / "keras"))
    np.testing.assert_allclose(_torch_cnn_outputs(torch, peft_net.eval()), model(IMAGES), rtol=0, atol=1e-5)

    trained = peft.get_peft_model(
        torch_cnn(torch, keras_cnn(1)), peft.LoraConfig(r=4, target_modules=["conv", "head"], use_dora=True)
    )
    randomize_torch(torch, trained)
    trained.save_pretrained(str(tmp_path / "peft"))
    keras_model = lora.load_adapter(keras_cnn(1), tmp_path / "peft")
    np.testing.assert_allclose(keras_model(IMAGES), _torch_cnn_outputs(torch, trained.eval()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("target", ["adapted", "base"])
def test_a_dora_file_whose_magnitude_does_not_fit_is_refused_and_the_model_is_untouched(tmp_path, target):
    lora.save_adapter(randomize(lora.apply(keras_base(), **TARGETS, use_dora=True)), tmp_path)
    tensors, metadata = safetensors_io.load(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.encoder.fc2.lora_magnitude_vector"] = np.ones(8, np.float32)
    safetensors_io.save(tmp_path / "adapter_model.safetensors", tensors, metadata=metadata)
    model = lora.apply(keras_base(), **TARGETS) if target == "adapted" else keras_base()
    before = _weights(model)
    with pytest.raises(
        ValueError,
        match=r"adapter tensor encoder.fc2.lora_magnitude_vector has shape \(8,\), but the "
        r"module's lora_B makes 16 output features",
    ) as error:
        lora.load_adapter(model, tmp_path)
    assert "\n" not in str(error.value)
    for old, new in zip(before, _weights(model), strict=True):
        np.testing.assert_array_equal(old, new)
