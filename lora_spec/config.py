"""`LoRAConfig`: the hyper-parameters of one adapter, with PEFT's semantics and file format."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

# PEFT's `init_lora_weights` strings; "pissa_niter_<K>" stands for every K >= 0.
INIT_METHODS = ("kaiming", "gaussian", "pissa", "pissa_niter_<K>", "olora")
_NAMED_INITS = ("kaiming", "gaussian", "pissa", "olora")
BIAS_MODES = ("none", "all", "lora_only")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")

# PEFT fields that describe the run, not the math: read and ignored.
_PEFT_METADATA = {
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "fan_in_fan_out",
}
# PEFT fields whose value is inert unless another field enables a feature we refuse anyway.
_PEFT_INERT = {"megatron_core", "qalora_group_size"}


def _is_off(value: Any) -> bool:
    """True when a PEFT field's value leaves the feature it controls switched off."""
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _pattern_key(patterns: Mapping[str, Any], module_path: str) -> str | None:
    """PEFT's rule for `rank_pattern`/`alpha_pattern`: the first key that matches the path's end."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def layer_index(module_path: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """PEFT's layer index of a module: the first number after `<pattern>.` in its path (any segment
    when no pattern is given), or None when the path has none."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = next(
            filter(None, (re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_path) for pattern in patterns)),
            None,
        )
    return None if found is None else int(found.group("idx"))


def matches_module(module_path: str, names: str | Sequence[str]) -> bool:
    """PEFT's `target_modules` rule.

    A string is a regular expression that must match the whole dotted path; a list of names
    matches a path equal to a name or ending with `.` + name.
    """
    if isinstance(names, str):
        return re.fullmatch(names, module_path) is not None
    return any(module_path == name or module_path.endswith("." + name) for name in names)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Hyper-parameters of a LoRA adapter.

    Args:
        r: rank of the update, an int >= 1.
        alpha: numerator of the scaling; defaults to `r` (scaling 1).
        dropout: probability of zeroing an input of the low-rank path, in [0, 1).
        use_rslora: scale by `alpha / sqrt(r)` instead of `alpha / r`.
        init: "kaiming" (A kaiming-uniform, PEFT's default), "gaussian" (A ~ N(0, 1/r)), or one computed
            from the base weight, which then becomes the residual (`lora_spec.inits`): "pissa" (its top r
            singular triplets), "pissa_niter_<K>" (the same by PEFT's randomized SVD with K subspace
            iterations) or "olora" (its QR decomposition). The strings are PEFT's `init_lora_weights`.
        use_dora: DoRA (weight-decomposed LoRA, `lora_spec.dora`): a trained magnitude per output
            feature rescales the adapted weight `W + s * B @ A`, normalised per feature.
        bias: which biases train: "none", "all", or "lora_only" (those of adapted layers).
        target_modules: names or a full-match regular expression selecting modules to adapt
            (PEFT's rule, see `matches_module`); None lets the backend pick.
        exclude_modules: names or a regular expression of modules never adapted.
        modules_to_save: modules trained fully and stored in the adapter file (e.g. a head).
        rank_pattern: per-module override of `r`, keyed by a pattern matching the path's end.
        alpha_pattern: per-module override of `alpha`, same keys.
        layers_to_transform: layer index or indices to adapt (PEFT's rule, see `layer_index`); it
            filters modules that a list of `target_modules` matches by suffix, not those named in full.
        layers_pattern: name(s) of the module list holding the layers (e.g. "layers", "h"), used with
            `layers_to_transform`; None takes the first numbered segment.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    use_dora: bool = False
    bias: str = "none"
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    # Whether alpha was left to default to r, so that `replace(r=...)` moves it along.
    _alpha_follows_r: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.r))
            object.__setattr__(self, "_alpha_follows_r", True)
        _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} is invalid: use a probability in [0, 1).")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora={self.use_rslora!r} is invalid: use True or False.")
        if not (isinstance(self.init, str) and (self.init in _NAMED_INITS or pissa_iterations(self.init) is not None)):
            raise ValueError(
                f"init={self.init!r} is invalid: use one of {', '.join(map(repr, INIT_METHODS))} (K an integer >= 0)."
            )
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora={self.use_dora!r} is invalid: use True or False.")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is invalid: use one of {', '.join(map(repr, BIAS_MODES))}.")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            object.__setattr__(
                self, name, _module_names(name, getattr(self, name), allow_regex=name != "modules_to_save")
            )
        for name, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            patterns = getattr(self, name)
            if not isinstance(patterns, Mapping):
                raise ValueError(f"{name}={patterns!r} is invalid: use a dict from module pattern to value.")
            for key, value in patterns.items():
                _check_regex(f"{name} key", key)
                check(f"{name}[{key!r}]", value)
            object.__setattr__(self, name, dict(patterns))
        self._check_layers()

    def _check_layers(self) -> None:
        """PEFT's rules: indices are ints >= 0, a pattern needs indices, and both need a list of targets."""
        layers, pattern = self.layers_to_transform, self.layers_pattern
        for index in layers if isinstance(layers, (list, tuple)) else () if layers is None else (layers,):
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(
                    f"layers_to_transform={layers!r} is invalid: use a layer index or a list of them (integers >= 0)."
                )
        if isinstance(layers, (list, tuple)):
            layers = tuple(layers)
            object.__setattr__(self, "layers_to_transform", layers)
        if isinstance(pattern, (list, tuple)):
            pattern = tuple(pattern)
            object.__setattr__(self, "layers_pattern", pattern)
        for item in pattern if isinstance(pattern, tuple) else () if pattern is None else (pattern,):
            _check_regex("layers_pattern", item)
        if pattern and layers is None:
            raise ValueError("layers_pattern is set without layers_to_transform: give the layer indices too.")
        if layers is not None and isinstance(self.target_modules, str):
            raise ValueError(
                "layers_to_transform cannot be used when target_modules is a string (a regular expression "
                "or 'all-linear'), as in PEFT: list module names, or put the layer indices in the "
                "expression."
            )

    @property
    def scaling(self) -> float:
        """`alpha / r`, or `alpha / sqrt(r)` with rsLoRA: the factor applied to `B @ A`."""
        assert self.alpha is not None  # __post_init__ defaults it to r
        return scaling(self.alpha, self.r, self.use_rslora)

    def rank_for(self, module_path: str) -> int:
        """The rank of the module at `module_path`, after `rank_pattern`."""
        key = _pattern_key(self.rank_pattern, module_path)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, module_path: str) -> float:
        """The alpha of the module at `module_path`, after `alpha_pattern`."""
        key = _pattern_key(self.alpha_pattern, module_path)
        if key is not None:
            return float(self.alpha_pattern[key])
        assert self.alpha is not None  # __post_init__ defaults it to r
        return self.alpha

    def scaling_for(self, module_path: str) -> float:
        """The scaling of the module at `module_path`, after both patterns."""
        return scaling(self.alpha_for(module_path), self.rank_for(module_path), self.use_rslora)

    def is_target(self, module_path: str) -> bool:
        """Whether `module_path` is selected by `target_modules` and not excluded.

        `target_modules` must be set (backends resolve `None` to their default first).
        """
        if self.target_modules is None:
            raise ValueError("target_modules is None: resolve the backend's default before matching.")
        if self.exclude_modules is not None and matches_module(module_path, self.exclude_modules):
            return False
        if self.modules_to_save and any(_is_inside(module_path, name) for name in self.modules_to_save):
            return False
        if not matches_module(module_path, self.target_modules):
            return False
        if self._uses_layer_indices() and module_path not in self.target_modules:
            index = layer_index(module_path, self.layers_pattern)
            layers = self.layers_to_transform
            return index is not None and (index in layers if isinstance(layers, tuple) else index == layers)
        return True

    def _uses_layer_indices(self) -> bool:
        # PEFT treats an empty list of indices as no filter.
        return self.layers_to_transform is not None and self.layers_to_transform != ()

    def is_module_to_save(self, module_path: str) -> bool:
        """Whether `module_path` is one of `modules_to_save` (PEFT's suffix rule)."""
        if not self.modules_to_save:
            return False
        return matches_module(module_path, self.modules_to_save)

    def replace(self, **changes: Any) -> LoRAConfig:
        """A copy with `changes` applied; unknown names raise `ValueError` listing the fields."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self) if f.init})
        if unknown:
            fields = ", ".join(f.name for f in dataclasses.fields(self) if f.init)
            raise ValueError(f"unknown LoRAConfig field {unknown[0]!r}: use one of {fields}.")
        if self._alpha_follows_r and "alpha" not in changes:
            changes = {**changes, "alpha": None}
        return dataclasses.replace(self, **changes)

    def to_peft_dict(self, target_modules: Sequence[str] | None = None, fan_in_fan_out: bool = False) -> dict[str, Any]:
        """PEFT's `adapter_config.json` content.

        `target_modules` is the resolved list of module names that were adapted; PEFT writes a
        list, so a regular expression is replaced by what it matched.
        """
        targets = list(target_modules) if target_modules is not None else self.target_modules
        if isinstance(targets, tuple):
            targets = list(targets)
        return {
            "peft_type": "LORA",
            "task_type": None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "exclude_modules": list(self.exclude_modules)
            if isinstance(self.exclude_modules, tuple)
            else self.exclude_modules,
            "use_rslora": self.use_rslora,
            "bias": self.bias,
            "init_lora_weights": True if self.init == "kaiming" else self.init,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": _as_list(self.layers_to_transform),
            "layers_pattern": _as_list(self.layers_pattern),
            "fan_in_fan_out": fan_in_fan_out,
            "inference_mode": True,
            "use_dora": self.use_dora,
        }

    @classmethod
    def from_peft_dict(cls, peft: Mapping[str, Any]) -> LoRAConfig:
        """Read PEFT's `adapter_config.json` content.

        A field for a feature we do not implement (LoRA biases, another `init_lora_weights`,
        ...) raises `ValueError` naming it: silently dropping it would change the math.
        """
        if peft.get("peft_type", "LORA") != "LORA":
            raise ValueError(
                f"peft_type={peft['peft_type']!r} is not supported: only LoRA adapters (peft_type 'LORA') load here."
            )
        if peft.get("lora_bias") and peft.get("use_dora"):
            raise ValueError(
                "adapter config sets lora_bias=true with use_dora=true, which PEFT refuses too: DoRA "
                "adapters have no LoRA bias; re-save the adapter without lora_bias."
            )
        known = {
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "exclude_modules",
            "use_rslora",
            "bias",
            "init_lora_weights",
            "modules_to_save",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
            "layers_pattern",
            "use_dora",
        }
        for name, value in peft.items():
            if name not in known and name not in _PEFT_METADATA and name not in _PEFT_INERT and not _is_off(value):
                raise ValueError(
                    f"adapter config field {name}={value!r} is not supported by lora_spec: "
                    "retrain the adapter without it."
                )
        target_modules = peft.get("target_modules")
        return cls(
            r=peft.get("r", 8),
            alpha=peft.get("lora_alpha", 8),
            dropout=peft.get("lora_dropout", 0.0),
            use_rslora=peft.get("use_rslora", False),
            init=_init_from_peft(peft.get("init_lora_weights", True)),
            use_dora=peft.get("use_dora") or False,
            bias=peft.get("bias", "none"),
            target_modules=target_modules,
            exclude_modules=peft.get("exclude_modules"),
            modules_to_save=peft.get("modules_to_save"),
            rank_pattern=peft.get("rank_pattern") or {},
            alpha_pattern=peft.get("alpha_pattern") or {},
            layers_to_transform=peft.get("layers_to_transform"),
            layers_pattern=peft.get("layers_pattern") or None,
        )


def _init_from_peft(value: Any) -> str:
    """Our `init` for PEFT's `init_lora_weights` (PEFT matches "olora" in any case). PEFT's inits that only
    choose the factors' starting values and leave the base weight alone (false: A and B both random; "eva";
    "orthogonal") read as "kaiming": a file's weights replace those values, so the loaded adapter is the same."""
    if isinstance(value, bool) or value in ("eva", "orthogonal"):
        return "kaiming"
    if isinstance(value, str) and value.lower() == "olora":
        return "olora"
    if value in ("gaussian", "pissa") or (isinstance(value, str) and pissa_iterations(value) is not None):
        return value
    raise ValueError(
        f"adapter config field init_lora_weights={value!r} is not supported: use true (kaiming), "
        "'gaussian', 'pissa', 'pissa_niter_<K>' or 'olora'."
    )


def pissa_iterations(init: str) -> int | None:
    """K of "pissa_niter_<K>" (PEFT's randomized SVD), None for any other init."""
    found = _PISSA_NITER.fullmatch(init)
    return int(found.group(1)) if found else None


def is_weight_init(init: str) -> bool:
    """Whether `init` computes A and B from the base weight (PiSSA, OLoRA), which becomes the residual."""
    return init == "olora" or init.startswith("pissa")


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resolve_config(config: LoRAConfig | None, overrides: Mapping[str, Any]) -> LoRAConfig:
    """`config` (default `LoRAConfig()`) with `overrides`, which must be LoRAConfig field names.

    The backends' `apply(model, config=None, **overrides)` convention.
    """
    if config is not None and not isinstance(config, LoRAConfig):
        raise TypeError(
            f"config must be a lora_spec.LoRAConfig, not {type(config).__name__}: "
            "build one with LoRAConfig(r=..., alpha=...) or pass fields as keywords."
        )
    resolved = (config or LoRAConfig()).replace(**overrides)
    return resolved


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """`s = alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _is_inside(module_path: str, name: str) -> bool:
    """PEFT keeps adapters out of `modules_to_save` and everything below them."""
    return re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", module_path) is not None


def _check_rank(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}={value!r} is invalid: use an integer >= 1.")


def _check_alpha(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field}={value!r} is invalid: use a finite number > 0.")


def _check_regex(field: str, pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{field} {pattern!r} is invalid: use a non-empty string.")
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"{field} {pattern!r} is not a valid regular expression ({error}): fix or escape it."
        ) from None


def _module_names(field: str, value: Any, allow_regex: bool) -> str | tuple[str, ...] | None:
    """Normalise a list of module names to a tuple (hashable, immutable); check a regex compiles."""
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            return (value,)
        _check_regex(field, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    kinds = "a list of module names or a regular expression" if allow_regex else "a list of module names"
    raise ValueError(f"{field}={value!r} is invalid: use {kinds}.")


def config_for_layers(config: LoRAConfig, layers: Mapping[str, tuple[int, float]]) -> LoRAConfig:
    """`config` restated for the layers that hold its adapter, given as `module path -> (rank, alpha)`.

    The targets become those paths; a rank or alpha that the config's patterns would not give a
    layer (applied again with other values, combined, hot-swapped) gets an anchored pattern of its
    own, so the adapter file describes exactly the tensors it holds.
    """
    paths = list(layers)
    first_rank, first_alpha = layers[paths[0]] if paths else (config.r, config.alpha)
    base = config.replace(
        target_modules=tuple(paths) or config.target_modules, layers_to_transform=None, layers_pattern=None
    )
    ranks = {path: rank for path, (rank, _) in layers.items()}
    alphas = {path: alpha for path, (_, alpha) in layers.items()}
    if all(base.rank_for(path) == rank for path, rank in ranks.items()) and all(
        base.alpha_for(path) == alpha for path, alpha in alphas.items()
    ):
        return base
    return base.replace(
        r=first_rank,
        alpha=first_alpha,
        rank_pattern={f"^{re.escape(path)}": rank for path, rank in ranks.items() if rank != first_rank},
        alpha_pattern={f"^{re.escape(path)}": alpha for path, alpha in alphas.items() if alpha != first_alpha},
    )
