"""The PyTorch LoRA layers against the NumPy reference: forward, gradients and merge."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec import dora, reference
from tests import strategies
from tests.numerics import assert_close

torch = pytest.importorskip("torch")
transformers_pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

from lora_spec.backends import torch_variants
from lora_spec.backends.torch_dropout import DropoutMask, SeededMask, draw_mask
from lora_spec.backends.torch_layers import LoRAConv2d, LoRAEmbedding, LoRALinear
from lora_spec.dropout import keep_probability

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def tensor(array, requires_grad=False):
    return torch.tensor(np.asarray(array), requires_grad=requires_grad)


def numpy(value):
    return value.detach().numpy()


def with_adapter(layer, lora_a, lora_b):
    with torch.no_grad():
        layer.lora_A.copy_(tensor(lora_a))
        layer.lora_B.copy_(tensor(lora_b))
    return layer


def linear_layer(case, layer_type, use_dora=False):
    """A LoRALinear around nn.Linear or GPT-2's Conv1D (weight stored transposed) holding `case`'s adapter (a DoRA
    adapter with `use_dora`, whose magnitude the caller sets)."""
    out_features, in_features = case.W.shape
    if layer_type == "conv1d":
        base = transformers_pytorch_utils.Conv1D(out_features, in_features)
        weight = case.W.T
    else:
        base = torch.nn.Linear(in_features, out_features, bias=case.b is not None)
        weight = case.W
    base.to(TORCH_DTYPES[case.dtype])
    with torch.no_grad():
        base.weight.copy_(tensor(weight))
        if layer_type == "conv1d":
            base.bias.copy_(tensor(case.b if case.b is not None else np.zeros(out_features, case.dtype)))
        elif case.b is not None:
            base.bias.copy_(tensor(case.b))
    base.weight.requires_grad_(False)
    layer = LoRALinear(base, case.A.shape[0], alpha=1.0, scaling=case.s, use_dora=use_dora)
    return with_adapter(layer, case.A, case.B)


def mask_of(case):
    return None if case.dropout_mask is None else DropoutMask.from_reference(tensor(case.dropout_mask))


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
@pytest.mark.parametrize("mode", ["train", "eval"], ids=["fused-function", "plain-ops"])
@given(case=strategies.linear_cases(), grad_seed=strategies.seeds)
def test_linear_forward_and_gradients_match_reference(layer_type, mode, case, grad_seed):
    layer = linear_layer(case, layer_type).train(mode == "train")
    bias = layer.base_layer.bias
    if bias is not None:
        bias.requires_grad_(True)
    x = tensor(case.x, requires_grad=True)
    y = layer(x, dropout_mask=mask_of(case))
    expected_bias = None if bias is None else numpy(bias)
    assert_close(
        numpy(y),
        reference.forward(case.x, case.W, expected_bias, case.A, case.B, case.s, case.dropout_mask),
        case.dtype,
        factor=10,
    )

    grad_y = np.random.default_rng(grad_seed).standard_normal(y.shape).astype(case.dtype)
    y.backward(tensor(grad_y))
    expected = reference.backward(case.x, case.W, case.A, case.B, case.s, grad_y, case.dropout_mask)
    assert_close(numpy(x.grad), expected.dx, case.dtype, factor=10)
    assert_close(numpy(layer.lora_A.grad), expected.dA, case.dtype, factor=10)
    assert_close(numpy(layer.lora_B.grad), expected.dB, case.dtype, factor=10)
    if bias is not None:
        assert_close(numpy(bias.grad), expected.db, case.dtype, factor=10)
    assert layer.base_layer.weight.grad is None


def test_a_seeded_mask_draws_the_same_mask_every_time():
    mask = SeededMask(seed=123, p=0.3)
    first, second = (mask.draw(torch.Size((7, 9)), torch.device("cpu"), torch.float64) for _ in range(2))
    assert torch.equal(first.keep, second.keep) and first.keep.dtype == torch.float64
    assert not torch.equal(
        first.keep, SeededMask(124, 0.3).draw(torch.Size((7, 9)), torch.device("cpu"), torch.float64).keep
    )


@pytest.mark.parametrize(("use_dora", "function"), [(False, "linear_lora"), (True, "linear_dora")])
def test_fused_path_is_used_in_training_and_plain_ops_in_eval(monkeypatch, use_dora, function):
    calls = []
    original = getattr(torch_variants, function)
    monkeypatch.setattr(torch_variants, function, lambda *a, **k: calls.append(1) or original(*a, **k))
    base = torch.nn.Linear(4, 3).requires_grad_(False)
    layer = LoRALinear(base, 2, alpha=2.0, scaling=1.0, use_dora=use_dora)
    layer.train()(torch.randn(2, 4))
    assert calls == [1]
    layer.eval()(torch.randn(2, 4))
    assert calls == [1]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_training_dropout_draws_the_documented_mask_and_scales_by_its_exact_keep_probability(p, use_dora):
    case = strategies.LinearCase(
        x=np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32),
        W=np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32),
        b=None,
        A=np.random.default_rng(2).standard_normal((2, 5)).astype(np.float32),
        B=np.random.default_rng(3).standard_normal((3, 2)).astype(np.float32),
        s=1.5,
        dropout_mask=None,
    )
    layer = linear_layer(case, "linear", use_dora).train()
    layer.dropout = p
    magnitude = np.random.default_rng(5).uniform(0.5, 2.0, 3).astype(np.float32)
    if use_dora:
        with torch.no_grad():
            layer.adapters["default"].lora_magnitude_vector.copy_(tensor(magnitude))
    x = tensor(case.x, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    mask = draw_mask(x.shape, p, x.device)
    reference_mask = numpy(mask.keep) * np.float32(1 / keep_probability(p))
    assert mask.scale == 1 / keep_probability(p)
    factors = (case.W, case.A, case.B, case.s) + ((magnitude,) if use_dora else ())
    forward, backward = (dora.dora_forward, dora.dora_backward) if use_dora else (reference.forward, reference.backward)
    assert_close(numpy(y), forward(case.x, case.W, None, *factors[1:], reference_mask), np.float32, factor=10)
    # Backward uses the same mask (the draws kept), after other draws moved the default generator.
    torch.rand(100)
    grad_y = np.random.default_rng(4).standard_normal(y.shape).astype(np.float32)
    y.backward(tensor(grad_y))
    expected = backward(case.x, *factors, grad_y, reference_mask)
    assert_close(numpy(x.grad), expected.dx, np.float32, factor=10)
    assert_close(numpy(layer.lora_A.grad), expected.dA, np.float32, factor=10)
    assert_close(numpy(layer.lora_B.grad), expected.dB, np.float32, factor=10)
    if use_dora:
        assert_close(numpy(layer.adapters["default"].lora_magnitude_vector.grad), expected.dmagnitude, np.float32, 10)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drawn_masks_keep_each_element_at_the_stated_rate(p):
    torch.manual_seed(0)
    keep = draw_mask(torch.Size((1000, 1001)), p, torch.device("cpu")).keep
    assert keep.shape == (1000, 1001) and keep.dtype == torch.float32
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    # 1e6 Bernoulli draws: the standard deviation of the rate is at most 5e-4.
    assert abs(keep.float().mean().item() - keep_probability(p)) < 3e-3


def embedding_layer(case, use_dora=False):
    num, dim = case.W.shape
    base = torch.nn.Embedding(num, dim).to(TORCH_DTYPES[case.W.dtype]).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(tensor(case.W))
    layer = LoRAEmbedding(base, case.A.shape[0], alpha=1.0, scaling=case.s, use_dora=use_dora)
    return with_adapter(layer, case.A, case.B)


@given(case=strategies.embedding_cases(), grad_seed=strategies.seeds)
def test_embedding_forward_and_gradients_match_reference(case, grad_seed):
    layer = embedding_layer(case)
    y = layer(torch.from_numpy(case.ids))
    assert_close(numpy(y), reference.embedding_forward(case.ids, case.W, case.A, case.B, case.s), case.W.dtype, 10)
    grad_y = np.random.default_rng(grad_seed).standard_normal(y.shape).astype(case.W.dtype)
    y.backward(tensor(grad_y))
    expected = reference.embedding_backward(case.ids, case.A, case.B, case.s, grad_y)
    assert_close(numpy(layer.lora_A.grad), expected.dA, case.W.dtype, factor=10)
    assert_close(numpy(layer.lora_B.grad), expected.dB, case.W.dtype, factor=10)


def conv2d_layer(case, use_dora=False):
    out_channels, _, kernel_h, kernel_w = case.W.shape
    base = torch.nn.Conv2d(
        case.x.shape[1],
        out_channels,
        (kernel_h, kernel_w),
        stride=case.stride,
        padding=case.padding,
        dilation=case.dilation,
        groups=case.groups,
        bias=case.b is not None,
    )
    base.to(TORCH_DTYPES[case.x.dtype]).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(tensor(case.W))
        if case.b is not None:
            base.bias.copy_(tensor(case.b))
    layer = LoRAConv2d(base, case.A.shape[0], alpha=1.0, scaling=case.s, use_dora=use_dora)
    return with_adapter(layer, case.A, case.B)


@given(case=strategies.conv2d_cases(), grad_seed=strategies.seeds)
def test_conv2d_forward_and_gradients_match_reference(case, grad_seed):
    layer = conv2d_layer(case)
    if case.b is not None:
        layer.base_layer.bias.requires_grad_(True)
    x = tensor(case.x, requires_grad=True)
    y = layer(x, dropout_mask=mask_of(case))
    assert_close(
        numpy(y),
        reference.conv2d_forward(
            case.x, case.W, case.b, case.A, case.B, case.s, **case.geometry, dropout_mask=case.dropout_mask
        ),
        case.x.dtype,
        factor=10,
    )
    grad_y = np.random.default_rng(grad_seed).standard_normal(y.shape).astype(case.x.dtype)
    y.backward(tensor(grad_y))
    expected = reference.conv2d_backward(
        case.x, case.W, case.A, case.B, case.s, grad_y, **case.geometry, dropout_mask=case.dropout_mask
    )
    assert_close(numpy(x.grad), expected.dx, case.x.dtype, factor=10)
    assert_close(numpy(layer.lora_A.grad), expected.dA, case.x.dtype, factor=10)
    assert_close(numpy(layer.lora_B.grad), expected.dB, case.x.dtype, factor=10)
    if case.b is not None:
        assert_close(numpy(layer.base_layer.bias.grad), expected.db, case.x.dtype, factor=10)


def _merge_cases():
    linear = st.tuples(st.sampled_from(["linear", "conv1d"]), strategies.linear_cases(dropout=False)).map(
        lambda t: (linear_layer(t[1], t[0]), t[1].W, t[1], "linear")
    )
    embedding = strategies.embedding_cases().map(lambda case: (embedding_layer(case), case.W, case, "embedding"))
    conv2d = strategies.conv2d_cases(dropout=False).map(lambda case: (conv2d_layer(case), case.W, case, "conv2d"))
    return st.one_of(linear, embedding, conv2d)


@given(layer_case=_merge_cases())
def test_merge_matches_reference_and_unmerge_restores_base_weights_bit_for_bit(layer_case):
    layer, W, case, kind = layer_case
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    merged = numpy(layer.base_layer.weight)
    if layer.fan_in_fan_out if kind == "linear" else False:
        merged = merged.T
    assert_close(merged, reference.merge(W, case.A, case.B, case.s, kind), W.dtype, factor=10)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


@given(case=strategies.linear_cases(dropout=False))
def test_merged_linear_forward_equals_unmerged_forward(case):
    layer = linear_layer(case, "linear").eval()
    x = tensor(case.x)
    unmerged = numpy(layer(x))
    layer.merge()
    assert layer.merged
    assert_close(numpy(layer(x)), unmerged, case.dtype, factor=50)


def test_merge_twice_is_one_merge():
    layer = LoRALinear(torch.nn.Linear(4, 3).requires_grad_(False), 2, alpha=2.0, scaling=1.0)
    torch.nn.init.normal_(layer.lora_B)
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once)


@pytest.mark.parametrize(("dtype", "cycles"), [(torch.bfloat16, 1000), (torch.float16, 100), (torch.float32, 100)])
def test_unmerge_restores_base_weights_bit_for_bit_after_many_cycles(dtype, cycles):
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32).to(dtype).requires_grad_(False)
    layer = LoRALinear(base, 8, alpha=16.0, scaling=2.0)
    torch.nn.init.normal_(layer.lora_B)
    original = base.weight.detach().clone()
    for _ in range(cycles):
        layer.merge()
        layer.unmerge()
    assert torch.equal(base.weight, original)


def test_half_precision_merge_is_computed_in_float32_and_cast_once():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, 4, alpha=4.0, scaling=1.0)
    torch.nn.init.normal_(layer.lora_B, std=1e-3)
    expected = (base.weight.float() + layer.delta_weight(torch.float32)).to(torch.bfloat16)
    layer.merge()
    assert layer.lora_A.dtype == torch.float32
    assert torch.equal(base.weight, expected)


def test_merge_refuses_an_overflowing_update_and_leaves_the_weight_untouched():
    base = torch.nn.Linear(4, 3).to(torch.float16).requires_grad_(False)
    layer = LoRALinear(base, 2, alpha=2.0, scaling=1.0)
    with torch.no_grad():
        layer.lora_A.fill_(300.0)
        layer.lora_B.fill_(300.0)
    original = base.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert not layer.merged and torch.equal(base.weight, original)


def test_conv2d_rank_not_divisible_by_groups_is_refused_by_name():
    with pytest.raises(ValueError, match="multiple of the conv's groups=2"):
        LoRAConv2d(torch.nn.Conv2d(4, 4, 3, groups=2), 3, alpha=3.0, scaling=1.0)
