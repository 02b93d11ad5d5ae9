"""Adapter files for Keras models, in PEFT's format, through `lora_spec.adapter_io`.

The files are the PyTorch backend's: `A` and `B` in the reference layout, and fully trained
tensors (`modules_to_save`, biases) under PyTorch's parameter names and layouts (`Dense`'s
`kernel (in, out)` is stored as `weight (out, in)`, `gamma` as `weight`...), so an adapter moves
between a Keras model and a PyTorch model whose module paths are the same. Several adapters are
stored as PEFT and `lora_spec.torch` store them: `"default"` in the folder, others in `<folder>/<name>/`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence

import keras
import numpy as np
from keras import ops

from lora_spec import inits
from lora_spec.adapter_io import (
    PREFIX,
    AdapterWeights,
    adapter_folder,
    adapter_folders,
    load_adapter_dir,
    save_adapter_dir,
)
from lora_spec.backends import keras_einsum
from lora_spec.backends.keras_layers import LoRAEmbedding, LoRALayer, reference_shapes
from lora_spec.backends.keras_model import (
    ACTIVE_ATTRIBUTE,
    activate,
    adapt,
    check_names,
    configs_of,
    lora_layers,
    named_layers,
    plan,
    remember,
    remove_from_layers,
)
from lora_spec.backends.keras_saved_modules import SavedModules
from lora_spec.config import LoRAConfig, config_for_layers, is_weight_init
from lora_spec.multi_adapter import DEFAULT_ADAPTER, check_adapter_name

Layout = Callable[[np.ndarray, keras.layers.Layer], np.ndarray]


def _same(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    return value


def _transposed(axes: tuple[int, ...]) -> tuple[Layout, Layout]:
    inverse = tuple(np.argsort(axes))
    return (lambda value, layer: np.transpose(value, axes)), (lambda value, layer: np.transpose(value, inverse))


def _einsum_kernel_to_torch(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    return keras_einsum.linear_plan(layer.equation).to_reference(value)


def _einsum_kernel_from_torch(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    return keras_einsum.linear_plan(layer.equation).from_reference(value, tuple(layer._kernel.shape))


def _flattened(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    return value.reshape(-1)


def _as_bias(value: np.ndarray, layer: keras.layers.Layer) -> np.ndarray:
    return value.reshape(tuple(layer.bias.shape)) if value.size == math.prod(layer.bias.shape) else value


_AS_IS = (None, _same, _same)
_MATRIX = _transposed((1, 0))
_NORMALIZATION: dict[str, tuple[str, Layout, Layout]] = {
    "gamma": ("weight", _same, _same),
    "beta": ("bias", _same, _same),
    "moving_mean": ("running_mean", _same, _same),
    "moving_variance": ("running_var", _same, _same),
}
# Keras variable name -> (PyTorch parameter name, to PyTorch's layout, back to Keras's), per layer class.
_TORCH_NAMES: dict[type[keras.layers.Layer], dict[str, tuple[str, Layout, Layout]]] = {
    keras.layers.Dense: {"kernel": ("weight", *_MATRIX)},
    # A Linear's bias is flat where an EinsumDense's spans its output axes, (heads, head_dim) say.
    keras.layers.EinsumDense: {
        "kernel": ("weight", _einsum_kernel_to_torch, _einsum_kernel_from_torch),
        "bias": ("bias", _flattened, _as_bias),
    },
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


def _to_torch(value: np.ndarray, variable: keras.Variable, layer: keras.layers.Layer) -> np.ndarray:
    to_torch = _torch_names(layer).get(variable.name, _AS_IS)[1]
    return np.asarray(to_torch(value, layer))


def _from_torch(value: np.ndarray, variable: keras.Variable, layer: keras.layers.Layer) -> np.ndarray:
    from_torch = _torch_names(layer).get(variable.name, _AS_IS)[2]
    return np.asarray(from_torch(value, layer))


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == prefix or path.startswith(prefix + ".") for prefix in prefixes)


def _trained_extras(
    model: keras.layers.Layer, config: LoRAConfig, adapter_name: str, holders: set[str]
) -> Iterator[tuple[str, np.ndarray]]:
    """`(file name, value in PyTorch's layout)` of one adapter's fully trained tensors: its copies of modules
    to save, then biases (of the LoRA layers in `holders`, or every one with `bias="all"`)."""
    saved = SavedModules.of(model)
    by_path = dict(named_layers(model))
    save_paths = [path for path in saved.current if adapter_name in saved.owners(path)]
    values = {
        variable_path: value
        for path in save_paths
        for variable_path, value in saved.values(path, by_path[path], adapter_name).items()
    }
    for path, layer in by_path.items():
        if _under(path, save_paths):
            for name, variable in _parameters(path, layer):
                yield name, _to_torch(values[variable.path], variable, layer)
        elif config.bias != "none" and getattr(layer, "bias", None) is not None:
            value = ops.convert_to_numpy(layer.bias)
            if isinstance(layer, LoRALayer) and path in holders:
                yield f"{path}.base_layer.bias", _to_torch(value, layer.bias, layer)
            elif config.bias == "all" and not isinstance(layer, LoRALayer):
                yield f"{path}.bias", _to_torch(value, layer.bias, layer)


def adapter_file(
    model: keras.layers.Layer, adapter_name: str, convert_to_lora: bool = True
) -> tuple[dict, AdapterWeights]:
    """`(adapter_config.json content, tensors)` of one adapter of `model`; a PiSSA or OLoRA adapter converted to
    LoRA of the original base with `convert_to_lora`."""
    config = configs_of(model)[adapter_name]
    convert = convert_to_lora and is_weight_init(config.init)
    weights, ranks = AdapterWeights(), {}
    for module_path, layer in lora_layers(model):
        if adapter_name in layer.adapters:
            lora_a, lora_b = layer.lora_weights(adapter_name)
            if convert:
                lora_a, lora_b = inits.convert_to_lora(lora_a, lora_b, *layer.lora_weights(adapter_name, initial=True))
            weights.lora[module_path] = (lora_a, lora_b)
            magnitude = layer.lora_magnitude(adapter_name)
            if magnitude is not None:
                weights.magnitudes[module_path] = magnitude
            ranks[module_path] = (layer.adapter(adapter_name).r, layer.adapter(adapter_name).alpha)
            if isinstance(layer, LoRAEmbedding):
                weights.embeddings.add(module_path)
    weights.extra = dict(_trained_extras(model, config, adapter_name, set(ranks)))
    config = config_for_layers(config, ranks)
    return (inits.converted_config(config) if convert else config).to_peft_dict(list(ranks)), weights


def save_adapter(
    model: keras.layers.Layer,
    path: str | os.PathLike,
    adapter_name: str | Sequence[str] | None = None,
    naming: str = "keras",
    transformers_class: type | str | None = None,
    convert_to_lora: bool = True,
) -> None:
    """Write adapters of `model` to the directory `path` (created if needed) in PEFT's format and layout.

    `adapter_name` None saves every adapter, a name or a list those only: `"default"` in `path`,
    any other in `path/<name>/`. `lora_spec.torch.load_adapter` and `peft.PeftModel.from_pretrained`
    read them on a PyTorch model with the same module paths. Every adapter is checked before any
    is written. `naming="transformers"` names them for the Hugging Face model that a KerasHub
    `model` converts from (the `*ForCausalLM` class, `BertModel` for BERT, or `transformers_class`),
    in its layouts (`lora_spec.backends.keras_hub_names`).

    A PiSSA or OLoRA adapter trained the residual of its init, not the model's original base
    weight. With `convert_to_lora` (default) it is saved as a plain LoRA (or DoRA) adapter of rank
    `2r` of the original base, `[A; A0]` and `[B | -B0]` with the initial A0 and B0 kept on the
    layer (PEFT's `path_initial_model_for_weight_conversion`): it loads anywhere the original base
    does. `convert_to_lora=False` writes PEFT's unconverted form, whose loading runs the init again
    on the base and then sets A and B: right only on the original base (not the residual this model
    holds), and only with a deterministic init ("pissa", "olora"; "pissa_niter_<K>" draws at random).
    """
    from lora_spec.backends import keras_hub_names  # imports KerasHub only for KerasHub models

    keras_hub_names.check_naming(naming, transformers_class)
    names = (
        list(configs_of(model))
        if adapter_name is None
        else ([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
    )
    check_names(model, names)
    files = [(adapter_folder(path, name), *adapter_file(model, name, convert_to_lora)) for name in names]
    if naming == "transformers":
        files = [
            (folder, *keras_hub_names.to_transformers_naming(model, config_dict, weights, transformers_class))
            for folder, config_dict, weights in files
        ]
    for _, _, weights in files:
        weights.check_finite()
    for folder, config_dict, weights in files:
        save_adapter_dir(folder, config_dict, weights)


def _key(name: str) -> str:
    return PREFIX + name


def _resolve_extra(
    by_path: dict[str, keras.layers.Layer], name: str
) -> tuple[keras.Variable, keras.layers.Layer] | None:
    """The variable a file name points at; PEFT's wrapper names (`base_layer`, `modules_to_save`) are
    seen through, and `original_module` tensors (the untrained copy) are skipped by the caller."""
    name = name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
    layer_path, _, _ = name.rpartition(".")
    layer = by_path.get(layer_path)
    if layer is None:
        return None
    for candidate, variable in _parameters(layer_path, layer):
        if candidate == name:
            return variable, layer
    return None


def _check_lora(
    by_path: dict[str, keras.layers.Layer], weights: AdapterWeights, config: LoRAConfig, target_paths: list[str]
) -> None:
    for path, (lora_a, lora_b) in weights.lora.items():
        suffix = ".lora_embedding_A" if path in weights.embeddings else ".lora_A.weight"
        if path not in target_paths:
            raise ValueError(
                f"adapter key {_key(path + suffix)} names no LoRA target of this model: "
                "load the adapter into the model it was trained on."
            )
        layer = by_path[path]
        is_embedding = isinstance(layer, (LoRAEmbedding, keras.layers.Embedding))
        if is_embedding != (path in weights.embeddings):
            kind = "an embedding" if is_embedding else "not an embedding"
            raise ValueError(f"adapter key {_key(path + suffix)} does not fit: layer {path!r} is {kind}.")
        rank = config.rank_for(path)
        for half, tensor, shape in zip("AB", (lora_a, lora_b), reference_shapes(layer, rank), strict=True):
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"adapter tensor {half} of {path!r} has shape {tuple(tensor.shape)}, but this model "
                    f"needs {shape}: the adapter was trained on another architecture or rank."
                )
    missing = sorted(set(target_paths) - set(weights.lora))
    if missing:
        raise ValueError(
            f"adapter has no weights for layer {missing[0]!r} although its config targets it: "
            "the file is incomplete or its target_modules do not match it."
        )


def _checked_extras(
    by_path: dict[str, keras.layers.Layer], weights: AdapterWeights
) -> list[tuple[keras.Variable, np.ndarray]]:
    assignments = []
    for name, value in weights.extra.items():
        if ".original_module." in name:
            continue
        resolved = _resolve_extra(by_path, name)
        if resolved is None:
            raise ValueError(
                f"adapter key {_key(name)} names no weight of this model: "
                "load the adapter into the model it was trained on."
            )
        variable, layer = resolved
        try:
            converted = _from_torch(value, variable, layer)
        except ValueError:  # a transpose or reshape that does not fit: reported as a shape mismatch below
            converted = value
        if tuple(converted.shape) != tuple(variable.shape):
            raise ValueError(
                f"adapter key {_key(name)} has shape {tuple(value.shape)}, which does not fit this "
                f"model's weight of shape {tuple(variable.shape)}: the adapter was trained on another "
                "architecture."
            )
        assignments.append((variable, converted))
    return assignments


def _planned(model: keras.layers.Layer, name: str, folder: str | os.PathLike) -> tuple:
    """Read one adapter folder and check it against `model`, which stays untouched."""
    from lora_spec.backends import keras_hub_names  # imports KerasHub only for KerasHub models

    try:
        file_config, _, weights = load_adapter_dir(folder)
        file_config, weights = keras_hub_names.to_keras_naming(model, file_config, weights)
        config, target_paths, save_paths = plan(model, file_config, require_modules_to_save=False, adapter_name=None)
        by_path = dict(named_layers(model))
        _check_lora(by_path, weights, config, target_paths)
        assignments = _checked_extras(by_path, weights)
    except ValueError as error:
        raise ValueError(f"adapter {name!r}: {error}" if name != DEFAULT_ADAPTER else str(error)) from None
    return name, config, target_paths, save_paths, weights, assignments


def load_adapter(
    model: keras.layers.Layer, path: str | os.PathLike, adapter_name: str | None = None
) -> keras.layers.Layer:
    """Load adapters written by `save_adapter` (Keras or PyTorch) or PEFT into `model`; returns `model`.

    As `lora_spec.torch.load_adapter`: with `adapter_name`, the folder `path` is loaded under that
    name, replacing an adapter of the same name; without it, `path` is loaded as `"default"` and each
    subfolder holding an adapter_config.json under its own name. Targets, ranks and alphas are the
    files'; a model without LoRA gets the first loaded adapter active, otherwise the active adapters
    stay. Everything is checked before the model changes: a name or shape that does not fit raises
    ValueError naming it. A KerasHub `model` also reads adapters named for its Hugging Face model
    (PEFT's), found from the keys.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"model must be a keras.Model or keras.layers.Layer, not {type(model).__name__}.")
    entries = [(check_adapter_name(adapter_name), path)] if adapter_name is not None else adapter_folders(path)
    existing = list(lora_layers(model))
    if any(layer.merged for _, layer in existing):
        raise ValueError("the model's adapters are merged: call unmerge(model) before load_adapter.")
    planned = [_planned(model, name, folder) for name, folder in entries]
    configs = configs_of(model) if existing else {}
    active = list(model.__dict__.get(ACTIVE_ATTRIBUTE) or [planned[0][0]]) if existing else [planned[0][0]]
    saved = SavedModules.of(model)
    for name, config, target_paths, save_paths, weights, assignments in planned:
        if name in configs:  # replaced: the new adapter keeps its place among the active ones
            remove_from_layers(model, name)
            configs.pop(name)
            remember(model, configs, active)
        adapt(model, config, target_paths, save_paths, adapter_name=name)
        configs = configs_of(model)
        by_path = dict(named_layers(model))
        for module_path, (lora_a, lora_b) in weights.lora.items():
            by_path[module_path].set_lora_weights(lora_a, lora_b, name, weights.magnitudes.get(module_path))
        owners = {variable.path: save_path for save_path in save_paths for variable in by_path[save_path].weights}
        for variable, value in assignments:
            if variable.path in owners:
                saved.assign(owners[variable.path], name, variable, value)
            else:
                variable.assign(value)
    remember(model, configs, active)
    activate(model, active)
    return model
