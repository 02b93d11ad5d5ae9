"""Adapters of KerasHub models under Hugging Face transformers' names and layouts (`naming="transformers"`).

KerasHub's own converter says which transformers tensor feeds each Keras variable, and how
(`keras_hub_recording`). From that:
- a transformers `Linear` maps to the Keras layers whose kernels it feeds: `A` keeps its rows and
  `B` its columns, each indexed like the kernel (`A_keras = A[:, columns]`, `B_keras = B[rows, :]`),
  which is exact because the kernel is a block of the `Linear`'s weight;
- a fused one (GPT-2's `c_attn`, the query, key and value kernels side by side) splits into its
  layers with the same `A`, and is written back at the sum of their ranks, `A` stacked and `B`
  block-diagonal, which is exact too;
- DoRA's magnitude, one value per row of the adapted weight, follows `B`'s rows (`m_keras = m[rows]`):
  each row of the adapted weight is a row of one layer's, so its norm is the same on both sides. A fused
  `Linear`'s rows of layers without the adapter get their base rows' norms, where DoRA changes nothing;
- fully trained tensors (biases, `modules_to_save`) are rearranged element by element.

Names are those of the transformers class's state dict, as PEFT writes them: the `*ForCausalLM`
class for decoders, the bare model for encoders (`BertModel`), or `transformers_class`. Loading
finds the naming and the key prefix from the keys themselves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from lora_spec import dora
from lora_spec.adapter_io import PREFIX, AdapterWeights
from lora_spec.backends import keras_adapter
from lora_spec.backends.keras_hub_architectures import backbone_of, is_keras_hub_model
from lora_spec.backends.keras_hub_recording import LinearPlacement, Recording, is_kernel
from lora_spec.backends.keras_layers import LoRALayer
from lora_spec.backends.keras_model import named_layers
from lora_spec.config import LoRAConfig, config_for_layers, is_weight_init
from lora_spec.targets import ALL_LINEAR, ModuleInfo, modules_to_save_paths, select_targets

NAMINGS = ("keras", "transformers")


def check_naming(naming: str, transformers_class: Any = None) -> None:
    """Refuse an unknown `naming`, and a `transformers_class` given without `naming="transformers"`."""
    if naming not in NAMINGS:
        raise ValueError(f"naming={naming!r} is invalid: use one of {', '.join(map(repr, NAMINGS))}.")
    if transformers_class is not None and naming != "transformers":
        raise ValueError(
            f"transformers_class={transformers_class!r} names transformers modules: pass naming='transformers' with it."
        )


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def _ancestors(path: str) -> Iterator[str]:
    parts = path.split(".")
    return (".".join(parts[:depth]) for depth in range(1, len(parts) + 1))


def _is_tied_embedding(layer: keras.layers.Layer) -> bool:
    return getattr(layer, "tie_weights", False) is True


class TransformersNames:
    """A KerasHub model's layers and weights under the names of its transformers counterpart.

    Keys are kept "bare": as the transformers model without a head names them (`layers.0.mlp.up_proj.weight`),
    with head modules (`lm_head`) at the top.
    """

    def __init__(self, model: keras.layers.Layer) -> None:
        backbone, self.architecture, converter = backbone_of(model)
        self.recording = Recording(backbone, converter, self.architecture.converter_config(backbone))
        self.layers = dict(named_layers(model))
        owners = {
            id(variable): (path, layer)
            for path, layer in self.layers.items()
            for variable in layer._trainable_variables + layer._non_trainable_variables
        }
        # bare key -> [(Keras layer path, layer, variable)] for the variables the tensor feeds, in converter order
        self.fed: dict[str, list[tuple[str, keras.layers.Layer, keras.Variable]]] = {}
        for variable, key, _ in self.recording.ports.values():
            if id(variable) in owners:
                self.fed.setdefault(self.bare(key), []).append((*owners[id(variable)], variable))
        # bare module path -> the Keras layer holding its weight, or its first tensor's
        self.modules: dict[str, tuple[str, keras.layers.Layer, keras.Variable]] = {}
        for key, members in self.fed.items():
            if key.endswith(".weight") or _module(key) not in self.modules:
                self.modules[_module(key)] = members[0]

    # -- names -------------------------------------------------------------------------------------

    def _is_head(self, path: str) -> bool:
        return path.split(".")[0] in self.architecture.head

    def bare(self, key: str) -> str:
        """A converter's key (or a module path named for a task class) without the task class's prefix."""
        return key.removeprefix(self.architecture.base_prefix + ".")

    def class_path(self, bare: str, class_name: str) -> str:
        """`bare` (a key or module path) as `class_name`'s state dict names it."""
        if self._is_head(bare):
            if class_name != self.architecture.causal_lm:
                raise ValueError(
                    f"transformers' {class_name} has no {bare.split('.')[0]}: save for "
                    f"{self.architecture.causal_lm}, or leave that module out of the adapter."
                )
            return bare
        return bare if class_name == self.architecture.bare else f"{self.architecture.base_prefix}.{bare}"

    def class_name(self, transformers_class: Any) -> str:
        """The transformers class adapters are named for: `transformers_class` (a class or its name), checked
        to be one of this architecture's, or the architecture's default."""
        if transformers_class is None:
            return self.architecture.default_class
        name = getattr(transformers_class, "__name__", transformers_class)
        known = [self.architecture.bare] + ([self.architecture.causal_lm] if self.architecture.causal_lm else [])
        stem = re.sub(r"(Text)?Model$", "", self.architecture.bare)
        if not isinstance(name, str) or not name.startswith(stem):
            raise ValueError(
                f"transformers_class={transformers_class!r} is not a class of this model's architecture "
                f"({self.architecture.model_type}): use {' or '.join(known)}, or another {stem}* class."
            )
        return name

    def bare_of(self, file_paths: list[str]) -> dict[str, str | None]:
        """The bare module path of each module path read from a file, or None where it names no module.

        Files name modules for any transformers class of the architecture: bare (`layers.0...`) or a task
        class holding the bare model under its prefix (`model.layers.0...`); the prefix that fits most
        paths is the file's.
        """

        def strip(path: str, prefix: str) -> str | None:
            if self._is_head(path):
                return path if path in self.modules else None
            bare = path[len(prefix) :] if path.startswith(prefix) else None
            return bare if bare in self.modules else None

        prefixes = ("", self.architecture.base_prefix + ".")
        prefix = max(prefixes, key=lambda candidate: sum(strip(path, candidate) is not None for path in file_paths))
        return {path: strip(path, prefix) for path in file_paths}

    # -- placements --------------------------------------------------------------------------------

    def linears(self, bare_module: str) -> list[tuple[str, LinearPlacement]]:
        """`(Keras layer path, placement)` of the Keras linear layers a transformers `Linear` feeds; ValueError
        when it feeds something LoRA cannot adapt here (KerasHub's output head)."""
        members = self.fed.get(bare_module + ".weight", [])
        if not members or not all(is_kernel(layer, variable) for _, layer, variable in members):
            path, layer, _ = members[0] if members else (None, None, None)
            held = "computes the logits with" if self._is_head(bare_module) else "holds it in"
            raise ValueError(
                f"KerasHub {held} {type(layer).__name__} {path!r}, which lora_spec does not adapt (it maps "
                "adapters on linear layers only between KerasHub and transformers): leave "
                f"{bare_module} out of target_modules."
            )
        return [(path, self.recording.linear(layer)) for path, layer, _ in members]

    def linear(self, keras_path: str) -> LinearPlacement:
        layer = self.layers[keras_path]
        if self.recording.key_of(layer._kernel) is None:
            raise ValueError(
                f"layer {keras_path!r} has no counterpart in transformers' {self.architecture.model_type} "
                "model (KerasHub's converter ports nothing into it): leave it out of target_modules."
            )
        return self.recording.linear(layer)

    def module_infos(self, class_name: str) -> list[ModuleInfo]:
        """The transformers modules that hold weights, and their parents, as the target matching sees them."""
        infos: dict[str, ModuleInfo] = {}
        for bare, (_, layer, variable) in self.modules.items():
            if self._is_head(bare) and class_name != self.architecture.causal_lm:
                continue
            path = self.class_path(bare, class_name)
            for ancestor in _ancestors(path):
                infos.setdefault(ancestor, ModuleInfo(ancestor, "other", "Module"))
            infos[path] = ModuleInfo(path, "linear" if is_kernel(layer, variable) else "other", type(layer).__name__)
        return list(infos.values())

    def keras_paths_under(self, bare_modules: list[str]) -> list[str]:
        """The Keras layers holding the variables that the tensors of these transformers modules feed."""
        paths: dict[str, None] = {}  # ordered, without repeats
        for key, members in self.fed.items():
            if any(_module(key) == module or key.startswith(module + ".") for module in bare_modules):
                for path, layer, _ in members:
                    if _is_tied_embedding(layer):
                        raise ValueError(
                            f"{_module(key)} is tied to the output head in this KerasHub model, but "
                            "PEFT's modules_to_save copy of it is not: leave it out of modules_to_save."
                        )
                    paths[path] = None
        return list(paths)

    def values(self, bare_key: str, given: dict[int, np.ndarray]) -> np.ndarray:
        """The transformers tensor `bare_key`, rebuilt from the Keras variables it feeds: their values in
        `given` (by variable id, Keras layout), the model's own for the others."""
        tensor: np.ndarray | None = None
        for _, layer, variable in self.fed[bare_key]:
            placement = self.recording.placement(layer, variable)
            value = given[id(variable)] if id(variable) in given else ops.convert_to_numpy(variable)
            if tensor is None:
                tensor = np.zeros(math.prod(placement.shape), dtype=value.dtype)
            tensor[placement.index.ravel()] = np.asarray(value).ravel()
        assert tensor is not None  # every key in `fed` feeds at least one variable
        return tensor.reshape(placement.shape)


def _restated(config: LoRAConfig, settings: dict[str, tuple[int, float]], save_paths: list[str]) -> LoRAConfig:
    """`config` for other module names: its targets the paths `settings` maps to their `(r, alpha)`, and its
    modules to save `save_paths` (the other side's patterns and filters name nothing here)."""
    unnamed = config.replace(
        exclude_modules=None,
        modules_to_save=tuple(save_paths) or None,
        rank_pattern={},
        alpha_pattern={},
        layers_to_transform=None,
        layers_pattern=None,
    )
    return config_for_layers(unnamed, settings)


# -- apply(naming="transformers") -------------------------------------------------------------------


def keras_config(model: keras.layers.Layer, config: LoRAConfig, naming: str) -> LoRAConfig:
    """`config`, whose module names are transformers' (`target_modules=["q_proj", "v_proj"]`), resolved to
    the Keras layers of the KerasHub `model`, with PEFT's matching rule and lora_spec's default targets."""
    check_naming(naming)
    if naming == "keras":
        return config
    names = TransformersNames(model)
    class_name = names.architecture.default_class
    infos = names.module_infos(class_name)
    if config.target_modules == ALL_LINEAR:  # PEFT's all-linear leaves out only the output head, never linear here
        config = config.replace(target_modules=tuple(info.path for info in infos if info.kind == "linear"))
    bare = {info.path: names.bare(info.path) for info in infos}
    for info in infos:
        if (
            info.kind == "other"
            and info.path
            and config.target_modules is not None
            and config.is_target(info.path)
            and bare[info.path] in names.modules
        ):
            names.linears(bare[info.path])  # raises the reason it cannot be adapted
    resolved, matches = select_targets(infos, config)
    settings = {
        keras_path: (resolved.rank_for(match.path), resolved.alpha_for(match.path))
        for match in matches
        for keras_path, _ in names.linears(bare[match.path])
    }
    saved = names.keras_paths_under([bare[path] for path in modules_to_save_paths(infos, resolved)])
    return _restated(resolved, settings, saved)


def _check_no_weight_init(config: LoRAConfig) -> None:
    """Refuse PiSSA/OLoRA inits, which the mapping between KerasHub layers and transformers modules does not
    carry: they are computed on the base weight as each side holds it (fused or split)."""
    if is_weight_init(config.init):
        raise ValueError(
            f"init={config.init!r} is not supported between KerasHub's and transformers' names yet: save "
            "the adapter converted to LoRA (convert_to_lora=True, the default; PEFT's "
            "path_initial_model_for_weight_conversion), or move it in Keras naming (save_adapter's default)."
        )


# -- load_adapter -----------------------------------------------------------------------------------


def _lora_key(path: str, weights: AdapterWeights) -> str:
    return PREFIX + path + (".lora_embedding_A" if path in weights.embeddings else ".lora_A.weight")


def _names_keras_layers(model: keras.layers.Layer, weights: AdapterWeights) -> bool:
    by_path = dict(named_layers(model))
    return all(path in by_path for path in weights.lora) and all(
        ".original_module." in name or keras_adapter._resolve_extra(by_path, name) is not None for name in weights.extra
    )


def _saved_under(config: LoRAConfig, module: str) -> bool:
    return any(config.is_module_to_save(ancestor) for ancestor in _ancestors(module))


def to_keras_naming(
    model: keras.layers.Layer, config: LoRAConfig, weights: AdapterWeights
) -> tuple[LoRAConfig, AdapterWeights]:
    """An adapter read from a file, in the Keras naming of `model`: unchanged unless `model` is a KerasHub model
    and the file names transformers modules, which are then mapped to its layers (config and tensors)."""
    if not is_keras_hub_model(model) or _names_keras_layers(model, weights):
        return config, weights
    _check_no_weight_init(config)
    names = TransformersNames(model)
    extras = {name: value for name, value in weights.extra.items() if ".original_module." not in name}
    unwrapped = {name: name.replace(".modules_to_save.", ".").replace(".base_layer.", ".") for name in extras}
    bare = names.bare_of(list(weights.lora) + [_module(key) for key in unwrapped.values()])
    for path in weights.lora:
        if bare[path] is None:
            raise ValueError(
                f"adapter key {_lora_key(path, weights)} names no module of transformers' "
                f"{names.architecture.model_type} model as KerasHub converts it: load the adapter into "
                "the model it was trained on."
            )
    lora, magnitudes, settings = {}, {}, {}
    for path, (lora_a, lora_b) in weights.lora.items():
        bare_path = bare[path]
        assert bare_path is not None  # refused above
        for keras_path, placement in names.linears(bare_path):
            for half, tensor, expected in (
                ("A", lora_a, (lora_a.shape[0], placement.in_features)),
                ("B", lora_b, (placement.out_features, lora_b.shape[1])),
            ):
                if tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"adapter tensor {half} of {path!r} has shape {tuple(tensor.shape)}, but this "
                        f"model needs {expected}: the adapter was trained on another model size."
                    )
            lora[keras_path] = split(placement, lora_a, lora_b)
            if path in weights.magnitudes:  # one value per row of the adapted weight, which is the layer's row
                magnitudes[keras_path] = weights.magnitudes[path][placement.rows]
            settings[keras_path] = (config.rank_for(path), config.alpha_for(path))
    extra, saved = {}, []
    for name, value in extras.items():
        module = _module(unwrapped[name])
        bare_module = bare[module]
        if bare_module is None or (key := f"{bare_module}.{unwrapped[name].rpartition('.')[2]}") not in names.fed:
            raise ValueError(
                f"adapter key {PREFIX + name} names no weight of transformers' "
                f"{names.architecture.model_type} model as KerasHub converts it: load the adapter into "
                "the model it was trained on."
            )
        if _saved_under(config, module):
            saved += names.keras_paths_under([bare_module])
        for keras_path, layer, variable in names.fed[key]:
            port = names.recording.placement(layer, variable)
            if tuple(value.shape) != port.shape:
                raise ValueError(
                    f"adapter key {PREFIX + name} has shape {tuple(value.shape)}, but this model's is "
                    f"{port.shape}: the adapter was trained on another model size."
                )
            extra[_file_name(keras_path, layer, variable)] = keras_adapter._to_torch(
                value.reshape(-1)[port.index], variable, layer
            )
    return _restated(config, settings, list(dict.fromkeys(saved))), AdapterWeights(
        lora=lora, extra=extra, magnitudes=magnitudes
    )


def _file_name(path: str, layer: keras.layers.Layer, variable: keras.Variable) -> str:
    """The name `variable` of the layer at `path` has in Keras-naming adapter files."""
    return next(name for name, candidate in keras_adapter._parameters(path, layer) if candidate is variable)


# -- save_adapter(naming="transformers") ------------------------------------------------------------


def to_transformers_naming(
    model: keras.layers.Layer, config_dict: dict[str, Any], weights: AdapterWeights, transformers_class: Any = None
) -> tuple[dict[str, Any], AdapterWeights]:
    """`(adapter_config.json content, tensors)` of an adapter file of the KerasHub `model` in Keras naming
    (`config_dict` and `weights`, as `keras_adapter.adapter_file` gives them) under the names and layouts of
    its transformers class."""
    config = LoRAConfig.from_peft_dict(config_dict)
    _check_no_weight_init(config)
    names = TransformersNames(model)
    class_name = names.class_name(transformers_class)
    by_module: dict[str, list[tuple[str, LinearPlacement]]] = {}
    for path in weights.lora:
        if path in weights.embeddings:
            raise ValueError(
                f"layer {path!r} is an embedding: lora_spec maps adapters on linear layers only between "
                "KerasHub and transformers; leave it out of target_modules."
            )
        placement = names.linear(path)
        by_module.setdefault(names.class_path(_module(names.bare(placement.key)), class_name), []).append(
            (path, placement)
        )
    lora, magnitudes, settings = {}, {}, {}
    for module, members in by_module.items():
        lora[module] = fuse([(placement, *weights.lora[path], config.scaling_for(path)) for path, placement in members])
        if config.use_dora:
            magnitudes[module] = fuse_magnitudes(
                [(placement, weights.magnitudes[path]) for path, placement in members]
                + _unadapted_magnitudes(names, members[0][1].key, set(weights.lora))
            )
        rank, first = lora[module][0].shape[0], members[0][0]
        # Several layers in one: the rank is the sum and the scaling the first layer's (fuse folds the others in).
        settings[module] = (
            rank,
            config.alpha_for(first)
            if len(members) == 1
            else config.scaling_for(first) * (math.sqrt(rank) if config.use_rslora else rank),
        )
    saved = _modules_to_save(names, config, class_name)
    file_keys, given = {}, {}
    for name, value in weights.extra.items():
        resolved = keras_adapter._resolve_extra(names.layers, name)
        assert resolved is not None  # the tensors are this model's own (keras_adapter.adapter_file)
        variable, layer = resolved
        key = names.recording.key_of(variable)
        if key is None:
            raise ValueError(
                f"weight {name!r} has no counterpart in transformers' {class_name} (KerasHub's converter "
                "ports nothing into it): leave its layer out of modules_to_save."
            )
        file_key = names.class_path(names.bare(key), class_name)
        if ".base_layer." in name:
            file_key = f"{_module(file_key)}.base_layer.{file_key.rpartition('.')[2]}"
        file_keys[file_key] = names.bare(key)
        # The file's values, not the model's: an inactive adapter's modules to save are copies beside the model.
        given[id(variable)] = keras_adapter._from_torch(value, variable, layer)
    extra = {file_key: names.values(bare, given) for file_key, bare in file_keys.items()}
    linear = [info.path for info in names.module_infos(class_name) if info.kind == "linear"]
    hf_config = _restated(config, settings, saved)
    transposed = any(placement.transposed for members in by_module.values() for _, placement in members)
    return hf_config.to_peft_dict(list(_target_names(list(lora), linear)), fan_in_fan_out=transposed), AdapterWeights(
        lora=lora, extra=extra, magnitudes=magnitudes
    )


def fuse(parts: list[tuple[LinearPlacement, np.ndarray, np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    """`(A, B)` of one transformers `Linear` from the adapters `(placement, A, B, s)` of the Keras layers it feeds.

    Each layer's `A` fills its own rows of the stacked `A` (its columns placed) and its `B` its own block
    of `B` (its rows placed), scaled by `s / s_first`: then `s_first * B @ A` holds each layer's update
    `s * B_layer @ A_layer` in its block and zero elsewhere, at the sum of the ranks.
    """
    placement, first_scaling = parts[0][0], parts[0][3]
    rank = sum(lora_a.shape[0] for _, lora_a, _, _ in parts)
    dtype = parts[0][1].dtype
    fused_a, fused_b = np.zeros((rank, placement.in_features), dtype), np.zeros((placement.out_features, rank), dtype)
    offset = 0
    for placement, lora_a, lora_b, scaling in parts:
        block = np.arange(offset, offset + lora_a.shape[0])
        fused_a[np.ix_(block, placement.columns)] = lora_a
        fused_b[np.ix_(placement.rows, block)] = lora_b * (scaling / first_scaling)
        offset += lora_a.shape[0]
    return fused_a, fused_b


def fuse_magnitudes(parts: list[tuple[LinearPlacement, np.ndarray]]) -> np.ndarray:
    """The DoRA magnitude of one transformers `Linear` from those `(placement, magnitude)` of the Keras layers
    it feeds, which cover its rows: each layer's in its rows.

    A magnitude is one value per row of the adapted weight, and `fuse` makes each row of the `Linear`'s
    adapted weight exactly the row of its layer's, so the row's norm, and its magnitude, are the layer's.
    """
    magnitude = np.zeros(parts[0][0].out_features, np.result_type(*(values for _, values in parts)))
    for placement, values in parts:
        magnitude[placement.rows] = values
    return magnitude


def _unadapted_magnitudes(
    names: TransformersNames, key: str, adapted: set[str]
) -> list[tuple[LinearPlacement, np.ndarray]]:
    """`(placement, magnitude)` for the Keras layers fed by the transformers weight `key` that the adapter
    leaves out (a fused `c_attn` of which only the query is adapted): the norms of their base rows, computed
    as DoRA computes them (`B = 0`, in float32), so that DoRA leaves their rows as they are (`m / n = 1`)."""
    parts = []
    for path, layer, _ in names.fed[names.bare(key)]:
        if path not in adapted:
            weight = (
                layer.base_weight()
                if isinstance(layer, LoRALayer)
                else keras_adapter._to_torch(ops.convert_to_numpy(layer._kernel), layer._kernel, layer)
            )
            out_features, in_features = weight.shape
            no_update = np.zeros((1, in_features)), np.zeros((out_features, 1))
            parts.append((names.recording.linear(layer), dora.init_magnitude(weight, *no_update, 1.0)))
    return parts


def split(placement: LinearPlacement, lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The adapter of the Keras layer at `placement` from its transformers `Linear`'s: its block, exactly."""
    return lora_a[:, placement.columns], lora_b[placement.rows, :]


def _modules_to_save(names: TransformersNames, config: LoRAConfig, class_name: str) -> list[str]:
    """The transformers modules whose tensors feed the Keras `modules_to_save` layers."""
    modules: dict[str, None] = {}  # ordered, without repeats
    for path, layer in names.layers.items():
        if not config.is_module_to_save(path):
            continue
        if _is_tied_embedding(layer):
            raise ValueError(
                f"layer {path!r} is tied to the output head in this KerasHub model, but PEFT's "
                "modules_to_save copy of it would not be: leave it out of modules_to_save."
            )
        for variable in layer._trainable_variables + layer._non_trainable_variables:
            key = names.recording.key_of(variable)
            if key is not None:
                modules[names.class_path(_module(names.bare(key)), class_name)] = None
    return list(modules)


def _target_names(adapted: list[str], linear: list[str]) -> tuple[str, ...]:
    """PEFT's `target_modules` for the adapted modules: their last names when those select exactly them, as
    people write them (`["q_proj", "v_proj"]`), else their full paths."""
    leaves = {path.rpartition(".")[2] for path in adapted}
    if {path for path in linear if path.rpartition(".")[2] in leaves} == set(adapted):
        return tuple(sorted(leaves))
    return tuple(adapted)
