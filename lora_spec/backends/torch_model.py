"""Whole-model LoRA for PyTorch: apply, merge, unmerge, merge_and_unload, disable_adapters, counts."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

from lora_spec.backends.torch_layers import LoRALayer, is_conv1d, lora_layer_for, make_lora_layer
from lora_spec.config import LoRAConfig, resolve_config
from lora_spec.merging import merge_all_or_none
from lora_spec.parameter_counts import TrainableParameters
from lora_spec.targets import ModuleInfo, modules_to_save_paths, select_targets

CONFIG_ATTRIBUTE = "lora_config"
_KINDS = {"LoRALinear": "linear", "LoRAEmbedding": "embedding", "LoRAConv2d": "conv2d"}


class ModulesToSave(nn.Module):
    """A module trained fully: `trained_module`, a trainable copy of the frozen `original_module`.

    Stored whole in the adapter file (PEFT's `modules_to_save`); `disable_adapters` runs the original.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.trained_module = copy.deepcopy(original_module)
        self.trained_module.requires_grad_(True)
        self.adapter_enabled = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.trained_module if self.adapter_enabled else self.original_module
        return module(*args, **kwargs)


def _kind(module: nn.Module) -> str:
    if isinstance(module, LoRALayer):
        return _KINDS[type(module).__name__]
    layer = lora_layer_for(module)
    return "other" if layer is None else _KINDS[layer.__name__]


def describe_modules(model: nn.Module) -> list[ModuleInfo]:
    """Every module of `model` as the core's target matching sees it; LoRA internals are hidden.

    The projections of `nn.MultiheadAttention` count as "other": it reads their weights directly,
    so a wrapper around them would be silently bypassed.
    """
    infos, hidden, weight_readers = [], (), ()
    for path, module in model.named_modules():
        if hidden and path.startswith(hidden):
            continue
        if isinstance(module, (LoRALayer, ModulesToSave)):
            hidden = tuple(f"{path}.{name}" for name, _ in module.named_children())
        if isinstance(module, nn.MultiheadAttention):
            weight_readers += (f"{path}.",)
        original = module.original_module if isinstance(module, ModulesToSave) else module
        type_name = type(module.base_layer if isinstance(module, LoRALayer) else original).__name__
        kind = "other" if weight_readers and path.startswith(weight_readers) else _kind(original)
        infos.append(ModuleInfo(path, kind, type_name))
    return infos


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """`(path, layer)` for every LoRA layer of `model`."""
    return ((path, module) for path, module in model.named_modules() if isinstance(module, LoRALayer))


def _modules_to_save(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    return ((path, module) for path, module in model.named_modules() if isinstance(module, ModulesToSave))


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)


def plan(model: nn.Module, config: LoRAConfig,
         require_modules_to_save: bool = True) -> tuple[LoRAConfig, list[str], list[str]]:
    """`(config with resolved targets, paths to adapt, paths of modules_to_save)`, touching nothing.

    An entry of `modules_to_save` that matches nothing raises, unless `require_modules_to_save`
    is False (PEFT's files list task heads such as "classifier" and "score" whether or not the
    model has them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}.")
    modules = describe_modules(model)
    config, matches = select_targets(modules, config)
    save_paths = modules_to_save_paths(modules, config, require_modules_to_save)
    for match in matches:
        module = model.get_submodule(match.path)
        if not isinstance(module, LoRALayer):
            try:
                lora_layer_for(module).lora_shapes(module, config.rank_for(match.path))
            except ValueError as error:
                raise ValueError(f"module {match.path!r}: {error}") from None
    return config, [m.path for m in matches], save_paths


def apply(model: nn.Module, config: LoRAConfig | None = None, **overrides: Any) -> nn.Module:
    """Wrap the targeted modules of `model` with LoRA in place and freeze the rest; returns `model`.

    `overrides` are `LoRAConfig` fields (`r=16, alpha=32, target_modules=[...]`). Modules that
    are already LoRA layers are kept as they are, so applying twice does not wrap twice.
    Trainable afterwards: every `lora_A`/`lora_B`, the copies of `modules_to_save`, and the
    biases that `config.bias` names ("all": every bias; "lora_only": those of adapted layers).
    """
    refuse_wrapper(model, "apply LoRA to")
    return wrap(model, *plan(model, resolve_config(config, overrides)))


def wrap(model: nn.Module, config: LoRAConfig, target_paths: list[str], save_paths: list[str]) -> nn.Module:
    """`apply` for targets already resolved by `plan`."""
    for path in target_paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoRALayer):
            _replace(model, path, make_lora_layer(module, path, config))
    for path in save_paths:
        if not isinstance(model.get_submodule(path), ModulesToSave):
            _replace(model, path, ModulesToSave(model.get_submodule(path)))
    _set_trainable(model, config.bias)
    setattr(model, CONFIG_ATTRIBUTE, config)
    return model


def _set_trainable(model: nn.Module, bias: str) -> None:
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        if bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in _modules_to_save(model):
        wrapper.trained_module.requires_grad_(True)
    if bias == "all":
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                parameter.requires_grad_(True)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside the wrappers training puts around it (DDP, DataParallel, `torch.compile`):
    the one `apply` adapted, whose module paths the adapter files use."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def refuse_wrapper(model: nn.Module, action: str) -> None:
    """Adding LoRA under a wrapper would miss the parameters it already registered."""
    if unwrap(model) is not model:
        raise ValueError(f"{action} the model before wrapping it ({type(model).__name__} has already registered its "
                         "parameters): call it on the bare model, then wrap.")


def config_of(model: nn.Module) -> LoRAConfig:
    """The resolved config `apply` stored on `model` (or the model inside its wrappers); ValueError
    when LoRA was never applied."""
    config = getattr(unwrap(model), CONFIG_ATTRIBUTE, None)
    if not isinstance(config, LoRAConfig):
        raise ValueError("this model has no LoRA adapter: call lora_spec.torch.apply(model) first.")
    return config


def uses_fan_in_fan_out(model: nn.Module) -> bool:
    """Whether an adapted layer is a Conv1D, whose weight is `(in, out)` (PEFT's `fan_in_fan_out`)."""
    return any(is_conv1d(layer.base_layer) for _, layer in lora_layers(model))


def _untie_adapted_weights(model: nn.Module) -> None:
    """Give every other module that shares an adapted base weight (a tied `lm_head`) its own copy.

    Merging writes into the base weight; a module tied to it would change too and with it the
    model's outputs (PEFT's `merge_and_unload` does that). Hugging Face's `tie_word_embeddings` is
    switched off so that saving and loading do not tie the weights again.
    """
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, parameter in module.named_parameters(recurse=False):
            holders.setdefault(id(parameter), []).append((path, module, name))
    for path, layer in lora_layers(model):
        if layer.merged:
            continue
        weight = layer.base_layer.weight
        tied = [(other, module, name) for other, module, name in holders.get(id(weight), ())
                if module is not layer.base_layer]
        for other, module, name in tied:
            setattr(module, name, nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
        if tied:
            config = getattr(model, "config", None)
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
            warnings.warn(f"the base weight of {path!r} is tied to {', '.join(repr(t[0]) for t in tied)}: each now "
                          f"holds its own copy, so that merging changes only {path!r} and keeps the model's outputs.",
                          stacklevel=3)


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (undo with `unmerge`); returns `model`.

    All or nothing: when one merged weight would hold NaN or inf, the layers merged so far are
    restored and ValueError names the module.
    """
    config_of(model)
    inner = unwrap(model)
    _untie_adapted_weights(inner)
    merge_all_or_none(lora_layers(inner))
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged base weight bit for bit; returns `model`."""
    config_of(model)
    for _, layer in lora_layers(unwrap(model)):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters for good and return `model` made of plain torch layers, no LoRA code left.

    `modules_to_save` are replaced by their trained copies. Every merged weight is checked before
    any is written (on NaN or inf: ValueError, model untouched), and no copy of the base weights
    is kept, so memory does not grow.
    """
    config_of(model)
    inner = unwrap(model)
    layers = list(lora_layers(inner))
    for path, layer in layers:
        if not layer.merged:
            try:
                layer.merged_weight()
            except ValueError as error:
                raise ValueError(f"module {path!r}: {error}") from None
    _untie_adapted_weights(inner)
    for path, layer in layers:
        layer.merge(keep_original=False)
        _replace(inner, path, layer.base_layer)
    for path, wrapper in list(_modules_to_save(inner)):
        _replace(inner, path, wrapper.trained_module)
    delattr(inner, CONFIG_ATTRIBUTE)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block: LoRA branches off, original `modules_to_save`.

    Merged layers are unmerged for the block and merged again after it (both exact).
    """
    config_of(model)
    inner = unwrap(model)
    switches = [module for _, module in lora_layers(inner)] + [module for _, module in _modules_to_save(inner)]
    was_merged = [layer for _, layer in lora_layers(inner) if layer.merged]
    for layer in was_merged:
        layer.unmerge()
    for module in switches:
        module.adapter_enabled = False
    try:
        yield model
    finally:
        for module in switches:
            module.adapter_enabled = True
        for layer in was_merged:
            layer.merge()


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """How many parameters train, out of all (shared parameters counted once)."""
    parameters = list(model.parameters())
    return TrainableParameters(sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters))
