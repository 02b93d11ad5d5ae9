"""Which modules an adapter wraps: PEFT's matching rule and our default, shared by the backends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from lora_spec.config import LoRAConfig

ADAPTABLE_KINDS = ("linear", "embedding", "conv2d")

# Attention projections the LoRA paper adapts (query and value), under the names of common
# architectures: Llama/OPT, BERT, GPT-2 (fused qkv), T5, DistilBERT, Falcon/Bloom, MPT, Phi.
ATTENTION_TARGETS = (
    "q_proj",
    "v_proj",
    "query",
    "value",
    "c_attn",
    "q",
    "v",
    "q_lin",
    "v_lin",
    "query_key_value",
    "Wqkv",
    "qkv_proj",
)
ALL_LINEAR = "all-linear"


class ModuleInfo(NamedTuple):
    """One module of a model, as a backend describes it: path, kind and class name."""

    path: str
    kind: str  # one of ADAPTABLE_KINDS, or "other"
    type_name: str


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def default_targets(modules: Sequence[ModuleInfo]) -> tuple[str, ...]:
    """The attention projections if the model has recognisable ones, else every linear but the head.

    The output head is the last linear module in definition order: adapting it would let the
    adapter re-learn the classifier that `modules_to_save` usually covers.
    """
    attention = sorted({_leaf(m.path) for m in modules if m.kind == "linear"} & set(ATTENTION_TARGETS))
    if attention:
        return tuple(attention)
    return _linears_but_the_head(modules)


def _linears_but_the_head(modules: Sequence[ModuleInfo]) -> tuple[str, ...]:
    return tuple(m.path for m in modules if m.kind == "linear")[:-1]


def select_targets(modules: Sequence[ModuleInfo], config: LoRAConfig) -> tuple[LoRAConfig, list[ModuleInfo]]:
    """Resolve the config's targets against `modules` and return `(resolved config, matches)`.

    `target_modules=None` (or PEFT's "all-linear") becomes an explicit list. A target that
    matches nothing, or matches a module of a kind we cannot adapt, raises `ValueError`.
    """
    if config.target_modules is None or config.target_modules == ALL_LINEAR:
        found = default_targets(modules) if config.target_modules is None else _linears_but_the_head(modules)
        if not found:
            asked = "the default targets" if config.target_modules is None else f"target_modules={ALL_LINEAR!r}"
            linear = [m.path for m in modules if m.kind == "linear"]
            why = f"its only linear module, {linear[0]!r}, is taken for the output head" if linear else "no linear"
            raise ValueError(f"{asked} found no module to adapt ({why}): name them with target_modules=[...].")
        config = config.replace(target_modules=found)
    matches = [m for m in modules if m.path and config.is_target(m.path)]
    unsupported = [m for m in matches if m.kind not in ADAPTABLE_KINDS]
    if unsupported:
        bad = unsupported[0]
        raise ValueError(
            f"target module {bad.path!r} is a {bad.type_name}, which LoRA cannot wrap: target its "
            f"linear, embedding or conv2d children instead."
        )
    if not matches:
        names = sorted({_leaf(m.path) for m in modules if m.kind in ADAPTABLE_KINDS})
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module: the model's adaptable "
            f"modules are named {', '.join(names) or '(none)'}."
        )
    return config, matches


def modules_to_save_paths(modules: Sequence[ModuleInfo], config: LoRAConfig, require: bool = True) -> list[str]:
    """The paths of the modules `config.modules_to_save` names.

    An entry that matches nothing raises `ValueError`, unless `require` is False (PEFT's files
    list task heads such as "classifier" and "score" whether or not the model has them).
    """
    paths = [m.path for m in modules if m.path and config.is_module_to_save(m.path)]
    for name in (config.modules_to_save or ()) if require else ():
        if not any(path == name or path.endswith("." + name) for path in paths):
            names = ", ".join(sorted({_leaf(m.path) for m in modules if m.path})[:8])
            raise ValueError(
                f"modules_to_save entry {name!r} matched no module: use a module name of the model such as {names}."
            )
    return paths
