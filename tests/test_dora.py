"""DoRA's reference: finite differences with the norm held, LoRA at the initial magnitude, merge, and PEFT itself."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec import dora, reference
from tests import strategies
from tests.numerics import assert_close, numerical_gradient

LAYERS = ("linear", "embedding", "conv2d")


def _forward(dora_case: strategies.DoRACase, magnitude=None, norm=None, bias=None):
    """The DoRA layer's output on the case's input; `bias` replaces the case's (for its gradient)."""
    case, m = dora_case.case, dora_case.magnitude if magnitude is None else magnitude
    if dora_case.layer == "embedding":
        return dora.dora_embedding_forward(case.ids, case.W, case.A, case.B, case.s, m, norm=norm)
    b = case.b if bias is None else bias
    if dora_case.layer == "linear":
        return dora.dora_forward(case.x, case.W, b, case.A, case.B, case.s, m, case.dropout_mask, norm=norm)
    return dora.dora_conv2d_forward(
        case.x, case.W, b, case.A, case.B, case.s, m, **case.geometry, dropout_mask=case.dropout_mask, norm=norm
    )


def _backward(dora_case: strategies.DoRACase, grad_y) -> dora.DoRAGradients:
    case, m = dora_case.case, dora_case.magnitude
    if dora_case.layer == "embedding":
        return dora.dora_embedding_backward(case.ids, case.W, case.A, case.B, case.s, m, grad_y)
    if dora_case.layer == "linear":
        return dora.dora_backward(case.x, case.W, case.A, case.B, case.s, m, grad_y, case.dropout_mask)
    return dora.dora_conv2d_backward(
        case.x, case.W, case.A, case.B, case.s, m, grad_y, **case.geometry, dropout_mask=case.dropout_mask
    )


def _lora_forward(dora_case: strategies.DoRACase, W=None):
    """Plain LoRA on the same layer (optionally with another base weight)."""
    case = dora_case.case
    W = case.W if W is None else W
    if dora_case.layer == "embedding":
        return reference.embedding_forward(case.ids, W, case.A, case.B, case.s)
    if dora_case.layer == "linear":
        return reference.forward(case.x, W, case.b, case.A, case.B, case.s, case.dropout_mask)
    return reference.conv2d_forward(
        case.x, W, case.b, case.A, case.B, case.s, **case.geometry, dropout_mask=case.dropout_mask
    )


def _dora_cases(dtype=None, dropout=True):
    return st.sampled_from(LAYERS).flatmap(lambda layer: strategies.dora_cases(layer, dtype=dtype, dropout=dropout))


@given(_dora_cases(dtype=np.float64), strategies.seeds)
def test_gradients_equal_finite_differences_with_the_norm_held_constant(dora_case, seed):
    """The norm is detached (the paper's section 4.3, PEFT): it is a constant of the differentiated function."""
    case = dora_case.case
    norm = dora.weight_norm(case.W, case.A, case.B, case.s, dora_case.layer)
    grad_y = np.random.default_rng(seed).standard_normal(_forward(dora_case).shape)
    bias = None if dora_case.layer == "embedding" else (case.b if case.b is not None else np.zeros(case.W.shape[0]))
    magnitude = dora_case.magnitude.copy()

    def loss(_):
        return float(np.sum(grad_y * _forward(dora_case, magnitude, norm, bias)))

    grads = _backward(dora_case, grad_y)
    wrt = {"dA": case.A, "dB": case.B, "dmagnitude": magnitude}
    if dora_case.layer != "embedding":
        wrt |= {"dx": case.x, "db": bias}
    for name, array in wrt.items():
        assert_close(getattr(grads, name), numerical_gradient(loss, array), factor=1e4)


@given(_dora_cases())
def test_dora_at_the_magnitude_of_its_norm_is_plain_lora_dropout_included(dora_case):
    case = dora_case.case
    magnitude = dora.weight_norm(case.W, case.A, case.B, case.s, dora_case.layer).astype(case.W.dtype)
    assert_close(_forward(dora_case, magnitude), _lora_forward(dora_case), case.W.dtype, factor=50)


def _base_only(dora_case: strategies.DoRACase, W):
    """The layer with weight `W` and no update (B = 0)."""
    case = dora_case.case
    zeros = np.zeros_like(case.B)
    if dora_case.layer == "embedding":
        return reference.embedding_forward(case.ids, W, case.A, zeros, case.s)
    if dora_case.layer == "linear":
        return reference.forward(case.x, W, case.b, case.A, zeros, case.s)
    return reference.conv2d_forward(case.x, W, case.b, case.A, zeros, case.s, **case.geometry)


@given(_dora_cases(dropout=False))
def test_merged_weight_computes_the_dora_layer(dora_case):
    case = dora_case.case
    merged = dora.dora_merge(case.W, case.A, case.B, case.s, dora_case.magnitude, dora_case.layer)
    assert merged.dtype == case.W.dtype
    assert_close(_base_only(dora_case, merged), _forward(dora_case), case.W.dtype, factor=100)


@given(_dora_cases(dtype=np.float64, dropout=False), st.data())
def test_merged_active_adapters_add_each_update_computed_against_the_base(dora_case, data):
    """A DoRA adapter beside a LoRA adapter and a second DoRA adapter: each adds what it adds alone."""
    case = dora_case.case
    plain = (
        data.draw(strategies.arrays(case.A.shape)),
        data.draw(strategies.arrays(case.B.shape)),
        data.draw(strategies.scales),
    )
    other_magnitude = dora_case.magnitude * data.draw(st.sampled_from([0.5, 2.0]))
    merged = dora.merge_adapters(
        case.W,
        [(case.A, case.B, case.s), plain, (case.A, case.B, case.s)],
        [dora_case.magnitude, None, other_magnitude],
        dora_case.layer,
    )
    base = _base_only(dora_case, case.W)
    plain_case = dataclasses.replace(dora_case, case=dataclasses.replace(case, A=plain[0], B=plain[1], s=plain[2]))
    expected = _forward(dora_case) + _lora_forward(plain_case) + _forward(dora_case, other_magnitude) - 2 * base
    assert_close(_base_only(dora_case, merged), expected, np.float64, factor=100)
    alone = dora.merge_adapters(case.W, [(case.A, case.B, case.s)], [dora_case.magnitude], dora_case.layer)
    np.testing.assert_array_equal(
        alone, dora.dora_merge(case.W, case.A, case.B, case.s, dora_case.magnitude, dora_case.layer)
    )


@given(_dora_cases(dtype=np.float64, dropout=False))
def test_unmerge_with_the_norm_at_merge_time_restores_the_weight(dora_case):
    case = dora_case.case
    norm = dora.weight_norm(case.W, case.A, case.B, case.s, dora_case.layer)
    merged = dora.dora_merge(case.W, case.A, case.B, case.s, dora_case.magnitude, dora_case.layer)
    restored = dora.dora_unmerge(merged, case.A, case.B, case.s, dora_case.magnitude, norm, dora_case.layer)
    assert_close(restored, case.W, np.float64, factor=1e3)


@given(_dora_cases(dropout=False))
def test_merge_with_feature_scales_of_m_over_n_is_doras_merge(dora_case):
    case = dora_case.case
    factor = dora_case.magnitude / dora.weight_norm(case.W, case.A, case.B, case.s, dora_case.layer)
    scaled = dora.merge_with_feature_scales(case.W, case.A, case.B, factor, factor * case.s, dora_case.layer)
    expected = dora.dora_merge(case.W, case.A, case.B, case.s, dora_case.magnitude, dora_case.layer)
    assert_close(scaled, expected, case.W.dtype, factor=50)
    plain = dora.merge_with_feature_scales(case.W, case.A, case.B, 1.0, case.s, dora_case.layer)
    assert_close(plain, reference.merge(case.W, case.A, case.B, case.s, dora_case.layer), case.W.dtype, factor=10)


@pytest.mark.parametrize(
    "layer, weight_shape, b_shape, expected",
    [
        ("linear", (5, 3), (5, 2), (5,)),
        ("embedding", (11, 4), (4, 2), (4,)),
        ("conv2d", (6, 3, 3, 3), (6, 2, 1, 1), (1, 6, 1, 1)),
    ],
)
def test_initial_magnitude_has_peft_shape_and_is_the_base_norm_when_the_update_is_zero(
    layer, weight_shape, b_shape, expected
):
    rng = np.random.default_rng(0)
    W = rng.standard_normal(weight_shape)
    a_shape = (2, weight_shape[0]) if layer == "embedding" else (2, *weight_shape[1:])
    magnitude = dora.init_magnitude(W, rng.standard_normal(a_shape), np.zeros(b_shape), 2.0, layer)
    assert magnitude.shape == expected == dora.magnitude_shape(layer, b_shape[0])
    axes = (0,) if layer == "embedding" else tuple(range(1, W.ndim))
    np.testing.assert_allclose(magnitude.reshape(-1), np.sqrt(np.sum(W**2, axis=axes)), rtol=1e-12)


def test_half_precision_norms_are_computed_in_float32():
    W = np.full((2, 4096), 300.0, np.float16)  # each row's sum of squares, 3.7e8, overflows float16
    norm = dora.weight_norm(W, np.zeros((1, 4096), np.float16), np.zeros((2, 1), np.float16), 1.0)
    assert norm.dtype == np.float32
    np.testing.assert_allclose(norm, [300.0 * 64] * 2, rtol=1e-6)
    merged = dora.dora_merge(W, np.zeros((1, 4096), np.float16), np.zeros((2, 1), np.float16), 1.0, norm)
    assert merged.dtype == np.float16 and np.array_equal(merged, W)


def test_a_grouped_convolution_is_refused_in_one_line():
    rng = np.random.default_rng(0)
    W, A, B = rng.standard_normal((4, 1, 3, 3)), rng.standard_normal((2, 1, 3, 3)), rng.standard_normal((4, 1, 1, 1))
    with pytest.raises(ValueError, match=r"DoRA on a grouped convolution \(groups=2\) is not supported") as error:
        dora.weight_norm(W, A, B, 1.0, "conv2d")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="groups=2"):
        dora.dora_conv2d_forward(np.ones((1, 2, 3, 3)), W, None, A[:, :, :, :], B, 1.0, np.ones((1, 4, 1, 1)), groups=2)


@pytest.mark.parametrize(
    "layer, magnitude_shape", [("linear", (1, 5)), ("linear", (4,)), ("conv2d", (5,)), ("embedding", (11,))]
)
def test_a_magnitude_that_does_not_fit_the_layer_is_refused_in_one_line(layer, magnitude_shape):
    rng = np.random.default_rng(0)
    W = {"linear": (5, 3), "embedding": (11, 5), "conv2d": (5, 3, 1, 1)}[layer]
    A = (2, 11) if layer == "embedding" else (2, *W[1:])
    B = (5, 2, 1, 1) if layer == "conv2d" else (5, 2)
    with pytest.raises(ValueError, match=r"DoRA magnitude has shape .* output features, so PEFT's shape is") as error:
        dora.dora_merge(
            rng.standard_normal(W), rng.standard_normal(A), rng.standard_normal(B), 1.0, np.ones(magnitude_shape), layer
        )
    assert "\n" not in str(error.value)


# --- PEFT itself ------------------------------------------------------------------------------------------------


def _peft_dora_layer(layer: str, dropout: float):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = {
        "linear": lambda: torch.nn.Linear(4, 6),
        "embedding": lambda: torch.nn.Embedding(9, 5),
        "conv2d": lambda: torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),
    }[layer]()
    model = peft.get_peft_model(
        torch.nn.ModuleDict({"layer": base}).double(),
        peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=dropout, target_modules=["layer"], use_dora=True),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # B (or the embedding's A) starts at zero, the magnitude at the norm
                parameter.copy_(torch.randn_like(parameter) * (1.3 if "magnitude" in name else 1.0))
    return model.base_model.model["layer"]


def _peft_tensors(module, layer: str):
    def arrays(*tensors):
        return [tensor.detach().numpy() for tensor in tensors]

    if layer == "embedding":
        factors = arrays(module.lora_embedding_A["default"], module.lora_embedding_B["default"])
    else:
        factors = arrays(module.lora_A["default"].weight, module.lora_B["default"].weight)
    return (
        *arrays(module.base_layer.weight),
        *factors,
        module.scaling["default"],
        *arrays(module.lora_magnitude_vector["default"].weight),
    )


def _fixed_dropout(torch, mask):
    """A dropout module multiplying by `mask`, so that PEFT's training path meets the reference's."""
    module = torch.nn.Module()
    module.forward = lambda x: x * mask
    return module


@pytest.mark.parametrize("layer", LAYERS)
def test_forward_gradients_and_merge_equal_pefts_dora(layer):
    torch = pytest.importorskip("torch")
    module = _peft_dora_layer(layer, dropout=0.0 if layer == "embedding" else 0.5)
    W, A, B, s, magnitude = _peft_tensors(module, layer)
    generator = torch.Generator().manual_seed(1)
    if layer == "embedding":
        x = torch.randint(0, 9, (2, 3), generator=generator)
    else:
        x = torch.randn(
            (2, 3, 4) if layer == "linear" else (2, 3, 7, 7),
            generator=generator,
            dtype=torch.float64,
            requires_grad=True,
        )
        mask = (torch.rand(x.shape, generator=generator) > 0.5).double() * 2
        module.lora_dropout["default"] = _fixed_dropout(torch, mask)
    module.train(layer != "embedding")
    y = module(x)
    grad_y = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    (y * grad_y).sum().backward()
    bias = None if layer == "embedding" else module.base_layer.bias.detach().numpy()
    case = _case(layer, x, W, bias, A, B, s, None if layer == "embedding" else mask.numpy())
    dora_case = strategies.DoRACase(layer, case, magnitude)
    assert_close(_forward(dora_case), y.detach().numpy(), np.float64, factor=10)
    ours = _backward(dora_case, grad_y.numpy())
    lora_a, lora_b = (
        (module.lora_embedding_A["default"], module.lora_embedding_B["default"])
        if layer == "embedding"
        else (module.lora_A["default"].weight, module.lora_B["default"].weight)
    )
    peft_grads = {
        "dA": lora_a.grad,
        "dB": lora_b.grad,
        "dmagnitude": module.lora_magnitude_vector["default"].weight.grad,
    }
    if layer != "embedding":
        peft_grads["dx"] = x.grad
    for name, expected in peft_grads.items():
        assert_close(getattr(ours, name), expected.numpy(), np.float64, factor=10)
    module.merge()
    merged = module.get_base_layer().weight.detach().numpy()
    assert_close(dora.dora_merge(W, A, B, s, magnitude, layer), merged, np.float64, factor=10)


def _case(layer, x, W, b, A, B, s, mask):
    if layer == "embedding":
        return strategies.EmbeddingCase(ids=x.numpy(), W=W, A=A, B=B, s=s)
    if layer == "linear":
        return strategies.LinearCase(x=x.detach().numpy(), W=W, b=b, A=A, B=B, s=s, dropout_mask=mask)
    return strategies.Conv2dCase(
        x=x.detach().numpy(),
        W=W,
        b=b,
        A=A,
        B=B,
        s=s,
        dropout_mask=mask,
        stride=(2, 2),
        padding=(1, 1),
        dilation=(1, 1),
        groups=1,
    )


def test_a_transposed_conv1d_weight_passed_as_w_t_gives_pefts_dora():
    """GPT-2's Conv1D stores W (in, out) (`fan_in_fan_out`): the reference takes W.T, the magnitude stays (out,)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = peft.get_peft_model(
        torch.nn.ModuleDict({"layer": Conv1D(6, 4)}).double(),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["layer"], use_dora=True, fan_in_fan_out=True),
    )
    module = model.base_model.model["layer"]
    with torch.no_grad():
        module.lora_B["default"].weight.normal_()
        module.lora_magnitude_vector["default"].weight.mul_(1.5)
    stored, A, B, s, magnitude = _peft_tensors(module, "linear")
    assert stored.shape == (4, 6) and magnitude.shape == (6,)
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = module.eval()(x).numpy()
    bias = module.base_layer.bias.detach().numpy()
    assert_close(dora.dora_forward(x.numpy(), stored.T, bias, A, B, s, magnitude), expected, np.float64, factor=10)
    module.merge()
    assert_close(
        dora.dora_merge(stored.T, A, B, s, magnitude).T,
        module.base_layer.weight.detach().numpy(),
        np.float64,
        factor=10,
    )
