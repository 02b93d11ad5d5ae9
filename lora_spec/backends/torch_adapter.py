"""Adapter files for PyTorch models, in PEFT's format, through `lora_spec.adapter_io`.

Keys follow what PEFT writes: `<path>.lora_A.weight` (embeddings: `<path>.lora_embedding_A`),
`<path>.lora_magnitude_vector` for a DoRA adapter, `<path>.<param>` for a module to save,
`<path>.base_layer.bias` / `<path>.bias` for trained biases. PEFT's `bias="all"` files also hold
`<path>.modules_to_save.<param>` and `<path>.original_module.<param>` for modules to save; both
are read. Several adapters are stored
as PEFT stores them: `"default"` in the folder itself, any other in `<folder>/<name>/`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from lora_spec.adapter_io import (
    PREFIX,
    AdapterWeights,
    adapter_folder,
    adapter_folders,
    load_adapter_dir,
    save_adapter_dir,
)
from lora_spec.backends.torch_layers import LoRAEmbedding, LoRALayer, lora_layer_for
from lora_spec.backends.torch_model import (
    ACTIVE_ATTRIBUTE,
    CONFIGS_ATTRIBUTE,
    ModulesToSave,
    check_alone,
    check_names,
    configs_of,
    lora_layers,
    modules_to_save,
    plan,
    refuse_wrapper,
    remove_from_modules,
    set_adapter,
    unwrap,
    uses_fan_in_fan_out,
    wrap,
)
from lora_spec.backends.torch_variants import DoRAAdapter, LoRAAdapter
from lora_spec.config import LoRAConfig, config_for_layers, is_weight_init
from lora_spec.inits import convert_to_lora, converted_config
from lora_spec.multi_adapter import DEFAULT_ADAPTER, check_adapter_name


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU NumPy copy of `tensor` (bfloat16 as float32, which holds every bfloat16 value exactly)."""
    tensor = tensor.detach().cpu()
    if hasattr(tensor, "full_tensor"):  # a DTensor shard under FSDP2: every rank gathers the whole tensor
        tensor = tensor.full_tensor()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _trained_extras(model: nn.Module, config: LoRAConfig, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Fully trained tensors of one adapter under their file names: its modules to save, then biases."""
    saved_prefixes = []
    for path, module in modules_to_save(model):
        saved_prefixes.append(path + ".")
        if adapter_name in module.modules_to_save:
            for name, tensor in module.modules_to_save[adapter_name].state_dict().items():
                yield f"{path}.{name}", tensor
    lora_biases = {f"{path}.base_layer.bias" for path, layer in lora_layers(model) if adapter_name in layer.adapters}
    for name, parameter in model.named_parameters():
        if name.startswith(tuple(saved_prefixes)) or name.rsplit(".", 1)[-1] != "bias":
            continue
        if config.bias == "all" or (config.bias == "lora_only" and name in lora_biases):
            yield name, parameter


def _file_factors(path: str, adapter_name: str, adapter: LoRAAdapter, convert: bool) -> tuple[np.ndarray, np.ndarray]:
    """An adapter's `(A, B)` as its file holds them: as trained, or converted to LoRA of the original base."""
    lora_a, lora_b = map(to_numpy, adapter.factors())
    if not convert:
        return lora_a, lora_b
    initial = adapter.initial_factors()
    if initial is None:
        raise ValueError(
            f"adapter {adapter_name!r} at {path!r} has no initial factors to convert against (its weights "
            "were replaced after the init): save it with convert_to_lora=False."
        )
    return convert_to_lora(lora_a, lora_b, *map(to_numpy, initial))


def adapter_file(model: nn.Module, adapter_name: str, convert_to_lora: bool = True) -> tuple[dict, AdapterWeights]:
    """`(adapter_config.json content, tensors)` of one adapter of `model` (unwrapped); an adapter initialised
    from the base weight is converted to LoRA of the original base unless `convert_to_lora` is False."""
    config = getattr(model, CONFIGS_ATTRIBUTE)[adapter_name]
    convert = convert_to_lora and is_weight_init(config.init)
    weights, ranks = AdapterWeights(), {}
    for module_path, layer in lora_layers(model):
        if adapter_name in layer.adapters:
            adapter = layer.adapter(adapter_name)
            weights.lora[module_path] = _file_factors(module_path, adapter_name, adapter, convert)
            ranks[module_path] = (adapter.r, adapter.alpha)
            if isinstance(layer, LoRAEmbedding):
                weights.embeddings.add(module_path)
            magnitude = getattr(adapter, "lora_magnitude_vector", None)
            if magnitude is not None:
                weights.magnitudes[module_path] = to_numpy(magnitude)
    weights.extra = {name: to_numpy(tensor) for name, tensor in _trained_extras(model, config, adapter_name)}
    file_config = config_for_layers(config, ranks)
    config_dict = (converted_config(file_config) if convert else file_config).to_peft_dict(
        list(ranks), fan_in_fan_out=uses_fan_in_fan_out(model, adapter_name)
    )
    return config_dict, weights


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | Sequence[str] | None = None,
    convert_to_lora: bool = True,
) -> None:
    """Write adapters of `model` to the directory `path` (created if needed) in PEFT's format and layout.

    `adapter_name` None saves every adapter, a name or a list those only: `"default"` goes in
    `path` itself and any other adapter in `path/<name>/`, as PEFT's `save_pretrained` does, so
    `peft.PeftModel.from_pretrained(base, path)` plus `load_adapter(path/<name>, adapter_name=<name>)`
    read them, and so does `load_adapter(model, path)`. Every adapter is checked before any is written.

    An adapter initialised from the base weight (PiSSA, OLoRA) trains on the residual base. With
    `convert_to_lora` (the default) it is written as a plain LoRA (or DoRA) adapter of rank 2r of the
    original base, `[A; A0]` and `[B | -B0]` from the initial factors the layer kept (PEFT's
    `path_initial_model_for_weight_conversion`): PEFT and `load_adapter` apply it to the unmodified
    base model. `convert_to_lora=False` writes PEFT's unconverted form (the trained A and B, the init
    in the config), and loading it re-runs the init on the base model, as PEFT does: right only on
    the original base model and with a deterministic init ("pissa", "olora"; "pissa_niter_<K>"
    draws a random test matrix, so only the same `torch.manual_seed` reproduces it).
    """
    names = (
        list(configs_of(model))
        if adapter_name is None
        else ([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
    )
    check_names(model, names)
    model = unwrap(model)
    files = [(adapter_folder(path, name), *adapter_file(model, name, convert_to_lora)) for name in names]
    for _, _, weights in files:
        weights.check_finite()
    for folder, config_dict, weights in files:
        save_adapter_dir(folder, config_dict, weights)


def _key(name: str) -> str:
    return PREFIX + name


def extra_tensor(model: nn.Module, name: str, save_paths: list[str], adapter_name: str) -> torch.Tensor | None:
    """The model tensor an extra key names, seen through LoRA wrappers whether or not applied yet: a module
    to save's tensors are adapter `adapter_name`'s copy (the original until the copy exists)."""
    owner = max((p for p in save_paths if name.startswith(p + ".")), key=len, default=None)
    if owner is not None:
        module, rest = model.get_submodule(owner), name[len(owner) + 1 :]
        role, _, inner = rest.partition(".")
        if role in ("modules_to_save", "original_module") and inner:
            rest = inner
        if isinstance(module, ModulesToSave):
            copies = module.modules_to_save
            trained = role != "original_module" and adapter_name in copies
            module = copies[adapter_name] if trained else module.original_module
    else:
        module_path, _, rest = name.rpartition(".")
        try:
            module = model.get_submodule(module_path.removesuffix(".base_layer"))
        except AttributeError:
            return None
    if isinstance(module, LoRALayer):
        module = module.base_layer
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors.get(rest)


def _expected_lora_shapes(model: nn.Module, config: LoRAConfig, target_paths: list[str]) -> dict[str, tuple]:
    """`path -> (A shape, B shape, is embedding)` for the layers the adapter must fill."""
    shapes = {}
    for path in target_paths:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, LoRALayer) else module
        layer = lora_layer_for(base)
        assert layer is not None  # plan() selects only layers that lora_layer_for wraps
        a_shape, b_shape = layer.lora_shapes(base, config.rank_for(path))
        shapes[path] = (tuple(a_shape), tuple(b_shape), layer is LoRAEmbedding)
    return shapes


def _check_lora(weights: AdapterWeights, expected: dict[str, tuple]) -> None:
    for path, (lora_a, lora_b) in weights.lora.items():
        suffix = ".lora_embedding_A" if path in weights.embeddings else ".lora_A.weight"
        if path not in expected:
            raise ValueError(
                f"adapter key {_key(path + suffix)} names no LoRA target of this model: "
                f"load the adapter into the model it was trained on."
            )
        a_shape, b_shape, is_embedding = expected[path]
        if is_embedding != (path in weights.embeddings):
            kind = "an embedding" if is_embedding else "not an embedding"
            raise ValueError(f"adapter key {_key(path + suffix)} does not fit: module {path!r} is {kind}.")
        for half, tensor, shape in (("A", lora_a, a_shape), ("B", lora_b, b_shape)):
            if tuple(tensor.shape) != shape:
                name = f"lora_embedding_{half}" if is_embedding else f"lora_{half}.weight"
                raise ValueError(
                    f"adapter key {_key(f'{path}.{name}')} has shape {tuple(tensor.shape)}, but this "
                    f"model needs {shape}: the adapter was trained on another architecture or rank."
                )
    missing = sorted(set(expected) - set(weights.lora))
    if missing:
        suffix = ".lora_embedding_A" if expected[missing[0]][2] else ".lora_A.weight"
        raise ValueError(
            f"adapter has no {_key(missing[0] + suffix)} although its config targets that module: "
            "the file is incomplete or its target_modules do not match it."
        )


def check_extras_fit(
    model: nn.Module, weights: AdapterWeights, save_paths: list[str], adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Raise, naming the key, when a full tensor of `weights` has no place in `model` or another shape."""
    for name, value in weights.extra.items():
        tensor = extra_tensor(model, name, save_paths, adapter_name)
        if tensor is None:
            raise ValueError(
                f"adapter key {_key(name)} names no parameter of this model: "
                "load the adapter into the model it was trained on."
            )
        if tuple(tensor.shape) != tuple(value.shape):
            raise ValueError(
                f"adapter key {_key(name)} has shape {tuple(value.shape)}, but this model's tensor "
                f"is {tuple(tensor.shape)}: the adapter was trained on another architecture."
            )


def _planned(model: nn.Module, name: str, folder: Path) -> tuple:
    """Read one adapter folder and check it against `model`, which stays untouched."""
    try:
        config, _, weights = load_adapter_dir(folder)
        config, target_paths, save_paths = plan(model, config, require_modules_to_save=False, adapter_name=None)
        check_alone(model, config, target_paths, name)
        _check_lora(weights, _expected_lora_shapes(model, config, target_paths))
        check_extras_fit(model, weights, save_paths)
    except ValueError as error:
        raise ValueError(f"adapter {name!r}: {error}" if name != DEFAULT_ADAPTER else str(error)) from None
    return name, config, target_paths, save_paths, weights


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load adapters written by `save_adapter` or PEFT's `save_pretrained` into `model`; returns `model`.

    With `adapter_name`, the folder `path` is loaded under that name, replacing an adapter of the
    same name. Without it, `path` itself is loaded as `"default"` and each subfolder holding an
    adapter_config.json under the subfolder's name (PEFT's layout for several adapters). Targets,
    ranks and alphas are the files'. A model without LoRA gets the loaded adapters with the first
    one active; otherwise the active adapters stay as they were (a replaced one stays active).
    Everything is checked before the model changes: a name or shape that does not fit raises
    ValueError naming the first offending key, and leaves the model as it was. A DoRA file's
    magnitudes load with it; a PiSSA/OLoRA file saved unconverted (its config names the init)
    re-runs the init on the model's base weight, as PEFT does (see `save_adapter`).
    """
    entries = [(check_adapter_name(adapter_name), Path(path))] if adapter_name is not None else adapter_folders(path)
    wrapper, model = model, unwrap(model)
    configs = getattr(model, CONFIGS_ATTRIBUTE, None)
    if configs is None:
        refuse_wrapper(wrapper, "load an adapter into")
    elif any(layer.merged for _, layer in lora_layers(model)):
        raise ValueError("the model's adapters are merged: call unmerge(model) before load_adapter.")
    planned = [_planned(model, name, folder) for name, folder in entries]
    _check_weight_inits_alone(planned)
    active = list(getattr(model, ACTIVE_ATTRIBUTE, None) or [planned[0][0]])
    for name, config, target_paths, save_paths, weights in planned:
        if configs is not None and name in configs:
            remove_from_modules(model, name)  # replaced: the new one keeps its place among the active adapters
        wrap(model, config, target_paths, save_paths, adapter_name=name)
        _fill(model, name, weights, save_paths)
    set_adapter(model, [name for name in active if name in getattr(model, CONFIGS_ATTRIBUTE)])
    return wrapper


def _check_weight_inits_alone(planned: list[tuple]) -> None:
    """`check_alone` among the adapters of one load: a PiSSA/OLoRA file may share no module with another."""
    for name, config, target_paths, *_ in planned:
        if not is_weight_init(config.init):
            continue
        for other, _, other_paths, *_ in planned:
            shared = sorted(set(target_paths) & set(other_paths)) if other != name else []
            if shared:
                raise ValueError(
                    f"adapters {name!r} (init={config.init!r}) and {other!r} both target module "
                    f"{shared[0]!r}, whose base weight the first turns into a residual: load them into "
                    "separate models, or save the first with convert_to_lora=True."
                )


def _fill(model: nn.Module, name: str, weights: AdapterWeights, save_paths: list[str]) -> None:
    layers = dict(lora_layers(model))
    for module_path, (lora_a, lora_b) in weights.lora.items():
        adapter = layers[module_path].adapter(name)
        adapter.assign(torch.from_numpy(lora_a), torch.from_numpy(lora_b))
        if module_path in weights.magnitudes:
            with torch.no_grad():
                cast(DoRAAdapter, adapter).lora_magnitude_vector.copy_(
                    torch.from_numpy(weights.magnitudes[module_path])
                )
    with torch.no_grad():
        for key, value in weights.extra.items():
            tensor = extra_tensor(model, key, save_paths, name)
            assert tensor is not None  # check_extras_fit refused extras the model does not hold
            tensor.copy_(torch.from_numpy(value))
