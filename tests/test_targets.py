"""Target selection shared by the backends: defaults, PEFT's rule, and errors that list the names."""

import pytest

from lora_spec import LoRAConfig
from lora_spec.targets import ModuleInfo, modules_to_save_paths, select_targets

BERT_LIKE = [
    ModuleInfo("", "other", "BertModel"),
    ModuleInfo("embeddings.word_embeddings", "embedding", "Embedding"),
    ModuleInfo("encoder.layer.0.attention.self", "other", "BertSelfAttention"),
    ModuleInfo("encoder.layer.0.attention.self.query", "linear", "Linear"),
    ModuleInfo("encoder.layer.0.attention.self.key", "linear", "Linear"),
    ModuleInfo("encoder.layer.0.attention.self.value", "linear", "Linear"),
    ModuleInfo("encoder.layer.0.output.dense", "linear", "Linear"),
    ModuleInfo("classifier", "linear", "Linear"),
]
MLP = [ModuleInfo(f"layers.{i}", "linear", "Linear") for i in range(4)] + [ModuleInfo("act", "other", "GELU")]


def _paths(matches):
    return [m.path for m in matches]


def test_default_targets_are_the_attention_query_and_value_projections():
    config, matches = select_targets(BERT_LIKE, LoRAConfig())
    assert config.target_modules == ("query", "value")
    assert _paths(matches) == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]


def test_default_without_attention_is_every_linear_but_the_output_head():
    _config, matches = select_targets(MLP, LoRAConfig())
    assert _paths(matches) == ["layers.0", "layers.1", "layers.2"]


def test_all_linear_excludes_the_output_head_like_peft():
    _, matches = select_targets(BERT_LIKE, LoRAConfig(target_modules="all-linear"))
    assert "classifier" not in _paths(matches) and len(matches) == 4


@pytest.mark.parametrize("target_modules, asked", [(None, "the default targets"), ("all-linear", "'all-linear'")])
@pytest.mark.parametrize(
    "modules, why",
    [
        (MLP[:1], "its only linear module, 'layers.0', is taken for the output head"),
        ([ModuleInfo("embed", "embedding", "Embedding")], "no linear"),
    ],
)
def test_default_targets_that_find_nothing_say_why_and_ask_for_target_modules(modules, why, target_modules, asked):
    with pytest.raises(ValueError, match="target_modules=") as error:
        select_targets(modules, LoRAConfig(target_modules=target_modules))
    assert asked in str(error.value) and why in str(error.value) and "\n" not in str(error.value)


def test_regex_targets_can_select_embeddings():
    _, matches = select_targets(BERT_LIKE, LoRAConfig(target_modules=r".*word_embeddings"))
    assert _paths(matches) == ["embeddings.word_embeddings"]


def test_modules_to_save_are_never_adapted():
    _, matches = select_targets(
        BERT_LIKE, LoRAConfig(target_modules=["classifier", "query"], modules_to_save=["classifier"])
    )
    assert _paths(matches) == ["encoder.layer.0.attention.self.query"]


def test_a_target_that_matches_nothing_lists_the_names_that_exist():
    with pytest.raises(
        ValueError,
        match=r"target_modules=\('q_proj',\) matched no module: the model's adaptable "
        r"modules are named classifier, dense, key, query, value, word_embeddings\.",
    ):
        select_targets(BERT_LIKE, LoRAConfig(target_modules=["q_proj"]))


def test_a_target_of_an_unsupported_kind_is_refused_with_its_type():
    with pytest.raises(
        ValueError, match=r"'encoder\.layer\.0\.attention\.self' is a BertSelfAttention, which LoRA cannot wrap"
    ):
        select_targets(BERT_LIKE, LoRAConfig(target_modules=["self"]))


def test_modules_to_save_follow_the_suffix_rule_and_an_unmatched_entry_raises_unless_optional():
    assert modules_to_save_paths(BERT_LIKE, LoRAConfig(modules_to_save=["classifier", "dense"])) == [
        "encoder.layer.0.output.dense",
        "classifier",
    ]
    config = LoRAConfig(modules_to_save=["score"])
    with pytest.raises(ValueError, match=r"modules_to_save entry 'score' matched no module: .* such as classifier"):
        modules_to_save_paths(BERT_LIKE, config)
    assert modules_to_save_paths(BERT_LIKE, config, require=False) == []
