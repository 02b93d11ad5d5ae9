"""Whole-model LoRA for PyTorch: apply named adapters, switch, delete, merge, unmerge, merge_and_unload, counts.

A model with LoRA holds its adapters' configs in `model.lora_configs` (name -> `LoRAConfig`, in
the order they were added) and the names of the active ones in `model.lora_active_adapters`;
every LoRA layer and `ModulesToSave` wrapper holds the same active list.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, cast

from torch import nn

from lora_spec.backends.torch_inits import method_name
from lora_spec.backends.torch_layers import (
    DEFAULT_ADAPTER,
    LoRALayer,
    adapter_arguments,
    is_conv1d,
    lora_layer_for,
    make_lora_layer,
)
from lora_spec.backends.torch_variants import base_weight
from lora_spec.config import LoRAConfig, is_weight_init, resolve_config
from lora_spec.merging import merge_all_or_none
from lora_spec.multi_adapter import Routing, check_adapter_name
from lora_spec.parameter_counts import TrainableParameters
from lora_spec.targets import ModuleInfo, modules_to_save_paths, select_targets

CONFIGS_ATTRIBUTE = "lora_configs"
ACTIVE_ATTRIBUTE = "lora_active_adapters"
# The model's own type: `apply` adapts a model in place and returns it.
ModelT = TypeVar("ModelT", bound=nn.Module)
_KINDS = {"LoRALinear": "linear", "LoRAEmbedding": "embedding", "LoRAConv2d": "conv2d"}


def _rename_single_copy_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: object) -> None:
    """Read state dicts saved when a module to save had one copy (`<path>.trained_module.*`) into its first copy."""
    first = next(iter(cast(ModulesToSave, module).modules_to_save), None)
    old = prefix + "trained_module."
    for key in [key for key in state_dict if key.startswith(old)]:
        if first is not None:
            state_dict[f"{prefix}modules_to_save.{first}.{key[len(old) :]}"] = state_dict.pop(key)


class ModulesToSave(nn.Module):
    """A module trained fully: one trainable copy per adapter (`modules_to_save[name]`) of the frozen
    `original_module`, as PEFT's `ModulesToSaveWrapper`.

    Stored whole in the adapter file (PEFT's `modules_to_save`). The copy of the first active
    adapter that has one runs; `disable_adapters`, or no such copy, runs the original.
    """

    def __init__(self, original_module: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = [adapter_name]
        self.adapter_enabled = True
        self._routes: Routing | None = None
        self.add_adapter(adapter_name)
        self.register_load_state_dict_pre_hook(_rename_single_copy_keys)

    def add_adapter(self, name: str) -> nn.Module:
        """A trainable copy of the original module for adapter `name`."""
        copied = copy.deepcopy(self.original_module)
        copied.requires_grad_(True)
        self.modules_to_save[name] = copied
        return copied

    def delete_adapter(self, name: str) -> None:
        """Drop adapter `name`'s copy."""
        del self.modules_to_save[name]
        self.active_adapters = [active for active in self.active_adapters if active != name]

    @property
    def trained_module(self) -> nn.Module | None:
        """The copy that runs now: the first active adapter's, or None (the original runs)."""
        return next((self.modules_to_save[name] for name in self.active_adapters if name in self.modules_to_save), None)

    def route(self, routing: Routing | None) -> None:
        """As `LoRALayer.route`: each row runs through its adapter's copy."""
        self._routes = routing

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.adapter_enabled:
            return self.original_module(*args, **kwargs)
        if self._routes is not None:
            return self._routed(*args, **kwargs)
        return (self.trained_module or self.original_module)(*args, **kwargs)

    def _routed(self, *args: Any, **kwargs: Any) -> Any:
        assert self._routes is not None  # forward routes only when routing is set
        rows_expected, groups = self._routes
        if len(args) != 1 or kwargs or args[0].shape[0] != rows_expected:
            raise ValueError(
                f"routing {rows_expected} rows through the module to save {type(self.original_module).__name__} "
                "needs one input tensor with one row per adapter name: give routed() one name per row."
            )
        (x,) = args
        result = self.original_module(x)
        for name, rows in groups:
            if isinstance(name, str) and name in self.modules_to_save:
                result[rows] = self.modules_to_save[name](x[rows])
        return result


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
    infos: list[ModuleInfo] = []
    hidden: tuple[str, ...] = ()
    weight_readers: tuple[str, ...] = ()
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


def modules_to_save(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """`(path, wrapper)` for every module to save of `model`."""
    return ((path, module) for path, module in model.named_modules() if isinstance(module, ModulesToSave))


def _switches(model: nn.Module) -> list[LoRALayer | ModulesToSave]:
    """Every module that holds adapters: LoRA layers and modules to save."""
    return [module for module in model.modules() if isinstance(module, (LoRALayer, ModulesToSave))]


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)


def plan(
    model: nn.Module,
    config: LoRAConfig,
    require_modules_to_save: bool = True,
    adapter_name: str | None = DEFAULT_ADAPTER,
) -> tuple[LoRAConfig, list[str], list[str]]:
    """`(config with resolved targets, paths to adapt, paths of modules_to_save)`, touching nothing.

    An entry of `modules_to_save` that matches nothing raises, unless `require_modules_to_save`
    is False (PEFT's files list task heads such as "classifier" and "score" whether or not the
    model has them). A target that cannot hold the adapter (its rank, DoRA on a grouped conv, PiSSA
    or OLoRA on a layer that is not linear or whose weight is not floating point) raises, naming
    it, unless it already holds adapter `adapter_name`, which `apply` keeps.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}.")
    modules = describe_modules(model)
    config, matches = select_targets(modules, config)
    save_paths = modules_to_save_paths(modules, config, require_modules_to_save)
    for match in matches:
        module = model.get_submodule(match.path)
        if isinstance(module, LoRALayer) and adapter_name is not None and adapter_name in module.adapters:
            continue
        base = module.base_layer if isinstance(module, LoRALayer) else module
        layer_class = lora_layer_for(base)
        assert layer_class is not None  # select_targets matches only layers that lora_layer_for wraps
        try:
            layer_class.check_adapter(base, config.rank_for(match.path), config.use_dora, config.init)
        except ValueError as error:
            raise ValueError(f"module {match.path!r}: {error}") from None
    return config, [m.path for m in matches], save_paths


def apply(
    model: ModelT, config: LoRAConfig | None = None, adapter_name: str = DEFAULT_ADAPTER, **overrides: Any
) -> ModelT:
    """Add an adapter called `adapter_name` to the targeted modules of `model` in place; returns `model`.

    `overrides` are `LoRAConfig` fields (`r=16, alpha=32, target_modules=[...]`). The first
    adapter of a model becomes active and everything else is frozen. Another name adds an
    adapter, with its own targets, rank and alpha, that stays inactive until `set_adapter`
    (PEFT's `add_adapter`). A module that already holds the adapter keeps it, so applying the same
    name twice does not wrap twice. Trainable afterwards: the active adapters' `lora_A`/`lora_B`
    (and a DoRA adapter's `lora_magnitude_vector`) and copies of `modules_to_save`, and the biases
    `config.bias` names ("all": every bias; "lora_only": those of adapted layers).

    `use_dora=True` adds DoRA adapters (`lora_spec.dora`; grouped convolutions refused);
    `init="pissa"`, `"pissa_niter_<K>"` or `"olora"` computes A and B from each targeted linear
    layer's weight, which becomes the residual (those adapters must have their layers to
    themselves). Everything is checked before the model changes.
    """
    refuse_wrapper(model, "apply LoRA to")
    check_adapter_name(adapter_name)
    config = resolve_config(config, overrides)
    config, target_paths, save_paths = plan(model, config, adapter_name=adapter_name)
    check_alone(model, config, target_paths, adapter_name)
    return wrap(model, config, target_paths, save_paths, adapter_name=adapter_name)


def check_alone(model: nn.Module, config: LoRAConfig, target_paths: Sequence[str], adapter_name: str) -> None:
    """PiSSA and OLoRA turn the base weight into a residual, which every other adapter of the layer
    would see (PEFT warns about it): refuse either beside the other, naming the module."""
    for path in target_paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoRALayer):
            continue
        others = {name: module.adapter(name) for name in module.adapters if name != adapter_name}
        on_residual = [name for name, adapter in others.items() if adapter.initial_factors() is not None]
        if on_residual:
            raise ValueError(
                f"module {path!r} holds adapter {on_residual[0]!r}, initialised from its weight (PiSSA or "
                "OLoRA), so its base weight is a residual that another adapter would be trained on: "
                "target other modules, or delete that adapter first."
            )
        if others and is_weight_init(config.init):
            raise ValueError(
                f"module {path!r} holds adapter {next(iter(others))!r}, and init={config.init!r} would "
                f"turn its base weight into {method_name(config.init)}'s residual under it: give this "
                "adapter modules of its own, or delete the other adapter first."
            )


def wrap(
    model: ModelT,
    config: LoRAConfig,
    target_paths: list[str],
    save_paths: list[str],
    adapter_name: str = DEFAULT_ADAPTER,
) -> ModelT:
    """`apply` for targets already resolved by `plan`."""
    configs = dict(getattr(model, CONFIGS_ATTRIBUTE, None) or {})
    active = list(getattr(model, ACTIVE_ATTRIBUTE, None) or [adapter_name])
    for path in target_paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoRALayer):
            module = make_lora_layer(module, path, config, adapter_name)
            _replace(model, path, module)
        elif adapter_name not in module.adapters:
            module.add_adapter(adapter_name, init=config.init, **adapter_arguments(config, path))
        module.active_adapters = list(active)
    for path in save_paths:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module, adapter_name)
            _replace(model, path, module)
        elif adapter_name not in module.modules_to_save:
            module.add_adapter(adapter_name)
        module.active_adapters = list(active)
    configs[adapter_name] = config
    setattr(model, CONFIGS_ATTRIBUTE, configs)
    setattr(model, ACTIVE_ATTRIBUTE, active)
    _set_trainable(model)
    return model


def _set_trainable(model: nn.Module) -> None:
    """Only the active adapters train (with the biases their configs name); everything else is frozen."""
    active, configs = getattr(model, ACTIVE_ATTRIBUTE), getattr(model, CONFIGS_ATTRIBUTE)
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        for name in active:
            if name in layer.adapters:
                layer.adapters[name].requires_grad_(True)
                if configs[name].bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in modules_to_save(model):
        if wrapper.trained_module is not None:
            wrapper.trained_module.requires_grad_(True)
    if any(configs[name].bias == "all" for name in active):
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                parameter.requires_grad_(True)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside the wrappers training puts around it (DDP, DataParallel, `torch.compile`):
    the one `apply` adapted, whose module paths the adapter files use."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(compiled := getattr(model, "_orig_mod", None), nn.Module):
            model = compiled
        else:
            return model


def refuse_wrapper(model: nn.Module, action: str) -> None:
    """Adding LoRA under a wrapper would miss the parameters it already registered."""
    if unwrap(model) is not model:
        raise ValueError(
            f"{action} the model before wrapping it ({type(model).__name__} has already registered its "
            "parameters): call it on the bare model, then wrap."
        )


def configs_of(model: nn.Module) -> dict[str, LoRAConfig]:
    """The configs of the model's adapters by name (the model inside its wrappers); ValueError when LoRA
    was never applied."""
    configs = getattr(unwrap(model), CONFIGS_ATTRIBUTE, None)
    if not configs:
        raise ValueError("this model has no LoRA adapter: call lora_spec.torch.apply(model) first.")
    return configs


def check_names(model: nn.Module, names: Sequence[str]) -> None:
    """Raise, listing the model's adapters, when one of `names` is not among them."""
    configs = configs_of(model)
    for name in names:
        if name not in configs:
            raise ValueError(f"unknown adapter {name!r}: the model has adapters {', '.join(map(repr, configs))}.")


def config_of(model: nn.Module, adapter_name: str | None = None) -> LoRAConfig:
    """The config of adapter `adapter_name` (default: the first active one, else the first)."""
    configs = configs_of(model)
    if adapter_name is None:
        active = active_adapters(model)
        adapter_name = active[0] if active else next(iter(configs))
    check_names(model, [adapter_name])
    return configs[adapter_name]


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(configs_of(model))


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters the model runs (their updates add up)."""
    configs_of(model)
    return list(getattr(unwrap(model), ACTIVE_ATTRIBUTE))


def _adapter_list(names: str | Sequence[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("no adapter named: pass one name or several (use disable_adapters(model) to run the base).")
    return names


def _check_one_copy_per_module(model: nn.Module, names: Sequence[str], action: str) -> None:
    for path, wrapper in modules_to_save(model):
        holders = [name for name in names if name in wrapper.modules_to_save]
        if len(holders) > 1:
            raise ValueError(
                f"adapters {', '.join(map(repr, holders))} each train their own {path!r} (modules_to_save), "
                f"and one module cannot run two copies: {action} at most one of them."
            )


def _unmerge_with_warning(model: nn.Module, reason: str) -> None:
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    if merged:
        warnings.warn(f"the model's adapters are merged; unmerging them to {reason}.", stacklevel=3)
        for layer in merged:
            layer.unmerge()


def _activate(model: nn.Module, names: list[str]) -> None:
    setattr(model, ACTIVE_ATTRIBUTE, list(names))
    for module in _switches(model):
        module.active_adapters = list(names)
    _set_trainable(model)


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> nn.Module:
    """Run (and train) the adapter `adapter_name`, or the sum of several (a list); returns `model`.

    Only the active adapters train; the others are frozen. A merged model is unmerged first, with
    a warning (as PEFT does). Two active adapters cannot both have a copy of one module to save.
    """
    names = _adapter_list(adapter_name)
    check_names(model, names)
    inner = unwrap(model)
    _check_one_copy_per_module(inner, names, "activate")
    _unmerge_with_warning(inner, f"activate {names}")
    _activate(inner, names)
    return model


def remove_from_modules(model: nn.Module, adapter_name: str) -> None:
    """Take adapter `adapter_name` out of every (unmerged) module; a module left without adapters turns back
    into its base module. The model's configs and active list are the caller's to update."""
    for path, layer in list(lora_layers(model)):
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
            if not layer.adapters:
                _replace(model, path, layer.base_layer)
    for path, wrapper in list(modules_to_save(model)):
        if adapter_name in wrapper.modules_to_save:
            wrapper.delete_adapter(adapter_name)
            if not wrapper.modules_to_save:
                _replace(model, path, wrapper.original_module)


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter `adapter_name` from every module; returns `model`.

    Deleting an active adapter activates the first remaining one, with a warning (as PEFT does);
    deleting the last one leaves the plain base model. A merged model is unmerged first, with a warning.
    """
    check_names(model, [adapter_name])
    inner = unwrap(model)
    _unmerge_with_warning(inner, f"delete {adapter_name!r}")
    remove_from_modules(inner, adapter_name)
    configs = getattr(inner, CONFIGS_ATTRIBUTE)
    del configs[adapter_name]
    if not configs:
        delattr(inner, CONFIGS_ATTRIBUTE)
        delattr(inner, ACTIVE_ATTRIBUTE)
        return model
    active = [name for name in getattr(inner, ACTIVE_ATTRIBUTE) if name != adapter_name]
    if not active:
        active = [next(iter(configs))]
        warnings.warn(f"adapter {adapter_name!r} was active and is deleted: {active[0]!r} is active now.", stacklevel=2)
    _activate(inner, active)
    return model


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
        weight = base_weight(layer.base_layer)
        tied = [
            (other, module, name)
            for other, module, name in holders.get(id(weight), ())
            if module is not layer.base_layer
        ]
        for _, module, name in tied:
            setattr(module, name, nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
        if tied:
            config = getattr(model, "config", None)
            if config is not None and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
            warnings.warn(
                f"the base weight of {path!r} is tied to {', '.join(repr(t[0]) for t in tied)}: each now "
                f"holds its own copy, so that merging changes only {path!r} and keeps the model's outputs.",
                stacklevel=3,
            )


def merge(model: nn.Module) -> nn.Module:
    """Merge the active adapters into the base weights (undo with `unmerge`); returns `model`.

    All or nothing: when one merged weight would hold NaN or inf, the layers merged so far are
    restored and ValueError names the module.
    """
    configs_of(model)
    inner = unwrap(model)
    _untie_adapted_weights(inner)
    merge_all_or_none(lora_layers(inner))
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged base weight bit for bit; returns `model`."""
    configs_of(model)
    for _, layer in lora_layers(unwrap(model)):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters for good and return `model` made of plain torch layers, no LoRA code left.

    Inactive adapters are dropped; `modules_to_save` are replaced by the active adapter's copy. Every
    merged weight is checked before any is written (on NaN or inf: ValueError, model untouched), and
    no copy of the base weights is kept, so memory does not grow.
    """
    configs_of(model)
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
    for path, wrapper in list(modules_to_save(inner)):
        _replace(inner, path, wrapper.trained_module or wrapper.original_module)
    delattr(inner, CONFIGS_ATTRIBUTE)
    delattr(inner, ACTIVE_ATTRIBUTE)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block: LoRA branches off, original `modules_to_save`.

    Merged layers are unmerged for the block and merged again after it (both exact).
    """
    configs_of(model)
    inner = unwrap(model)
    switches = _switches(inner)
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


@contextlib.contextmanager
def routed(model: nn.Module, adapter_per_row: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row `i` of each batch runs through adapter `adapter_per_row[i]` (None or
    `"__base__"`: the base model), as PEFT's `adapter_names=` argument does.

    For inference: the model must be in evaluation mode and unmerged. The rows of each adapter run
    together (a contiguous run of rows as one view, no copy), not one at a time. `disable_adapters`
    inside the block runs the base for every row.
    """
    routing = Routing.of(list(adapter_per_row))
    # The adapters the batch uses, once each: a per-row check would cost a pass over the rows in every layer.
    used = cast("list[str]", [name for name, _ in routing.groups])  # the names as given: str or None, None left out
    check_names(model, used)
    inner = unwrap(model)
    if inner.training:
        raise ValueError("routed() is for inference, and the model is in training mode: call model.eval() first.")
    if any(layer.merged for _, layer in lora_layers(inner)):
        raise ValueError(
            "the model's adapters are merged, so rows cannot take different adapters: call "
            "unmerge(model) before routed()."
        )
    switches = _switches(inner)
    for _, layer in lora_layers(inner):
        layer.check_routable(used)
    for module in switches:
        module.route(routing)
    try:
        yield model
    finally:
        for module in switches:
            module.route(None)


def uses_fan_in_fan_out(model: nn.Module, adapter_name: str | None = None) -> bool:
    """Whether a layer holding the adapter is a Conv1D, whose weight is `(in, out)` (PEFT's `fan_in_fan_out`)."""
    return any(
        is_conv1d(layer.base_layer)
        for _, layer in lora_layers(model)
        if adapter_name is None or adapter_name in layer.adapters
    )


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """How many parameters train, out of all (shared parameters counted once)."""
    parameters = list(model.parameters())
    return TrainableParameters(
        sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)
    )
