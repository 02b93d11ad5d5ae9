"""DoRA with PEFT, both ways: PEFT's DoRA files give PEFT's outputs and gradients here, ours load in PEFT, and
several active adapters run and merge as in PEFT."""

import copy

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
nn = torch.nn

import lora_spec.torch as lora

TARGETS = ["embed", "linear", "conv1d", "conv"]


class EveryKind(nn.Module):
    """An embedding, a linear layer, GPT-2's Conv1D and a conv: every layer DoRA covers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.linear = nn.Linear(6, 5)
        self.conv1d = pytorch_utils.Conv1D(4, 5)
        self.conv = nn.Conv2d(4, 3, 2)

    def forward(self, ids):
        hidden = self.conv1d(self.linear(self.embed(ids)))
        return self.conv(hidden.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 3))


def base_model():
    torch.manual_seed(0)
    return EveryKind().double()


IDS = torch.tensor([[1, 4, 9, 0, 3], [7, 7, 2, 5, 8]])


def _moved(model, seed=1):
    """`model` with its adapter tensors moved off their initial values, so every term of DoRA shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)
    return model


def _gradients(model, prefix=""):
    model.zero_grad()
    model(IDS).square().sum().backward()
    return {
        name.removeprefix(prefix): parameter.grad
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }


def _peft_name(name: str) -> str:
    """PEFT's parameter name for one of ours."""
    layer, _, rest = name.partition(".adapters.")
    adapter, _, tensor = rest.partition(".")
    if tensor == "lora_magnitude_vector":
        return f"{layer}.lora_magnitude_vector.{adapter}.weight"
    if layer == "embed":
        return f"{layer}.lora_embedding_{tensor[-1]}.{adapter}"
    return f"{layer}.{tensor}.{adapter}.weight"


@pytest.fixture
def peft_dora(tmp_path):
    theirs = _moved(
        peft.get_peft_model(base_model(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True))
    )
    theirs.save_pretrained(tmp_path)
    return theirs, tmp_path


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_peft_dora_adapter_gives_pefts_outputs_and_gradients(peft_dora, mode):
    theirs, folder = peft_dora
    ours = lora.load_adapter(base_model(), folder).train(mode == "train")
    theirs.train(mode == "train")
    torch.testing.assert_close(ours(IDS), theirs(IDS))
    expected = _gradients(theirs, "base_model.model.")
    actual = _gradients(ours)
    assert len(actual) == 3 * len(TARGETS)
    for name, gradient in actual.items():
        torch.testing.assert_close(gradient, expected[_peft_name(name)], msg=name)


def test_our_dora_adapter_loads_in_peft_with_equal_outputs(tmp_path):
    ours = _moved(lora.apply(base_model(), r=2, alpha=3, target_modules=TARGETS, use_dora=True)).eval()
    lora.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()
    torch.testing.assert_close(theirs(IDS), ours(IDS))


@pytest.mark.parametrize(
    "kinds", [(True, True), (False, True), (True, False)], ids=["dora-dora", "lora-dora", "dora-lora"]
)
def test_two_active_adapters_run_and_merge_as_in_peft(tmp_path, kinds):
    """PEFT runs them in order: a DoRA adapter rescales the output of the ones before it (without dropout)."""
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(r=2, target_modules=TARGETS, use_dora=kinds[0]))
    theirs.add_adapter(
        "other", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["linear", "conv"], use_dora=kinds[1])
    )
    _moved(theirs).save_pretrained(tmp_path)
    ours = lora.load_adapter(base_model(), tmp_path)
    theirs.base_model.set_adapter(["default", "other"])
    lora.set_adapter(ours, ["default", "other"])
    for mode in (True, False):
        theirs.train(mode)
        ours.train(mode)
        torch.testing.assert_close(ours(IDS), theirs(IDS))
    expected = _gradients(theirs, "base_model.model.")
    for name, gradient in _gradients(ours).items():
        torch.testing.assert_close(gradient, expected[_peft_name(name)], msg=name)
    lora.merge(ours)
    theirs.base_model.merge_adapter(["default", "other"])
    torch.testing.assert_close(ours(IDS), theirs(IDS))
    torch.testing.assert_close(ours(IDS), copy.deepcopy(theirs).merge_and_unload()(IDS))
