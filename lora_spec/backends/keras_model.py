"""Whole-model LoRA for Keras 3: named adapters, switching, combining, routing, merging, unloading, counts.

A layer's module path is its `name` prefixed by the names of the models and layers containing
it, joined with `.` (the outer model's own name excluded), so `encoder.attention.query` in Keras
is the PyTorch module `encoder.attention.query`. Layers are converted in place (the same object
becomes its LoRA subclass), so functional graphs, parents and `.keras` files keep working.
Adapters have PEFT's names and meanings, as in `lora_spec.torch`: the model keeps their configs
by name and which are active; each LoRA layer holds the adapters that target it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from lora_spec.backends import keras_einsum
from lora_spec.backends.keras_layers import LORA_LAYERS, LoRALayer, adapter_arguments, lora_arguments
from lora_spec.backends.keras_saved_modules import ORIGINAL, SavedModules
from lora_spec.config import LoRAConfig, config_for_layers, resolve_config
from lora_spec.merging import merge_all_or_none
from lora_spec.multi_adapter import (
    BASE_MODEL,
    DEFAULT_ADAPTER,
    Factors,
    check_adapter_name,
    combine,
    weighted_combination,
)
from lora_spec.parameter_counts import TrainableParameters
from lora_spec.targets import ModuleInfo, modules_to_save_paths, select_targets

CONFIGS_ATTRIBUTE = "_lora_spec_configs"
ACTIVE_ATTRIBUTE = "_lora_spec_active"
# Adapter names per row (None or "__base__": the base), or an integer tensor of indices into `adapter_names`.
AdapterPerRow = Sequence[str | None] | Any


def named_layers(model: keras.layers.Layer) -> Iterator[tuple[str, keras.layers.Layer]]:
    """`(module path, layer)` for every layer below `model`, parents first; a shared layer once."""
    seen = {id(model)}

    def walk(parent: keras.layers.Layer, prefix: str) -> Iterator[tuple[str, keras.layers.Layer]]:
        for layer in parent._layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            path = f"{prefix}.{layer.name}" if prefix else layer.name
            yield path, layer
            yield from walk(layer, path)

    return walk(model, "")


def lora_layers(model: keras.layers.Layer) -> Iterator[tuple[str, LoRALayer]]:
    """`(path, layer)` for every LoRA layer of `model`."""
    return ((path, layer) for path, layer in named_layers(model) if isinstance(layer, LoRALayer))


def _kind(layer: keras.layers.Layer) -> tuple[str, str]:
    """`(kind, class name)` as the core's target matching sees a layer."""
    if isinstance(layer, LoRALayer):
        return layer.lora_kind, layer.base_class.__name__
    lora_class = LORA_LAYERS.get(type(layer))
    if lora_class is None or (
        lora_class.base_class is keras.layers.EinsumDense and keras_einsum.plan(layer.equation) is None
    ):
        return "other", type(layer).__name__
    return lora_class.lora_kind, type(layer).__name__


def describe_layers(model: keras.layers.Layer) -> list[ModuleInfo]:
    """Every layer of `model` as a `ModuleInfo`; two layers on one path raise ValueError."""
    infos, seen = [], set()
    for path, layer in named_layers(model):
        if path in seen:
            raise ValueError(
                f"two layers of the model have the module path {path!r}: give them unique names "
                "(name=...) so that adapters can name them."
            )
        seen.add(path)
        infos.append(ModuleInfo(path, *_kind(layer)))
    return infos


def _check_model(model: object) -> None:
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model must be a keras.Model or keras.layers.Layer, not {type(model).__name__}.")


def plan(
    model: keras.layers.Layer,
    config: LoRAConfig,
    require_modules_to_save: bool = True,
    adapter_name: str | None = DEFAULT_ADAPTER,
) -> tuple[LoRAConfig, list[str], list[str]]:
    """`(config with resolved targets, paths to adapt, paths of modules_to_save)`, touching nothing; a target
    that cannot take an adapter of its rank raises, unless it already holds adapter `adapter_name`."""
    _check_model(model)
    layers = describe_layers(model)
    config, matches = select_targets(layers, config)
    save_paths = modules_to_save_paths(layers, config, require_modules_to_save)
    by_path = dict(named_layers(model))
    for match in matches:
        layer = by_path[match.path]
        variant = (config.rank_for(match.path), config.init, config.use_dora)
        if isinstance(layer, LoRALayer):
            if adapter_name not in layer.adapters:
                layer.check_new_adapter(adapter_name, *variant)
        else:
            LORA_LAYERS[type(layer)].check_adaptable(layer, *variant)
    return config, [m.path for m in matches], save_paths


def apply(
    model: keras.layers.Layer,
    config: LoRAConfig | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    naming: str = "keras",
    **overrides: Any,
) -> keras.layers.Layer:
    """Add adapter `adapter_name` to the targeted `Dense`, `EinsumDense`, `Embedding` and `Conv2D` layers of
    `model` in place; returns `model`.

    `overrides` are `LoRAConfig` fields (`r=16, alpha=32, target_modules=[...]`); targets,
    default and errors are the PyTorch backend's (`lora_spec.targets.select_targets`). The first
    adapter becomes active; another name adds an inactive adapter with its own targets, rank and
    alpha (PEFT's `add_adapter`). Layers that already hold the adapter keep it, so applying the
    same name twice does not wrap twice. Afterwards only the active adapters, their
    `modules_to_save` and the biases their configs name train; other layers get
    `trainable = False`, Keras's way of freezing. Compile after `apply`. `naming="transformers"` reads
    module names as those of the Hugging Face model that a KerasHub `model` converts from
    (`target_modules=["q_proj", "v_proj"]`).
    """
    from lora_spec.backends import keras_hub_names  # imports KerasHub only for KerasHub models

    check_adapter_name(adapter_name)
    config = keras_hub_names.keras_config(model, resolve_config(config, overrides), naming)
    return adapt(model, *plan(model, config, adapter_name=adapter_name), adapter_name=adapter_name)


def adapt(
    model: keras.layers.Layer,
    config: LoRAConfig,
    target_paths: list[str],
    save_paths: list[str],
    adapter_name: str = DEFAULT_ADAPTER,
) -> keras.layers.Layer:
    """`apply` for targets already resolved by `plan`; applying a name again keeps its earlier modules to save."""
    by_path = dict(named_layers(model))
    configs = dict(_stored_configs(model))
    previous = configs.get(adapter_name)
    if previous is not None and previous.modules_to_save:
        kept = modules_to_save_paths(describe_layers(model), previous, require=False)
        save_paths = list(dict.fromkeys(save_paths + kept))
        config = config.replace(
            modules_to_save=tuple(dict.fromkeys((config.modules_to_save or ()) + previous.modules_to_save))
        )
    active = list(getattr(model, ACTIVE_ATTRIBUTE, None) or [adapter_name])
    train_bias = config.bias != "none"
    for path in target_paths:
        layer = by_path[path]
        if not isinstance(layer, LoRALayer):
            LORA_LAYERS[type(layer)].adapt_in_place(
                layer, adapter_name=adapter_name, **lora_arguments(config, path, train_bias)
            )
        elif adapter_name not in layer.adapters:
            layer.add_adapter(adapter_name, **adapter_arguments(config, path))
            layer.train_bias = layer.train_bias or train_bias
    saved = SavedModules.of(model)
    for path in save_paths:
        saved.add(path, by_path[path], adapter_name)
    configs[adapter_name] = config
    remember(model, configs, active)
    activate(model, active)
    return model


def remember(model: keras.layers.Layer, configs: dict[str, LoRAConfig], active: list[str]) -> None:
    """Keep the adapters' configs and the active names on the model (as plain attributes, which Keras does not
    track)."""
    object.__setattr__(model, CONFIGS_ATTRIBUTE, dict(configs))
    object.__setattr__(model, ACTIVE_ATTRIBUTE, list(active))


def _stored_configs(model: keras.layers.Layer) -> dict[str, LoRAConfig]:
    return model.__dict__.get(CONFIGS_ATTRIBUTE) or {}


def activate(model: keras.layers.Layer, active: list[str]) -> None:
    """Run the adapters `active` everywhere: LoRA layers, copies of modules to save, what trains."""
    object.__setattr__(model, ACTIVE_ATTRIBUTE, list(active))
    by_path = dict(named_layers(model))
    for _, layer in lora_layers(model):
        layer.set_active_adapters(active)
    saved = SavedModules.of(model)
    saved.show_active({path: by_path[path] for path in saved.current}, active)
    configs = configs_of(model)
    save_paths = [path for path in saved.current if saved.current[path] != ORIGINAL]
    _set_trainable(
        model,
        by_path,
        save_paths,
        "all" if any(configs[name].bias == "all" for name in active if name in configs) else "none",
    )
    reset_compiled_functions(model)


def _set_trainable(
    model: keras.layers.Layer, by_path: dict[str, keras.layers.Layer], save_paths: list[str], bias: str
) -> None:
    model.trainable = False
    trained = [path for path, layer in by_path.items() if isinstance(layer, LoRALayer)] + save_paths
    for path in trained:
        by_path[path].trainable = True
    if bias == "all":
        for path, layer in by_path.items():
            if getattr(layer, "bias", None) is not None and isinstance(layer.bias, keras.Variable):
                layer.bias.trainable = True
                trained.append(path)
    # Containers of trained layers must be trainable too, or their trainable_weights hide them;
    # setting the flag directly keeps their other children frozen.
    model._trainable = True
    for path in trained:
        parts = path.split(".")
        for depth in range(1, len(parts)):
            by_path[".".join(parts[:depth])]._trainable = True


def reset_compiled_functions(model: keras.layers.Layer) -> None:
    """Forget the model's traced functions: ones traced before a merge, a conversion or a switch of adapters
    would still run the old graph. A model compiled for `fit` gets a fresh optimizer for the variables that
    train now (Keras builds an optimizer for one set of variables)."""
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built and getattr(model, "compiled", False):
        known = {id(variable) for variable in optimizer._trainable_variables}
        if any(id(variable) not in known for variable in model.trainable_variables):
            try:
                model.compile_from_config(model.get_compile_config())
            except (TypeError, ValueError) as error:
                warnings.warn(
                    f"the model's trainable variables changed and its compile config cannot be read back "
                    f"({error}): call model.compile(...) again before fit.",
                    stacklevel=3,
                )


def configs_of(model: keras.layers.Layer) -> dict[str, LoRAConfig]:
    """The configs of the model's adapters by name, read back from its LoRA layers where they disagree.

    After a `.keras` round trip the model has its LoRA layers but not the Python attributes, so
    each config is rebuilt from the layers holding the adapter (their own r, alpha, dropout...;
    `modules_to_save` is lost); so it is when two `apply` calls gave layers different ranks.
    """
    layers = _require_lora_layers(model)
    stored = _stored_configs(model)
    names = list(dict.fromkeys([name for name in stored] + [name for _, layer in layers for name in layer.adapters]))
    configs = {}
    for name in names:
        holders = [(path, layer.adapter(name)) for path, layer in layers if name in layer.adapters]
        config = stored.get(name)
        if (
            isinstance(config, LoRAConfig)
            and holders
            and all(
                (adapter.r, adapter.scaling) == (config.rank_for(path), config.scaling_for(path))
                for path, adapter in holders
            )
        ):
            configs[name] = config
            continue
        if not holders:
            continue
        from_layers = _config_from_layers(
            holders, any(layer.train_bias for _, layer in layers if name in layer.adapters)
        )
        configs[name] = (
            from_layers
            if config is None
            else from_layers.replace(bias=config.bias, modules_to_save=config.modules_to_save)
        )
    return configs


def _config_from_layers(holders: list[tuple[str, Any]], train_bias: bool) -> LoRAConfig:
    first = holders[0][1]
    shared = {name: getattr(first, name) for name in ("dropout", "use_rslora", "init", "use_dora")}
    for path, adapter in holders:
        for name, value in shared.items():
            if getattr(adapter, name) != value:
                raise ValueError(
                    f"LoRA layers disagree on {name} ({value!r} and {getattr(adapter, name)!r} at "
                    f"{path!r}): one adapter file holds one value; apply them with one config."
                )
    base = LoRAConfig(r=first.r, alpha=first.alpha, bias="lora_only" if train_bias else "none", **shared)
    return config_for_layers(base, {path: (adapter.r, adapter.alpha) for path, adapter in holders})


def config_of(model: keras.layers.Layer, adapter_name: str | None = None) -> LoRAConfig:
    """The config of adapter `adapter_name` (default: the first active one)."""
    configs = configs_of(model)
    name = adapter_name if adapter_name is not None else (active_adapters(model) or list(configs))[0]
    check_names(model, [name])
    return configs[name]


def adapter_names(model: keras.layers.Layer) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(configs_of(model))


def active_adapters(model: keras.layers.Layer) -> list[str]:
    """The names of the adapters the model runs (their updates add up)."""
    layers = _require_lora_layers(model)
    stored = model.__dict__.get(ACTIVE_ATTRIBUTE)
    return list(stored) if stored is not None else list(layers[0][1].active_adapters)


def check_names(model: keras.layers.Layer, names: Sequence[str]) -> None:
    """Raise, listing the model's adapters, when one of `names` is not among them."""
    known = adapter_names(model)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown adapter {name!r}: the model has adapters {', '.join(map(repr, known))}.")


def _adapter_list(names: str | Sequence[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("no adapter named: pass one name or several (use disable_adapters(model) to run the base).")
    return names


def _check_one_copy_per_module(model: keras.layers.Layer, names: Sequence[str], action: str) -> None:
    saved = SavedModules.of(model)
    for path in saved.current:
        holders = [name for name in names if name in saved.owners(path)]
        if len(holders) > 1:
            raise ValueError(
                f"adapters {', '.join(map(repr, holders))} each train their own {path!r} (modules_to_save), "
                f"and one module cannot run two copies: {action} at most one of them."
            )


def _unmerge_with_warning(model: keras.layers.Layer, reason: str) -> None:
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    if merged:
        warnings.warn(f"the model's adapters are merged; unmerging them to {reason}.", stacklevel=3)
        for layer in merged:
            layer.unmerge()


def set_adapter(model: keras.layers.Layer, adapter_name: str | Sequence[str]) -> keras.layers.Layer:
    """Run (and train) adapter `adapter_name`, or the sum of several (a list); returns `model`.

    Nothing is rebuilt: the model's traced functions are reset so that `predict`, `evaluate` and
    `fit` of a compiled model run the new adapters, and a compiled model gets a fresh optimizer
    for them. Only the active adapters train. A merged model is unmerged first, with a warning.
    """
    names = _adapter_list(adapter_name)
    check_names(model, names)
    _check_one_copy_per_module(model, names, "activate")
    _unmerge_with_warning(model, f"activate {names}")
    remember(model, configs_of(model), names)
    activate(model, names)
    return model


def remove_from_layers(model: keras.layers.Layer, adapter_name: str) -> None:
    """Take adapter `adapter_name` out of every (unmerged) layer and module to save; a layer left without
    adapters turns back into its base class. The model's configs and active list are the caller's."""
    by_path = dict(named_layers(model))
    for _, layer in list(lora_layers(model)):
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
            if not layer.adapters:
                layer.unload()
    saved = SavedModules.of(model)
    for path in list(saved.current):
        saved.remove(path, by_path[path], adapter_name)


def delete_adapter(model: keras.layers.Layer, adapter_name: str) -> keras.layers.Layer:
    """Remove adapter `adapter_name` from every layer; returns `model`.

    Deleting an active adapter activates the first remaining one, with a warning (as PEFT does);
    deleting the last one leaves the plain base model.
    """
    check_names(model, [adapter_name])
    configs = configs_of(model)
    active = [name for name in active_adapters(model) if name != adapter_name]
    _unmerge_with_warning(model, f"delete {adapter_name!r}")
    remove_from_layers(model, adapter_name)
    del configs[adapter_name]
    if not configs:
        return _forget_config(model)
    if not active:
        active = [next(iter(configs))]
        warnings.warn(f"adapter {adapter_name!r} was active and is deleted: {active[0]!r} is active now.", stacklevel=2)
    remember(model, configs, active)
    activate(model, active)
    return model


def add_weighted_adapter(
    model: keras.layers.Layer,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> keras.layers.Layer:
    """Add adapter `adapter_name` standing for `sum_k weights[k] * adapters[k]`; returns `model`.

    As `lora_spec.torch.add_weighted_adapter`: the reference's "cat" (exact), "svd" (default) or
    "linear" combination per layer over the union of the adapters' targets, scaling 1, one adapter
    always "linear"; the new adapter is inactive, and everything is checked before the model changes.
    """
    names = _adapter_list(adapters)
    check_names(model, names)
    configs = configs_of(model)
    combination = weighted_combination(names, weights, adapter_name, combination_type, configs)
    saved = SavedModules.of(model)
    copies = {}
    for path in saved.current:
        holders = [name for name, weight in zip(names, weights, strict=True) if weight and name in saved.owners(path)]
        if len(holders) > 1:
            raise ValueError(
                f"adapters {', '.join(map(repr, holders))} each train their own {path!r} (modules_to_save), "
                "and full tensors cannot be weighted: give all but one of them weight 0."
            )
        if holders:
            copies[path] = holders[0]
    combined = {}
    for path, layer in lora_layers(model):
        present = [(name, weight) for name, weight in zip(names, weights, strict=True) if name in layer.adapters]
        if present:
            factors = [Factors(*layer.lora_weights(name), layer.adapter(name).scaling) for name, _ in present]
            try:
                combined[path] = combine(factors, [weight for _, weight in present], combination, svd_rank)
            except ValueError as error:
                raise ValueError(f"layer {path!r}: {error}") from None
    layers = dict(lora_layers(model))
    first = configs[names[0]]
    for path, (lora_a, lora_b) in combined.items():
        rank = lora_a.shape[0]
        layers[path].add_adapter(adapter_name, r=rank, alpha=float(rank), dropout=first.dropout)
        layers[path].set_lora_weights(lora_a, lora_b, adapter_name)
    by_path = dict(named_layers(model))
    for path, source in copies.items():
        saved.add(path, by_path[path], adapter_name)
        for variable in by_path[path].weights:
            saved.assign(path, adapter_name, variable, saved.values(path, by_path[path], source)[variable.path])
    base = first.replace(
        use_rslora=False, rank_pattern={}, alpha_pattern={}, exclude_modules=None, modules_to_save=tuple(copies) or None
    )
    configs[adapter_name] = config_for_layers(
        base, {path: (a.shape[0], float(a.shape[0])) for path, (a, _) in combined.items()}
    )
    remember(model, configs, active_adapters(model))
    activate(model, active_adapters(model))
    return model


def _route_ids(model: keras.layers.Layer, adapter_per_row: AdapterPerRow) -> tuple[Any, dict[str, int]]:
    """An int tensor of adapter indices per row (-1: the base) and the index of each adapter name."""
    names = adapter_names(model)
    indices = {name: index for index, name in enumerate(names)}
    if isinstance(adapter_per_row, (list, tuple)):
        check_names(model, [name for name in adapter_per_row if name is not None and name != BASE_MODEL])
        adapter_per_row = np.asarray([indices.get(name, -1) for name in adapter_per_row], np.int32)
    return ops.convert_to_tensor(adapter_per_row, "int32"), indices


@contextlib.contextmanager
def routed(model: keras.layers.Layer, adapter_per_row: AdapterPerRow) -> Iterator[keras.layers.Layer]:
    """Inside the block, row `i` of each batch runs through adapter `adapter_per_row[i]` (None or
    `"__base__"`: the base model), as PEFT's `adapter_names=` argument does.

    `adapter_per_row` is a list of names, or an integer tensor of indices into
    `adapter_names(model)` (-1: the base). Entered inside a traced function (`tf.function`,
    `jax.jit`) with a tensor argument, the choice stays data of that function; `RoutedModel` does
    that for `predict`. Each layer computes an adapter's low-rank path on every row and keeps the
    rows routed to it. For inference: call the model with `training=False`, unmerged; the routed
    adapters must not train different copies of one module to save, nor be DoRA adapters (refused,
    as in PEFT).
    """
    route_ids, indices = _route_ids(model, adapter_per_row)
    if isinstance(adapter_per_row, (list, tuple)):  # only the adapters named run; any index may come in a tensor
        indices = {name: index for name, index in indices.items() if name in adapter_per_row}
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.check_routable(indices)
    if any(layer.merged for layer in layers):
        raise ValueError(
            "the model's adapters are merged, so rows cannot take different adapters: call "
            "unmerge(model) before routed()."
        )
    saved = SavedModules.of(model)
    if any(len(saved.owners(path)) > 0 for path in saved.current):
        raise ValueError(
            "adapters of this model train their own copies of modules_to_save, which Keras cannot run "
            "per row: route a batch per adapter with set_adapter instead."
        )
    for layer in layers:
        layer.route(route_ids, indices)
    reset_compiled_functions(model)
    try:
        yield model
    finally:
        for layer in layers:
            layer.route(None)
        reset_compiled_functions(model)


class RoutedModel(keras.Model):
    """`model` taking `[inputs, adapter_ids]`: row `i` of `inputs` runs through adapter
    `adapter_names(model)[adapter_ids[i]]` (-1: the base model).

    The ids are an input of the model, so `predict` slices them into batches with the inputs
    and every traced function reads them as data: `RoutedModel(model).predict([x, ids])`.
    """

    def __init__(self, model: keras.layers.Layer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.routed_model = model

    def call(self, inputs: Sequence[Any], training: bool | None = None) -> Any:
        inputs, adapter_ids = inputs
        with routed(self.routed_model, adapter_ids):
            return self.routed_model(inputs, training=False)


@contextlib.contextmanager
def disable_adapters(model: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Run the base model inside the block: LoRA branches off, original modules to save.

    Merged layers are unmerged for the block and merged again after it (both exact); traced
    functions of the model are reset on the way in and out.
    """
    layers = [layer for _, layer in _require_lora_layers(model)]
    was_merged = [layer for layer in layers if layer.merged]
    for layer in was_merged:
        layer.unmerge()
    for layer in layers:
        layer.adapter_enabled = False
    by_path = dict(named_layers(model))
    saved = SavedModules.of(model)
    saved.show_active({path: by_path[path] for path in saved.current}, [])
    reset_compiled_functions(model)
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapter_enabled = True
        for layer in was_merged:
            layer.merge()
        saved.show_active({path: by_path[path] for path in saved.current}, active_adapters(model))
        reset_compiled_functions(model)


def merge(model: keras.layers.Layer) -> keras.layers.Layer:
    """Merge the active adapters into the base weights (undo with `unmerge`); returns `model`.

    All or nothing: when a merged weight would hold NaN or inf, the layers merged so far are
    restored and ValueError names the layer. Traced functions of the model are reset.
    """
    merge_all_or_none(_require_lora_layers(model), noun="layer")
    reset_compiled_functions(model)
    return model


def unmerge(model: keras.layers.Layer) -> keras.layers.Layer:
    """Restore every merged base weight bit for bit; returns `model`."""
    for _, layer in _require_lora_layers(model):
        layer.unmerge()
    reset_compiled_functions(model)
    return model


def merge_and_unload(model: keras.layers.Layer) -> keras.layers.Layer:
    """Merge the active adapters for good: `model` is left with plain `Dense`/`EinsumDense`/`Embedding`/`Conv2D`
    layers, and the active adapter's copies of modules to save."""
    merge(model)
    for _, layer in lora_layers(model):
        layer.merge_and_unload()
    return _forget_config(model)


def unload(model: keras.layers.Layer) -> keras.layers.Layer:
    """Drop the adapters: `model` is left with plain layers holding the original base weights, and the
    original modules to save."""
    by_path = dict(named_layers(model))
    for _, layer in _require_lora_layers(model):
        layer.unload()
    saved = SavedModules.of(model)
    saved.show_active({path: by_path[path] for path in saved.current}, [])
    return _forget_config(model)


def _forget_config(model: keras.layers.Layer) -> keras.layers.Layer:
    for name in (CONFIGS_ATTRIBUTE, ACTIVE_ATTRIBUTE, "_lora_spec_saved_modules"):
        model.__dict__.pop(name, None)
    reset_compiled_functions(model)
    return model


def _require_lora_layers(model: keras.layers.Layer) -> list[tuple[str, LoRALayer]]:
    _check_model(model)
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("this model has no LoRA adapter: call lora_spec.keras.apply(model) first.")
    return layers


def trainable_parameters(model: keras.layers.Layer) -> TrainableParameters:
    """How many weights train, out of all (Keras's `trainable_weights`; shared weights once)."""
    _check_model(model)
    return TrainableParameters(_count(model.trainable_weights), _count(model.weights))


def _count(variables: list[keras.Variable]) -> int:
    return sum(math.prod(variable.shape) for variable in variables)
