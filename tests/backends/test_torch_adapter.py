"""Adapter files: our round trip, PEFT reading ours, ours reading PEFT's, and refusals."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
nn = torch.nn

import lora_spec.torch as lora
from lora_spec import safetensors_io
from tests.backends.test_torch_model import TinyModel, adapted, inputs

ALL_KINDS = ["q_proj", "v_proj", "embed", "conv"]


def fresh_base(seed=0):
    torch.manual_seed(seed)
    return TinyModel().eval()


def randomise(model, names=("lora_",), seed=1):
    """Non-zero adapter weights (and saved modules), so that every tensor shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and any(part in name for part in names):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def peft_model(base, **config):
    config.setdefault("init_lora_weights", True)
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    return randomise(model, names=("lora_", "modules_to_save", "bias")).eval()


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_save_then_load_reproduces_the_adapted_model(tmp_path, bias):
    model = randomise(
        adapted(target_modules=ALL_KINDS, modules_to_save=["classifier"], bias=bias),
        names=("lora_", "trained_module", "bias"),
    ).eval()
    lora.save_adapter(model, tmp_path)
    loaded = lora.load_adapter(fresh_base(), tmp_path).eval()
    torch.testing.assert_close(loaded(*inputs()), model(*inputs()))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_saved_keys_and_config_follow_peft(tmp_path):
    lora.save_adapter(adapted(target_modules=["q_proj", "embed"], modules_to_save=["classifier"], r=2), tmp_path)
    tensors, _ = safetensors_io.load(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == [
        "base_model.model.attention.q_proj.lora_A.weight",
        "base_model.model.attention.q_proj.lora_B.weight",
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
        "base_model.model.embed.lora_embedding_A",
        "base_model.model.embed.lora_embedding_B",
    ]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["fan_in_fan_out"] is False
    assert sorted(config["target_modules"]) == ["attention.q_proj", "embed"]
    assert config["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(use_rslora=True, alpha=6, rank_pattern={"v_proj": 2}, alpha_pattern={"embed": 3}),
        dict(modules_to_save=["classifier"], bias="all"),
    ],
    ids=["plain", "patterns-rslora", "modules-to-save-bias"],
)
def test_peft_loads_our_adapter_and_gives_the_same_outputs(tmp_path, options):
    # groups=1 convs: PEFT's grouped-conv adapters have another shape (see the reference).
    model = fresh_base()
    model.conv = nn.Conv2d(2, 4, 3, padding=1)
    lora.apply(model, r=4, target_modules=ALL_KINDS, **options)
    randomise(model, names=("lora_", "trained_module", "bias")).eval()
    lora.save_adapter(model, tmp_path)
    base = fresh_base()
    base.conv = model.conv.base_layer
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(theirs(*inputs()), model(*inputs()))


@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=["embed", "conv", "k_proj"], lora_dropout=0.1),
        dict(
            target_modules=["q_proj", "v_proj"],
            use_rslora=True,
            lora_alpha=5,
            rank_pattern={"q_proj": 2},
            alpha_pattern={"v_proj": 7},
        ),
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], bias="all"),
        dict(target_modules=["q_proj", "v_proj"], bias="lora_only"),
        dict(target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"),
        dict(target_modules=".*attention\\.(q|v)_proj"),
    ],
    ids=[
        "linear",
        "embedding-conv",
        "patterns-rslora",
        "modules-to-save",
        "bias-all",
        "bias-lora-only",
        "gaussian",
        "regex",
    ],
)
def test_peft_adapters_load_and_give_peft_outputs(tmp_path, options):
    def base():
        model = fresh_base()
        model.conv = nn.Conv2d(2, 4, 3, padding=1)
        return model

    theirs = peft_model(base(), r=4, **options)
    theirs.save_pretrained(tmp_path)
    ours = lora.load_adapter(base(), tmp_path).eval()
    torch.testing.assert_close(ours(*inputs()), theirs(*inputs()))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}, type(model.attention.q_proj)


def _tamper(path, changes):
    """Replace (or, for None, delete) tensors of a saved adapter."""
    tensors, metadata = safetensors_io.load(path / "adapter_model.safetensors")
    for key, value in changes.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    safetensors_io.save(path / "adapter_model.safetensors", tensors, metadata)


PREFIX = "base_model.model."


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"attention.v_proj.lora_B.weight": np.zeros((8, 3), np.float32)},
            r"attention\.v_proj\.lora_B\.weight has shape \(8, 3\), but this model needs \(8, 4\)",
        ),
        (
            {"attention.k_proj.lora_A.weight": None, "attention.k_proj.lora_B.weight": None},
            r"adapter has no base_model\.model\.attention\.k_proj\.lora_A\.weight",
        ),
        (
            {
                "attention.zz_proj.lora_A.weight": np.zeros((4, 8), np.float32),
                "attention.zz_proj.lora_B.weight": np.zeros((8, 4), np.float32),
            },
            r"zz_proj\.lora_A\.weight names no LoRA target",
        ),
        ({"classifier.gamma": np.zeros(3, np.float32)}, r"classifier\.gamma names no parameter"),
        ({"classifier.weight": np.zeros((3, 9), np.float32)}, r"classifier\.weight has shape \(3, 9\)"),
    ],
    ids=["shape", "missing", "unknown-module", "unknown-extra", "extra-shape"],
)
@pytest.mark.parametrize("already_applied", [False, True], ids=["plain-model", "lora-model"])
def test_a_mismatched_adapter_names_the_first_offending_key_and_leaves_the_model_unchanged(
    tmp_path, changes, message, already_applied
):
    options = dict(r=4, target_modules=["q_proj", "k_proj", "v_proj"], modules_to_save=["classifier"])
    lora.save_adapter(adapted(**options), tmp_path)
    _tamper(tmp_path, {PREFIX + key: value for key, value in changes.items()})
    model = adapted(seed=3, **options) if already_applied else fresh_base()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    before_type = type(model.attention.q_proj)
    with pytest.raises(ValueError, match=message) as error:
        lora.load_adapter(model, tmp_path)
    assert "\n" not in str(error.value)
    after = model.state_dict()
    assert type(model.attention.q_proj) is before_type and before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_an_unsupported_peft_field_is_refused_by_name(tmp_path):
    lora.save_adapter(adapted(target_modules=["q_proj"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"layer_replication": [[0, 1]]}))
    with pytest.raises(ValueError, match=r"layer_replication=.* is not supported"):
        lora.load_adapter(fresh_base(), tmp_path)


def test_a_pickled_adapter_is_never_loaded(tmp_path):
    lora.save_adapter(adapted(target_modules=["q_proj"]), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        lora.load_adapter(fresh_base(), tmp_path)


def test_loading_into_a_merged_model_is_refused(tmp_path):
    model = adapted(target_modules=["q_proj"])
    lora.save_adapter(model, tmp_path)
    lora.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        lora.load_adapter(model, tmp_path)


def test_save_adapter_on_a_model_without_lora_says_to_apply_first(tmp_path):
    with pytest.raises(ValueError, match="apply"):
        lora.save_adapter(fresh_base(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_loading_into_a_lora_model_takes_the_files_scaling_and_saves_it_again(tmp_path):
    source = randomise(adapted(r=4, alpha=12, target_modules=["q_proj", "v_proj"])).eval()
    lora.save_adapter(source, tmp_path / "source")
    other_adapter = randomise(adapted(r=4, alpha=4, target_modules=["q_proj", "v_proj"]), seed=9)
    model = lora.load_adapter(other_adapter, tmp_path / "source")
    assert model.attention.q_proj.scaling == 3.0 and model.lora_configs["default"].alpha == 12
    torch.testing.assert_close(model.eval()(*inputs()), source(*inputs()))
    lora.save_adapter(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["lora_alpha"] == 12


def test_a_peft_adapter_of_a_grouped_conv_gives_a_shape_error_naming_its_key(tmp_path):
    # PEFT's grouped-conv A spans all input channels; ours is grouped like the base, so it merges exactly.
    theirs = peft.get_peft_model(fresh_base(), peft.LoraConfig(r=4, target_modules=["conv"]))
    theirs.save_pretrained(tmp_path)
    model = fresh_base()
    with pytest.raises(ValueError, match=r"base_model\.model\.conv\.lora_(A|B)\.weight has shape"):
        lora.load_adapter(model, tmp_path)
    assert type(model.conv) is nn.Conv2d


@pytest.mark.parametrize("wrapper", [nn.DataParallel, torch.compile], ids=["DataParallel", "torch.compile"])
def test_a_wrapped_model_saves_merges_and_loads_under_its_own_module_paths(tmp_path, wrapper):
    options = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    model = randomise(adapted(**options)).eval()
    expected = model(*inputs())
    wrapped = wrapper(model)
    lora.save_adapter(wrapped, tmp_path / "wrapped")
    lora.save_adapter(model, tmp_path / "bare")
    assert (tmp_path / "wrapped" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "bare" / "adapter_model.safetensors"
    ).read_bytes()
    assert lora.merge(wrapped) is wrapped
    assert all(layer.merged for layer in model.modules() if isinstance(layer, lora.LoRALayer))
    torch.testing.assert_close(model(*inputs()), expected)
    lora.unmerge(wrapped)

    other = adapted(**options)
    assert lora.load_adapter(wrapper(other), tmp_path / "wrapped") is not None
    torch.testing.assert_close(other.eval()(*inputs()), expected)
    with pytest.raises(ValueError, match=r"apply LoRA to the model before wrapping it \("):
        lora.apply(wrapper(fresh_base()), target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"load an adapter into the model before wrapping it"):
        lora.load_adapter(wrapper(fresh_base()), tmp_path / "bare")
