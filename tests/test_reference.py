"""The NumPy reference against independent formulations: finite differences, einsum, merged forward."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec import LoRAConfig, reference
from tests import strategies
from tests.numerics import assert_close, numerical_gradient


def _loss(forward, grad_y):
    """The scalar whose gradient `backward` returns: sum(grad_y * y)."""
    return lambda: float(np.sum(grad_y * forward()))


@given(strategies.linear_cases(dtype=np.float64), strategies.seeds)
def test_linear_gradients_equal_central_finite_differences(case, seed):
    grad_y = np.random.default_rng(seed).standard_normal((*case.x.shape[:-1], case.W.shape[0]))
    bias = case.b if case.b is not None else np.zeros(case.W.shape[0])

    def forward():
        return reference.forward(case.x, case.W, bias, case.A, case.B, case.s, case.dropout_mask)

    loss = _loss(forward, grad_y)
    grads = reference.backward(case.x, case.W, case.A, case.B, case.s, grad_y, case.dropout_mask)
    for name, array in (("dx", case.x), ("dA", case.A), ("dB", case.B), ("db", bias)):
        assert_close(getattr(grads, name), numerical_gradient(lambda _: loss(), array), factor=1e4)


@given(strategies.embedding_cases(dtype=np.float64), strategies.seeds)
def test_embedding_gradients_equal_central_finite_differences(case, seed):
    grad_y = np.random.default_rng(seed).standard_normal((*case.ids.shape, case.W.shape[1]))
    loss = _loss(lambda: reference.embedding_forward(case.ids, case.W, case.A, case.B, case.s), grad_y)
    grads = reference.embedding_backward(case.ids, case.A, case.B, case.s, grad_y)
    assert_close(grads.dA, numerical_gradient(lambda _: loss(), case.A), factor=1e4)
    assert_close(grads.dB, numerical_gradient(lambda _: loss(), case.B), factor=1e4)


@given(strategies.conv2d_cases(dtype=np.float64), strategies.seeds)
def test_conv2d_gradients_equal_central_finite_differences(case, seed):
    y = reference.conv2d_forward(
        case.x, case.W, case.b, case.A, case.B, case.s, **case.geometry, dropout_mask=case.dropout_mask
    )
    grad_y = np.random.default_rng(seed).standard_normal(y.shape)
    bias = case.b if case.b is not None else np.zeros(case.W.shape[0])
    loss = _loss(
        lambda: reference.conv2d_forward(
            case.x, case.W, bias, case.A, case.B, case.s, **case.geometry, dropout_mask=case.dropout_mask
        ),
        grad_y,
    )
    grads = reference.conv2d_backward(
        case.x, case.W, case.A, case.B, case.s, grad_y, **case.geometry, dropout_mask=case.dropout_mask
    )
    for name, array in (("dx", case.x), ("dA", case.A), ("dB", case.B), ("db", bias)):
        assert_close(getattr(grads, name), numerical_gradient(lambda _: loss(), array), factor=1e4)


@given(strategies.linear_cases())
def test_linear_forward_equals_einsum_formula(case):
    x_dropped = case.x if case.dropout_mask is None else case.x * case.dropout_mask
    expected = np.einsum("...i,oi->...o", case.x, case.W) + case.s * np.einsum(
        "...i,ki,ok->...o", x_dropped, case.A, case.B
    )
    if case.b is not None:
        expected = expected + case.b
    actual = reference.forward(case.x, case.W, case.b, case.A, case.B, case.s, case.dropout_mask)
    assert actual.dtype == case.dtype
    assert_close(actual, expected, case.dtype, factor=10)


def test_forward_matches_a_hand_computed_example():
    x = np.array([[1.0, 2.0]])
    W = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([0.5, 0.0, -1.0])
    A = np.array([[1.0, -1.0]])  # x @ A.T = -1
    B = np.array([[2.0], [0.0], [1.0]])
    # base: [1.5, 2, 2]; low-rank: s * -1 * [2, 0, 1] with s = alpha / r = 3
    y = reference.forward(x, W, b, A, B, LoRAConfig(r=1, alpha=3).scaling)
    np.testing.assert_array_equal(y, [[-4.5, 2.0, -1.0]])


@given(strategies.linear_cases(dropout=False))
def test_merged_linear_forward_equals_unmerged_forward(case):
    merged = reference.merge(case.W, case.A, case.B, case.s)
    base_only = reference.forward(case.x, merged, case.b, np.zeros_like(case.A), np.zeros_like(case.B), case.s)
    assert_close(base_only, reference.forward(case.x, case.W, case.b, case.A, case.B, case.s), case.dtype, factor=50)


@given(strategies.embedding_cases())
def test_merged_embedding_lookup_equals_unmerged_forward(case):
    merged = reference.merge(case.W, case.A, case.B, case.s, layer="embedding")
    expected = reference.embedding_forward(case.ids, case.W, case.A, case.B, case.s)
    assert_close(merged[case.ids], expected, case.W.dtype, factor=50)


@given(strategies.conv2d_cases(dropout=False))
def test_merged_conv2d_forward_equals_unmerged_forward(case):
    merged = reference.merge(case.W, case.A, case.B, case.s, layer="conv2d")
    zeros = np.zeros_like(case.A), np.zeros_like(case.B)
    actual = reference.conv2d_forward(case.x, merged, case.b, *zeros, case.s, **case.geometry)
    expected = reference.conv2d_forward(case.x, case.W, case.b, case.A, case.B, case.s, **case.geometry)
    assert_close(actual, expected, case.x.dtype, factor=100)


@given(strategies.linear_cases(dropout=False))
def test_unmerge_of_merge_returns_the_base_weight_within_rounding(case):
    restored = reference.unmerge(reference.merge(case.W, case.A, case.B, case.s), case.A, case.B, case.s)
    assert_close(restored, case.W, case.dtype, factor=10 * (1 + case.s))


def test_half_precision_merge_computes_in_float32_and_casts_once():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 16)).astype(np.float16)
    A, B = (
        (0.1 * rng.standard_normal((8, 16))).astype(np.float16),
        (0.1 * rng.standard_normal((16, 8))).astype(np.float16),
    )
    merged = reference.merge(W, A, B, 0.37)
    in_float32 = W.astype(np.float32) + np.float32(0.37) * (B.astype(np.float32) @ A.astype(np.float32))
    assert merged.dtype == np.float16
    np.testing.assert_array_equal(merged, in_float32.astype(np.float16))
    # computing in float16 step by step rounds differently: the test above would notice
    assert (merged != W + np.float16(0.37) * (B @ A)).any()


def test_conv2d_with_one_group_matches_reshape_formula():
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((4, 3, 1, 1))
    expected = 0.5 * (B.reshape(4, 3) @ A.reshape(3, -1)).reshape(4, 2, 3, 3)
    np.testing.assert_allclose(reference.conv2d_delta_weight(A, B, 0.5), expected, rtol=1e-12)


def test_grouped_conv2d_delta_is_block_diagonal_per_group():
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((4, 1, 2, 2)), rng.standard_normal((6, 2, 1, 1))  # groups = 2
    delta = reference.conv2d_delta_weight(A, B, 1.0)
    np.testing.assert_allclose(delta[:3], (B[:3, :, 0, 0] @ A[:2].reshape(2, -1)).reshape(3, 1, 2, 2))
    np.testing.assert_allclose(delta[3:], (B[3:, :, 0, 0] @ A[2:].reshape(2, -1)).reshape(3, 1, 2, 2))


@given(strategies.linear_cases(dropout=False))
def test_zero_b_gives_exactly_the_base_output(case):
    zero_b = np.zeros_like(case.B)
    base = case.x @ case.W.T if case.b is None else case.x @ case.W.T + case.b
    np.testing.assert_array_equal(reference.forward(case.x, case.W, case.b, case.A, zero_b, case.s), base)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_linear_init_draws_a_from_the_configured_distribution_and_zero_b(init):
    config = LoRAConfig(r=16, init=init)
    A, B = reference.init(400, 7, config, np.random.default_rng(0))
    assert A.shape == (16, 400) and B.shape == (7, 16) and A.dtype == np.float32
    assert not B.any()
    if init == "kaiming":
        assert np.abs(A).max() <= 1 / np.sqrt(400)
        assert np.isclose(A.std(), 1 / np.sqrt(400) / np.sqrt(3), rtol=0.05)  # uniform(-a, a): std a / sqrt(3)
    else:
        assert np.isclose(A.std(), 1 / 16, rtol=0.05) and abs(A.mean()) < 0.01


def test_init_rank_argument_overrides_the_config_rank():
    A, B = reference.init(5, 3, LoRAConfig(r=8), np.random.default_rng(0), rank=2)
    assert A.shape == (2, 5) and B.shape == (3, 2)


def test_embedding_init_zero_a_and_standard_normal_b():
    A, B = reference.embedding_init(1000, 30, LoRAConfig(r=4), np.random.default_rng(0))
    assert A.shape == (4, 1000) and B.shape == (30, 4) and not A.any()
    assert np.isclose(B.std(), 1.0, rtol=0.1)


def test_conv2d_init_uses_the_grouped_fan_in():
    A, B = reference.conv2d_init(8, 6, (3, 3), LoRAConfig(r=4), np.random.default_rng(0), groups=2)
    assert A.shape == (4, 4, 3, 3) and B.shape == (6, 2, 1, 1) and not B.any()
    assert np.abs(A).max() <= 1 / np.sqrt(4 * 9)


def test_conv2d_init_refuses_a_rank_that_groups_do_not_divide():
    with pytest.raises(ValueError, match="rank 3 is not a multiple of the conv's groups=2"):
        reference.conv2d_init(4, 4, (1, 1), LoRAConfig(r=3), np.random.default_rng(0), groups=2)


@given(st.integers(1, 64), st.floats(0.1, 100))
def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora(r, alpha):
    assert LoRAConfig(r=r, alpha=alpha).scaling == pytest.approx(alpha / r)
    assert LoRAConfig(r=r, alpha=alpha, use_rslora=True).scaling == pytest.approx(alpha / np.sqrt(r))


def _plain_merge(weight, lora_a, lora_b, scale, sign):
    """The reference's semantics spelled out: the sum in at least float32, cast back once."""
    compute = np.promote_types(weight.dtype, np.float32)
    delta = scale * (lora_b.astype(compute) @ lora_a.astype(compute))
    return (weight.astype(compute) + sign * delta).astype(weight.dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sign", [+1, -1], ids=["merge", "unmerge"])
@pytest.mark.parametrize("scale", [0.5, np.float32(0.3), np.float64(0.3)], ids=["float", "float32", "float64"])
def test_reference_merge_leaves_w_untouched_and_equals_the_plain_sum(dtype, sign, scale):
    """The exporter relies on the reference's merge for multi-GB weights; it must not modify W."""
    rng = np.random.default_rng(0)
    weight, lora_a, lora_b = (rng.standard_normal(shape).astype(dtype) for shape in [(6, 5), (2, 5), (6, 2)])
    original = weight.copy()
    function = reference.merge if sign > 0 else reference.unmerge
    result = function(weight, lora_a, lora_b, scale)
    np.testing.assert_array_equal(weight, original)
    np.testing.assert_array_equal(result, _plain_merge(weight, lora_a, lora_b, scale, sign))
    assert result.dtype == dtype


@given(strategies.linear_cases(dropout=False), st.sampled_from([+1, -1]))
def test_reference_merge_overwriting_w_computes_in_its_memory_bit_for_bit(case, sign):
    """What lets the exporter merge a weight it read without a second full-size copy."""
    function = reference.merge if sign > 0 else reference.unmerge
    expected = function(case.W, case.A, case.B, case.s)
    weight = case.W.copy()
    result = function(weight, case.A, case.B, case.s, overwrite_w=True)
    assert np.shares_memory(result, weight)
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(result, _plain_merge(case.W, case.A, case.B, case.s, sign))


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["float16", "read-only float32"])
def test_reference_merge_overwrite_w_copies_a_weight_it_cannot_compute_in(dtype):
    """float16 is merged in float32 (cast once), and a read-only weight is never written."""
    rng = np.random.default_rng(0)
    weight, lora_a, lora_b = (rng.standard_normal(shape).astype(dtype) for shape in [(6, 5), (2, 5), (6, 2)])
    weight.flags.writeable = dtype == np.float16
    original = weight.copy()
    result = reference.merge(weight, lora_a, lora_b, 0.5, overwrite_w=True)
    assert not np.shares_memory(result, weight)
    np.testing.assert_array_equal(weight, original)
    np.testing.assert_array_equal(result, _plain_merge(weight, lora_a, lora_b, 0.5, +1))
