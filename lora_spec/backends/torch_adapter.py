"""Adapter files for PyTorch models, in PEFT's format, through `lora_spec.adapter_io`.

Keys follow what PEFT writes: `<path>.lora_A.weight` (embeddings: `<path>.lora_embedding_A`),
`<path>.<param>` for a module to save, `<path>.base_layer.bias` / `<path>.bias` for trained
biases. PEFT's `bias="all"` files also hold `<path>.modules_to_save.<param>` and
`<path>.original_module.<param>` for modules to save; both are read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from lora_spec.adapter_io import PREFIX, AdapterWeights, load_adapter_dir, save_adapter_dir
from lora_spec.backends.torch_layers import LoRAEmbedding, LoRALayer, lora_layer_for
from lora_spec.backends.torch_model import (CONFIG_ATTRIBUTE, ModulesToSave, config_of, lora_layers, plan,
                                            refuse_wrapper, unwrap, uses_fan_in_fan_out, wrap)
from lora_spec.config import LoRAConfig, check_backend_support


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    # NumPy has no bfloat16: float32 holds every bfloat16 value exactly.
    tensor = tensor.detach().cpu()
    if hasattr(tensor, "full_tensor"):  # a DTensor shard under FSDP2: every rank gathers the whole tensor
        tensor = tensor.full_tensor()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _trained_extras(model: nn.Module, config: LoRAConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Fully trained tensors under their file names: modules to save, then biases."""
    saved_prefixes = []
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            saved_prefixes.append(path + ".")
            for name, tensor in module.trained_module.state_dict().items():
                yield f"{path}.{name}", tensor
    lora_biases = {f"{path}.base_layer.bias" for path, _ in lora_layers(model)}
    for name, parameter in model.named_parameters():
        if name.startswith(tuple(saved_prefixes)) or name.rsplit(".", 1)[-1] != "bias":
            continue
        if config.bias == "all" or (config.bias == "lora_only" and name in lora_biases):
            yield name, parameter


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter of `model` to the directory `path` (created if needed), as PEFT does.

    `peft.PeftModel.from_pretrained(base_model, path)` loads it; so does `load_adapter`.
    """
    config = config_of(model)
    model = unwrap(model)
    weights = AdapterWeights()
    for module_path, layer in lora_layers(model):
        weights.lora[module_path] = (_to_numpy(layer.lora_A), _to_numpy(layer.lora_B))
        if isinstance(layer, LoRAEmbedding):
            weights.embeddings.add(module_path)
    weights.extra = {name: _to_numpy(tensor) for name, tensor in _trained_extras(model, config)}
    target_paths = [module_path for module_path, _ in lora_layers(model)]
    save_adapter_dir(path, config.to_peft_dict(target_paths, fan_in_fan_out=uses_fan_in_fan_out(model)), weights)


def _key(name: str) -> str:
    return PREFIX + name


def _extra_tensor(model: nn.Module, name: str, save_paths: list[str]) -> torch.Tensor | None:
    """The model tensor an extra key names, seen through LoRA wrappers whether or not applied yet."""
    owner = max((p for p in save_paths if name.startswith(p + ".")), key=len, default=None)
    if owner is not None:
        module, rest = model.get_submodule(owner), name[len(owner) + 1:]
        role, _, inner = rest.partition(".")
        if role in ("modules_to_save", "original_module") and inner:
            rest = inner
        if isinstance(module, ModulesToSave):
            module = module.original_module if role == "original_module" else module.trained_module
    else:
        module_path, _, rest = name.rpartition(".")
        try:
            module = model.get_submodule(module_path.removesuffix(".base_layer"))
        except AttributeError:
            return None
    if isinstance(module, LoRALayer):
        module = module.base_layer
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors.get(rest)


def _expected_lora_shapes(model: nn.Module, config: LoRAConfig, target_paths: list[str]) -> dict[str, tuple]:
    """`path -> (A shape, B shape, is embedding)` for the layers the adapter must fill."""
    shapes = {}
    for path in target_paths:
        module = model.get_submodule(path)
        if isinstance(module, LoRALayer):
            shapes[path] = (tuple(module.lora_A.shape), tuple(module.lora_B.shape), isinstance(module, LoRAEmbedding))
        else:
            layer = lora_layer_for(module)
            a_shape, b_shape = layer.lora_shapes(module, config.rank_for(path))
            shapes[path] = (tuple(a_shape), tuple(b_shape), layer is LoRAEmbedding)
    return shapes


def _check_lora(weights: AdapterWeights, expected: dict[str, tuple]) -> None:
    for path, (lora_a, lora_b) in weights.lora.items():
        suffix = ".lora_embedding_A" if path in weights.embeddings else ".lora_A.weight"
        if path not in expected:
            raise ValueError(f"adapter key {_key(path + suffix)} names no LoRA target of this model: "
                             f"load the adapter into the model it was trained on.")
        a_shape, b_shape, is_embedding = expected[path]
        if is_embedding != (path in weights.embeddings):
            kind = "an embedding" if is_embedding else "not an embedding"
            raise ValueError(f"adapter key {_key(path + suffix)} does not fit: module {path!r} is {kind}.")
        for half, tensor, shape in (("A", lora_a, a_shape), ("B", lora_b, b_shape)):
            if tuple(tensor.shape) != shape:
                name = f"lora_embedding_{half}" if is_embedding else f"lora_{half}.weight"
                raise ValueError(f"adapter key {_key(f'{path}.{name}')} has shape {tuple(tensor.shape)}, but this "
                                 f"model needs {shape}: the adapter was trained on another architecture or rank.")
    missing = sorted(set(expected) - set(weights.lora))
    if missing:
        suffix = ".lora_embedding_A" if expected[missing[0]][2] else ".lora_A.weight"
        raise ValueError(f"adapter has no {_key(missing[0] + suffix)} although its config targets that module: "
                         "the file is incomplete or its target_modules do not match it.")


def _check_extras(model: nn.Module, weights: AdapterWeights, save_paths: list[str]) -> None:
    for name, value in weights.extra.items():
        tensor = _extra_tensor(model, name, save_paths)
        if tensor is None:
            raise ValueError(f"adapter key {_key(name)} names no parameter of this model: "
                             "load the adapter into the model it was trained on.")
        if tuple(tensor.shape) != tuple(value.shape):
            raise ValueError(f"adapter key {_key(name)} has shape {tuple(value.shape)}, but this model's tensor "
                             f"is {tuple(tensor.shape)}: the adapter was trained on another architecture.")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter directory written by `save_adapter` or PEFT's `save_pretrained`; returns `model`.

    When `model` has no LoRA yet, it is applied first with the file's config. Everything is
    checked before the model changes: a name or shape that does not fit raises ValueError
    naming the first offending key, and leaves the model as it was.
    """
    config, _, weights = load_adapter_dir(path)
    check_backend_support(config)
    wrapper, model = model, unwrap(model)
    if getattr(model, CONFIG_ATTRIBUTE, None) is not None:
        target_paths = [module_path for module_path, _ in lora_layers(model)]
        save_paths = [module_path for module_path, module in model.named_modules() if isinstance(module, ModulesToSave)]
        if any(layer.merged for _, layer in lora_layers(model)):
            raise ValueError("the model's adapter is merged: call unmerge(model) before load_adapter.")
    else:
        refuse_wrapper(wrapper, "load an adapter into")
        config, target_paths, save_paths = plan(model, config, require_modules_to_save=False)
    _check_lora(weights, _expected_lora_shapes(model, config, target_paths))
    _check_extras(model, weights, save_paths)
    if getattr(model, CONFIG_ATTRIBUTE, None) is None:
        wrap(model, config, target_paths, save_paths)
    else:
        # The model keeps its structure (targets, saved modules, trainable biases); the math is the file's.
        current = config_of(model)
        config = config.replace(target_modules=current.target_modules, exclude_modules=current.exclude_modules,
                                modules_to_save=current.modules_to_save, bias=current.bias)
        setattr(model, CONFIG_ATTRIBUTE, config)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for module_path, (lora_a, lora_b) in weights.lora.items():
            layer = layers[module_path]
            layer.lora_A.copy_(torch.from_numpy(lora_a))
            layer.lora_B.copy_(torch.from_numpy(lora_b))
            layer.scaling, layer.alpha, layer.dropout = (config.scaling_for(module_path), config.alpha_for(module_path),
                                                         config.dropout)
        for name, value in weights.extra.items():
            _extra_tensor(model, name, save_paths).copy_(torch.from_numpy(value))
    return wrapper
