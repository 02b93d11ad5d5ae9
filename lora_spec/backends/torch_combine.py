"""`add_weighted_adapter` for PyTorch models: a new adapter combining others, by the reference's math."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from lora_spec.backends.torch_adapter import to_numpy
from lora_spec.backends.torch_model import (
    CONFIGS_ATTRIBUTE,
    check_names,
    configs_of,
    lora_layers,
    modules_to_save,
    unwrap,
)
from lora_spec.config import config_for_layers
from lora_spec.multi_adapter import Factors, combine, weighted_combination


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> nn.Module:
    """Add adapter `adapter_name` standing for `sum_k weights[k] * adapters[k]`, as PEFT's method; returns `model`.

    `combination_type` is the reference's (`lora_spec.combine`): "cat" (exact, ranks added up),
    "svd" (PEFT's default: the best rank-`svd_rank` approximation, default rank the largest input
    rank) or "linear" (PEFT's; equal ranks, not exact); one adapter always combines as "linear",
    as in PEFT. Each layer combines the adapters it holds, so the new adapter covers the union of
    their targets; its scaling is 1 (alpha = rank, no rsLoRA) and each layer keeps its own rank. A
    module to save is copied from the one adapter with a non-zero weight that trains it (two are
    refused: full tensors cannot be weighted). The new adapter is inactive until `set_adapter`.
    DoRA adapters and adapters initialised from the base weight (PiSSA, OLoRA) are refused. Everything
    is checked before the model changes.
    """
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    check_names(model, names)
    configs = configs_of(model)
    combination = weighted_combination(names, weights, adapter_name, combination_type, configs)
    inner = unwrap(model)
    copies = _copied_modules(inner, names, weights)
    combined = {}
    for path, layer in lora_layers(inner):
        present = [
            (layer.adapter(name), weight) for name, weight in zip(names, weights, strict=True) if name in layer.adapters
        ]
        if not present:
            continue
        factors = []
        for adapter, _ in present:
            factor_a, factor_b = adapter.factors()
            factors.append(Factors(to_numpy(factor_a), to_numpy(factor_b), float(adapter.scaling)))
        try:
            combined[path] = combine(factors, [weight for _, weight in present], combination, svd_rank)
        except ValueError as error:
            raise ValueError(f"module {path!r}: {error}") from None
    layers = dict(lora_layers(inner))
    for path, (lora_a, lora_b) in combined.items():
        layer, rank = layers[path], lora_a.shape[0]
        adapter = layer.add_adapter(
            adapter_name, r=rank, alpha=float(rank), scaling=1.0, dropout=configs[names[0]].dropout
        )
        adapter.requires_grad_(False)
        adapter.assign(*(torch.from_numpy(factor).to(adapter.lora_A) for factor in (lora_a, lora_b)))
    wrappers = dict(modules_to_save(inner))
    for path, source in copies.items():
        wrappers[path].modules_to_save[adapter_name] = copy.deepcopy(wrappers[path].modules_to_save[source])
    first = configs[names[0]].replace(
        use_rslora=False, rank_pattern={}, alpha_pattern={}, exclude_modules=None, modules_to_save=tuple(copies) or None
    )
    ranks = {path: (lora_a.shape[0], float(lora_a.shape[0])) for path, (lora_a, _) in combined.items()}
    getattr(inner, CONFIGS_ATTRIBUTE)[adapter_name] = config_for_layers(first, ranks)
    return model


def _copied_modules(model: nn.Module, names: Sequence[str], weights: Sequence[float]) -> dict[str, str]:
    """`module path -> adapter` whose trained copy of that module to save the combined adapter takes."""
    sources = {}
    for path, wrapper in modules_to_save(model):
        holders = [
            name for name, weight in zip(names, weights, strict=True) if weight and name in wrapper.modules_to_save
        ]
        if len(holders) > 1:
            raise ValueError(
                f"adapters {', '.join(map(repr, holders))} each train their own {path!r} (modules_to_save), "
                "and full tensors cannot be weighted: give all but one of them weight 0."
            )
        if holders:
            sources[path] = holders[0]
    return sources
