"""Hot-swapping an adapter's weights in place, under PEFT's names, so a compiled model does not recompile.

`prepare_model_for_compiled_hotswap` (before `torch.compile`) zero-pads every adapter to one rank
and turns its scaling into a tensor; `hotswap_adapter` then writes a new adapter's weights into
those tensors in place. What the compiled graph reads keeps its shapes, dtypes and Python values.
"""

from __future__ import annotations

import os
import warnings
from typing import cast

import torch
from torch import nn

from lora_spec.adapter_io import load_adapter_dir
from lora_spec.backends.torch_adapter import PREFIX, check_extras_fit, extra_tensor
from lora_spec.backends.torch_layers import DEFAULT_ADAPTER, LoRAAdapter, LoRAEmbedding, LoRALayer
from lora_spec.backends.torch_model import (
    CONFIGS_ATTRIBUTE,
    check_names,
    configs_of,
    lora_layers,
    modules_to_save,
    unwrap,
)
from lora_spec.backends.torch_variants import DoRAAdapter
from lora_spec.config import LoRAConfig, config_for_layers, is_weight_init

_CHECK_COMPILED = ("error", "warn", "ignore")


def _is_compiled(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def prepare_model_for_compiled_hotswap(
    model: nn.Module, *, target_rank: int | None = None, check_compiled: str = "error"
) -> None:
    """Make every adapter of `model` ready to be replaced by `hotswap_adapter` without recompiling.

    Call it before `torch.compile`. Each adapter's factors are zero-padded to `target_rank`
    (default: the largest rank present), the largest rank a swapped-in adapter may have; the
    outputs do not change. Scalings become 0-d tensors, so an adapter with another alpha swaps in
    too. `check_compiled` ("error", "warn" or "ignore") says what to do with a model already compiled.
    """
    if check_compiled not in _CHECK_COMPILED:
        raise ValueError(
            f"check_compiled={check_compiled!r} is invalid: use one of {', '.join(map(repr, _CHECK_COMPILED))}."
        )
    if _is_compiled(model):
        message = "the model is already compiled: call prepare_model_for_compiled_hotswap before torch.compile."
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            warnings.warn(message, stacklevel=2)
    configs_of(model)
    adapters = [
        (path, adapter) for path, layer in lora_layers(unwrap(model)) for adapter in map(layer.adapter, layer.adapters)
    ]
    capacity = max(adapter.lora_A.shape[0] for _, adapter in adapters)
    rank = capacity if target_rank is None else target_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < capacity:
        raise ValueError(
            f"target_rank={target_rank!r} is invalid: use an integer at least the largest rank present ({capacity})."
        )
    for path, adapter in adapters:
        if rank % adapter.groups:
            raise ValueError(
                f"target_rank={rank} is not a multiple of the groups={adapter.groups} of the conv at "
                f"{path!r}: choose a multiple of {adapter.groups}."
            )
    for _, adapter in adapters:
        _pad(adapter, rank)
        _scaling_as_tensor(adapter)


def _pad(adapter: LoRAAdapter, rank: int) -> None:
    if adapter.lora_A.shape[0] == rank:
        return
    lora_a, lora_b = (factor.detach().clone() for factor in adapter.factors())
    groups = adapter.groups
    for name, shape in (
        ("lora_A", (rank, *lora_a.shape[1:])),
        ("lora_B", (lora_b.shape[0], rank // groups, *lora_b.shape[2:])),
    ):
        old = getattr(adapter, name)
        setattr(
            adapter,
            name,
            nn.Parameter(torch.zeros(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad),
        )
    adapter.assign(lora_a, lora_b)


def _scaling_as_tensor(adapter: LoRAAdapter) -> None:
    if isinstance(adapter.scaling, torch.Tensor):
        return
    value = adapter.__dict__.pop("scaling")
    adapter.register_buffer(
        "scaling", torch.tensor(value, dtype=adapter.lora_A.dtype, device=adapter.lora_A.device), persistent=False
    )


def hotswap_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Replace the weights of adapter `adapter_name` by those of the adapter folder `path`, in place.

    The new adapter may target a subset of the modules holding `adapter_name` (the others get
    zeros), have another alpha, and any rank up to the one `prepare_model_for_compiled_hotswap`
    padded to; then a compiled model runs it without recompiling. Its modules to save must be among
    the model's. A DoRA adapter swaps with a DoRA file (its magnitudes too; a module it leaves out gets
    the base's norm, so it runs the base). Everything is checked before anything is written.
    """
    check_names(model, [adapter_name])
    config, _, weights = load_adapter_dir(path)
    _check_same_kind(config, configs_of(model)[adapter_name], adapter_name)
    inner = unwrap(model)
    layers = {module_path: layer for module_path, layer in lora_layers(inner) if adapter_name in layer.adapters}
    for module_path, (lora_a, lora_b) in weights.lora.items():
        _check_fits(module_path, layers, adapter_name, lora_a.shape, lora_b.shape, module_path in weights.embeddings)
    save_paths = [
        module_path for module_path, wrapper in modules_to_save(inner) if adapter_name in wrapper.modules_to_save
    ]
    check_extras_fit(inner, weights, save_paths, adapter_name)
    for module_path, layer in layers.items():
        adapter = layer.adapter(adapter_name)
        if module_path in weights.lora:
            adapter.assign(*(torch.from_numpy(factor).to(adapter.lora_A) for factor in weights.lora[module_path]))
            _set_scaling(adapter, config.scaling_for(module_path))
            adapter.alpha = config.alpha_for(module_path)
            if module_path in weights.magnitudes:
                with torch.no_grad():
                    cast(DoRAAdapter, adapter).lora_magnitude_vector.copy_(
                        torch.from_numpy(weights.magnitudes[module_path])
                    )
        else:
            with torch.no_grad():
                adapter.lora_A.zero_()
                adapter.lora_B.zero_()
            adapter.initialise(layer)
    with torch.no_grad():
        for key, value in weights.extra.items():
            tensor = extra_tensor(inner, key, save_paths, adapter_name)
            assert tensor is not None  # check_extras_fit refused extras the model does not hold
            tensor.copy_(torch.from_numpy(value))
    ranks = {
        module_path: (layer.adapter(adapter_name).r, layer.adapter(adapter_name).alpha)
        for module_path, layer in layers.items()
    }
    getattr(inner, CONFIGS_ATTRIBUTE)[adapter_name] = config_for_layers(config, ranks)


def _check_same_kind(new: LoRAConfig, current: LoRAConfig, adapter_name: str) -> None:
    """A swap writes adapter weights only: the variant must match (as PEFT checks), and the base weight
    must be the original (not a PiSSA/OLoRA residual) on both sides."""
    if new.use_dora != current.use_dora:
        kinds = ("a DoRA", "a plain LoRA") if new.use_dora else ("a plain LoRA", "a DoRA")
        raise ValueError(
            f"the new adapter is {kinds[0]} adapter and {adapter_name!r} is {kinds[1]} one: hot-swapping "
            "keeps the compiled graph, so swap adapters of the same kind (use_dora), as PEFT requires."
        )
    for init, whose in ((new.init, "the new adapter"), (current.init, f"adapter {adapter_name!r}")):
        if is_weight_init(init):
            raise ValueError(
                f"{whose} has init={init!r}, which changes the base weight, and hot-swapping changes only "
                "adapter weights: save PiSSA/OLoRA adapters with convert_to_lora=True and swap those."
            )


def _check_fits(
    module_path: str,
    layers: dict[str, LoRALayer],
    adapter_name: str,
    a_shape: tuple,
    b_shape: tuple,
    is_embedding: bool,
) -> None:
    if module_path not in layers:
        raise ValueError(
            f"the new adapter targets {module_path!r}, which adapter {adapter_name!r} does not: a hot-swap "
            f"keeps the compiled graph, so it may target only {', '.join(map(repr, layers))}."
        )
    layer = layers[module_path]
    adapter = layer.adapter(adapter_name)
    rank, capacity = a_shape[0], adapter.lora_A.shape[0]
    if rank > capacity:
        raise ValueError(
            f"the new adapter has rank {rank} at {module_path!r}, above the {capacity} prepared there: call "
            f"prepare_model_for_compiled_hotswap(model, target_rank={rank}) (or more) before compiling."
        )
    expected = type(layer).lora_shapes(layer.base_layer, rank)
    if (tuple(a_shape), tuple(b_shape)) != tuple(map(tuple, expected)) or is_embedding != isinstance(
        layer, LoRAEmbedding
    ):
        raise ValueError(
            f"the new adapter's {PREFIX}{module_path} factors have shapes {tuple(a_shape)} and "
            f"{tuple(b_shape)}, but this model needs {expected[0]} and {expected[1]}: it was trained on "
            "another architecture."
        )


def _set_scaling(adapter: LoRAAdapter, value: float) -> None:
    if isinstance(adapter.scaling, torch.Tensor):
        adapter.scaling.fill_(value)
    else:
        adapter.scaling = value
