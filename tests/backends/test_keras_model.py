"""Whole-model LoRA in Keras: apply in place, targets and freezing, merge/unmerge, unload, `.keras` files, fit."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

import lora_spec.keras as lora
from lora_spec import inits
from tests.numerics import assert_close

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="needs Keras's TensorFlow backend")

RNG = np.random.default_rng(0)
X = RNG.standard_normal((6, 8)).astype(np.float32)
Y = RNG.standard_normal((6, 3)).astype(np.float32)


def mlp() -> keras.Model:
    """A functional model with a nested Sequential: paths `encoder.fc1`, `encoder.fc2`, `norm`, `head`."""
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="fc1"), keras.layers.Dense(16, name="fc2")],
        name="encoder",
    )
    inputs = keras.Input((8,))
    hidden = keras.layers.LayerNormalization(name="norm")(encoder(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden), name="mlp")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.embed = keras.layers.Embedding(10, 8, name="embed")
        self.attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="attention")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, ids):
        hidden = self.embed(ids)
        return self.head(self.attention(hidden, hidden))


def attention_model() -> Subclassed:
    keras.utils.set_random_seed(0)
    model = Subclassed()
    model(np.zeros((2, 5), np.int32))
    return model


IDS = RNG.integers(0, 10, (3, 5))


def _randomize_adapters(model):
    for _, layer in lora.lora_layers(model):
        layer.lora_a.assign(RNG.standard_normal(layer.lora_a.shape) * 0.3)
        layer.lora_b.assign(RNG.standard_normal(layer.lora_b.shape) * 0.3)


def _trained(model) -> list[str]:
    """`<module path>/<variable name>` of the weights that train, independent of Keras's variable paths."""
    owners = {
        id(v): f"{path}/{v.name}"
        for path, layer in lora.named_layers(model)
        for v in layer._trainable_variables + layer._non_trainable_variables
    }
    return sorted(owners[id(v)] for v in model.trainable_weights)


def _classes(model):
    return {path: type(layer).__name__ for path, layer in lora.named_layers(model)}


def test_apply_converts_layers_in_place_and_returns_the_same_model():
    model = mlp()
    layer_ids = [id(layer) for _, layer in lora.named_layers(model)]
    expected = model(X)
    assert lora.apply(model, r=4, target_modules=["fc1", "fc2"]) is model
    assert [id(layer) for _, layer in lora.named_layers(model)] == layer_ids
    assert {p: c for p, c in _classes(model).items() if c.startswith("LoRA")} == {
        "encoder.fc1": "LoRADense",
        "encoder.fc2": "LoRADense",
    }
    np.testing.assert_array_equal(model(X), expected)  # B starts at zero


def test_default_targets_are_every_dense_but_the_head():
    model = lora.apply(mlp())
    assert sorted(path for path, _ in lora.lora_layers(model)) == ["encoder.fc1", "encoder.fc2"]


def test_default_targets_of_an_attention_model_are_query_and_value():
    model = lora.apply(attention_model(), r=2)
    assert sorted(path for path, _ in lora.lora_layers(model)) == ["attention.query", "attention.value"]
    assert isinstance(model.attention._query_dense, lora.LoRAEinsumDense)


def test_subclassed_model_adapts_embeddings_and_attention_and_merges_exactly():
    model = attention_model()
    base = model(IDS)
    lora.apply(model, r=2, target_modules=["embed", "query", "key", "value", "attention_output"])
    assert len(list(lora.lora_layers(model))) == 5
    _randomize_adapters(model)
    expected = model(IDS)
    assert not np.allclose(expected, base)
    lora.merge(model)
    assert_close(model(IDS), expected, np.float32, factor=20)
    lora.unmerge(model)
    np.testing.assert_array_equal(model(IDS), expected)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"target_modules": ["missing"]}, ValueError, "target_modules=.*matched no module.*fc1, fc2, head"),
        ({"target_modules": ["norm"]}, ValueError, "'norm' is a LayerNormalization, which LoRA cannot wrap"),
        (
            {"target_modules": ["fc1"], "modules_to_save": ["classifier"]},
            ValueError,
            "modules_to_save entry 'classifier' matched no module",
        ),
        ({"rank": 4}, ValueError, "unknown LoRAConfig field 'rank'"),
        ({"r": 0}, ValueError, "r=0 is invalid"),
    ],
)
def test_bad_apply_arguments_raise_one_clear_error_and_change_nothing(overrides, error, message):
    model = mlp()
    with pytest.raises(error, match=message):
        lora.apply(model, **overrides)
    assert not list(lora.lora_layers(model))
    assert len(model.trainable_weights) == 8


def test_apply_refuses_what_is_not_a_built_keras_model():
    with pytest.raises(TypeError, match=r"model must be a keras\.Model or keras\.layers\.Layer, not list"):
        lora.apply([])
    with pytest.raises(TypeError, match=r"config must be a lora_spec\.LoRAConfig, not dict"):
        lora.apply(mlp(), {"r": 4})
    unbuilt = keras.Sequential([keras.layers.Dense(4, name="fc"), keras.layers.Dense(2, name="out")])
    with pytest.raises(ValueError, match="layer 'fc' is not built: build the model"):
        lora.apply(unbuilt, target_modules=["fc"])


def test_a_layer_with_keras_own_lora_is_refused_before_any_layer_changes():
    model = mlp()
    model.get_layer("encoder").get_layer("fc2").enable_lora(2)
    with pytest.raises(ValueError, match="layer 'fc2' has Keras's own LoRA enabled: rebuild it without enable_lora"):
        lora.apply(model, target_modules=["fc1", "fc2"])
    assert not list(lora.lora_layers(model))


def test_applying_twice_does_not_wrap_twice():
    model = lora.apply(mlp(), r=4, target_modules=["fc1"])
    lora_a = model.get_layer("encoder").get_layer("fc1").lora_a
    lora.apply(model, r=4, target_modules=["fc1"])
    assert model.get_layer("encoder").get_layer("fc1").lora_a is lora_a
    assert [v.path for v in model.trainable_weights] == ["encoder/fc1/lora_a", "encoder/fc1/lora_b"]


@pytest.mark.parametrize(
    ("bias", "trained"),
    [
        ("none", ["encoder/fc1/lora_a", "encoder/fc1/lora_b", "head/kernel", "head/bias"]),
        ("lora_only", ["encoder/fc1/bias", "encoder/fc1/lora_a", "encoder/fc1/lora_b", "head/kernel", "head/bias"]),
        (
            "all",
            [
                "encoder/fc1/bias",
                "encoder/fc1/lora_a",
                "encoder/fc1/lora_b",
                "encoder/fc2/bias",
                "head/kernel",
                "head/bias",
            ],
        ),
    ],
)
def test_only_adapters_modules_to_save_and_chosen_biases_train(bias, trained):
    model = lora.apply(mlp(), r=4, target_modules=["fc1"], modules_to_save=["head"], bias=bias)
    assert sorted(v.path for v in model.trainable_weights) == sorted(trained)
    counts = lora.trainable_parameters(model)
    assert counts.trainable == sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert counts.total == 8 * 16 + 16 + 16 * 16 + 16 + 32 + 16 * 3 + 3 + 4 * (8 + 16)
    assert str(counts).startswith(f"trainable params: {counts.trainable:,} || all params: {counts.total:,}")


def test_fit_changes_only_the_lora_weights():
    model = lora.apply(mlp(), r=4, target_modules=["fc1", "fc2"])
    before = {v.path: v.numpy().copy() for v in model.weights}
    model.compile(optimizer=keras.optimizers.AdamW(0.01), loss="mse")
    model.fit(X, Y, epochs=2, verbose=0)
    changed = sorted(path for path, value in before.items() if not np.array_equal(value, _weight(model, path)))
    assert changed == ["encoder/fc1/lora_a", "encoder/fc1/lora_b", "encoder/fc2/lora_a", "encoder/fc2/lora_b"]


def _weight(model, path):
    return next(v.numpy() for v in model.weights if v.path == path)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_training_step_runs_in_tf_function_and_xla(jit_compile):
    model = lora.apply(mlp(), r=4, target_modules=["fc1", "fc2"])
    optimizer = keras.optimizers.SGD(0.1)

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply(grads, model.trainable_weights)
        return loss

    losses = [float(step(X, Y)) for _ in range(3)]
    assert losses[2] < losses[0]


def test_merge_resets_traced_predict_so_outputs_do_not_double_count():
    model = lora.apply(mlp(), r=4, target_modules=["fc1", "fc2"])
    _randomize_adapters(model)
    expected = model.predict(X, verbose=0)
    lora.merge(model)
    assert_close(model.predict(X, verbose=0), expected, np.float32, factor=20)
    lora.unmerge(model)
    np.testing.assert_array_equal(model.predict(X, verbose=0), expected)


def test_merge_is_all_or_nothing_when_an_adapter_diverged():
    model = lora.apply(mlp(), r=4, target_modules=["fc1", "fc2"])
    _randomize_adapters(model)
    kernels = [layer.kernel.numpy().copy() for _, layer in lora.lora_layers(model)]
    model.get_layer("encoder").get_layer("fc2").lora_b.assign(np.full((4, 16), np.inf))
    with pytest.raises(ValueError, match=r"layer 'encoder\.fc2': the merged weight would hold NaN or inf"):
        lora.merge(model)
    assert not any(layer.merged for _, layer in lora.lora_layers(model))
    for kernel, (_, layer) in zip(kernels, lora.lora_layers(model), strict=True):
        np.testing.assert_array_equal(layer.kernel.numpy(), kernel)


def test_merge_and_unload_leaves_plain_dense_layers_with_merged_weights():
    model = lora.apply(mlp(), r=4, target_modules=["fc1", "fc2"])
    _randomize_adapters(model)
    expected = model(X)
    assert lora.merge_and_unload(model) is model
    assert set(_classes(model).values()) == {"Dense", "Sequential", "InputLayer", "LayerNormalization"}
    assert all("lora" not in v.path for v in model.weights)
    assert model.trainable_weights == []  # the merged kernels stay frozen, as PEFT leaves them
    assert_close(model(X), expected, np.float32, factor=20)
    with pytest.raises(ValueError, match=r"this model has no LoRA adapter: call lora_spec\.keras\.apply"):
        lora.merge(model)


def test_unload_restores_the_base_model_outputs():
    model = mlp()
    expected = model(X)
    lora.apply(model, r=4, target_modules=["fc1"])
    _randomize_adapters(model)
    lora.unload(model)
    np.testing.assert_array_equal(model(X), expected)
    assert "LoRADense" not in _classes(model).values()


@pytest.mark.parametrize("merged", [False, True])
def test_keras_file_round_trip_keeps_the_adapter_separate_and_trainable(tmp_path, merged):
    model = lora.apply(mlp(), r=4, alpha=8, target_modules=["fc1", "fc2"])
    _randomize_adapters(model)
    if merged:
        lora.merge(model)
    expected = model(X)
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(restored(X), expected)
    assert _trained(restored) == [
        "encoder.fc1/lora_a",
        "encoder.fc1/lora_b",
        "encoder.fc2/lora_a",
        "encoder.fc2/lora_b",
    ]
    layer = restored.get_layer("encoder").get_layer("fc1")
    assert (type(layer), layer.r, layer.alpha, layer.merged) == (lora.LoRADense, 4, 8, merged)
    lora.unmerge(restored)
    restored.compile(optimizer="adam", loss="mse")
    restored.fit(X, Y, epochs=1, verbose=0)
    lora.unload(restored)
    np.testing.assert_array_equal(restored(X), lora.unload(model)(X))


def _no_decomposition(*args, **kwargs):
    raise AssertionError("loading a file decomposed a base weight")


def functional_attention_model() -> keras.Model:
    """A functional model whose `MultiHeadAttention` creates its projections (`attention.query`...) in its own
    build: a `.keras` file rebuilds them from the attention layer's config, as plain `EinsumDense` layers."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Embedding(10, 8, name="embed")(ids)
    hidden = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="attention")(hidden, hidden)
    return keras.Model(ids, keras.layers.Dense(3, name="head")(hidden))


@pytest.mark.parametrize(
    ("options", "merged"),
    [
        (dict(use_dora=True), False),
        (dict(use_dora=True), True),
        (dict(init="olora"), False),
        (dict(init="pissa", use_dora=True), False),
    ],
)
def test_a_keras_file_restores_the_adapters_of_layers_that_a_parent_layer_builds(
    tmp_path, monkeypatch, options, merged
):
    targets = ["query", "value", "attention_output"]
    model = lora.apply(functional_attention_model(), r=2, alpha=4, target_modules=targets, **options)
    _randomize_adapters(model)
    if not options.get("init"):  # a second adapter on the query; weight inits take no other adapter
        lora.apply(model, adapter_name="other", r=3, target_modules=["query"])
        lora.set_adapter(model, ["default", "other"])
    if merged:
        lora.merge(model)
    expected = model(IDS)
    model.save(tmp_path / "model.keras")
    # PiSSA/OLoRA layers take their residual and factors from the file, without decomposing a new weight first.
    monkeypatch.setattr(inits, "init_from_weight", _no_decomposition)
    restored = keras.models.load_model(tmp_path / "model.keras")
    monkeypatch.undo()
    np.testing.assert_array_equal(restored(IDS), expected)
    layers, restored_layers = dict(lora.lora_layers(model)), dict(lora.lora_layers(restored))
    assert sorted(restored_layers) == ["attention.attention_output", "attention.query", "attention.value"]
    for path, layer in restored_layers.items():
        assert (type(layer), layer.get_config(), layer.merged) == (
            lora.LoRAEinsumDense,
            layers[path].get_config(),
            merged,
        )
        for saved, loaded in zip(layers[path].weights, layer.weights, strict=True):
            np.testing.assert_array_equal(loaded.numpy(), saved.numpy())
    lora.unmerge(restored)
    # The attention layer's config does not say its key and output layers were frozen: set_adapter freezes again.
    lora.set_adapter(restored, lora.active_adapters(model))
    assert _trained(restored) == _trained(model)


def test_a_weights_file_with_lora_inside_a_parent_layer_gives_an_unadapted_model_its_adapters(tmp_path):
    model = lora.apply(functional_attention_model(), r=2, target_modules=["query", "value"], use_dora=True)
    _randomize_adapters(model)
    model.save_weights(tmp_path / "model.weights.h5")
    base = functional_attention_model()
    base.load_weights(tmp_path / "model.weights.h5")
    np.testing.assert_array_equal(base(IDS), model(IDS))
    assert [path for path, _ in lora.lora_layers(base)] == ["attention.query", "attention.value"]


def test_mixed_precision_training_keeps_float32_lora_weights():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = mlp()
    finally:
        keras.config.set_dtype_policy("float32")
    lora.apply(model, r=4, target_modules=["fc1", "fc2"])
    model.compile(optimizer="adam", loss="mse")
    model.fit(X, Y, epochs=1, verbose=0)
    layer = model.get_layer("encoder").get_layer("fc1")
    assert layer.lora_a.dtype == "float32" and layer.compute_dtype == "bfloat16"
    assert np.all(np.isfinite(layer.lora_b.numpy())) and np.any(layer.lora_b.numpy() != 0)


def test_subclassed_model_weights_file_loads_into_a_rebuilt_model_with_the_same_lora(tmp_path):
    targets = dict(r=2, target_modules=["embed", "query", "value"])
    model = lora.apply(attention_model(), **targets)
    _randomize_adapters(model)
    model.save_weights(tmp_path / "model.weights.h5")
    rebuilt = lora.apply(attention_model(), **targets)
    rebuilt.load_weights(tmp_path / "model.weights.h5")
    np.testing.assert_array_equal(rebuilt(IDS), model(IDS))


def test_a_weights_file_saved_before_lora_is_refused_with_what_to_do_instead(tmp_path):
    mlp().save_weights(tmp_path / "base.weights.h5")
    model = lora.apply(mlp(), r=4, target_modules=["fc1", "fc2"])
    with pytest.raises(
        ValueError,
        match=r"the file has no weights for LoRA layer 'fc1': it was saved without LoRA; "
        "load base weights before lora_spec.keras.apply",
    ):
        model.load_weights(tmp_path / "base.weights.h5")


def test_a_second_apply_keeps_the_first_ones_adapters_and_modules_to_save(tmp_path):
    model = lora.apply(mlp(), r=4, target_modules=["fc1"], modules_to_save=["head"])
    lora.apply(model, r=2, target_modules=["fc2"])
    assert {path: layer.r for path, layer in lora.lora_layers(model)} == {"encoder.fc1": 4, "encoder.fc2": 2}
    assert "head/kernel" in _trained(model)
    _randomize_adapters(model)
    lora.save_adapter(model, tmp_path)
    np.testing.assert_array_equal(lora.load_adapter(mlp(), tmp_path)(X), model(X))


def test_a_cnn_trains_only_its_conv_adapters_reloads_from_a_keras_file_and_merges_away(tmp_path):
    keras.utils.set_random_seed(0)
    images = keras.Input((8, 8, 3))
    hidden = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(images)
    hidden = keras.layers.Conv2D(8, 3, padding="same", groups=2, name="conv2")(hidden)
    model = keras.Model(images, keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(hidden)))
    x = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32)
    lora.apply(model, target_modules=["conv1", "conv2"], r=2, dropout=0.1)
    before = {variable.path: variable.numpy().copy() for variable in model.weights}
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.ones((4, 2)), epochs=2, verbose=0)
    changed = sorted(v.path for v in model.weights if not np.array_equal(v.numpy(), before[v.path]))
    assert changed == ["conv1/lora_a", "conv1/lora_b", "conv2/lora_a", "conv2/lora_b"]
    expected = model(x).numpy()
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(restored(x), expected)
    assert sorted(v.path for v in restored.trainable_weights if "lora" in v.path) == changed
    lora.merge_and_unload(model)
    assert [type(layer).__name__ for layer in model.layers[1:3]] == ["Conv2D", "Conv2D"]
    assert_close(model(x), expected, np.float32, factor=10)
