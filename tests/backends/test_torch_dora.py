"""The PyTorch DoRA layers against the reference (`lora_spec.dora`): forward, gradients (the magnitude's
included), merge and unmerge, several adapters in order; the ONNX exports of DoRA models fold."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec import dora, reference
from lora_spec.multi_adapter import Factors
from tests import strategies
from tests.numerics import TOLERANCE, assert_close
from tests.test_dora import _backward, _forward

torch = pytest.importorskip("torch")
nn = torch.nn

import lora_spec.torch as lora
from lora_spec.backends.torch_layers import LoRALinear, lora_layer_for
from tests.backends.test_torch_layers import (
    conv2d_layer,
    embedding_layer,
    linear_layer,
    mask_of,
    numpy,
    tensor,
)
from tests.backends.test_torch_model import TinyModel, inputs
from tests.backends.test_torch_multi_adapter import _base_module, _layer_input, _reference_forward

LAYER_TYPES = ("linear", "conv1d", "embedding", "conv2d")


def _kind(layer_type: str) -> str:
    """The reference's layer for a layer type: GPT-2's Conv1D is a linear layer stored transposed."""
    return "linear" if layer_type == "conv1d" else layer_type


def dora_layer(dora_case: strategies.DoRACase, layer_type: str):
    """A LoRA layer of `layer_type` holding the case's DoRA adapter, magnitude included."""
    case = dora_case.case
    if dora_case.layer == "linear":
        layer = linear_layer(case, layer_type, use_dora=True)
    else:
        layer = (embedding_layer if dora_case.layer == "embedding" else conv2d_layer)(case, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector.copy_(tensor(dora_case.magnitude))
    return layer


def _inputs(dora_case: strategies.DoRACase):
    case = dora_case.case
    return torch.from_numpy(case.ids) if dora_case.layer == "embedding" else tensor(case.x, requires_grad=True)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("mode", ["train", "eval"], ids=["training", "evaluation"])
@given(data=st.data(), grad_seed=strategies.seeds)
def test_dora_forward_and_gradients_match_the_reference(layer_type, mode, data, grad_seed):
    """Training runs the fused Function for linear layers; evaluation runs PEFT's formula in plain ops (with a
    dropout mask given, the form for a dropped input)."""
    dora_case = data.draw(strategies.dora_cases(_kind(layer_type)))
    case = dora_case.case
    layer = dora_layer(dora_case, layer_type).train(mode == "train")
    bias = getattr(layer.base_layer, "bias", None)
    if bias is not None:
        bias.requires_grad_(True)
    x = _inputs(dora_case)
    y = layer(x) if dora_case.layer == "embedding" else layer(x, dropout_mask=mask_of(case))
    dtype = case.W.dtype
    if layer_type == "conv1d":  # Conv1D always has a bias; the case may have none
        case = dataclasses.replace(case, b=numpy(bias))
    assert_close(numpy(y), _forward(dataclasses.replace(dora_case, case=case)), dtype, factor=10)

    grad_y = np.random.default_rng(grad_seed).standard_normal(y.shape).astype(dtype)
    y.backward(tensor(grad_y))
    expected = _backward(dora_case, grad_y)
    adapter = layer.adapters["default"]
    assert_close(numpy(adapter.lora_A.grad), expected.dA, dtype, factor=10)
    assert_close(numpy(adapter.lora_B.grad), expected.dB, dtype, factor=10)
    _assert_magnitude_gradient(adapter, expected.dmagnitude, _bias_rounding(dora_case, bias, grad_y, mode))
    if expected.dx is not None:
        assert_close(numpy(x.grad), expected.dx, dtype, factor=10)
    if bias is not None and expected.db is not None:
        assert_close(numpy(bias.grad), expected.db, dtype, factor=10)
    assert layer.base_layer.weight.grad is None


def _bias_rounding(dora_case, bias, grad_y, mode) -> np.ndarray:
    """What the magnitude's gradient may carry from the bias, per feature: evaluation recovers the base product
    as `result - b` (PEFT's formula), off by the float rounding of `|b|` per element of the direction, which the
    gradient sums against `|g|` and divides by the norm. Zero in training (the fused Function keeps the direction)."""
    if mode == "train" or bias is None:
        return np.zeros(dora_case.magnitude.size)
    case, features = dora_case.case, 1 if dora_case.layer == "conv2d" else -1
    summed = np.moveaxis(np.abs(grad_y), features, -1).reshape(-1, grad_y.shape[features]).sum(0)
    norm = dora.weight_norm(case.W, case.A, case.B, case.s, dora_case.layer).reshape(-1)
    return 10 * TOLERANCE[case.W.dtype] * summed * np.abs(numpy(bias)).reshape(-1) / norm


def _assert_magnitude_gradient(adapter, expected: np.ndarray, bias_rounding: np.ndarray) -> None:
    actual, expected = numpy(adapter.lora_magnitude_vector.grad).reshape(-1), expected.reshape(-1)
    allowed = 10 * TOLERANCE[expected.dtype] * np.abs(expected).max() + bias_rounding
    difference = np.abs(actual - expected)
    assert np.all(difference <= allowed), f"magnitude gradient off by {difference}, allowed {allowed}"


def _merge_cases():
    layer_types = st.sampled_from(LAYER_TYPES)
    return layer_types.flatmap(
        lambda layer_type: strategies.dora_cases(_kind(layer_type), dropout=False).map(
            lambda dora_case: (layer_type, dora_case)
        )
    )


@given(_merge_cases())
def test_dora_merge_matches_the_reference_keeps_the_outputs_and_unmerge_restores_the_weight_bit_for_bit(layer_case):
    layer_type, dora_case = layer_case
    case = dora_case.case
    layer = dora_layer(dora_case, layer_type).eval()
    x = _inputs(dora_case)
    unmerged = numpy(layer(x))
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    merged = numpy(layer.base_layer.weight)
    expected = dora.dora_merge(case.W, case.A, case.B, case.s, dora_case.magnitude, dora_case.layer)
    assert_close(merged.T if layer_type == "conv1d" else merged, expected, case.W.dtype, factor=10)
    assert_close(numpy(layer(x)), unmerged, case.W.dtype, factor=50)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


@given(strategies.linear_cases(dropout=False))
def test_a_dora_adapter_starts_at_its_weight_norm_where_it_is_the_lora_layer(case):
    layer = linear_layer(case, "linear", use_dora=True).eval()
    adapter = layer.adapters["default"]
    adapter.initialise(layer)
    assert_close(
        numpy(adapter.lora_magnitude_vector), dora.init_magnitude(case.W, case.A, case.B, case.s), case.dtype, factor=10
    )
    expected = reference.forward(case.x, case.W, case.b, case.A, case.B, case.s)
    assert_close(numpy(layer(tensor(case.x))), expected, case.dtype, factor=10)


def test_apply_starts_dora_magnitudes_at_the_base_weight_norms_in_pefts_shapes():
    torch.manual_seed(0)
    model = TinyModel()
    model.conv = nn.Conv2d(2, 4, 3, padding=1)
    lora.apply(model, r=2, target_modules=["q_proj", "embed", "conv"], use_dora=True)
    norm = torch.linalg.vector_norm
    for layer, expected in (
        (model.attention.q_proj, norm(model.attention.q_proj.weight, dim=1)),
        (model.embed, norm(model.embed.weight, dim=0)),
        (model.conv, norm(model.conv.weight, dim=(1, 2, 3)).reshape(1, 4, 1, 1)),
    ):
        magnitude = layer.adapters["default"].lora_magnitude_vector
        assert magnitude.requires_grad and magnitude.shape == expected.shape
        torch.testing.assert_close(magnitude.detach(), expected.detach())


# --- several adapters on one layer ---------------------------------------------------------------------------


def _mixed_layer(case: strategies.AdapterSetCase):
    """A LoRA layer holding the case's adapters `a0`, `a1`, ...: DoRA ones where the case has a magnitude."""
    first = case.adapters[0]
    layer = lora_layer_for(_base_module(case))(
        _base_module(case), first.A.shape[0], 1.0, first.s, adapter_name="a0", use_dora=case.magnitudes[0] is not None
    )
    for index, (adapter, magnitude) in enumerate(zip(case.adapters, case.magnitudes, strict=True)):
        name = f"a{index}"
        if name not in layer.adapters:
            layer.add_adapter(name, adapter.A.shape[0], 1.0, adapter.s, use_dora=magnitude is not None)
        layer.adapters[name].assign(torch.from_numpy(adapter.A), torch.from_numpy(adapter.B))
        if magnitude is not None:
            with torch.no_grad():
                layer.adapters[name].lora_magnitude_vector.copy_(torch.from_numpy(magnitude))
    return layer


def _composed_weight(case: strategies.AdapterSetCase, order: list[int]) -> np.ndarray:
    """PEFT's composition: a LoRA adapter adds its update, a DoRA adapter rescales everything before it and its
    own update by `m / ||W + s * B @ A||` (the norm from the base weight W)."""
    merged = case.W
    for index in order:
        (lora_a, lora_b, s), magnitude = case.adapters[index], case.magnitudes[index]
        if magnitude is None:
            merged = reference.merge(merged, lora_a, lora_b, s, case.layer)
        else:
            factor = magnitude / dora.weight_norm(case.W, lora_a, lora_b, s, case.layer)
            merged = dora.merge_with_feature_scales(merged, lora_a, lora_b, factor, factor * s, case.layer)
    return merged


@given(strategies.dora_adapter_set_cases(), st.data())
def test_active_adapters_run_in_order_as_peft_runs_them_and_merge_to_the_same_weight(case, data):
    layer = _mixed_layer(case).eval()
    names = [f"a{index}" for index in range(len(case.adapters))]
    active = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    layer.active_adapters = active
    expected_weight = _composed_weight(case, [names.index(name) for name in active])
    zero = Factors(np.zeros_like(case.adapters[0].A), np.zeros_like(case.adapters[0].B), 1.0)
    composed = dataclasses.replace(case, base=dataclasses.replace(case.base, W=expected_weight))
    assert_close(numpy(layer(_layer_input(case))), _reference_forward(composed, zero), np.float64, factor=100)
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert_close(numpy(layer.base_layer.weight), expected_weight, np.float64, factor=100)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_half_precision_dora_keeps_float32_magnitudes_norms_in_float32_and_merges_cast_once():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, 4, alpha=4.0, scaling=1.0, use_dora=True)
    nn.init.normal_(layer.lora_A)
    nn.init.normal_(layer.lora_B, std=0.1)
    adapter = layer.adapters["default"]
    adapter.initialise(layer)
    with torch.no_grad():
        adapter.lora_magnitude_vector.mul_(1.5)
    W = base.weight.float().numpy()
    A, B, m = (numpy(tensor) for tensor in (layer.lora_A, layer.lora_B, adapter.lora_magnitude_vector))
    assert m.dtype == np.float32
    assert_close(numpy(adapter.weight_norm(layer)), dora.weight_norm(W, A, B, 1.0), np.float32, factor=10)
    expected = dora.dora_merge(W, A, B, 1.0, m)
    layer.merge()
    np.testing.assert_array_less(np.abs(base.weight.float().numpy() - expected), 2.0**-8 * np.abs(expected) + 1e-30)


# --- ONNX ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_an_exported_dora_model_folds_into_its_base_nodes(tmp_path, dynamo):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from lora_spec.export import merge_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4))
    lora.apply(model, r=2, target_modules=["0", "2"], use_dora=True, init="gaussian")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    torch.onnx.export(model.eval(), (torch.randn(3, 8),), tmp_path / "model.onnx", dynamo=dynamo)
    result = merge_onnx(tmp_path / "model.onnx")
    assert len(result.folds) == 2 and all("DoRA" in fold for fold in result.folds) and not result.refused
    ops = sorted(node.op_type for node in onnx.load(result.output).graph.node)
    assert "ReduceL2" not in ops and ops.count("Gemm") + ops.count("MatMul") == 2


# --- what DoRA refuses ---------------------------------------------------------------------------------------


def test_dora_on_a_grouped_conv_is_refused_in_one_line_and_the_model_is_unchanged():
    model = TinyModel()
    with pytest.raises(ValueError, match=r"module 'conv': DoRA on a grouped convolution \(groups=2\)") as error:
        lora.apply(model, r=2, target_modules=["q_proj", "conv"], use_dora=True)
    assert "\n" not in str(error.value)
    assert not any(isinstance(module, lora.LoRALayer) for module in model.modules())


def _dora_model(targets=("q_proj", "v_proj"), scale=0.0):
    """A TinyModel with DoRA adapter "default" (its weights moved by `scale`) and plain LoRA adapter "plain"."""
    torch.manual_seed(0)
    model = lora.apply(TinyModel(), r=2, target_modules=list(targets), use_dora=True)
    lora.apply(model, adapter_name="plain", r=2, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "adapters.default" in name:
                parameter.mul_(1 + scale).add_(scale)
    return model.eval()


def _layers(model):
    return [module for module in model.modules() if isinstance(module, lora.LoRALayer)]


def test_routed_batches_refuse_dora_adapters_in_one_line():
    model = _dora_model()
    with (
        pytest.raises(ValueError, match="adapter 'default' is a DoRA adapter, which routed batches do not support"),
        lora.routed(model, ["plain", "default"]),
    ):
        pass
    assert all(layer._routes is None for layer in _layers(model))
    with lora.routed(model, ["plain", "__base__"]):
        model(*inputs())


def test_add_weighted_adapter_refuses_dora_adapters_in_one_line():
    model = _dora_model()
    with pytest.raises(ValueError, match="adapter 'default' is a DoRA adapter: each DoRA adapter rescales") as error:
        lora.add_weighted_adapter(model, ["default", "plain"], [0.5, 0.5], "mix", combination_type="cat")
    assert "\n" not in str(error.value) and "mix" not in lora.adapter_names(model)


def test_a_dora_file_whose_magnitude_does_not_fit_is_refused_and_the_model_is_unchanged(tmp_path):
    from lora_spec import safetensors_io
    from lora_spec.adapter_io import WEIGHTS_NAME

    lora.save_adapter(_dora_model(scale=0.5), tmp_path, adapter_name="default")
    tensors, metadata = safetensors_io.load(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.attention.q_proj.lora_magnitude_vector"] = np.ones(5, np.float32)
    safetensors_io.save(tmp_path / WEIGHTS_NAME, tensors, metadata=metadata)
    model = _dora_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"attention.q_proj.lora_magnitude_vector has shape \(5,\)"):
        lora.load_adapter(model, tmp_path, adapter_name="default")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def test_hot_swapping_a_dora_adapter_swaps_its_magnitudes_and_other_kinds_are_refused(tmp_path):
    """A DoRA file targeting q_proj only: v_proj's adapter gets zeros and the base's norms, so it runs the base."""
    source = _dora_model(targets=["q_proj"], scale=0.5)
    lora.save_adapter(source, tmp_path, adapter_name="default")
    lora.save_adapter(source, tmp_path / "plain_file", adapter_name="plain")
    model = _dora_model(scale=0.3)
    lora.prepare_model_for_compiled_hotswap(model, target_rank=4)
    lora.hotswap_adapter(model, tmp_path, "default")
    torch.testing.assert_close(model(*inputs()), source(*inputs()))
    with pytest.raises(ValueError, match="the new adapter is a plain LoRA adapter and 'default' is a DoRA one"):
        lora.hotswap_adapter(model, tmp_path / "plain_file" / "plain", "default")
