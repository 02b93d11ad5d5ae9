"""`lora_spec.torch` on whole models: apply, freezing, merge, unmerge, merge_and_unload, disable_adapters."""

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import lora_spec.torch as lora
from lora_spec import LoRAConfig


class Attention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        weights = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2), dim=-1)
        return self.o_proj(weights @ self.v_proj(x))


class TinyModel(nn.Module):
    """An embedding, an attention block, a conv on a side input and a classifier head."""

    def __init__(self, vocabulary=11, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.attention = Attention(width)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.classifier = nn.Linear(width, 3)

    def forward(self, ids, image):
        hidden = self.attention(self.embed(ids))
        return self.classifier(hidden).mean(1) + self.conv(image).mean((1, 2, 3))[:, None]


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (2, 5), generator=generator), torch.randn(2, 2, 6, 6, generator=generator)


def adapted(seed=0, **overrides):
    """A TinyModel with LoRA whose B is non-zero, so the adapter changes the outputs."""
    torch.manual_seed(seed)
    model = lora.apply(TinyModel(), **overrides)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, lora.LoRALayer)):
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    return model


def test_apply_wraps_the_targets_in_place_and_freezes_everything_else():
    model = TinyModel()
    returned = lora.apply(model, r=2, target_modules=["q_proj", "v_proj", "embed", "conv"])
    assert returned is model
    assert isinstance(model.attention.q_proj, lora.LoRALinear) and isinstance(model.embed, lora.LoRAEmbedding)
    assert isinstance(model.conv, lora.LoRAConv2d) and isinstance(model.attention.k_proj, nn.Linear)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"{path}.adapters.default.lora_{half}"
        for path in ("attention.q_proj", "attention.v_proj", "embed", "conv")
        for half in "AB"
    )
    assert model.attention.q_proj.lora_A.shape == (2, 8) and model.attention.q_proj.lora_B.shape == (8, 2)
    assert model.conv.lora_A.shape == (2, 1, 3, 3) and model.conv.lora_B.shape == (4, 1, 1, 1)
    assert model.embed.lora_A.shape == (2, 11) and model.embed.lora_B.shape == (8, 2)


def test_apply_starts_from_the_base_model_outputs():
    torch.manual_seed(0)
    model = TinyModel()
    before = model(*inputs())
    lora.apply(model, target_modules=["q_proj", "v_proj", "conv"])
    assert torch.equal(model(*inputs()), before)


def test_applying_twice_does_not_wrap_twice():
    model = lora.apply(TinyModel(), target_modules=["q_proj"])
    lora.apply(model, target_modules=["q_proj"])
    assert isinstance(model.attention.q_proj.base_layer, nn.Linear)


def test_default_targets_are_the_attention_projections():
    model = lora.apply(TinyModel())
    adapted_paths = sorted(name for name, m in model.named_modules() if isinstance(m, lora.LoRALayer))
    assert adapted_paths == ["attention.q_proj", "attention.v_proj"]


def test_default_targets_without_attention_are_every_linear_but_the_head():
    model = lora.apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2)))
    assert [type(m).__name__ for m in model] == ["LoRALinear", "ReLU", "LoRALinear", "Linear"]


def test_alpha_defaults_to_the_given_rank():
    model = lora.apply(TinyModel(), r=4)
    assert model.attention.q_proj.scaling == 1.0


def test_rank_and_alpha_patterns_and_rslora_set_each_layers_scaling():
    model = lora.apply(
        TinyModel(),
        r=4,
        alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"v_proj": 1},
    )
    assert model.attention.q_proj.r == 4 and model.attention.q_proj.scaling == 8 / 2
    assert model.attention.v_proj.r == 2 and model.attention.v_proj.scaling == pytest.approx(1 / 2**0.5)


def test_a_target_that_matches_nothing_lists_the_module_names():
    model = TinyModel()
    with pytest.raises(ValueError, match=r"matched no module.*q_proj") as error:
        lora.apply(model, target_modules=["query"])
    assert "\n" not in str(error.value)
    assert isinstance(model.attention.q_proj, nn.Linear) and all(p.requires_grad for p in model.parameters())


def test_an_unknown_override_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown LoRAConfig field 'rank'"):
        lora.apply(TinyModel(), rank=4)


def test_a_config_that_is_not_a_loraconfig_is_refused():
    with pytest.raises(TypeError, match="LoRAConfig"):
        lora.apply(TinyModel(), {"r": 4})


def test_modules_to_save_train_a_copy_and_keep_the_original_frozen():
    model = lora.apply(TinyModel(), target_modules=["q_proj"], modules_to_save=["classifier"])
    assert isinstance(model.classifier, lora.ModulesToSave)
    assert all(p.requires_grad for p in model.classifier.trained_module.parameters())
    assert not any(p.requires_grad for p in model.classifier.original_module.parameters())


def test_modules_to_save_that_match_nothing_are_refused():
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matched no module"):
        lora.apply(TinyModel(), target_modules=["q_proj"], modules_to_save=["head"])


@pytest.mark.parametrize(
    ("bias", "expected"),
    [
        ("none", []),
        ("lora_only", ["attention.q_proj.base_layer.bias"]),
        (
            "all",
            [
                "attention.k_proj.bias",
                "attention.o_proj.bias",
                "attention.q_proj.base_layer.bias",
                "attention.v_proj.bias",
                "classifier.bias",
                "conv.bias",
            ],
        ),
    ],
)
def test_bias_modes_train_the_biases_they_name(bias, expected):
    model = lora.apply(TinyModel(), target_modules=["q_proj"], bias=bias)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")) == expected


def test_trainable_parameters_count_and_print_like_peft():
    model = lora.apply(TinyModel(), r=2, target_modules=["q_proj"])
    counts = lora.trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    assert counts.trainable == 2 * 8 + 8 * 2 and counts.total == total
    assert str(counts) == f"trainable params: 32 || all params: {total:,} || trainable%: {100 * 32 / total:.4f}"


def test_only_lora_parameters_receive_gradients():
    model = adapted(target_modules=["q_proj", "v_proj", "embed", "conv"], dropout=0.1)
    model(*inputs()).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in with_grad)


def test_merge_keeps_outputs_and_unmerge_restores_every_base_weight_bit_for_bit():
    model = adapted(target_modules=["q_proj", "v_proj", "embed", "conv"]).eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = model(*inputs())
    lora.merge(model)
    torch.testing.assert_close(model(*inputs()), before, rtol=1e-5, atol=1e-5)
    lora.merge(model)
    lora.unmerge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(model(*inputs()), before)


@pytest.mark.parametrize("merge", [lora.merge, lora.merge_and_unload], ids=["merge", "merge_and_unload"])
@pytest.mark.parametrize("bad_value", [float("inf"), float("nan")])
def test_merging_refuses_nan_or_inf_and_leaves_every_layer_as_it_was(merge, bad_value):
    model = adapted(target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        model.attention.v_proj.lora_B[0, 0] = bad_value
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"module 'attention.v_proj'.*NaN or inf"):
        merge(model)
    assert isinstance(model.attention.q_proj, lora.LoRALinear) and not model.attention.q_proj.merged
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, weights[name], rtol=0, atol=0, equal_nan=True)


def test_merge_and_unload_gives_plain_layers_and_the_same_outputs():
    model = adapted(target_modules=["q_proj", "v_proj", "embed", "conv"], modules_to_save=["classifier"]).eval()
    with torch.no_grad():
        model.classifier.trained_module.weight.add_(1.0)
    before = model(*inputs())
    plain = lora.merge_and_unload(model)
    assert plain is model
    assert not any(isinstance(m, (lora.LoRALayer, lora.ModulesToSave)) for m in plain.modules())
    assert type(plain.attention.q_proj) is nn.Linear and type(plain.embed) is nn.Embedding
    assert not hasattr(plain, "lora_configs")
    torch.testing.assert_close(plain(*inputs()), before, rtol=1e-5, atol=1e-5)


def test_disable_adapters_runs_the_base_model_and_restores_the_adapter():
    torch.manual_seed(0)
    base_outputs = TinyModel().eval()(*inputs())
    model = adapted(target_modules=["q_proj", "embed", "conv"], modules_to_save=["classifier"]).eval()
    with torch.no_grad():
        model.classifier.trained_module.weight.add_(1.0)
    adapted_outputs = model(*inputs())
    assert not torch.allclose(adapted_outputs, base_outputs)
    for merged in (False, True):
        if merged:
            lora.merge(model)
        with lora.disable_adapters(model):
            torch.testing.assert_close(model(*inputs()), base_outputs)
        torch.testing.assert_close(model(*inputs()), adapted_outputs, rtol=1e-5, atol=1e-5)
    assert model.attention.q_proj.merged


def test_eval_does_not_merge():
    model = adapted(target_modules=["q_proj"]).eval()
    assert not model.attention.q_proj.merged


def test_merge_on_a_model_without_lora_says_to_apply_first():
    with pytest.raises(ValueError, match="apply"):
        lora.merge(TinyModel())


@pytest.mark.parametrize("config", [LoRAConfig(r=2, target_modules=["q_proj"]), None])
def test_apply_takes_a_config_or_keywords(config):
    model = lora.apply(TinyModel(), config) if config else lora.apply(TinyModel(), r=2, target_modules=["q_proj"])
    assert model.lora_configs["default"].r == 2 and model.lora_configs["default"].target_modules == ("q_proj",)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_train_float32_adapters(dtype):
    torch.manual_seed(0)
    model = lora.apply(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)).to(dtype), r=2).train()
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    out = model(torch.randn(4, 8, dtype=dtype))
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    assert layer.lora_A.grad.abs().sum() > 0


def test_a_rank_a_grouped_conv_cannot_take_is_refused_before_any_module_is_wrapped():
    model = TinyModel()
    with pytest.raises(ValueError, match=r"module 'conv': rank 3 is not a multiple of the conv's groups=2"):
        lora.apply(model, r=3, target_modules=["q_proj", "conv"])
    assert type(model.attention.q_proj) is nn.Linear and not hasattr(model, "lora_configs")


def test_multihead_attention_projections_are_never_wrapped():
    # nn.MultiheadAttention reads out_proj.weight itself, so a LoRA wrapper there would do nothing.
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 8), nn.Linear(8, 2))
    lora.apply(model)
    assert type(model[1].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model[0], lora.LoRALinear) and isinstance(model[2], lora.LoRALinear)
    with pytest.raises(ValueError, match=r"'0\.out_proj' is a NonDynamicallyQuantizableLinear, which LoRA cannot wrap"):
        lora.apply(nn.Sequential(nn.MultiheadAttention(8, 2)), target_modules=["out_proj"])
