"""PiSSA and OLoRA in Keras: the reference's init with the kernel as residual, saving as LoRA of the original base
(or PEFT's unconverted form) read back by Keras, lora_spec.torch and PEFT, and the refusals."""

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

import lora_spec.keras as lora
from lora_spec import inits
from tests.backends.test_keras_adapter import (
    IDS,
    _torch_outputs,
    keras_base,
    keras_cnn,
    torch_twin,
)
from tests.backends.test_keras_model import _no_decomposition, attention_model
from tests.numerics import assert_close

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="needs Keras's TensorFlow backend")

LINEAR = {"dense": (keras_base, ["fc1", "fc2"]), "einsum": (attention_model, ["query", "value"])}


def _weights(model) -> list[np.ndarray]:
    return [weight.numpy().copy() for weight in model.weights]


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
@pytest.mark.parametrize("kind", sorted(LINEAR))
def test_weight_inits_start_from_the_reference_init_with_the_kernel_as_its_residual(init, kind):
    build, targets = LINEAR[kind]
    model = build()
    original = {
        path: layer.kernel.numpy().copy() for path, layer in lora.named_layers(model) if path.split(".")[-1] in targets
    }
    expected = np.asarray(model(IDS))
    # With DoRA the magnitude starts at the norm of the initial adapted weight, the original one.
    lora.apply(model, r=3, alpha=6, target_modules=targets, init=init, use_dora=init == "olora")
    assert_close(model(IDS), expected, np.float32, factor=20)
    for path, layer in lora.lora_layers(model):
        W = layer._to_reference(original[path])
        A, B = layer.lora_weights()
        np.testing.assert_array_equal(
            np.concatenate(layer.lora_weights(initial=True), axis=None), np.concatenate((A, B), axis=None)
        )
        assert_close(layer.base_weight() + layer.scaling * B @ A, W, np.float32, factor=10)
        if init != "pissa_niter_2":  # the randomized SVD draws its test matrix
            start = inits.init_from_weight(W, init, 3, layer.scaling)
            for actual, want in zip((A, B, layer.base_weight()), start, strict=True):
                assert_close(actual, want, np.float32, factor=10)
        assert [v.name for v in layer.trainable_weights] == ["lora_a", "lora_b"] + (
            ["lora_magnitude_vector"] if init == "olora" else []
        )


def _trained(init, use_dora):
    """A keras_base model with a weight-init adapter on fc1 and fc2, trained (randomized adapter)."""
    model = lora.apply(keras_base(), r=2, alpha=4, target_modules=["fc1", "fc2"], init=init, use_dora=use_dora)
    rng = np.random.default_rng(3)
    for weight in model.trainable_weights:
        weight.assign(weight.numpy() + rng.standard_normal(weight.shape) * 0.3)
    return model


def _torch_loaders():
    """`(name, load(net, folder))` of the PyTorch-side readers: lora_spec.torch (while it has the variant) and PEFT."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import lora_spec.torch as lora_torch

    return torch, {
        "lora_spec.torch": lora_torch.load_adapter,
        "peft": lambda net, folder: peft.PeftModel.from_pretrained(net, str(folder)),
    }


@pytest.mark.parametrize(("init", "use_dora"), [("pissa", False), ("olora", True), ("pissa_niter_2", False)])
def test_a_weight_init_adapter_saved_as_lora_of_the_original_base_runs_there_in_keras_and_pytorch(
    tmp_path, monkeypatch, init, use_dora
):
    model = _trained(init, use_dora)
    expected = np.asarray(model(IDS))
    if init == "pissa_niter_2":  # a .keras file keeps the residual and the initial A and B
        model.save(tmp_path / "model.keras")
        # Loading takes them from the file, without decomposing the new layers' random weights first.
        monkeypatch.setattr(inits, "init_from_weight", _no_decomposition)
        model = keras.models.load_model(tmp_path / "model.keras")
        monkeypatch.undo()
        np.testing.assert_array_equal(model(IDS), expected)
    lora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (4, 8, True)
    assert config["use_dora"] is use_dora
    assert_close(lora.load_adapter(keras_base(), tmp_path)(IDS), expected, np.float32, factor=50)
    torch, loaders = _torch_loaders()
    for load in loaders.values():
        net = load(torch_twin(torch, keras_base()), tmp_path)
        assert_close(_torch_outputs(torch, net.eval()), expected, np.float32, factor=50)


@pytest.mark.parametrize(("init", "use_dora"), [("pissa", True), ("olora", False)])
def test_the_unconverted_form_runs_the_init_again_on_the_original_base_in_keras_and_peft(tmp_path, init, use_dora):
    model = _trained(init, use_dora)
    expected = np.asarray(model(IDS))
    lora.save_adapter(model, tmp_path, convert_to_lora=False)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (2, init)
    assert_close(lora.load_adapter(keras_base(), tmp_path)(IDS), expected, np.float32, factor=50)
    torch, loaders = _torch_loaders()
    net = loaders["peft"](torch_twin(torch, keras_base()), tmp_path)
    assert_close(_torch_outputs(torch, net.eval()), expected, np.float32, factor=50)


def test_weight_inits_are_refused_in_one_line_where_peft_has_none_and_the_model_is_unchanged():
    cases = [
        (
            keras_base(),
            dict(target_modules=["embed", "fc1"]),
            r"init='pissa' initialises linear layers \(Dense, "
            r"EinsumDense\) only, as PEFT's does, and layer 'embed' "
            "is a Embedding",
        ),
        (keras_cnn(1), dict(target_modules=["conv"]), "layer 'conv' is a Conv2D"),
        (
            keras_base(),
            dict(target_modules=["fc1"], r=9),
            r"rank r=9 does not fit init='pissa' of layer 'fc1', whose "
            "weight is 16x8: use r <= 8",
        ),
    ]
    quantized = keras_base()
    quantized.get_layer("encoder").get_layer("fc1").quantize("int8")
    cases.append((quantized, dict(target_modules=["fc1"]), r"layer 'fc1' is quantized \(int8\)"))
    integer = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, dtype="int32", kernel_initializer="ones", name="counts")]
    )
    cases.append((integer, dict(target_modules=["counts"]), r"layer 'counts' holds int32 weights: LoRA, DoRA"))
    for model, options, message in cases:
        before = _weights(model)
        with pytest.raises(ValueError, match=message) as error:
            lora.apply(model, init="pissa", **{"r": 2, **options})
        assert "\n" not in str(error.value)
        assert not list(lora.lora_layers(model))
        for old, new in zip(before, _weights(model), strict=True):
            np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize(("first", "second"), [("pissa", "kaiming"), ("kaiming", "olora")])
def test_a_weight_init_adapter_cannot_share_layers_with_another_adapter(first, second):
    model = lora.apply(keras_base(), r=2, target_modules=["fc1"], init=first)
    before = _weights(model)
    with pytest.raises(
        ValueError,
        match=r"layer 'fc1' would hold adapters 'other', 'default', one with "
        r"init='(pissa|olora)': PiSSA and OLoRA make the base weight the residual",
    ):
        lora.apply(model, adapter_name="other", r=2, target_modules=["fc1", "fc2"], init=second)
    assert lora.adapter_names(model) == ["default"]
    assert [path for path, _ in lora.lora_layers(model)] == ["encoder.fc1"]
    for old, new in zip(before, _weights(model), strict=True):
        np.testing.assert_array_equal(old, new)
    if first == "pissa":
        with pytest.raises(ValueError, match=r"adapter 'default' has init='pissa', so its layers' base weights"):
            lora.add_weighted_adapter(model, ["default"], [1.0], "copy")
