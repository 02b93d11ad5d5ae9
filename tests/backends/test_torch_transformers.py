"""Real architectures from tiny transformers configs (nothing downloaded): BERT and GPT-2."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora_spec.torch as lora

SIZES = dict(vocab_size=99, max_position_embeddings=32)


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
        **SIZES,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=99, resid_pdrop=0.1, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(config)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 99, (4, 12), generator=generator)


def loss_of(model, ids):
    if isinstance(model, transformers.GPT2LMHeadModel) or "GPT2" in type(model).__name__:
        return model(input_ids=ids, labels=ids).loss
    return model(input_ids=ids, labels=ids[:, 0] % 3).loss


ARCHITECTURES = {
    "bert": (
        bert,
        dict(r=4, alpha=8, dropout=0.1, modules_to_save=["classifier"]),
        "bert.encoder.layer.0.attention.self.query",
    ),
    "gpt2": (gpt2, dict(r=4, alpha=8, dropout=0.1), "transformer.h.0.attn.c_attn"),
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_changes_only_lora_weights_and_merge_and_unload_keeps_outputs(architecture):
    build, options, adapted_path = ARCHITECTURES[architecture]
    model = lora.apply(build(), **options)
    assert isinstance(model.get_submodule(adapted_path), lora.LoRALinear)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(3):
        optimizer.zero_grad()
        loss = loss_of(model, batch(step))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert all(".lora_" in name or ".modules_to_save." in name for name in changed)

    model.eval()
    ids = batch(10)
    expected = model(input_ids=ids).logits
    plain = lora.merge_and_unload(model)
    assert not any(isinstance(m, (lora.LoRALayer, lora.ModulesToSave)) for m in plain.modules())
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_gpt2_adapter_marks_fan_in_fan_out_and_loads_in_peft(tmp_path):
    model = lora.apply(gpt2(), r=4, target_modules=["c_attn", "c_proj", "wte"]).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.normal_(0, 0.2)
    lora.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(gpt2(), tmp_path).eval()
    ids = batch(1)
    torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits)


def saved_peft_model(base, config, folder):
    """PEFT's model of `base` under `config`, its adapter randomised (so it shows) and saved to `folder`."""
    theirs = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.2)
    theirs.save_pretrained(folder)
    return theirs


def test_peft_gpt2_adapter_loads_and_gives_peft_outputs(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    theirs = saved_peft_model(gpt2(), config, tmp_path)
    ours = lora.load_adapter(gpt2(), tmp_path).eval()
    ids = batch(2)
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


@pytest.mark.parametrize("layers, pattern", [([1], "layer"), (0, None)])
def test_peft_adapter_on_some_layers_loads_into_those_layers_only(tmp_path, layers, pattern):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], layers_to_transform=layers, layers_pattern=pattern
    )
    theirs = saved_peft_model(bert(), config, tmp_path)
    ours = lora.load_adapter(bert(), tmp_path).eval()
    index = layers[0] if isinstance(layers, list) else layers
    assert sorted(name for name, module in ours.named_modules() if isinstance(module, lora.LoRALayer)) == [
        f"bert.encoder.layer.{index}.attention.self.query",
        f"bert.encoder.layer.{index}.attention.self.value",
    ]
    ids = batch(3)
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_apply_on_some_layers_adapts_those_layers_and_peft_reads_the_file(tmp_path):
    model = lora.apply(bert(), target_modules=["query", "value"], layers_to_transform=[1], layers_pattern="layer")
    assert sorted(name for name, module in model.named_modules() if isinstance(module, lora.LoRALayer)) == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    lora.save_adapter(model.eval(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(bert(), tmp_path).eval()
    ids = batch(4)
    torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bert_default_targets_are_query_and_value():
    model = lora.apply(bert())
    adapted = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, lora.LoRALayer)})
    assert adapted == ["query", "value"]


def test_merging_an_adapter_on_a_tied_embedding_keeps_the_outputs_and_survives_saving(tmp_path):
    model = lora.apply(gpt2(), r=4, alpha=8, target_modules=["wte"])
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    ids = batch(5)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    head = model.lm_head.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"'transformer.wte' is tied to 'lm_head'"):
        merged = lora.merge_and_unload(model)
    assert torch.equal(merged.lm_head.weight, head) and not merged.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected)
    merged.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
