"""Adapter files for Keras models, in PEFT's format, through `lora_spec.adapter_io`.

The files are the PyTorch backend's: `A` and `B` in the reference layout, and fully trained
tensors (`modules_to_save`, biases) under PyTorch's parameter names and layouts (`Dense`'s
`kernel (in, out)` is stored as `weight (out, in)`, `gamma` as `weight`...), so an adapter moves
between a Keras model and a PyTorch model whose module paths are the same.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import keras
import numpy as np
from keras import ops

from lora_spec.adapter_io import PREFIX, AdapterWeights, load_adapter_dir, save_adapter_dir
from lora_spec.backends import keras_einsum
from lora_spec.backends.keras_layers import LoRAEmbedding, LoRALayer, reference_shapes
from lora_spec.backends.keras_model import CONFIG_ATTRIBUTE, adapt, config_of, lora_layers, named_layers, plan
from lora_spec.config import LoRAConfig

Layout = Callable[[np.ndarray, keras.layers.Layer], np.ndarray]


def _same(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    return value


def _transposed(axes: tuple[int, ...]) -> tuple[Layout, Layout]:
    inverse = tuple(np.argsort(axes))
    return (lambda value, layer: np.transpose(value, axes)), (lambda value, layer: np.transpose(value, inverse))


def _einsum_kernel_to_torch(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    return keras_einsum.plan(layer.equation).to_reference(value)


def _einsum_kernel_from_torch(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    return keras_einsum.plan(layer.equation).from_reference(value, tuple(layer._kernel.shape))


def _flattened(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    return value.reshape(-1)


def _as_bias(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    return value.reshape(tuple(layer.bias.shape)) if value.size == math.prod(layer.bias.shape) else value


_AS_IS = (None, _same, _same)
_MATRIX = _transposed((1, 0))
_NORMALIZATION = {"gamma": ("weight", _same, _same), "beta": ("bias", _same, _same),
                  "moving_mean": ("running_mean", _same, _same), "moving_variance": ("running_var", _same, _same)}
# Keras variable name -> (PyTorch parameter name, to PyTorch's layout, back to Keras's), per layer class.
_TORCH_NAMES: dict[type[keras.layers.Layer], dict[str, tuple[str, Layout, Layout]]] = {
    keras.layers.Dense: {"kernel": ("weight", *_MATRIX)},
    # A Linear's bias is flat where an EinsumDense's spans its output axes, (heads, head_dim) say.
    keras.layers.EinsumDense: {"kernel": ("weight", _einsum_kernel_to_torch, _einsum_kernel_from_torch),
                               "bias": ("bias", _flattened, _as_bias)},
    keras.layers.Embedding: {"embeddings": ("weight", _same, _same)},
    keras.layers.Conv1D: {"kernel": ("weight", *_transposed((2, 1, 0)))},
    keras.layers.Conv2D: {"kernel": ("weight", *_transposed((3, 2, 0, 1)))},
    keras.layers.LayerNormalization: _NORMALIZATION,
    keras.layers.BatchNormalization: _NORMALIZATION,
}


def _torch_names(layer: keras.layers.Layer) -> dict[str, tuple[str, Layout, Layout]]:
    base = layer.base_class if isinstance(layer, LoRALayer) else type(layer)
    return _TORCH_NAMES.get(base, {})


def _parameters(path: str, layer: keras.layers.Layer) -> Iterator[tuple[str, keras.Variable]]:
    """`(PyTorch parameter name, variable)` for the variables `layer` owns directly."""
    names = _torch_names(layer)
    for variable in layer._trainable_variables + layer._non_trainable_variables:
        yield f"{path}.{names.get(variable.name, (variable.name,))[0]}", variable


def _to_torch(variable: keras.Variable, layer: keras.layers.Layer) -> np.ndarray:
    to_torch = _torch_names(layer).get(variable.name, _AS_IS)[1]
    return np.asarray(to_torch(ops.convert_to_numpy(variable), layer))


def _from_torch(value: np.ndarray, variable: keras.Variable, layer: keras.layers.Layer) -> np.ndarray:
    from_torch = _torch_names(layer).get(variable.name, _AS_IS)[2]
    return np.asarray(from_torch(value, layer))


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == prefix or path.startswith(prefix + ".") for prefix in prefixes)


def _trained_extras(model: keras.layers.Layer, config: LoRAConfig,
                    save_paths: list[str]) -> Iterator[tuple[str, keras.Variable, keras.layers.Layer]]:
    """`(file name, variable, owning layer)` of the fully trained tensors: modules to save, then biases."""
    for path, layer in named_layers(model):
        if _under(path, save_paths):
            for name, variable in _parameters(path, layer):
                yield name, variable, layer
        elif config.bias != "none" and getattr(layer, "bias", None) is not None:
            if isinstance(layer, LoRALayer):
                yield f"{path}.base_layer.bias", layer.bias, layer
            elif config.bias == "all":
                yield f"{path}.bias", layer.bias, layer


def _save_paths(model: keras.layers.Layer, config: LoRAConfig) -> list[str]:
    return [path for path, _ in named_layers(model) if config.is_module_to_save(path)]


def save_adapter(model: keras.layers.Layer, path: str | os.PathLike, naming: str = "keras",
                 transformers_class: type | str | None = None) -> None:
    """Write the adapter of `model` to the directory `path` (created if needed), as PEFT does.

    `lora_spec.torch.load_adapter` and `peft.PeftModel.from_pretrained` read it on a PyTorch
    model with the same module paths. `naming="transformers"` names it for the Hugging Face model
    that a KerasHub `model` converts from (the `*ForCausalLM` class, `BertModel` for BERT, or
    `transformers_class`), in its layouts (`lora_spec.backends.keras_hub_names`).
    """
    from lora_spec.backends import keras_hub_names  # imports KerasHub only for KerasHub models

    keras_hub_names.check_naming(naming, transformers_class)
    config = config_of(model)
    weights = AdapterWeights()
    layers = list(lora_layers(model))
    for module_path, layer in layers:
        weights.lora[module_path] = layer.lora_weights()
        if isinstance(layer, LoRAEmbedding):
            weights.embeddings.add(module_path)
    extras = _trained_extras(model, config, _save_paths(model, config))
    weights.extra = {name: _to_torch(variable, layer) for name, variable, layer in extras}
    config_dict = config.to_peft_dict([module_path for module_path, _ in layers])
    if naming == "transformers":
        config_dict, weights = keras_hub_names.to_transformers_naming(model, config, weights, transformers_class)
    save_adapter_dir(path, config_dict, weights)


def _key(name: str) -> str:
    return PREFIX + name


def _resolve_extra(by_path: dict[str, keras.layers.Layer], name: str) -> tuple[keras.Variable, keras.layers.Layer] | None:
    """The variable a file name points at; PEFT's wrapper names (`base_layer`, `modules_to_save`) are
    seen through, and `original_module` tensors (the untrained copy) are skipped by the caller."""
    name = name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
    layer_path, _, parameter = name.rpartition(".")
    layer = by_path.get(layer_path)
    if layer is None:
        return None
    for candidate, variable in _parameters(layer_path, layer):
        if candidate == name:
            return variable, layer
    return None


def _check_lora(by_path: dict[str, keras.layers.Layer], weights: AdapterWeights, config: LoRAConfig,
                target_paths: list[str]) -> None:
    for path, (lora_a, lora_b) in weights.lora.items():
        suffix = ".lora_embedding_A" if path in weights.embeddings else ".lora_A.weight"
        if path not in target_paths:
            raise ValueError(f"adapter key {_key(path + suffix)} names no LoRA target of this model: "
                             "load the adapter into the model it was trained on.")
        layer = by_path[path]
        is_embedding = isinstance(layer, (LoRAEmbedding, keras.layers.Embedding))
        if is_embedding != (path in weights.embeddings):
            kind = "an embedding" if is_embedding else "not an embedding"
            raise ValueError(f"adapter key {_key(path + suffix)} does not fit: layer {path!r} is {kind}.")
        if isinstance(layer, LoRALayer) and (layer.r, layer.scaling) != (config.rank_for(path), config.scaling_for(path)):
            raise ValueError(f"layer {path!r} has an adapter with r={layer.r}, scaling={layer.scaling:g}, but the file's "
                             f"is r={config.rank_for(path)}, scaling={config.scaling_for(path):g}: call unload(model) "
                             "before loading it.")
        rank = config.rank_for(path)
        for half, tensor, shape in zip("AB", (lora_a, lora_b), reference_shapes(layer, rank)):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"adapter tensor {half} of {path!r} has shape {tuple(tensor.shape)}, but this model "
                                 f"needs {shape}: the adapter was trained on another architecture or rank.")
    missing = sorted(set(target_paths) - set(weights.lora))
    if missing:
        raise ValueError(f"adapter has no weights for layer {missing[0]!r} although its config targets it: "
                         "the file is incomplete or its target_modules do not match it.")


def _checked_extras(by_path: dict[str, keras.layers.Layer],
                    weights: AdapterWeights) -> list[tuple[keras.Variable, np.ndarray]]:
    assignments = []
    for name, value in weights.extra.items():
        if ".original_module." in name:
            continue
        resolved = _resolve_extra(by_path, name)
        if resolved is None:
            raise ValueError(f"adapter key {_key(name)} names no weight of this model: "
                             "load the adapter into the model it was trained on.")
        variable, layer = resolved
        try:
            converted = _from_torch(value, variable, layer)
        except ValueError:  # a transpose or reshape that does not fit: reported as a shape mismatch below
            converted = value
        if tuple(converted.shape) != tuple(variable.shape):
            raise ValueError(f"adapter key {_key(name)} has shape {tuple(value.shape)}, which does not fit this "
                             f"model's weight of shape {tuple(variable.shape)}: the adapter was trained on another "
                             "architecture.")
        assignments.append((variable, converted))
    return assignments


def load_adapter(model: keras.layers.Layer, path: str | os.PathLike) -> keras.layers.Layer:
    """Load an adapter directory written by `save_adapter` (Keras or PyTorch) or PEFT; returns `model`.

    When `model` has no LoRA yet, it is applied in place with the file's config; a model that
    has LoRA gets the file's weights (same ranks required). Everything is checked before the
    model changes: a name or shape that does not fit raises ValueError naming it. A KerasHub
    `model` also reads adapters named for its Hugging Face model (PEFT's), found from the keys.
    """
    from lora_spec.backends import keras_hub_names  # imports KerasHub only for KerasHub models

    file_config, _, weights = load_adapter_dir(path)
    file_config, weights = keras_hub_names.to_keras_naming(model, file_config, weights)
    existing = list(lora_layers(model)) if isinstance(model, keras.layers.Layer) else []
    if existing:
        if any(layer.merged for _, layer in existing):
            raise ValueError("the model's adapter is merged: call unmerge(model) before load_adapter.")
        config = file_config
        target_paths, save_paths = [p for p, _ in existing], _save_paths(model, file_config)
    else:
        config, target_paths, save_paths = plan(model, file_config, require_modules_to_save=False)
    by_path = dict(named_layers(model))
    _check_lora(by_path, weights, config, target_paths)
    assignments = _checked_extras(by_path, weights)
    if not existing:
        adapt(model, config, target_paths, save_paths)
    else:
        setattr(model, CONFIG_ATTRIBUTE, config.replace(target_modules=tuple(target_paths)))
    for module_path, (lora_a, lora_b) in weights.lora.items():
        by_path[module_path].set_lora_weights(lora_a, lora_b)
    for variable, value in assignments:
        variable.assign(value)
    return model
