"""Several named adapters on Keras models: layers against the reference, switching in compiled models,
modules to save per adapter, combinations, routed batches as data, `.keras` files, folders shared with PyTorch."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

import lora_spec.keras as lora
from lora_spec import reference
from lora_spec.multi_adapter import BASE_MODEL, combine
from tests import strategies
from tests.backends.keras_cases import keras_can_run, lora_conv2d, nhwc
from tests.numerics import assert_close

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="needs Keras's TensorFlow backend")


# --- one layer, several adapters ------------------------------------------------------------------------------


def keras_layer(case):
    """A built LoRA layer holding the case's adapters `a0`, `a1`, ... (only `a0` active), and its input."""
    base = case.base
    adapters = {f"a{index}": dict(r=a.A.shape[0], alpha=a.s * a.A.shape[0]) for index, a in enumerate(case.adapters)}
    if case.layer == "linear":
        layer = lora.LoRADense(base.W.shape[0], use_bias=base.b is not None, dtype="float64", adapters=adapters)
        layer.build(base.x.shape)
        layer.kernel.assign(base.W.T)
        x = base.x
    elif case.layer == "embedding":
        layer = lora.LoRAEmbedding(*base.W.shape, dtype="float64", adapters=adapters)
        layer.build(base.ids.shape)
        layer.embeddings.assign(base.W)
        x = base.ids
    else:
        conv, x, _ = lora_conv2d(base)  # for its geometry and the input as Keras pads it
        layer = lora.LoRAConv2D(
            conv.filters,
            conv.kernel_size,
            strides=conv.strides,
            dilation_rate=conv.dilation_rate,
            groups=conv.groups,
            use_bias=base.b is not None,
            dtype="float64",
            adapters=adapters,
        )
        layer.build(x.shape)
        layer.kernel.assign(base.W.transpose(2, 3, 1, 0))
    if getattr(base, "b", None) is not None:
        layer.bias.assign(base.b)
    for index, adapter in enumerate(case.adapters):
        layer.set_lora_weights(adapter.A, adapter.B, f"a{index}")
    return layer, x


def _reference(case, adapter, rows=slice(None)):
    base = case.base
    if case.layer == "linear":
        return reference.forward(base.x[rows], base.W, base.b, adapter.A, adapter.B, adapter.s)
    if case.layer == "embedding":
        return reference.embedding_forward(base.ids[rows], base.W, adapter.A, adapter.B, adapter.s)
    y = reference.conv2d_forward(
        np.pad(base.x[rows], ((0, 0), (0, 0), (base.padding[0],) * 2, (base.padding[1],) * 2)),
        base.W,
        base.b,
        adapter.A,
        adapter.B,
        adapter.s,
        stride=base.stride,
        dilation=base.dilation,
        groups=base.groups,
    )
    return nhwc(y)


@settings(max_examples=15)
@given(strategies.adapter_set_cases(), st.data())
def test_active_adapters_add_up_route_and_merge_as_the_reference(case, data):
    if case.layer == "conv2d" and not keras_can_run(case.base):
        return
    layer, x = keras_layer(case)
    names = [f"a{index}" for index in range(len(case.adapters))]
    active = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    layer.set_active_adapters(active)
    zero = case.adapters[0]._replace(B=np.zeros_like(case.adapters[0].B))
    base_output = _reference(case, zero)
    expected = base_output + sum(_reference(case, case.adapters[names.index(name)]) - base_output for name in active)
    assert_close(np.asarray(layer(x)), expected, factor=100)
    layer.merge()
    assert layer.merged_adapters == active
    assert_close(np.asarray(layer(x)), expected, factor=100)
    layer.unmerge()
    routes = data.draw(st.lists(st.sampled_from([*names, BASE_MODEL]), min_size=len(x), max_size=len(x)))
    layer.route(
        np.asarray([names.index(name) if name in names else -1 for name in routes], np.int32),
        {name: index for index, name in enumerate(names)},
    )
    routed = np.asarray(layer(x))
    for row, name in enumerate(routes):
        adapter = zero if name == BASE_MODEL else case.adapters[names.index(name)]
        assert_close(routed[row], _reference(case, adapter, slice(row, row + 1))[0], factor=100)


def test_a_layer_routed_without_adapter_indices_names_the_missing_argument():
    layer = lora.LoRADense(4, adapters={"a": dict(r=2)})
    with pytest.raises(ValueError, match="without adapter_indices"):
        layer.route(np.zeros(3, np.int32))


def test_a_layer_config_keeps_every_adapter_and_the_active_ones():
    layer = lora.LoRADense(4, adapters={"a": dict(r=2, alpha=4), "b": dict(r=3, dropout=0.1)}, active_adapters=["b"])
    config = layer.get_config()
    assert config["adapters"]["b"]["r"] == 3 and config["active_adapters"] == ["b"]
    assert "adapters" not in lora.LoRADense(4, r=2).get_config()  # one default adapter: the config of old files
    again = lora.LoRADense.from_config(config)
    again.build((2, 5))
    assert [v.name for v in again.trainable_weights] == ["lora_a_b", "lora_b_b"]
    assert (again.r, again.dropout) == (3, 0.1)


# --- whole models ---------------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 8)).astype(np.float32)
Y = RNG.standard_normal((4, 3)).astype(np.float32)


def mlp():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu", name="fc1")(inputs)
    hidden = keras.layers.Dense(16, name="fc2")(hidden)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in lora.lora_layers(model):
        for name in layer.adapters:
            lora_a, lora_b = layer.lora_weights(name)
            layer.set_lora_weights(
                rng.standard_normal(lora_a.shape) * 0.3, rng.standard_normal(lora_b.shape) * 0.3, name
            )
    return model


def two_adapters():
    """`default` (fc1, fc2; r=2) and `other` (fc2, head copy; r=4, alpha=3), random non-zero."""
    model = lora.apply(mlp(), r=2, alpha=4, target_modules=["fc1", "fc2"])
    lora.apply(model, adapter_name="other", r=4, alpha=3, target_modules=["fc2"], modules_to_save=["head"])
    return randomize(model)


def test_set_adapter_switches_what_runs_and_trains_without_rebuilding():
    model = two_adapters()
    default_output = np.asarray(model(X))
    layers = [id(layer) for layer in model.layers]
    lora.set_adapter(model, "other")
    assert [id(layer) for layer in model.layers] == layers
    assert sorted(v.name for v in model.trainable_weights) == ["bias", "kernel", "lora_a_other", "lora_b_other"]
    assert not np.allclose(np.asarray(model(X)), default_output)
    lora.set_adapter(model, "default")
    np.testing.assert_allclose(np.asarray(model(X)), default_output, rtol=1e-6)


def test_set_adapter_takes_effect_in_a_model_compiled_for_predict_and_fit():
    model = two_adapters()
    model.compile(optimizer="adam", loss="mse")
    model.fit(X, Y, epochs=1, verbose=0)
    default_predictions = model.predict(X, verbose=0)
    lora.set_adapter(model, "other")
    np.testing.assert_allclose(model.predict(X, verbose=0), np.asarray(model(X)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(model.predict(X, verbose=0), default_predictions)
    fc1 = model.get_layer("fc1")
    before = {
        name: [w.numpy().copy() for w in (fc1.adapter(name).lora_a, fc1.adapter(name).lora_b)] for name in fc1.adapters
    }
    other_b = model.get_layer("fc2").adapter("other").lora_b.numpy().copy()
    model.fit(X, Y, epochs=2, verbose=0)
    assert not np.allclose(model.get_layer("fc2").adapter("other").lora_b.numpy(), other_b)
    for name, values in before.items():
        for value, variable in zip(values, (fc1.adapter(name).lora_a, fc1.adapter(name).lora_b), strict=True):
            np.testing.assert_array_equal(variable.numpy(), value)


def test_modules_to_save_keep_one_copy_per_adapter():
    model = two_adapters()
    head = model.get_layer("head")
    original = head.kernel.numpy().copy()
    lora.set_adapter(model, "other")
    head.kernel.assign(original + 1.0)
    lora.set_adapter(model, "default")
    np.testing.assert_array_equal(head.kernel.numpy(), original)
    lora.set_adapter(model, "other")
    np.testing.assert_array_equal(head.kernel.numpy(), original + 1.0)
    with lora.disable_adapters(model):
        np.testing.assert_array_equal(head.kernel.numpy(), original)
    np.testing.assert_array_equal(head.kernel.numpy(), original + 1.0)


def test_delete_adapter_activates_the_first_remaining_and_the_last_leaves_the_base():
    model = two_adapters()
    with lora.disable_adapters(model):
        base_output = np.asarray(model(X))
    with pytest.warns(UserWarning, match="'default' was active and is deleted: 'other' is active now"):
        lora.delete_adapter(model, "default")
    assert type(model.get_layer("fc1")) is keras.layers.Dense and lora.active_adapters(model) == ["other"]
    lora.delete_adapter(model, "other")
    assert not list(lora.lora_layers(model))
    np.testing.assert_allclose(np.asarray(model(X)), base_output, rtol=1e-6)


def test_add_weighted_adapter_combines_each_layer_by_the_reference():
    model = two_adapters()
    lora.add_weighted_adapter(model, ["default", "other"], [0.5, -2.0], "mixed", combination_type="cat")
    fc2 = model.get_layer("fc2")
    factors = [fc2.adapter(name) for name in ("default", "other")]
    from lora_spec.multi_adapter import Factors

    expected = combine([Factors(*fc2.lora_weights(a.name), a.scaling) for a in factors], [0.5, -2.0], "cat")
    for actual, wanted in zip(fc2.lora_weights("mixed"), expected, strict=True):
        np.testing.assert_allclose(actual, wanted, rtol=1e-6)
    assert set(model.get_layer("fc1").adapters) == {"default", "mixed"}
    with pytest.raises(ValueError, match=r"layer 'fc2'.*one rank"):
        lora.add_weighted_adapter(model, ["default", "other"], [1, 1], "bad", combination_type="linear")


def _through(model, x, name):
    """`x` through adapter `name` alone, or the base for "__base__"."""
    if name == BASE_MODEL:
        with lora.disable_adapters(model):
            return np.asarray(model(x))
    active = lora.active_adapters(model)
    lora.set_adapter(model, name)
    output = np.asarray(model(x))
    lora.set_adapter(model, active)
    return output


def test_routed_batches_are_data_in_eager_calls_traced_functions_and_predict():
    model = lora.apply(mlp(), r=2, target_modules=["fc1", "fc2"])
    lora.apply(model, adapter_name="other", r=4, target_modules=["fc2"])
    randomize(model)
    routes = ["other", BASE_MODEL, "default", "other"]
    expected = np.concatenate([_through(model, X[row : row + 1], name) for row, name in enumerate(routes)])
    with lora.routed(model, routes):
        np.testing.assert_allclose(np.asarray(model(X)), expected, rtol=1e-5, atol=1e-6)

    names = lora.adapter_names(model)
    ids = np.asarray([names.index(name) if name != BASE_MODEL else -1 for name in routes], np.int32)

    @tf.function
    def serve(x, adapter_ids):
        with lora.routed(model, adapter_ids):
            return model(x, training=False)

    np.testing.assert_allclose(serve(X, ids).numpy(), expected, rtol=1e-5, atol=1e-6)
    # The same trace with other data: every row through "default".
    np.testing.assert_allclose(
        serve(X, np.zeros(4, np.int32)).numpy(), _through(model, X, "default"), rtol=1e-5, atol=1e-6
    )
    assert serve.experimental_get_tracing_count() == 1
    served = lora.RoutedModel(model)
    np.testing.assert_allclose(served.predict([X, ids], batch_size=3, verbose=0), expected, rtol=1e-5, atol=1e-6)


def test_routing_refuses_unknown_names_merged_models_copies_of_modules_to_save_and_other_batch_sizes():
    model = lora.apply(mlp(), r=2, target_modules=["fc1"])
    with lora.routed(model, ["default", None, None]):
        with pytest.raises(ValueError, match="names 3 adapters, one per row, but this batch has 4 rows"):
            model(X)
        with pytest.raises(ValueError, match="for inference"):
            model(X[:3], training=True)
    lora.merge(model)
    with pytest.raises(ValueError, match=r"merged.*unmerge"), lora.routed(model, ["default"] * 4):
        pass
    model = two_adapters()
    with pytest.raises(ValueError, match="unknown adapter 'x'"), lora.routed(model, ["x"] * 4):
        pass
    with pytest.raises(ValueError, match="modules_to_save"), lora.routed(model, ["other"] * 4):
        pass


def test_a_keras_file_keeps_every_adapter_and_the_active_ones(tmp_path):
    model = lora.apply(mlp(), r=2, target_modules=["fc1", "fc2"])
    lora.apply(model, adapter_name="other", r=4, target_modules=["fc2"])
    randomize(model)
    lora.set_adapter(model, ["default", "other"])
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert lora.adapter_names(restored) == ["default", "other"]
    assert lora.active_adapters(restored) == ["default", "other"]
    np.testing.assert_allclose(np.asarray(restored(X)), np.asarray(model(X)), rtol=1e-6)


def test_folders_move_between_keras_and_torch_by_name(tmp_path):
    torch = pytest.importorskip("torch")
    import lora_spec.torch as lora_torch

    model = two_adapters()
    lora.save_adapter(model, tmp_path / "keras")
    assert (tmp_path / "keras" / "other" / "adapter_config.json").is_file()
    torch_model = torch.nn.Sequential()
    torch_model.fc1, torch_model.fc2, torch_model.head = (
        torch.nn.Linear(8, 16),
        torch.nn.Linear(16, 16),
        torch.nn.Linear(16, 3),
    )
    with torch.no_grad():
        for name in ("fc1", "fc2", "head"):
            getattr(torch_model, name).weight.copy_(torch.from_numpy(model.get_layer(name).kernel.numpy().T))
            getattr(torch_model, name).bias.copy_(torch.from_numpy(model.get_layer(name).bias.numpy()))

    def forward(x):
        hidden = torch.relu(torch_model.fc1(torch.from_numpy(x)))
        return torch_model.head(torch_model.fc2(hidden)).detach().numpy()

    lora_torch.load_adapter(torch_model, tmp_path / "keras")
    assert lora_torch.adapter_names(torch_model) == ["default", "other"]
    for name in ("default", "other"):
        lora.set_adapter(model, name)
        lora_torch.set_adapter(torch_model, name)
        np.testing.assert_allclose(forward(X), np.asarray(model(X)), rtol=1e-5, atol=1e-5)
    lora_torch.save_adapter(torch_model, tmp_path / "torch")
    back = lora.load_adapter(mlp(), tmp_path / "torch")
    for name in ("default", "other"):
        lora.set_adapter(back, name)
        lora.set_adapter(model, name)
        np.testing.assert_allclose(np.asarray(back(X)), np.asarray(model(X)), rtol=1e-5, atol=1e-5)
