"""PiSSA and OLoRA in the PyTorch backend: against the reference (`lora_spec.inits`), on models (the base weight
becomes the residual), saved converted to LoRA or not and loaded here and in PEFT, and what they refuse."""

import json

import numpy as np
import pytest
from hypothesis import given

from lora_spec import inits
from tests import strategies
from tests.numerics import TOLERANCE, assert_close

torch = pytest.importorskip("torch")
pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
nn = torch.nn

import lora_spec.torch as lora
from lora_spec.backends import torch_inits


def _torch_init(W: np.ndarray, init: str, r: int, s: float):
    """Ours on a copy of W: `(A, B, residual)` as NumPy arrays; torch seeded, so the fast PiSSA's random
    projection (torch's global generator, as in PEFT) is the same on every run."""
    torch.manual_seed(0)
    weight = torch.from_numpy(W.copy())
    lora_a, lora_b = torch_inits.init_from_weight(weight, init, r, s)
    return lora_a.numpy(), lora_b.numpy(), weight.numpy()


@given(strategies.weight_init_cases())
def test_the_residual_plus_the_scaled_update_is_the_weight_and_the_factors_have_the_inits_properties(case):
    W, r, s, init = case
    lora_a, lora_b, residual = _torch_init(W, init, r, s)
    assert lora_a.shape == (r, W.shape[1]) and lora_b.shape == (W.shape[0], r) and residual.dtype == W.dtype
    assert_close(residual + s * lora_b @ lora_a, W, np.float64, factor=100)
    if init == "olora":
        np.testing.assert_allclose(lora_b.T @ lora_b, np.eye(r), atol=1e-10)
        assert np.all(np.tril(lora_a, -1) == 0)
    elif init == "pissa":  # Eckart-Young: what is left is the norm of the other singular values
        np.testing.assert_allclose(
            np.linalg.norm(residual), np.linalg.norm(np.linalg.svd(W, compute_uv=False)[r:]), atol=1e-9
        )


# pissa_niter_0 finds the range from one random projection, off by about noise / |cos| of the projection's angle
# to it; torch (seeded in _torch_init) and the reference draw different projections, so the noise stays far below
# the tolerance.
@given(strategies.spectral_gap_weight_init_cases(noise=1e-12))
def test_the_update_equals_the_references_on_a_weight_with_a_spectral_gap(case):
    """A and B are unique up to the sign of each rank component there, so their product is the reference's."""
    W, r, s, init = case
    lora_a, lora_b, residual = _torch_init(W, init, r, s)
    expected = inits.init_from_weight(W, init, r, s, np.random.default_rng(0))
    assert_close(lora_b @ lora_a, expected.lora_b @ expected.lora_a, np.float64, factor=1e4)
    # The residual's rounding is W's: a full-rank init leaves an exact 0 in the reference and ~1e-16 here.
    np.testing.assert_allclose(
        residual, expected.residual, rtol=0, atol=1e4 * TOLERANCE[np.dtype(np.float64)] * np.abs(W).max()
    )


def test_half_precision_weights_are_decomposed_in_float32_and_the_residual_cast_once():
    W = strategies.low_rank_weight((16, 8), 3, gap=0.1).astype(np.float32)
    for init in ("pissa", "olora"):
        weight = torch.from_numpy(W).to(torch.bfloat16)
        original = weight.float().numpy()
        lora_a, lora_b = torch_inits.init_from_weight(weight, init, 3, 0.5)
        assert lora_a.dtype == lora_b.dtype == torch.float32 and weight.dtype == torch.bfloat16
        expected = torch.from_numpy(original - 0.5 * (lora_b @ lora_a).numpy()).to(torch.bfloat16)
        assert torch.equal(weight, expected)


class TwoLinear(nn.Module):
    """nn.Linear then GPT-2's Conv1D (a linear stored transposed)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 6)
        self.conv1d = pytorch_utils.Conv1D(5, 6)

    def forward(self, x):
        return self.conv1d(self.linear(x))


def base_model():
    torch.manual_seed(0)
    return TwoLinear()


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))


def _trained(init: str, use_dora: bool):
    """A model adapted by `init` and trained a few steps (the seed fixed before the init, as PEFT's would be)."""
    model = base_model()
    torch.manual_seed(1)
    lora.apply(model, r=2, alpha=4, target_modules=["linear", "conv1d"], init=init, use_dora=use_dora)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(X).square().sum().backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_an_adapted_model_starts_as_the_base_and_its_weights_become_the_residuals(init):
    model = base_model()
    original = {name: module.weight.detach().clone() for name, module in model.named_children()}
    expected = model(X)
    torch.manual_seed(1)
    lora.apply(model, r=2, alpha=4, target_modules=["linear", "conv1d"], init=init, use_dora=True)
    torch.testing.assert_close(model(X), expected)
    for name, original_weight in original.items():
        layer = getattr(model, name)
        initial_a, initial_b = layer.adapters["default"].initial_factors()
        assert torch.equal(initial_a, layer.lora_A) and torch.equal(initial_b, layer.lora_B)
        W = original_weight.T if name == "conv1d" else original_weight  # OLoRA and PiSSA of a Conv1D: on W.T
        torch.testing.assert_close(layer.weight_out_in() + 2.0 * layer.lora_B @ layer.lora_A, W)
        torch.testing.assert_close(layer.adapters["default"].lora_magnitude_vector, torch.linalg.vector_norm(W, dim=1))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_the_converted_file_gives_the_trained_model_on_the_original_base_here_and_in_peft(tmp_path, init, use_dora):
    peft = pytest.importorskip("peft")
    model = _trained(init, use_dora)
    lora.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (4, 8, True)
    assert written["use_dora"] is use_dora
    torch.testing.assert_close(lora.load_adapter(base_model(), tmp_path).eval()(X), model(X))
    torch.testing.assert_close(peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()(X), model(X))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_the_unconverted_file_reruns_the_init_on_the_original_base_as_peft_does(tmp_path, init):
    """Right on the original base with a deterministic init: "pissa_niter_<K>" only with the same seed."""
    peft = pytest.importorskip("peft")
    model = _trained(init, use_dora=True)
    lora.save_adapter(model, tmp_path, convert_to_lora=False)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["init_lora_weights"]) == (2, init)
    base = base_model()
    torch.manual_seed(1)
    torch.testing.assert_close(lora.load_adapter(base, tmp_path).eval()(X), model(X))
    if init == "pissa":  # PEFT's OLoRA cannot hold a Conv1D's adapter; its randomized PiSSA draws differently
        torch.testing.assert_close(peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()(X), model(X))


def test_deleting_the_adapter_gives_the_base_weight_back():
    model = base_model()
    original = model.linear.weight.detach().clone()
    lora.apply(model, r=2, target_modules=["linear"], init="pissa")
    lora.apply(model, adapter_name="other", r=2, target_modules=["conv1d"])
    lora.delete_adapter(model, "default")
    assert isinstance(model.linear, nn.Linear)
    torch.testing.assert_close(model.linear.weight, original)


# --- what PiSSA and OLoRA refuse -------------------------------------------------------------------------------


def _unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_embeddings_convs_quantised_weights_and_too_large_ranks_are_refused_in_one_line(init):
    method = "PiSSA" if init == "pissa" else "OLoRA"
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 4),
            "conv": nn.Conv2d(2, 3, 3),
            "linear": nn.Linear(4, 3),
            "quantised": nn.Linear(4, 3),
        }
    )
    model.quantised.weight = nn.Parameter(torch.ones(3, 4, dtype=torch.int8), requires_grad=False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    for targets, r, message in (
        (
            ["linear", "embed"],
            2,
            f"module 'embed': init='{init}' computes A and B from a linear layer's weight, and this is Embedding",
        ),
        (["conv"], 2, "module 'conv': init=.* and this is Conv2d"),
        (["quantised"], 2, f"module 'quantised': {method} needs a floating-point base weight, not torch.int8"),
        (["linear"], 4, f"rank r=4 does not fit {method} of a 3x4 weight"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            lora.apply(model, r=r, target_modules=targets, init=init)
        assert "\n" not in str(error.value) and _unchanged(model, before)


def test_weight_inits_beside_other_adapters_on_the_same_layers_are_refused_both_ways(tmp_path):
    model = lora.apply(base_model(), r=2, target_modules=["linear"])
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="module 'linear' holds adapter 'default', and init='olora' would turn"):
        lora.apply(model, adapter_name="olora", r=2, target_modules=["linear"], init="olora")
    assert _unchanged(model, before)
    lora.apply(model, adapter_name="pissa", r=2, target_modules=["conv1d"], init="pissa")
    lora.save_adapter(model, tmp_path, adapter_name="pissa", convert_to_lora=False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="module 'conv1d' holds adapter 'pissa', initialised from its weight"):
        lora.apply(model, adapter_name="late", r=2, target_modules=["conv1d"])
    with pytest.raises(ValueError, match="adapter 'again': module 'conv1d' holds adapter 'pissa', initialised"):
        lora.load_adapter(model, tmp_path / "pissa", adapter_name="again")
    assert _unchanged(model, before)


def test_combining_or_hot_swapping_weight_init_adapters_is_refused_in_one_line(tmp_path):
    model = lora.apply(base_model(), r=2, target_modules=["linear"], init="pissa")
    with pytest.raises(ValueError, match="adapter 'default' has init='pissa', so its layers' base weights are"):
        lora.add_weighted_adapter(model, ["default"], [1.0], "mix")
    lora.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="adapter 'default' has init='pissa', which changes the base weight"):
        lora.hotswap_adapter(model, tmp_path, "default")
