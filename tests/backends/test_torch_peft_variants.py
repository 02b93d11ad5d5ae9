"""DoRA, PiSSA and OLoRA against PEFT on what users bring: half-precision bases, a real architecture (Llama from a
tiny config) with rsLoRA, rank and alpha patterns and a module to save, PEFT's own PiSSA/OLoRA inits and converted
files, and the PEFT files lora_spec cannot take, refused for their real cause."""

import copy

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
nn = torch.nn

import lora_spec.torch as lora
from tests.backends.test_torch_dora_peft import IDS, TARGETS, EveryKind, _gradients, _moved

PREFIX = "base_model.model."


def _peft_name(name: str, model: nn.Module) -> str:
    """PEFT's name of one of our adapter tensors (`<layer>.adapters.<adapter>.<tensor>`) in `model`."""
    layer, _, rest = name.partition(".adapters.")
    adapter, _, tensor = rest.partition(".")
    if tensor == "lora_magnitude_vector":
        return f"{layer}.lora_magnitude_vector.{adapter}.weight"
    if isinstance(model.get_submodule(layer), lora.LoRAEmbedding):
        return f"{layer}.lora_embedding_{tensor[-1]}.{adapter}"
    return f"{layer}.{tensor}.{adapter}.weight"


def _state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


# --- DoRA on half-precision bases ------------------------------------------------------------------------------


def half_model(dtype):
    torch.manual_seed(0)
    return EveryKind().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_dora_on_a_half_precision_base_gives_pefts_outputs_gradients_and_merge(tmp_path, dtype):
    """The float32 factors meet the half-precision input (they did not: a DoRA linear or conv raised a dtype
    error in its forward pass); norms and magnitudes stay float32."""
    theirs = _moved(peft.get_peft_model(half_model(dtype), peft.LoraConfig(r=2, target_modules=TARGETS, use_dora=True)))
    theirs.save_pretrained(tmp_path)
    ours = lora.load_adapter(half_model(dtype), tmp_path)
    magnitudes = [p for name, p in ours.named_parameters() if name.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == len(TARGETS) and all(p.dtype == torch.float32 for p in magnitudes)
    tolerance = dict(atol=2e-2, rtol=2e-2)
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        assert ours(IDS).dtype == dtype
        torch.testing.assert_close(ours(IDS).float(), theirs(IDS).float(), **tolerance)
    theirs.train()
    ours.train()
    expected = _gradients(theirs, PREFIX)
    actual = {name: gradient for name, gradient in _gradients(ours).items() if "lora_" in name}
    assert len(actual) == 3 * len(TARGETS)
    for name, gradient in actual.items():
        torch.testing.assert_close(gradient.float(), expected[_peft_name(name, ours)].float(), msg=name, **tolerance)
    ours.eval()
    theirs.eval()
    unmerged, before = ours(IDS), _state(ours)
    lora.merge(ours)
    torch.testing.assert_close(ours(IDS).float(), unmerged.float(), **tolerance)
    torch.testing.assert_close(ours(IDS).float(), copy.deepcopy(theirs).merge_and_unload()(IDS).float(), **tolerance)
    lora.unmerge(ours)
    assert _unchanged(ours, before)


# --- a real architecture ----------------------------------------------------------------------------------------


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=0,
    )
    return transformers.LlamaForSequenceClassification(config)


TOKENS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _logits(model):
    return model(input_ids=TOKENS).logits


def _llama_gradients(model, prefix=""):
    model.zero_grad()
    model(input_ids=TOKENS, labels=TOKENS[:, 0] % 3).loss.backward()
    return {name.removeprefix(prefix): p.grad for name, p in model.named_parameters() if p.grad is not None}


DORA_CONFIGS = {
    "all-linear": dict(target_modules="all-linear"),
    "rslora-patterns": dict(
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"k_proj": 3},
    ),
    "embedding-and-head": dict(target_modules=["embed_tokens", "o_proj"], modules_to_save=["score"]),
}


@pytest.mark.parametrize("config", DORA_CONFIGS.values(), ids=DORA_CONFIGS)
def test_a_peft_dora_adapter_of_llama_gives_pefts_outputs_gradients_and_merged_weights(tmp_path, config):
    theirs = _moved(peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **config)))
    theirs.save_pretrained(tmp_path)
    ours = lora.load_adapter(llama(), tmp_path).eval()
    theirs.eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs))
    ours.train()
    theirs.train()
    expected = _llama_gradients(theirs, PREFIX)
    actual = _llama_gradients(ours)
    assert len(actual) == len(expected)
    for name, gradient in actual.items():
        peft_name = _peft_name(name, ours) if ".adapters." in name else name
        torch.testing.assert_close(gradient, expected[peft_name], msg=name)
    merged = lora.merge_and_unload(ours.eval())
    peft_merged = theirs.eval().merge_and_unload()
    torch.testing.assert_close(merged.state_dict(), peft_merged.state_dict())


def test_our_dora_adapter_of_llama_with_rslora_and_patterns_loads_in_peft_with_equal_outputs(tmp_path):
    config = DORA_CONFIGS["rslora-patterns"]
    ours = _moved(lora.apply(llama(), r=4, alpha=8, use_dora=True, modules_to_save=["score"], **config)).eval()
    lora.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours))


# --- PiSSA and OLoRA ---------------------------------------------------------------------------------------------

INIT_TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_our_pissa_and_olora_inits_are_pefts_factors_residuals_and_magnitudes(init, use_dora):
    """The exact SVD and QR of the same float32 weight: equal up to rounding (pissa_niter_<K> draws its random
    test matrix after PEFT has drawn its layers' default init, so one seed gives the two different matrices)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=INIT_TARGETS, init_lora_weights=init, use_dora=use_dora)
    theirs = peft.get_peft_model(llama(), config)
    ours = lora.apply(llama(), r=4, alpha=8, target_modules=INIT_TARGETS, init=init, use_dora=use_dora)
    peft_tensors = {name.removeprefix(PREFIX): tensor for name, tensor in theirs.state_dict().items()}
    compared = 0
    for name, tensor in ours.state_dict().items():
        if ".adapters." in name and "initial_lora" not in name:
            torch.testing.assert_close(tensor, peft_tensors[_peft_name(name, ours)], atol=1e-5, rtol=1e-4, msg=name)
            compared += 1
        elif name.endswith(".weight") and any(f"{target}.base_layer" in name for target in INIT_TARGETS):
            torch.testing.assert_close(tensor, peft_tensors[name], atol=1e-5, rtol=1e-4, msg=name)  # the residual
            compared += 1
    assert compared == len(INIT_TARGETS) * (4 if use_dora else 3)


def _train(model, steps=2):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=TOKENS, labels=TOKENS[:, 0] % 3).loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pefts_converted_and_unconverted_pissa_and_olora_files_give_its_trained_model_on_the_original_base(
    tmp_path, init
):
    """PEFT's documented flow: the initial adapter saved with init_lora_weights=True, then the trained one
    converted against it (`path_initial_model_for_weight_conversion`), or saved as it is."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=INIT_TARGETS, init_lora_weights=init)
    theirs = peft.get_peft_model(llama(), config)
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = init
    _train(theirs)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    theirs.save_pretrained(tmp_path / "unconverted")
    expected = _logits(theirs)
    for folder in ("converted", "unconverted"):
        torch.testing.assert_close(_logits(lora.load_adapter(llama(), tmp_path / folder).eval()), expected, msg=folder)


# --- PEFT files lora_spec refuses, for their real cause ---------------------------------------------------------


def test_pefts_converted_pissa_dora_file_which_lost_its_magnitudes_is_refused_naming_the_conversion(tmp_path):
    """PEFT's conversion writes use_dora=true and no magnitude at all; loading it in PEFT keeps the initial ones."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa", use_dora=True)
    theirs = peft.get_peft_model(llama(), config)
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    model = llama()
    before = _state(model)
    with pytest.raises(
        ValueError, match=r"without any lora_magnitude_vector: PEFT's save_pretrained\(path_init"
    ) as error:
        lora.load_adapter(model, tmp_path / "converted")
    assert "\n" not in str(error.value) and _unchanged(model, before)


class WithConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.conv = nn.Conv1d(4, 6, 3)

    def forward(self, x):
        return self.conv(self.linear(x).transpose(1, 2))


def test_a_peft_dora_file_of_a_conv1d_is_refused_for_the_layer_lora_spec_cannot_wrap(tmp_path):
    """PEFT's magnitude of a Conv1d is (1, out, 1): the file is consistent, the layer is what lora_spec lacks."""
    torch.manual_seed(0)
    peft.get_peft_model(
        WithConv1d(), peft.LoraConfig(r=2, target_modules=["linear", "conv"], use_dora=True)
    ).save_pretrained(tmp_path)
    model = WithConv1d()
    before = _state(model)
    with pytest.raises(ValueError, match="target module 'conv' is a Conv1d, which LoRA cannot wrap") as error:
        lora.load_adapter(model, tmp_path)
    assert "\n" not in str(error.value) and _unchanged(model, before)


# --- a DoRA adapter beside a LoRA adapter -----------------------------------------------------------------------


def test_a_dora_and_a_lora_adapter_switch_and_disable_as_in_peft_both_ways(tmp_path):
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    theirs.add_adapter("plain", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj"]))
    _moved(theirs).save_pretrained(tmp_path / "peft")
    ours = lora.load_adapter(llama(), tmp_path / "peft").eval()
    lora.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours")
    back.load_adapter(tmp_path / "ours" / "plain", adapter_name="plain")
    theirs.eval()
    back.eval()
    base = _logits(llama())
    for name in ("plain", "default"):
        lora.set_adapter(ours, name)
        theirs.set_adapter(name)
        back.set_adapter(name)
        torch.testing.assert_close(_logits(ours), _logits(theirs), msg=name)
        torch.testing.assert_close(_logits(back), _logits(ours), msg=name)
        with lora.disable_adapters(ours), theirs.disable_adapter():
            torch.testing.assert_close(_logits(ours), base)
            torch.testing.assert_close(_logits(theirs), base)
    lora.merge(ours)
    with lora.disable_adapters(ours):
        torch.testing.assert_close(_logits(ours), base)
    torch.testing.assert_close(_logits(ours), _logits(theirs))


# --- PEFT inits that only pick starting values -------------------------------------------------------------------


@pytest.mark.parametrize("init", [False, "orthogonal"])
def test_a_peft_adapter_whose_init_left_the_base_alone_loads_with_pefts_outputs(tmp_path, init):
    """Our config reads these inits as the default one, whose starting values the file's factors replace (here
    moved as training would)."""
    config = peft.LoraConfig(r=2, target_modules=["linear"], init_lora_weights=init)
    theirs = peft.get_peft_model(half_model(torch.float32), config).eval()
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
    theirs.save_pretrained(tmp_path)
    ours = lora.load_adapter(half_model(torch.float32), tmp_path).eval()
    with theirs.disable_adapter():
        base = theirs(IDS)
    assert not torch.allclose(theirs(IDS), base)
    torch.testing.assert_close(ours(IDS), theirs(IDS))
