"""Whole-model LoRA for Keras 3: apply, merge, unmerge, merge_and_unload, unload, parameter counts.

A layer's module path is its `name` prefixed by the names of the models and layers containing
it, joined with `.` (the outer model's own name excluded), so `encoder.attention.query` in Keras
is the PyTorch module `encoder.attention.query`. Layers are converted in place (the same object
becomes its LoRA subclass), so functional graphs, parents and `.keras` files keep working.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import keras

from lora_spec.backends import keras_einsum
from lora_spec.backends.keras_layers import LORA_LAYERS, LoRALayer, lora_arguments
from lora_spec.config import LoRAConfig, resolve_config
from lora_spec.merging import merge_all_or_none
from lora_spec.parameter_counts import TrainableParameters
from lora_spec.targets import ModuleInfo, modules_to_save_paths, select_targets

CONFIG_ATTRIBUTE = "_lora_spec_config"


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
    if lora_class is None or (lora_class.base_class is keras.layers.EinsumDense
                              and keras_einsum.plan(layer.equation) is None):
        return "other", type(layer).__name__
    return lora_class.lora_kind, type(layer).__name__


def describe_layers(model: keras.layers.Layer) -> list[ModuleInfo]:
    """Every layer of `model` as a `ModuleInfo`; two layers on one path raise ValueError."""
    infos, seen = [], set()
    for path, layer in named_layers(model):
        if path in seen:
            raise ValueError(f"two layers of the model have the module path {path!r}: give them unique names "
                             "(name=...) so that adapters can name them.")
        seen.add(path)
        infos.append(ModuleInfo(path, *_kind(layer)))
    return infos


def plan(model: keras.layers.Layer, config: LoRAConfig,
         require_modules_to_save: bool = True) -> tuple[LoRAConfig, list[str], list[str]]:
    """`(config with resolved targets, paths to adapt, paths of modules_to_save)`, touching nothing."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model must be a keras.Model or keras.layers.Layer, not {type(model).__name__}.")
    layers = describe_layers(model)
    config, matches = select_targets(layers, config)
    save_paths = modules_to_save_paths(layers, config, require_modules_to_save)
    by_path = dict(named_layers(model))
    for match in matches:
        layer = by_path[match.path]
        if not isinstance(layer, LoRALayer):
            LORA_LAYERS[type(layer)].check_adaptable(layer, config.rank_for(match.path))
    return config, [m.path for m in matches], save_paths


def apply(model: keras.layers.Layer, config: LoRAConfig | None = None, naming: str = "keras",
          **overrides: Any) -> keras.layers.Layer:
    """Add LoRA to the targeted `Dense`, `EinsumDense`, `Embedding` and `Conv2D` layers of `model` in place;
    returns `model`.

    `overrides` are `LoRAConfig` fields (`r=16, alpha=32, target_modules=[...]`); targets,
    default and errors are the PyTorch backend's (`lora_spec.targets.select_targets`). Layers
    that already have LoRA are kept as they are, so applying twice does not wrap twice.
    Afterwards only the adapters, `modules_to_save` and the biases `config.bias` names train;
    other layers get `trainable = False`, Keras's way of freezing. Compile after `apply`.
    `naming="transformers"` reads module names as those of the Hugging Face model that a KerasHub
    `model` converts from (`target_modules=["q_proj", "v_proj"]`).
    """
    from lora_spec.backends import keras_hub_names  # imports KerasHub only for KerasHub models

    config = keras_hub_names.keras_config(model, resolve_config(config, overrides), naming)
    return adapt(model, *plan(model, config))


def adapt(model: keras.layers.Layer, config: LoRAConfig, target_paths: list[str],
          save_paths: list[str]) -> keras.layers.Layer:
    """`apply` for targets already resolved by `plan`; a second call keeps the first one's modules to save."""
    by_path = dict(named_layers(model))
    previous = getattr(model, CONFIG_ATTRIBUTE, None)
    if previous is not None and previous.modules_to_save:
        kept = modules_to_save_paths(describe_layers(model), previous, require=False)
        save_paths = list(dict.fromkeys(save_paths + kept))
        config = config.replace(modules_to_save=tuple(dict.fromkeys((config.modules_to_save or ()) +
                                                                    previous.modules_to_save)))
    train_bias = config.bias != "none"
    for path in target_paths:
        layer = by_path[path]
        if not isinstance(layer, LoRALayer):
            LORA_LAYERS[type(layer)].adapt_in_place(layer, **lora_arguments(config, path, train_bias))
    _set_trainable(model, by_path, save_paths, config.bias)
    setattr(model, CONFIG_ATTRIBUTE, config)
    _reset_compiled_functions(model)
    return model


def _set_trainable(model: keras.layers.Layer, by_path: dict[str, keras.layers.Layer], save_paths: list[str],
                   bias: str) -> None:
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


def _reset_compiled_functions(model: keras.layers.Layer) -> None:
    # Functions traced before a merge or conversion would still run the old graph.
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def config_of(model: keras.layers.Layer) -> LoRAConfig:
    """The resolved config `apply` stored on `model`, or one read back from its LoRA layers.

    After a `.keras` round trip the model has its LoRA layers but not the Python attribute, so
    the config is rebuilt from them (their own r, alpha, dropout...; `modules_to_save` is lost);
    so it is when two `apply` calls gave layers different ranks.
    """
    layers = _require_lora_layers(model)
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if isinstance(config, LoRAConfig) and all(
            (layer.r, layer.scaling) == (config.rank_for(path), config.scaling_for(path)) for path, layer in layers):
        return config
    # Layers adapted by an earlier apply with other ranks: their own values are the truth.
    from_layers = _config_from_layers(layers)
    if isinstance(config, LoRAConfig):
        return from_layers.replace(bias=config.bias, modules_to_save=config.modules_to_save)
    return from_layers


def _config_from_layers(layers: list[tuple[str, LoRALayer]]) -> LoRAConfig:
    first = layers[0][1]
    shared = {name: getattr(first, name) for name in ("dropout", "use_rslora", "init")}
    for path, layer in layers:
        for name, value in shared.items():
            if getattr(layer, name) != value:
                raise ValueError(f"LoRA layers disagree on {name} ({value!r} and {getattr(layer, name)!r} at "
                                 f"{path!r}): one adapter file holds one value; apply them with one config.")
    anchored = {path: re.escape(path) for path, _ in layers}
    return LoRAConfig(
        r=first.r, alpha=first.alpha, target_modules=tuple(path for path, _ in layers),
        bias="lora_only" if any(layer.train_bias for _, layer in layers) else "none",
        rank_pattern={anchored[path]: layer.r for path, layer in layers if layer.r != first.r},
        alpha_pattern={anchored[path]: layer.alpha for path, layer in layers if layer.alpha != first.alpha},
        **shared)


def merge(model: keras.layers.Layer) -> keras.layers.Layer:
    """Merge every adapter into its base weight (undo with `unmerge`); returns `model`.

    All or nothing: when a merged weight would hold NaN or inf, the layers merged so far are
    restored and ValueError names the layer. Traced functions of the model are reset.
    """
    merge_all_or_none(_require_lora_layers(model), noun="layer")
    _reset_compiled_functions(model)
    return model


def unmerge(model: keras.layers.Layer) -> keras.layers.Layer:
    """Restore every merged base weight bit for bit; returns `model`."""
    for _, layer in _require_lora_layers(model):
        layer.unmerge()
    _reset_compiled_functions(model)
    return model


def merge_and_unload(model: keras.layers.Layer) -> keras.layers.Layer:
    """Merge the adapters for good: `model` is left with plain `Dense`/`EinsumDense`/`Embedding`/`Conv2D` layers."""
    merge(model)
    for _, layer in lora_layers(model):
        layer.merge_and_unload()
    return _forget_config(model)


def unload(model: keras.layers.Layer) -> keras.layers.Layer:
    """Drop the adapters: `model` is left with plain layers holding the original base weights."""
    for _, layer in _require_lora_layers(model):
        layer.unload()
    return _forget_config(model)


def _forget_config(model: keras.layers.Layer) -> keras.layers.Layer:
    if hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
    _reset_compiled_functions(model)
    return model


def _require_lora_layers(model: keras.layers.Layer) -> list[tuple[str, LoRALayer]]:
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model must be a keras.Model or keras.layers.Layer, not {type(model).__name__}.")
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("this model has no LoRA adapter: call lora_spec.keras.apply(model) first.")
    return layers


def trainable_parameters(model: keras.layers.Layer) -> TrainableParameters:
    """How many weights train, out of all (Keras's `trainable_weights`; shared weights once)."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model must be a keras.Model or keras.layers.Layer, not {type(model).__name__}.")
    return TrainableParameters(_count(model.trainable_weights), _count(model.weights))


def _count(variables: list[keras.Variable]) -> int:
    return sum(math.prod(variable.shape) for variable in variables)
