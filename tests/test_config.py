"""LoRAConfig: validation, PEFT's matching and pattern rules, and adapter_config.json round trips."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec import LoRAConfig, matches_module
from lora_spec.config import resolve_config


def test_alpha_defaults_to_r_so_scaling_is_one():
    assert LoRAConfig(r=16).alpha == 16 and LoRAConfig(r=16).scaling == 1.0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("r", 0, "r=0 is invalid: use an integer >= 1."),
        ("r", 2.5, "r=2.5 is invalid: use an integer >= 1."),
        ("r", True, "r=True is invalid"),
        ("alpha", -1.0, "alpha=-1.0 is invalid: use a finite number > 0."),
        ("alpha", math.inf, "alpha=inf is invalid"),
        ("dropout", 1.0, "dropout=1.0 is invalid: use a probability in [0, 1)."),
        ("dropout", -0.1, "dropout=-0.1 is invalid"),
        ("use_rslora", "yes", "use_rslora='yes' is invalid: use True or False."),
        (
            "init",
            "pissa_niter_two",
            "init='pissa_niter_two' is invalid: use one of 'kaiming', 'gaussian', 'pissa', "
            "'pissa_niter_<K>', 'olora' (K an integer >= 0).",
        ),
        ("init", "pissa_niter_<K>", "init='pissa_niter_<K>' is invalid"),
        ("use_dora", 1, "use_dora=1 is invalid: use True or False."),
        ("bias", "some", "bias='some' is invalid: use one of 'none', 'all', 'lora_only'."),
        ("target_modules", [], "target_modules=[] is invalid"),
        ("target_modules", "(unclosed", "target_modules '(unclosed' is not a valid regular expression"),
        ("layers_to_transform", -1, "layers_to_transform=-1 is invalid: use a layer index or a list of them"),
        ("layers_to_transform", [0, "1"], "layers_to_transform=[0, '1'] is invalid"),
        ("layers_pattern", "layers", "layers_pattern is set without layers_to_transform"),
        ("modules_to_save", [1], "modules_to_save=[1] is invalid: use a list of module names."),
        ("rank_pattern", {"q": 0}, "rank_pattern['q']=0 is invalid: use an integer >= 1."),
        ("alpha_pattern", {"q": "x"}, "alpha_pattern['q']='x' is invalid"),
        ("rank_pattern", ["q"], "rank_pattern=['q'] is invalid: use a dict"),
    ],
)
def test_bad_values_raise_one_line_value_error_naming_field_and_fix(field, value, message):
    with pytest.raises(ValueError) as error:
        LoRAConfig(**{field: value})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_replace_refuses_unknown_fields_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown LoRAConfig field 'rank': use one of r, alpha"):
        LoRAConfig().replace(rank=4)


@pytest.mark.parametrize(
    "path, names, expected",
    [
        ("encoder.layer.0.attention.self.query", ["query"], True),
        ("query", ["query"], True),
        ("encoder.layer.0.attention.self.query_proj", ["query"], False),
        ("model.subquery", ["query"], False),
        ("encoder.layer.0.attention.self.query", ["self.query"], True),
        ("encoder.layer.0.attention.self.query", r".*\.(query|value)", True),
        ("encoder.layer.0.attention.self.key", r".*\.(query|value)", False),
        ("encoder.layer.0.attention.self.query", "query", False),  # a string must match the whole path
    ],
)
def test_target_matching_follows_peft(path, names, expected):
    assert matches_module(path, names) is expected


def test_rank_and_alpha_patterns_override_per_module_and_set_its_scaling():
    config = LoRAConfig(r=8, alpha=16, rank_pattern={"query": 4, r"layer\.1\..*value": 2}, alpha_pattern={"value": 4})
    assert (config.rank_for("a.layer.0.query"), config.alpha_for("a.layer.0.query")) == (4, 16)
    assert (config.rank_for("a.layer.1.x.value"), config.alpha_for("a.layer.1.x.value")) == (2, 4)
    assert (config.rank_for("a.layer.0.value"), config.alpha_for("a.layer.0.value")) == (8, 4)
    assert config.scaling_for("a.layer.0.query") == 4.0
    assert config.scaling_for("a.layer.0.dense") == 2.0
    assert LoRAConfig(r=4, alpha=8, use_rslora=True, rank_pattern={"q": 16}).scaling_for("m.q") == 2.0


def test_is_target_honours_exclusions_and_keeps_adapters_out_of_modules_to_save():
    config = LoRAConfig(
        target_modules=["dense", "query"], exclude_modules=["output.dense"], modules_to_save=["classifier"]
    )
    assert config.is_target("encoder.attention.dense")
    assert not config.is_target("encoder.output.dense")
    assert not config.is_target("classifier.dense")
    assert config.is_module_to_save("model.classifier")


@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter_4", "olora"])
def test_round_trip_through_our_peft_dict_keeps_every_field(init):
    config = LoRAConfig(
        r=4,
        alpha=12.0,
        dropout=0.1,
        use_rslora=True,
        init=init,
        use_dora=True,
        bias="lora_only",
        target_modules=("q", "v"),
        modules_to_save=("classifier",),
        rank_pattern={"q": 2},
        alpha_pattern={"v": 3.0},
        layers_to_transform=(0, 3),
        layers_pattern=("h", "layers"),
    )
    written = json.loads(json.dumps(config.to_peft_dict()))
    assert written["init_lora_weights"] == init and written["use_dora"] is True
    assert LoRAConfig.from_peft_dict(written) == config


def test_peft_dict_writes_the_resolved_target_list():
    written = LoRAConfig(target_modules=r".*\.q").to_peft_dict(target_modules=["q"])
    assert written["target_modules"] == ["q"] and written["peft_type"] == "LORA"
    assert written["init_lora_weights"] is True and written["lora_alpha"] == 8


@pytest.mark.parametrize(
    "field, value",
    [
        ("init_lora_weights", "corda"),
        ("init_lora_weights", "pissa_niter_"),
        ("init_lora_weights", "PiSSA"),
        ("lora_bias", True),
        ("layer_replication", [[0, 2]]),
        ("peft_type", "IA3"),
        ("some_future_field", {"enabled": True}),
    ],
)
def test_unsupported_peft_features_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        LoRAConfig.from_peft_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, field: value})


def test_lora_bias_with_dora_is_refused_as_peft_refuses_it():
    with pytest.raises(ValueError, match="lora_bias=true with use_dora=true, which PEFT refuses too"):
        LoRAConfig.from_peft_dict({"r": 4, "use_dora": True, "lora_bias": True})


@pytest.mark.parametrize("value", [False, "eva", "orthogonal"])
def test_peft_inits_that_leave_the_base_weight_alone_load_as_the_default(value):
    """A file's weights replace whatever these inits started from, and none of them changed the base weight."""
    assert LoRAConfig.from_peft_dict({"r": 4, "init_lora_weights": value}).init == "kaiming"


def test_olora_is_read_in_any_case_as_peft_matches_it():
    assert LoRAConfig.from_peft_dict({"init_lora_weights": "OLoRA"}).init == "olora"


@pytest.mark.parametrize(
    "options",
    [dict(use_dora=True), dict(init_lora_weights="pissa_niter_4"), dict(init_lora_weights="olora", use_dora=True)],
)
def test_dora_and_weight_inits_written_by_peft_read_back(tmp_path, options):
    peft = pytest.importorskip("peft")
    peft.LoraConfig(r=4, target_modules=["q"], **options).save_pretrained(tmp_path)
    config = LoRAConfig.from_peft_dict(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert config.use_dora is options.get("use_dora", False)
    assert config.init == options.get("init_lora_weights", "kaiming")


@pytest.mark.parametrize(
    "config", [LoRAConfig(use_dora=True), LoRAConfig(init="pissa_niter_2"), LoRAConfig(init="olora", use_dora=True)]
)
def test_dora_and_weight_inits_resolve_unchanged_now_that_both_backends_implement_them(config):
    assert resolve_config(config, {}) == config
    assert resolve_config(None, {"use_dora": config.use_dora, "init": config.init}) == config


def test_config_written_by_peft_itself_reads_back_with_the_same_math(tmp_path):
    peft = pytest.importorskip("peft")
    peft.LoraConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["query", "value"],
        use_rslora=True,
        init_lora_weights="gaussian",
        modules_to_save=["classifier"],
        rank_pattern={"value": 2},
        alpha_pattern={"query": 8},
        bias="all",
    ).save_pretrained(tmp_path)
    config = LoRAConfig.from_peft_dict(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert (config.r, config.alpha, config.dropout, config.use_rslora, config.init, config.bias) == (
        4,
        16,
        0.05,
        True,
        "gaussian",
        "all",
    )
    assert set(config.target_modules) == {"query", "value"} and config.modules_to_save == ("classifier",)
    assert config.scaling_for("encoder.value") == 16 / math.sqrt(2)
    assert config.scaling_for("encoder.query") == 8 / 2


def test_peft_reads_our_config_with_the_same_values(tmp_path):
    peft = pytest.importorskip("peft")
    config = LoRAConfig(r=4, alpha=6.0, dropout=0.1, target_modules=("q", "v"), rank_pattern={"v": 2})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config.to_peft_dict()))
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert (theirs.r, theirs.lora_alpha, theirs.lora_dropout, set(theirs.target_modules), theirs.rank_pattern) == (
        4,
        6.0,
        0.1,
        {"q", "v"},
        {"v": 2},
    )


@given(st.sampled_from(["q", "v", "k"]), st.sampled_from(["", "model.", "model.layers.3.attn."]))
def test_our_rank_pattern_lookup_agrees_with_peft(leaf, prefix):
    other = pytest.importorskip("peft.utils.other")
    patterns = {"q": 2, r"layers\.3\.attn\.v": 3}
    config = LoRAConfig(r=8, rank_pattern=patterns)
    key = other.get_pattern_key(list(patterns), prefix + leaf)
    assert config.rank_for(prefix + leaf) == patterns.get(key, 8)


def test_resolve_config_applies_overrides_and_defaults_alpha_to_the_given_r():
    assert resolve_config(None, {"r": 4}) == LoRAConfig(r=4, alpha=4)
    assert resolve_config(LoRAConfig(r=2, alpha=8), {"dropout": 0.1}) == LoRAConfig(r=2, alpha=8, dropout=0.1)
    with pytest.raises(ValueError, match="unknown LoRAConfig field 'rank': use one of r, alpha"):
        resolve_config(None, {"rank": 4})
    with pytest.raises(TypeError, match=r"config must be a lora_spec\.LoRAConfig, not dict"):
        resolve_config({"r": 4}, {})


def test_replacing_r_moves_a_defaulted_alpha_but_keeps_an_explicit_one():
    assert LoRAConfig().replace(r=2).alpha == 2
    assert LoRAConfig(alpha=8).replace(r=2).alpha == 8
    assert LoRAConfig().replace(r=2).replace(r=4).scaling == 1.0


def test_layer_indices_need_a_list_of_target_names():
    for target in (r".*\.q", "all-linear"):
        with pytest.raises(ValueError, match="cannot be used when target_modules is a string"):
            LoRAConfig(target_modules=target, layers_to_transform=1)


@given(
    st.sampled_from(["q", "mlp.fc", "attn.q"]),
    st.sampled_from(
        [
            "",
            "model.",
            "model.layers.2.",
            "model.h.1.",
            "encoder.layer.0.attn.",
            "layers.3.",
            "model.layers.1.experts.0.",
            "transformer.h.10.block.",
            "model.h.1.mlp.h.0.",
        ]
    ),
    st.one_of(st.integers(0, 3), st.lists(st.integers(0, 3), max_size=3)),
    st.sampled_from([None, "layers", "h", ["h", "layers"], "lay.rs"]),
    st.sampled_from([["q"], ["fc", "q"], ["model.layers.2.q"]]),
)
def test_layer_index_filter_agrees_with_peft(leaf, prefix, layers, pattern, targets):
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    path = prefix + leaf
    theirs = peft.LoraConfig(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    ours = LoRAConfig(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    assert ours.is_target(path) == bool(check_target_module_exists(theirs, path)), (path, layers, pattern, targets)


@pytest.mark.parametrize(
    "path, pattern, expected",
    [
        ("model.layers.1.experts.0.q", None, 1),  # the first numbered segment, not a nested expert's
        ("model.h.1.mlp.h.0.q", "h", 1),
        ("layers.3.q", "layers", 3),  # the pattern may start the path
        ("model.blocks.2.q", "layers", None),
        ("q", None, None),
    ],
)
def test_layer_index_is_the_first_number_after_the_pattern(path, pattern, expected):
    from lora_spec.config import layer_index

    assert layer_index(path, pattern) == expected
