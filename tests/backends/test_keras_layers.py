"""Keras LoRA layers against the NumPy reference: forward, gradients, merge, masks, saving, Keras's own LoRA."""

import numpy as np
import pytest
from hypothesis import assume, given

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from lora_spec import LoRAConfig, reference
from lora_spec.backends.keras_layers import LoRAConv2D, LoRADense, LoRAEinsumDense, LoRAEmbedding
from lora_spec.dropout import keep_probability
from tests import strategies
from tests.backends.keras_cases import (
    DTYPE_NAMES,
    dense_output_and_gradients,
    keras_can_run,
    lora_conv2d,
    lora_dense,
    nhwc,
    reference_padding,
)
from tests.numerics import assert_close

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="needs Keras's TensorFlow backend")


@given(strategies.linear_cases())
def test_dense_forward_equals_reference_with_explicit_dropout_mask(case):
    layer = lora_dense(case)
    actual = layer(case.x, training=True, dropout_mask=case.dropout_mask)
    expected = reference.forward(case.x, case.W, case.b, case.A, case.B, case.s, case.dropout_mask)
    assert_close(actual, expected, case.dtype)


@given(strategies.linear_cases(), strategies.seeds)
def test_dense_gradients_equal_reference_backward(case, seed):
    grad_y = np.random.default_rng(seed).standard_normal((*case.x.shape[:-1], case.W.shape[0])).astype(case.dtype)
    _, grads = dense_output_and_gradients(lora_dense(case, train_bias=True), case, grad_y)
    expected = reference.backward(case.x, case.W, case.A, case.B, case.s, grad_y, case.dropout_mask)
    assert_close(grads["dx"], expected.dx, case.dtype, factor=10)
    assert_close(grads["dA"], expected.dA, case.dtype, factor=10)
    assert_close(grads["dB"], expected.dB, case.dtype, factor=10)
    if case.b is not None:
        assert_close(grads["db"], expected.db, case.dtype, factor=10)


def test_dense_base_kernel_gets_no_gradient():
    layer = LoRADense(3, r=2)
    layer.build((2, 4))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(np.ones((2, 4), np.float32)))
    assert [v.name for v in layer.trainable_weights] == ["lora_a", "lora_b"]
    assert all(g is not None for g in tape.gradient(loss, layer.trainable_weights))


@given(strategies.linear_cases(dropout=False))
def test_merge_gives_the_reference_merged_kernel_and_the_same_outputs(case):
    layer = lora_dense(case)
    expected = layer(case.x)
    layer.merge()
    assert layer.merged
    np.testing.assert_array_equal(layer.kernel.numpy(), reference.merge(case.W, case.A, case.B, layer.scaling).T)
    assert_close(layer(case.x), expected, case.dtype, factor=10)


@given(strategies.linear_cases(dropout=False))
def test_unmerge_restores_base_kernel_bit_for_bit(case):
    layer = lora_dense(case)
    before = layer.kernel.numpy().copy()
    layer.merge()
    layer.merge()  # a second merge must not add the update twice
    layer.unmerge()
    assert not layer.merged
    np.testing.assert_array_equal(layer.kernel.numpy(), before)


def test_dropout_is_random_in_training_and_off_at_inference():
    layer = LoRADense(64, r=4, dropout=0.5)
    x = np.ones((8, 64), np.float32)
    layer.build(x.shape)
    layer.lora_b.assign(np.ones((4, 64)))
    base = x @ layer.kernel.numpy() + layer.bias.numpy()
    assert_close(layer(x, training=False), layer(x, dropout_mask=np.ones_like(x)), np.float32)
    trained = layer(x, training=True).numpy()
    assert not np.allclose(trained, layer(x, training=False).numpy())
    assert not np.allclose(trained, base)


@pytest.mark.parametrize("p, features", [(0.1, 64), (0.5, 7)])
def test_training_dropout_is_the_reference_with_the_drawn_mask_scaled_by_its_exact_keep_probability(p, features):
    rng = np.random.default_rng(0)
    layer = LoRADense(5, r=3, alpha=6, dropout=p)
    x = rng.standard_normal((4, 6, features)).astype(np.float32)
    layer.build(x.shape)
    layer.set_lora_weights(rng.standard_normal((3, features)), rng.standard_normal((5, 3)))
    state = layer.seed_generator.state.numpy().copy()
    trained = layer(x, training=True).numpy()
    layer.seed_generator.state.assign(state)
    keep = np.asarray(layer._keep(layer.adapter(), keras.ops.convert_to_tensor(x)))
    assert keep.shape == x.shape and 0 < keep.mean() < 1
    A, B = layer.lora_weights()
    expected = reference.forward(
        x, layer.base_weight(), layer.bias.numpy(), A, B, layer.scaling, keep / np.float32(keep_probability(p))
    )
    assert_close(trained, expected, np.float32, factor=10)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drawn_masks_keep_each_input_at_the_stated_rate(p):
    layer = LoRADense(5, r=2, dropout=p)
    layer.build((1000, 1001))
    keep = np.asarray(layer._keep(layer.adapter(), keras.ops.zeros((1000, 1001))))
    # 1e6 Bernoulli draws: the standard deviation of the rate is at most 5e-4.
    assert abs(keep.mean() - keep_probability(p)) < 3e-3


@pytest.mark.parametrize(
    ("equation", "output_shape", "input_shape"),
    [
        ("ab,bc->ac", (5,), (3, 4)),
        ("abc,cd->abd", (None, 5), (2, 3, 4)),
        ("abc,cde->abde", (None, 2, 3), (2, 3, 4)),
        ("abcd,cde->abe", (None, 5), (2, 3, 2, 4)),
        ("...b,bc->...c", (5,), (2, 3, 4)),
        ("abc,dce->abde", (None, 2, 3), (2, 3, 4)),
    ],
)
def test_einsum_dense_equals_reference_on_flattened_axes(equation, output_shape, input_shape):
    rng = np.random.default_rng(0)
    layer = LoRAEinsumDense(equation, output_shape, r=3, alpha=6, dtype="float64")
    x = rng.standard_normal(input_shape)
    layer.build(x.shape)
    A, B = (
        rng.standard_normal((3, layer.base_weight().shape[1])),
        rng.standard_normal((layer.base_weight().shape[0], 3)),
    )
    layer.set_lora_weights(A, B)
    W = layer.base_weight()
    in_features = W.shape[1]
    batch = x.reshape(-1, in_features)
    y = layer(x).numpy()
    expected = reference.forward(batch, W, None, A, B, layer.scaling)
    assert_close(y.reshape(expected.shape), expected)
    layer.merge()
    assert_close(layer(x).numpy().reshape(expected.shape), expected, factor=10)


def test_einsum_dense_refuses_an_equation_that_is_not_a_linear_map():
    with pytest.raises(ValueError, match="'abc,bcd->abd' is not a linear map"):
        LoRAEinsumDense("abc,bcd->abd", (None, 4))


@given(strategies.embedding_cases())
def test_embedding_forward_and_merge_equal_reference(case):
    num, dim = case.W.shape
    layer = LoRAEmbedding(num, dim, r=case.A.shape[0], alpha=case.s * case.A.shape[0], dtype=DTYPE_NAMES[case.W.dtype])
    layer.build()
    layer.embeddings.assign(case.W)
    layer.set_lora_weights(case.A, case.B)
    expected = reference.embedding_forward(case.ids, case.W, case.A, case.B, case.s)
    assert_close(layer(case.ids), expected, case.W.dtype, factor=10)
    layer.merge()
    np.testing.assert_array_equal(
        layer.embeddings.numpy(), reference.merge(case.W, case.A, case.B, layer.scaling, layer="embedding")
    )
    layer.unmerge()
    np.testing.assert_array_equal(layer.embeddings.numpy(), case.W)


@given(strategies.embedding_cases(dtype=np.float64), strategies.seeds)
def test_embedding_gradients_equal_reference_backward(case, seed):
    num, dim = case.W.shape
    layer = LoRAEmbedding(num, dim, r=case.A.shape[0], alpha=case.s * case.A.shape[0], dtype="float64")
    layer.build()
    layer.embeddings.assign(case.W)
    layer.set_lora_weights(case.A, case.B)
    grad_y = np.random.default_rng(seed).standard_normal((*case.ids.shape, dim))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(case.ids) * grad_y)
    grad_a, grad_b = (tf.convert_to_tensor(g) for g in tape.gradient(loss, [layer.lora_a.value, layer.lora_b.value]))
    expected = reference.embedding_backward(case.ids, case.A, case.B, case.s, grad_y)
    assert_close(np.transpose(grad_a), expected.dA, np.float32)
    assert_close(np.transpose(grad_b), expected.dB, np.float32)


@given(strategies.linear_cases(dtype=np.float32, dropout=False))
def test_keras_enable_lora_with_the_same_weights_gives_the_same_output(case):
    out_features, _ = case.W.shape
    r = case.A.shape[0]
    alpha = case.s * r
    keras_dense = keras.layers.Dense(out_features, use_bias=case.b is not None)
    keras_dense.build(case.x.shape)
    keras_dense.kernel.assign(case.W.T)
    if case.b is not None:
        keras_dense.bias.assign(case.b)
    keras_dense.enable_lora(r, lora_alpha=alpha)
    keras_dense.lora_kernel_a.assign(case.A.T)
    keras_dense.lora_kernel_b.assign(case.B.T)
    assert_close(lora_dense(case)(case.x), keras_dense(case.x), np.float32, factor=10)


@given(strategies.embedding_cases())
def test_keras_embedding_enable_lora_with_the_same_weights_gives_the_same_output(case):
    num, dim = case.W.shape
    r = case.A.shape[0]
    ours = LoRAEmbedding(num, dim, r=r, alpha=case.s * r)
    ours.build()
    ours.embeddings.assign(case.W)
    ours.set_lora_weights(case.A, case.B)
    theirs = keras.layers.Embedding(num, dim)
    theirs.build()
    theirs.embeddings.assign(case.W)
    theirs.enable_lora(r, lora_alpha=case.s * r)
    theirs.lora_embeddings_a.assign(case.A.T)
    theirs.lora_embeddings_b.assign(case.B.T)
    assert_close(ours(case.ids), theirs(case.ids), np.float32, factor=10)


def test_lora_rank_and_dropout_follow_the_config_names():
    layer = LoRADense(4, r=4, alpha=8, use_rslora=True, dropout=0.25, activation="relu", name="proj")
    assert (layer.r, layer.alpha, layer.dropout, layer.scaling) == (4, 8, 0.25, 4.0)
    config = layer.get_config()
    assert {k: config[k] for k in ("r", "alpha", "dropout", "use_rslora", "init", "units", "activation")} == {
        "r": 4,
        "alpha": 8,
        "dropout": 0.25,
        "use_rslora": True,
        "init": "kaiming",
        "units": 4,
        "activation": "relu",
    }
    assert "lora_rank" not in config
    assert LoRADense.from_config(config).get_config() == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"alpha": -1.0}, "alpha=-1.0 is invalid"),
        ({"dropout": 1.0}, "dropout=1.0 is invalid"),
        ({"init": "orthogonal"}, "init='orthogonal' is invalid"),
    ],
)
def test_bad_lora_arguments_raise_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRADense(4, **kwargs)


def test_keras_own_lora_arguments_are_refused():
    with pytest.raises(TypeError, match=r"lora_rank=4.*use r= and alpha="):
        LoRADense(4, lora_rank=4)


def test_from_dense_keeps_the_base_weights_and_starts_with_a_zero_update():
    dense = keras.layers.Dense(5, activation="tanh", kernel_regularizer="l2", name="proj")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    expected = dense(x)
    adapted = LoRADense.from_dense(dense, LoRAConfig(r=2, alpha=4, rank_pattern={"proj": 3}))
    assert (adapted.r, adapted.alpha, adapted.name, adapted.activation) == (3, 4, "proj", dense.activation)
    np.testing.assert_array_equal(adapted.kernel.numpy(), dense.kernel.numpy())
    np.testing.assert_array_equal(adapted(x), expected)
    with pytest.raises(TypeError, match=r"LoRADense adapts a keras\.layers\.Dense, not a Conv1D"):
        LoRADense.from_dense(keras.layers.Conv1D(2, 1))


def test_setting_trainable_never_unfreezes_the_base_kernel():
    layer = LoRADense(3, r=2)
    layer.build((2, 4))
    layer.trainable = False
    assert layer.trainable_weights == []
    layer.trainable = True
    assert [v.name for v in layer.trainable_weights] == ["lora_a", "lora_b"]
    with_bias = LoRADense(3, r=2, train_bias=True)
    with_bias.build((2, 4))
    assert [v.name for v in with_bias.trainable_weights] == ["bias", "lora_a", "lora_b"]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_lora_weights_in_float32_and_computes_in_half(policy):
    layer = LoRADense(8, r=2, dtype=policy)
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    y = layer(x)
    layer.lora_b.assign(np.ones((2, 8)))
    assert layer.lora_a.dtype == layer.lora_b.dtype == layer.kernel.dtype == "float32"
    assert y.dtype == policy.removeprefix("mixed_")
    A, B = layer.lora_weights()
    expected = reference.forward(x, layer.base_weight(), layer.bias.numpy(), A, B, layer.scaling)
    np.testing.assert_allclose(np.asarray(layer(x), np.float32), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("merged", [False, True])
def test_weights_file_keeps_the_adapter_separate_and_restores_merge_state(tmp_path, merged):
    rng = np.random.default_rng(1)
    layer = LoRADense(4, r=2, name="proj")
    x = rng.standard_normal((3, 5)).astype(np.float32)
    model = keras.Sequential([keras.Input((5,)), layer])
    layer.lora_b.assign(rng.standard_normal((2, 4)))
    base = layer.kernel.numpy().copy()
    if merged:
        layer.merge()
    model.save_weights(tmp_path / "model.weights.h5")
    other = LoRADense(4, r=2, name="proj")
    restored = keras.Sequential([keras.Input((5,)), other])
    restored.load_weights(tmp_path / "model.weights.h5")
    assert other.merged == merged
    np.testing.assert_array_equal(other.lora_b.numpy(), layer.lora_b.numpy())
    np.testing.assert_array_equal(other(x), layer(x))
    other.unmerge()
    np.testing.assert_array_equal(other.kernel.numpy(), base)


def test_every_dense_argument_works_as_in_dense():
    arguments = dict(
        activation="relu",
        use_bias=True,
        kernel_initializer="ones",
        bias_initializer="ones",
        kernel_regularizer=keras.regularizers.L2(0.5),
        bias_regularizer=keras.regularizers.L1(0.25),
        activity_regularizer=keras.regularizers.L2(0.125),
        kernel_constraint="non_neg",
        bias_constraint="non_neg",
        name="proj",
    )
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    dense, adapted = keras.layers.Dense(5, **arguments), LoRADense(5, r=2, train_bias=True, **arguments)
    np.testing.assert_array_equal(adapted(x), dense(x))
    # Keras regularizes trainable weights only: the frozen kernel's term is a constant and is left out.
    activity, _kernel, bias = (float(loss) for loss in dense.losses)
    np.testing.assert_allclose([float(loss) for loss in adapted.losses], [activity, bias], rtol=1e-6)
    config = adapted.get_config()
    assert {k: config[k] for k in arguments} == {k: dense.get_config()[k] for k in arguments}
    without_bias = LoRADense(5, r=2, use_bias=False)
    without_bias.build((3, 4))
    assert [v.name for v in without_bias.weights] == ["kernel", "lora_a", "lora_b"]


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_initialisation_follows_peft_so_the_update_starts_at_zero(init):
    keras.utils.set_random_seed(0)
    layer = LoRADense(64, r=8, init=init)
    layer.build((2, 256))
    A, B = layer.lora_weights()
    assert not np.any(B)
    if init == "kaiming":
        assert np.max(np.abs(A)) <= 1 / np.sqrt(256) and np.std(A) == pytest.approx(1 / np.sqrt(3 * 256), rel=0.05)
    else:
        assert np.std(A) == pytest.approx(1 / 8, rel=0.05)
    embedding = LoRAEmbedding(100, 64, r=8)
    embedding.build()
    A, B = embedding.lora_weights()
    assert not np.any(A) and np.std(B) == pytest.approx(1.0, rel=0.1)


@given(strategies.conv2d_cases())
def test_conv2d_forward_equals_reference_with_explicit_dropout_mask(case):
    assume(keras_can_run(case))
    layer, x, mask = lora_conv2d(case)
    expected = reference.conv2d_forward(
        case.x, case.W, case.b, case.A, case.B, case.s, **case.geometry, dropout_mask=case.dropout_mask
    )
    assert_close(layer(x, dropout_mask=mask), nhwc(expected), case.x.dtype, factor=20)


@given(strategies.conv2d_cases(dtype=np.float64), strategies.seeds)
def test_conv2d_gradients_equal_reference_backward(case, seed):
    assume(keras_can_run(case))
    layer, x, mask = lora_conv2d(case)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, dropout_mask=mask)
        grad_y = np.random.default_rng(seed).standard_normal(y.shape)
        loss = tf.reduce_sum(y * grad_y)
    dx, d_lora_a, d_lora_b = tape.gradient(loss, [x, layer.lora_a, layer.lora_b])
    nchw_grad = np.ascontiguousarray(grad_y.transpose(0, 3, 1, 2))
    pad = reference_padding(case)
    expected = reference.conv2d_backward(
        np.pad(case.x, pad),
        case.W,
        case.A,
        case.B,
        case.s,
        nchw_grad,
        **{**case.geometry, "padding": (0, 0)},
        dropout_mask=None if case.dropout_mask is None else np.pad(case.dropout_mask, pad),
    )
    assert_close(dx, nhwc(expected.dx), np.float64, factor=50)
    assert_close(d_lora_a, expected.dA.transpose(2, 3, 1, 0), np.float64, factor=50)
    assert_close(d_lora_b, expected.dB.transpose(2, 3, 1, 0), np.float64, factor=50)


@given(strategies.conv2d_cases(dropout=False))
def test_conv2d_merge_gives_the_reference_merged_kernel_and_unmerge_restores_it(case):
    assume(keras_can_run(case))
    layer, x, _ = lora_conv2d(case)
    before = layer.kernel.numpy().copy()
    unmerged = layer(x)
    layer.merge()
    merged = reference.merge(case.W, case.A, case.B, layer.scaling, "conv2d")
    np.testing.assert_array_equal(layer.kernel.numpy(), merged.transpose(2, 3, 1, 0))
    assert_close(layer(x), unmerged, case.x.dtype, factor=20)
    layer.unmerge()
    np.testing.assert_array_equal(layer.kernel.numpy(), before)


def test_a_conv_rank_that_groups_do_not_divide_is_refused_naming_the_layer():
    with pytest.raises(ValueError, match=r"rank 3 is not a multiple of groups=2 of layer 'grouped'"):
        LoRAConv2D(4, 3, groups=2, r=3, name="grouped")
