"""Keras DoRA layers against the reference (`lora_spec.dora`): forward, gradients (magnitude included) and merge of
`LoRADense`, `LoRAEinsumDense`, `LoRAConv2D` and `LoRAEmbedding` with `use_dora=True`, a DoRA adapter beside a LoRA
one, `.keras` files, training, and the refusals."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

import lora_spec.keras as lora
from lora_spec import dora, reference
from lora_spec.dropout import keep_probability
from lora_spec.multi_adapter import Factors
from tests import strategies
from tests.backends.keras_cases import (
    dora_layer,
    keras_can_run,
    layer_output_and_gradients,
    nhwc,
    reference_padding,
)
from tests.numerics import assert_close

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="needs Keras's TensorFlow backend")

LAYERS = ("linear", "embedding", "conv2d")


def _dora_cases(dtype=None, dropout=True):
    return st.sampled_from(LAYERS).flatmap(lambda layer: strategies.dora_cases(layer, dtype=dtype, dropout=dropout))


def _reference_output_and_gradients(dora_case, s, grad_y, dropout_mask):
    """The reference's output and gradients for the Keras layer of `dora_case` (scaling `s`, the layer's), in
    Keras's layout for the output and `dx`; `grad_y` in Keras's layout."""
    case, m = dora_case.case, dora_case.magnitude
    if dora_case.layer == "linear":
        return (
            dora.dora_forward(case.x, case.W, case.b, case.A, case.B, s, m, case.dropout_mask),
            dora.dora_backward(case.x, case.W, case.A, case.B, s, m, grad_y, case.dropout_mask),
        )
    if dora_case.layer == "embedding":
        return (
            dora.dora_embedding_forward(case.ids, case.W, case.A, case.B, s, m),
            dora.dora_embedding_backward(case.ids, case.W, case.A, case.B, s, m, grad_y),
        )
    # Keras pads only 'same' or 'valid': the reference runs unpadded on the padded input, channels first.
    pad = reference_padding(case)
    geometry = {**case.geometry, "padding": (0, 0)}
    x = np.pad(case.x, pad)
    mask = None if case.dropout_mask is None else np.pad(case.dropout_mask, pad)
    y = dora.dora_conv2d_forward(x, case.W, case.b, case.A, case.B, s, m, **geometry, dropout_mask=mask)
    grad_y = np.ascontiguousarray(grad_y.transpose(0, 3, 1, 2))
    grads = dora.dora_conv2d_backward(x, case.W, case.A, case.B, s, m, grad_y, **geometry, dropout_mask=mask)
    return nhwc(y), grads._replace(dx=nhwc(grads.dx))


def _output_shape(dora_case):
    case = dora_case.case
    if dora_case.layer == "linear":
        return (*case.x.shape[:-1], case.W.shape[0])
    if dora_case.layer == "embedding":
        return (*case.ids.shape, case.W.shape[1])
    return None


@settings(max_examples=40)
@given(_dora_cases(), strategies.seeds)
def test_dora_layers_compute_the_reference_forward_and_gradients_with_the_norm_detached(dora_case, seed):
    assume(dora_case.layer != "conv2d" or keras_can_run(dora_case.case))
    layer, x, mask = dora_layer(dora_case)
    dtype = dora_case.case.W.dtype
    y_shape = _output_shape(dora_case) or layer.compute_output_shape(x.shape)
    grad_y = np.random.default_rng(seed).standard_normal(y_shape).astype(dtype)
    y, grads = layer_output_and_gradients(layer, x, mask, grad_y)
    expected_y, expected = _reference_output_and_gradients(dora_case, layer.scaling, grad_y, mask)
    assert_close(y, expected_y, dtype, factor=50)
    has_bias = getattr(layer, "bias", None) is not None
    for name in ("dx", "dA", "dB", "dmagnitude") + (("db",) if has_bias else ()):
        want = getattr(expected, name)
        if want is None:
            assert grads[name] is None, name
        else:
            assert_close(grads[name], want, dtype, factor=200)


def _dense_dora_layer(rng, dtype, features=5, units=6, r=3):
    """A built `LoRADense` DoRA layer with a random adapter, a bias and a magnitude of 0.5 to 2 per feature."""
    layer = lora.LoRADense(units, r=r, alpha=6, use_dora=True, dtype=dtype)
    layer.build((None, features))
    magnitude = rng.uniform(0.5, 2.0, units)
    layer.set_lora_weights(rng.standard_normal((r, features)), rng.standard_normal((units, r)), magnitude=magnitude)
    layer.bias.assign(rng.standard_normal(units))
    return layer


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("zero_magnitude", [False, True])
def test_a_traced_training_step_without_dropout_gives_the_reference_output_and_gradients(dtype, zero_magnitude):
    # Training on TensorFlow without dropout runs `keras_dora_dense`: one product with the merged weight and a
    # hand-written gradient, here in a tf.function on rows with a sequence axis; a zero magnitude takes its
    # gradient's other branch (the direction computed again).
    rng = np.random.default_rng(3)
    layer = _dense_dora_layer(rng, dtype)
    adapter = layer.adapter()
    if zero_magnitude:
        adapter.magnitude.assign(np.where(np.arange(6) == 2, 0.0, adapter.magnitude.numpy()))
    x = rng.standard_normal((2, 4, 5)).astype(dtype)
    grad_y = rng.standard_normal((2, 4, 6)).astype(dtype)
    sources = [adapter.lora_a, adapter.lora_b, adapter.magnitude]

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * grad_y)
        return y, tape.gradient(loss, [x] + [variable.value for variable in sources])

    y, (dx, da, db, dmagnitude) = step(tf.constant(x))
    A, B = layer.lora_weights()
    m, rows = adapter.magnitude.numpy(), x.reshape(-1, 5)
    W, bias = layer.base_weight(), layer.bias.numpy()
    expected_y = dora.dora_forward(rows, W, bias, A, B, layer.scaling, m)
    expected = dora.dora_backward(rows, W, A, B, layer.scaling, m, grad_y.reshape(-1, 6))
    assert_close(y.numpy().reshape(-1, 6), expected_y, np.dtype(dtype), factor=50)
    grad_a, grad_b = layer._factors_to_reference(adapter, da.numpy(), db.numpy())
    for actual, want in [(dx.numpy().reshape(-1, 5), expected.dx), (grad_a, expected.dA), (grad_b, expected.dB)]:
        assert_close(actual, want, np.dtype(dtype), factor=200)
    assert_close(dmagnitude.numpy(), expected.dmagnitude, np.dtype(dtype), factor=200)
    assert np.all(np.isfinite(dmagnitude.numpy()))


def test_a_kernel_made_trainable_by_hand_gets_its_gradient():
    # The merged-weight training product has no kernel gradient, so a trainable kernel takes the general path.
    rng = np.random.default_rng(4)
    layer = _dense_dora_layer(rng, "float64")
    layer.kernel.trainable = True
    x = rng.standard_normal((7, 5))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True))
    A, B = layer.lora_weights()
    factor = layer.adapter().magnitude.numpy() / dora.weight_norm(layer.base_weight(), A, B, layer.scaling, "linear")
    # d/dW of sum((m/n) * (x @ W.T)) with n a constant, in Keras's (in, out) layout.
    assert_close(tape.gradient(loss, layer.kernel.value), x.T @ np.tile(factor, (7, 1)), np.float64)


def test_sparse_inputs_train_as_their_dense_values():
    # Sparse inputs keep the general path (the merged-weight product takes dense tensors); both give one result.
    rng = np.random.default_rng(5)
    layer = _dense_dora_layer(rng, "float64")
    x = np.where(rng.random((7, 5)) < 0.5, rng.standard_normal((7, 5)), 0.0)
    results = []
    for inputs in (tf.constant(x), tf.sparse.from_dense(x)):
        with tf.GradientTape() as tape:
            y = layer(inputs, training=True)
            loss = tf.reduce_sum(y * y)
        gradients = tape.gradient(loss, [variable.value for variable in layer.trainable_weights])
        results.append([y, *map(tf.convert_to_tensor, gradients)])  # the sparse product's may be IndexedSlices
    for dense, sparse in zip(*results, strict=True):
        assert_close(sparse, dense, np.float64)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_training_dropout_is_the_reference_with_the_drawn_mask_scaled_by_its_exact_keep_probability(p):
    rng = np.random.default_rng(0)
    layer = lora.LoRADense(5, r=3, alpha=6, dropout=p, use_dora=True)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    layer.build(x.shape)
    magnitude = rng.uniform(0.5, 2.0, 5)
    layer.set_lora_weights(rng.standard_normal((3, 7)), rng.standard_normal((5, 3)), magnitude=magnitude)
    state = layer.seed_generator.state.numpy().copy()
    trained = layer(x, training=True).numpy()
    layer.seed_generator.state.assign(state)
    keep = np.asarray(layer._keep(layer.adapter(), keras.ops.convert_to_tensor(x)))
    assert 0 < keep.mean() < 1
    A, B = layer.lora_weights()
    expected = dora.dora_forward(
        x,
        layer.base_weight(),
        layer.bias.numpy(),
        A,
        B,
        layer.scaling,
        magnitude,
        keep / np.float32(keep_probability(p)),
    )
    assert_close(trained, expected, np.float32, factor=20)


def _merged_reference(layer, dora_case):
    case = dora_case.case
    return dora.dora_merge(case.W, *layer.lora_weights(), layer.scaling, layer.lora_magnitude(), dora_case.layer)


@settings(max_examples=20)
@given(_dora_cases(dropout=False))
def test_merge_gives_the_reference_merged_weight_and_the_same_outputs_and_unmerge_restores_it(dora_case):
    assume(dora_case.layer != "conv2d" or keras_can_run(dora_case.case))
    layer, x, _ = dora_layer(dora_case)
    before = layer._base_weight.numpy().copy()
    expected = layer(x)
    layer.merge()
    np.testing.assert_array_equal(layer._to_reference(layer._base_weight.numpy()), _merged_reference(layer, dora_case))
    assert_close(layer(x), expected, dora_case.case.W.dtype, factor=50)
    layer.unmerge()
    np.testing.assert_array_equal(layer._base_weight.numpy(), before)


@given(_dora_cases(dropout=False))
def test_a_new_dora_adapter_starts_at_its_norm_so_it_computes_plain_lora(dora_case):
    assume(dora_case.layer != "conv2d" or keras_can_run(dora_case.case))
    layer, x, _ = dora_layer(dora_case)
    case = dora_case.case
    norm = dora.weight_norm(case.W, case.A, case.B, layer.scaling, dora_case.layer)
    layer.set_lora_weights(case.A, case.B, magnitude=norm)
    plain = {
        "linear": lambda: reference.forward(case.x, case.W, case.b, case.A, case.B, layer.scaling),
        "embedding": lambda: reference.embedding_forward(case.ids, case.W, case.A, case.B, layer.scaling),
        "conv2d": lambda: nhwc(
            reference.conv2d_forward(
                np.pad(case.x, reference_padding(case)),
                case.W,
                case.b,
                case.A,
                case.B,
                layer.scaling,
                case.stride,
                (0, 0),
                case.dilation,
            )
        ),
    }
    assert_close(layer(x), plain[dora_case.layer](), case.W.dtype, factor=50)


def test_the_magnitude_starts_at_the_norm_of_the_initial_adapter_when_the_layer_is_built():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    layer = lora.LoRADense(5, r=2, use_dora=True)
    layer.build(x.shape)
    assert [v.name for v in layer.trainable_weights] == ["lora_a", "lora_b", "lora_magnitude_vector"]
    np.testing.assert_allclose(layer.lora_magnitude(), np.linalg.norm(layer.base_weight(), axis=1), rtol=1e-6)
    np.testing.assert_allclose(layer(x), x @ layer.kernel.numpy() + layer.bias.numpy(), rtol=1e-5, atol=1e-6)


# --- EinsumDense: the reference on the flattened axes ---------------------------------------------------------

EQUATIONS = [  # equation, output shape, input shape, bias axes
    ("abc,cde->abde", (None, 2, 3), (2, 3, 4), "de"),  # an attention projection: heads split on the output
    ("abcd,cde->abe", (None, 5), (2, 3, 2, 4), "e"),  # its output projection: heads contracted
    ("abc,ced->abde", (None, 3, 2), (2, 3, 4), "e"),  # output axes in another order than the kernel's
    ("abc,cd->adb", (5, None), (2, 3, 4), None),  # a batch axis after the output axis
    ("...b,bc->...c", (5,), (2, 3, 4), "c"),
]


@pytest.mark.parametrize(("equation", "output_shape", "input_shape", "bias_axes"), EQUATIONS)
def test_einsum_dense_dora_computes_the_reference_merged_weight_on_its_flattened_axes(
    equation, output_shape, input_shape, bias_axes
):
    rng = np.random.default_rng(0)
    layer = lora.LoRAEinsumDense(
        equation, output_shape, r=3, alpha=6, use_dora=True, bias_axes=bias_axes, dtype="float64"
    )
    x = rng.standard_normal(input_shape)
    layer.build(x.shape)
    W = layer.base_weight()
    A, B = rng.standard_normal((3, W.shape[1])), rng.standard_normal((W.shape[0], 3))
    magnitude = dora.weight_norm(W, A, B, layer.scaling) * rng.uniform(0.5, 2.0, W.shape[0])
    layer.set_lora_weights(A, B, magnitude=magnitude)
    bias = 0.0
    if bias_axes:
        bias = rng.standard_normal(layer.bias.shape)
        layer.bias.assign(bias)
    np.testing.assert_array_equal(layer.lora_magnitude(), magnitude)
    # Without dropout the DoRA layer is the plain layer of the reference's merged weight.
    merged = dora.dora_merge(W, A, B, layer.scaling, magnitude)
    expected = np.einsum(equation, x, layer._plan.from_reference(merged, tuple(layer.kernel.shape))) + bias
    assert_close(layer(x), expected, factor=10)
    layer.merge()
    assert_close(layer._to_reference(layer.kernel.numpy()), merged)
    assert_close(layer(x), expected, factor=10)


# --- several adapters ---------------------------------------------------------------------------------------------


@settings(max_examples=20)
@given(strategies.dora_cases("linear", np.float64), st.data())
def test_a_dora_adapter_beside_a_lora_adapter_adds_its_own_update_and_merges_as_the_reference(dora_case, data):
    case = dora_case.case
    other = Factors(
        data.draw(strategies.arrays(case.A.shape, np.float64)),
        data.draw(strategies.arrays(case.B.shape)),
        data.draw(strategies.scales),
    )
    r = case.A.shape[0]
    layer = lora.LoRADense(
        case.W.shape[0],
        use_bias=case.b is not None,
        dtype="float64",
        adapters={"dora": dict(r=r, alpha=case.s * r, use_dora=True), "plain": dict(r=r, alpha=other.s * r)},
        active_adapters=["plain", "dora"],
    )
    layer.build(case.x.shape)
    layer.kernel.assign(case.W.T)
    if case.b is not None:
        layer.bias.assign(case.b)
    layer.set_lora_weights(case.A, case.B, "dora", magnitude=dora_case.magnitude)
    layer.set_lora_weights(other.A, other.B, "plain")
    s, plain_s = layer.adapter("dora").scaling, layer.adapter("plain").scaling
    base = reference.forward(case.x, case.W, case.b, case.A, np.zeros_like(case.B), s)

    def expected(mask=None):
        return (
            dora.dora_forward(case.x, case.W, case.b, case.A, case.B, s, dora_case.magnitude, mask)
            + reference.forward(case.x, case.W, case.b, other.A, other.B, plain_s, mask)
            - base
        )

    assert_close(layer(case.x, dropout_mask=case.dropout_mask), expected(case.dropout_mask), factor=100)
    layer.merge()
    merged = dora.merge_adapters(
        case.W, [Factors(case.A, case.B, s), other._replace(s=plain_s)], [dora_case.magnitude, None]
    )
    assert_close(layer._to_reference(layer.kernel.numpy()), merged)
    assert_close(layer(case.x), expected(), factor=100)


def _model(use_dora=True, **kwargs):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="fc1"), keras.layers.Dense(3, name="head")]
    )
    return lora.apply(model, r=2, target_modules=["fc1", "head"], use_dora=use_dora, **kwargs)


def _randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for weight in model.trainable_weights:
        weight.assign(weight.numpy() + rng.standard_normal(weight.shape) * 0.3)
    return model


X = np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)


def test_dora_model_trains_only_a_b_and_the_magnitude_and_reloads_from_a_keras_file(tmp_path):
    model = _model()
    weights = {f"{layer.name}/{v.name}": v for layer in model.layers for v in layer.weights}
    before = {name: v.numpy().copy() for name, v in weights.items()}
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(X, np.ones((4, 3)), epochs=2, verbose=0)
    changed = sorted(name for name, v in weights.items() if not np.array_equal(before[name], v.numpy()))
    assert changed == [
        f"{layer}/{name}" for layer in ("fc1", "head") for name in ("lora_a", "lora_b", "lora_magnitude_vector")
    ]
    lora.apply(model, adapter_name="plain", r=3, target_modules=["fc1"])
    lora.set_adapter(model, ["default", "plain"])
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(restored(X), model(X))
    fc1 = restored.get_layer("fc1")
    assert (fc1.adapter("default").use_dora, fc1.adapter("plain").use_dora) == (True, False)
    assert lora.LoRADense.from_config(fc1.get_config()).get_config() == fc1.get_config()


def test_dora_on_a_grouped_convolution_is_refused_in_one_line_and_the_model_is_unchanged():
    images = keras.Input((6, 6, 4))
    model = keras.Model(images, keras.layers.Conv2D(4, 3, groups=2, name="conv")(images))
    with pytest.raises(ValueError, match=r"^DoRA on grouped convolution 'conv' \(groups=2\) is not supported") as error:
        lora.apply(model, r=2, target_modules=["conv"], use_dora=True)
    assert "\n" not in str(error.value)
    assert type(model.get_layer("conv")) is keras.layers.Conv2D
    with pytest.raises(ValueError, match="DoRA on grouped convolution"):
        lora.LoRAConv2D(4, 3, groups=2, r=2, use_dora=True, name="conv")


def test_dora_on_an_equation_with_an_ellipsis_among_the_output_features_is_refused():
    with pytest.raises(ValueError, match=r"DoRA on EinsumDense 'odd' is not supported: its equation 'ab,bc->c\.\.\.'"):
        lora.LoRAEinsumDense("ab,bc->c...", (5,), r=2, use_dora=True, name="odd")


def test_dora_adapters_are_refused_in_routed_batches_and_combinations():
    model = _model()
    lora.apply(model, adapter_name="plain", r=2, target_modules=["fc1", "head"])
    with (
        pytest.raises(ValueError, match="adapter 'default' is a DoRA adapter, which routed batches do not support"),
        lora.routed(model, ["default", "plain", "plain", None]),
    ):
        pass
    with (
        pytest.raises(ValueError, match="adapter 'default' is a DoRA adapter"),
        lora.routed(model, np.array([1, 1, -1, 1], np.int32)),
    ):
        pass
    with lora.routed(model, ["plain", "plain", None, "plain"]):  # the DoRA adapter is not routed
        routed = model(X, training=False)
    lora.set_adapter(model, "plain")
    np.testing.assert_allclose(np.asarray(routed)[[0, 1, 3]], np.asarray(model(X))[[0, 1, 3]], rtol=1e-6, atol=1e-6)
    assert all(layer._routes is None for _, layer in lora.lora_layers(model))
    with pytest.raises(ValueError, match="adapter 'default' is a DoRA adapter: each DoRA adapter rescales"):
        lora.add_weighted_adapter(model, ["default", "plain"], [0.5, 0.5], "mix")
    assert lora.adapter_names(model) == ["default", "plain"]


def test_mixed_precision_keeps_the_magnitude_in_float32_and_computes_in_half():
    layer = lora.LoRADense(8, r=2, use_dora=True, dtype="mixed_float16")
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    layer.build(x.shape)
    layer.lora_b.assign(np.random.default_rng(1).standard_normal((2, 8)))
    assert layer.adapter().magnitude.dtype == "float32"
    y = layer(x)
    assert y.dtype == "float16"
    A, B = layer.lora_weights()
    expected = dora.dora_forward(
        x, layer.base_weight(), layer.bias.numpy(), A, B, layer.scaling, layer.lora_magnitude()
    )
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=0.02, atol=0.02)


def _half_precision_dora_layer(kind, policy):
    """A built DoRA layer of `kind` under `policy` with random A, B and magnitude, and an input for it."""
    rng = np.random.default_rng(0)
    layer, x = {
        "einsum": lambda: (
            lora.LoRAEinsumDense("abc,cde->abde", (None, 2, 4), r=2, use_dora=True, bias_axes="de", dtype=policy),
            rng.standard_normal((2, 3, 6)).astype(np.float32),
        ),
        "embedding": lambda: (lora.LoRAEmbedding(10, 8, r=2, use_dora=True, dtype=policy), rng.integers(0, 10, (3, 4))),
        "conv2d": lambda: (
            lora.LoRAConv2D(4, 3, r=2, use_dora=True, padding="same", dtype=policy),
            rng.standard_normal((2, 5, 5, 3)).astype(np.float32),
        ),
    }[kind]()
    layer.build(x.shape)
    adapter = layer.adapter()
    for variable in (adapter.lora_a, adapter.lora_b):
        variable.assign(rng.standard_normal(variable.shape) * 0.5)
    adapter.magnitude.assign(adapter.magnitude.numpy() * rng.uniform(0.5, 2.0, adapter.magnitude.shape))
    return layer, x


@pytest.mark.parametrize("kind", ["einsum", "embedding", "conv2d"])
def test_mixed_bfloat16_dora_layers_compute_the_float32_layer_in_half_and_merge_reversibly(kind):
    layer, x = _half_precision_dora_layer(kind, "mixed_bfloat16")
    assert layer.adapter().magnitude.dtype == "float32"
    config = {**layer.get_config(), "dtype": "float32"}
    twin = type(layer).from_config(config)
    twin.build(x.shape)
    for variable, value in zip(twin.weights, layer.weights, strict=True):
        variable.assign(value)
    expected = np.asarray(twin(x))
    y = layer(x)
    assert y.dtype == "bfloat16"
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=0.02, atol=0.02 * np.abs(expected).max())
    before = layer._base_weight.numpy().copy()
    layer.merge()
    np.testing.assert_allclose(
        np.asarray(layer(x), np.float32), expected, rtol=0.02, atol=0.02 * np.abs(expected).max()
    )
    layer.unmerge()
    np.testing.assert_array_equal(layer._base_weight.numpy(), before)
