"""PiSSA and OLoRA inits: the residual plus the update is the weight, the SVD/QR properties, PEFT's own values,
and the conversion of a trained adapter to LoRA against the original base."""

import json

import numpy as np
import pytest
from hypothesis import given

from lora_spec import LoRAConfig, dora, inits, reference
from lora_spec.adapter_io import load_adapter_dir
from tests import strategies
from tests.numerics import assert_close


@given(strategies.weight_init_cases(), strategies.seeds)
def test_residual_plus_the_scaled_update_is_the_weight(case, seed):
    W, r, s, init = case
    original = W.copy()
    lora_a, lora_b, residual = inits.init_from_weight(W, init, r, s, np.random.default_rng(seed))
    np.testing.assert_array_equal(W, original)  # the base weight is the caller's: never modified
    assert lora_a.shape == (r, W.shape[1]) and lora_b.shape == (W.shape[0], r) and residual.dtype == W.dtype
    assert_close(residual + s * lora_b @ lora_a, W, np.float64, factor=100)


@given(strategies.weight_init_cases())
def test_pissa_update_is_the_best_rank_r_approximation(case):
    """Eckart-Young: the error of the best rank-r approximation is the norm of the other singular values."""
    W, r, s, _ = case
    _, _, residual = inits.pissa_init(W, r, s)
    singular_values = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(residual), np.linalg.norm(singular_values[r:]), atol=1e-9)


@given(strategies.base_weights(np.float64).filter(lambda W: min(W.shape) > 1), strategies.seeds)
def test_randomized_pissa_is_exact_on_a_weight_of_rank_r(W, seed):
    r = min(W.shape) - 1
    weight = strategies.low_rank_weight(W.shape, r, seed, gap=0.0)
    exact = inits.pissa_init(weight, r, 2.0)
    fast = inits.pissa_init(weight, r, 2.0, niter=2, rng=np.random.default_rng(seed))
    np.testing.assert_allclose(fast.residual, 0.0, atol=1e-10 * np.abs(weight).max())
    assert_close(fast.lora_b @ fast.lora_a, exact.lora_b @ exact.lora_a, np.float64, factor=1e3)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
def test_svd_lowrank_finds_the_top_triplets_of_a_tall_or_wide_matrix(shape):
    W = strategies.low_rank_weight(shape, 4, gap=1e-3)
    U, S, V = inits.svd_lowrank(W, 4, 2, np.random.default_rng(0))
    assert U.shape == (shape[0], 4) and V.shape == (shape[1], 4)
    np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(V.T @ V, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(S, np.linalg.svd(W, compute_uv=False)[:4], rtol=1e-6)


@given(strategies.weight_init_cases())
def test_olora_b_has_orthonormal_columns_and_a_is_the_top_of_r(case):
    W, r, s, _ = case
    lora_a, lora_b, _ = inits.olora_init(W, r, s)
    np.testing.assert_allclose(lora_b.T @ lora_b, np.eye(r), atol=1e-10)
    assert np.all(np.tril(lora_a, -1) == 0)  # the first r rows of the triangular R


def test_half_precision_is_computed_in_float32_and_the_residual_cast_once():
    W = strategies.low_rank_weight((16, 8), 3, gap=0.1).astype(np.float16)
    for init in ("pissa", "olora"):
        lora_a, lora_b, residual = inits.init_from_weight(W, init, 3, 0.5)
        assert lora_a.dtype == lora_b.dtype == np.float32 and residual.dtype == np.float16
        assert_close(residual.astype(np.float32) + 0.5 * lora_b @ lora_a, W, np.float16, factor=2)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: inits.pissa_init(np.ones((4, 3), np.int8), 2, 1.0),
            "PiSSA needs a floating-point base weight, not int8",
        ),
        (
            lambda: inits.olora_init(np.ones((4, 3), np.uint8), 2, 1.0),
            "OLoRA needs a floating-point base weight, not uint8",
        ),
        (
            lambda: inits.pissa_init(np.ones((4, 3)), 4, 1.0),
            r"rank r=4 does not fit PiSSA of a 4x3 weight: use 1 <= r <= 3",
        ),
        (lambda: inits.olora_init(np.ones((2, 3, 3)), 1, 1.0), "OLoRA initialises linear layers"),
        (lambda: inits.pissa_init(np.ones((4, 3)), 2, 1.0, niter=-1), "niter=-1 is invalid"),
        (
            lambda: inits.init_from_weight(np.ones((4, 3)), "gaussian", 2, 1.0),
            "init='gaussian' does not compute A and B",
        ),
        (
            lambda: reference.init(3, 4, LoRAConfig(init="olora"), np.random.default_rng(0)),
            "init='olora' computes A and B from the base weight",
        ),
    ],
)
def test_bad_weights_and_settings_are_refused_in_one_line(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


# --- conversion to LoRA against the original base --------------------------------------------------------------


@given(strategies.weight_init_cases(), strategies.seeds)
def test_the_converted_adapter_on_the_original_base_is_the_trained_adapter_on_the_residual(case, seed):
    W, r, s, init = case
    initial = inits.init_from_weight(W, init, r, s, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    lora_a = initial.lora_a + rng.standard_normal(initial.lora_a.shape)  # as if trained
    lora_b = initial.lora_b + rng.standard_normal(initial.lora_b.shape)
    config = LoRAConfig(r=r, alpha=s * r, init=init)
    converted = inits.converted_config(config)
    lora_a2, lora_b2 = inits.convert_to_lora(lora_a, lora_b, initial.lora_a, initial.lora_b)
    assert lora_a2.shape == (2 * r, W.shape[1]) and converted.r == 2 * r and converted.scaling == pytest.approx(s)
    assert_close(
        reference.merge(W, lora_a2, lora_b2, converted.scaling),
        reference.merge(initial.residual, lora_a, lora_b, s),
        np.float64,
        factor=100,
    )
    magnitude = dora.weight_norm(initial.residual, lora_a, lora_b, s) * 1.5  # DoRA's carries over
    x = rng.standard_normal((2, W.shape[1]))
    assert_close(
        dora.dora_forward(x, W, None, lora_a2, lora_b2, converted.scaling, magnitude),
        dora.dora_forward(x, initial.residual, None, lora_a, lora_b, s, magnitude),
        np.float64,
        factor=100,
    )


def test_converted_config_doubles_ranks_and_keeps_every_scaling():
    config = LoRAConfig(r=4, alpha=8, init="pissa_niter_2", rank_pattern={"q": 2}, alpha_pattern={"v": 6})
    converted = inits.converted_config(config)
    assert (converted.r, converted.init, converted.rank_pattern, converted.alpha_pattern) == (
        8,
        "kaiming",
        {"q": 4},
        {"v": 12},
    )
    for path in ("m.q", "m.v", "m.k"):
        assert converted.scaling_for(path) == pytest.approx(config.scaling_for(path))
    rslora = LoRAConfig(r=4, alpha=8, init="olora", use_rslora=True)
    assert inits.converted_config(rslora).scaling == pytest.approx(rslora.scaling)


@pytest.mark.parametrize(
    "config, message",
    [
        (LoRAConfig(init="pissa", use_rslora=True, rank_pattern={"q": 2}), "not supported with use_rslora=True"),
        (LoRAConfig(init="gaussian"), "only PiSSA and OLoRA adapters need converting"),
    ],
)
def test_conversions_peft_refuses_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        inits.converted_config(config)


# --- PEFT itself ------------------------------------------------------------------------------------------------


def _peft_layer(init: str, base=None, **options):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = base if base is not None else torch.nn.Linear(12, 7)
    original = base.weight.detach().numpy().copy()
    model = peft.get_peft_model(
        torch.nn.ModuleDict({"layer": base}),
        peft.LoraConfig(r=3, lora_alpha=5, target_modules=["layer"], init_lora_weights=init, **options),
    )
    return model, original


def _align_signs(ours: inits.WeightInit, lora_a: np.ndarray) -> inits.WeightInit:
    """Singular vectors are defined up to sign: flip ours to PEFT's, a pair (row of A, column of B) at a time."""
    signs = np.sign(np.sum(ours.lora_a * lora_a, axis=1))
    return inits.WeightInit(ours.lora_a * signs[:, None], ours.lora_b * signs, ours.residual)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_exact_inits_equal_pefts(init):
    model, W = _peft_layer(init)
    layer = model.base_model.model["layer"]
    lora_a = layer.lora_A["default"].weight.detach().numpy()
    ours = _align_signs(inits.init_from_weight(W, init, 3, layer.scaling["default"]), lora_a)
    assert_close(ours.lora_a, lora_a, np.float32, factor=10)
    assert_close(ours.lora_b, layer.lora_B["default"].weight.detach().numpy(), np.float32, factor=10)
    assert_close(ours.residual, layer.base_layer.weight.detach().numpy(), np.float32, factor=10)


def test_randomized_pissa_finds_pefts_update_on_a_weight_with_a_spectral_gap():
    torch = pytest.importorskip("torch")
    base = torch.nn.Linear(12, 7)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(strategies.low_rank_weight((7, 12), 3, gap=1e-4)))
    model, W = _peft_layer("pissa_niter_2", base)
    layer = model.base_model.model["layer"]
    ours = inits.init_from_weight(W, "pissa_niter_2", 3, layer.scaling["default"], np.random.default_rng(0))
    # Both find the top directions up to float32 rounding; the residual left is the 1e-4 noise.
    np.testing.assert_allclose(ours.residual, layer.base_layer.weight.detach().numpy(), atol=1e-5 * np.abs(W).max())


def test_pissa_of_a_transposed_conv1d_weight_equals_pefts():
    """GPT-2's Conv1D stores W (in, out): PEFT transposes it for the SVD and the residual back."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model, stored = _peft_layer("pissa", Conv1D(7, 12), fan_in_fan_out=True)
    layer = model.base_model.model["layer"]
    ours = inits.pissa_init(stored.T, 3, layer.scaling["default"])
    assert_close(ours.residual.T, layer.base_layer.weight.detach().numpy(), np.float32, factor=10)


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
def test_pefts_conversion_to_lora_is_ours(tmp_path):
    model, _W = _peft_layer("pissa")
    model.save_pretrained(tmp_path / "initial")
    _, _, initial = load_adapter_dir(tmp_path / "initial")
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "trained")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    trained_config, _, trained = load_adapter_dir(tmp_path / "trained")
    converted_config, raw, converted = load_adapter_dir(tmp_path / "converted")
    ours = inits.convert_to_lora(*trained.lora["layer"], *initial.lora["layer"])
    for theirs, mine in zip(converted.lora["layer"], ours, strict=True):
        np.testing.assert_array_equal(theirs, mine)
    expected = inits.converted_config(trained_config)
    assert (converted_config.r, converted_config.alpha, converted_config.init) == (
        expected.r,
        expected.alpha,
        expected.init,
    )
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert raw["r"] == 6
