"""Several adapters with PEFT, both ways: PEFT's multi-adapter folders, its combinations and mixed batches."""

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
nn = torch.nn

import lora_spec.torch as lora
from tests.backends.test_torch_model import TinyModel
from tests.backends.test_torch_multi_adapter import batch, two_adapters

OTHER = dict(r=4, lora_alpha=3, target_modules=["v_proj", "k_proj", "embed", "conv"])


def base_model():
    torch.manual_seed(0)
    model = TinyModel()
    model.conv = nn.Conv2d(2, 4, 3, padding=1)  # PEFT's grouped-conv adapters have another shape
    return model


@pytest.fixture
def peft_two_adapters(tmp_path):
    """A PEFT model with adapters "default" and "other" (random, non-zero), saved to `tmp_path / "peft"`."""
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(**OTHER))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    theirs.eval().save_pretrained(tmp_path / "peft")
    return theirs, tmp_path / "peft"


def test_peft_folders_with_two_adapters_load_with_their_names_and_give_peft_outputs(peft_two_adapters):
    theirs, folder = peft_two_adapters
    ours = lora.load_adapter(base_model(), folder).eval()
    assert lora.adapter_names(ours) == ["default", "other"]
    for active in (["default"], ["other"], ["default", "other"]):
        theirs.base_model.set_adapter(active)
        lora.set_adapter(ours, active)
        torch.testing.assert_close(ours(*batch()), theirs(*batch()))


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.6, -1.5]])
def test_cat_equals_peft_cat_and_full_rank_svd_equals_cat(peft_two_adapters, weights):
    theirs, folder = peft_two_adapters
    ours = lora.load_adapter(base_model(), folder).eval()
    theirs.add_weighted_adapter(["default", "other"], weights, "mixed", combination_type="cat")
    theirs.set_adapter("mixed")
    lora.add_weighted_adapter(ours, ["default", "other"], weights, "mixed", combination_type="cat")
    lora.add_weighted_adapter(ours, ["default", "other"], weights, "svd", combination_type="svd", svd_rank=6)
    lora.set_adapter(ours, "mixed")
    expected = theirs(*batch())
    torch.testing.assert_close(ours(*batch()), expected)
    lora.set_adapter(ours, "svd")
    torch.testing.assert_close(ours(*batch()), expected, rtol=1e-4, atol=1e-5)


def test_routed_batches_equal_peft_adapter_names(peft_two_adapters):
    theirs, folder = peft_two_adapters
    ours = lora.load_adapter(base_model(), folder).eval()
    routes = ["other", "__base__", "default", "other"]
    with lora.routed(ours, routes):
        actual = ours(*batch())
    torch.testing.assert_close(actual, theirs(*batch(), adapter_names=routes))


def test_our_multi_adapter_folder_loads_in_peft(tmp_path):
    ours = two_adapters(conv_groups=1)  # the same base weights as base_model()
    lora.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base_model(), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    theirs.eval()
    for name in ("default", "other"):
        theirs.set_adapter(name)
        lora.set_adapter(ours, name)
        torch.testing.assert_close(theirs(*batch()), ours(*batch()))
