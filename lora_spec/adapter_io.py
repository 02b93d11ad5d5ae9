"""Adapter directories in PEFT's format, shared by every backend.

A directory holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (linear and conv layers),
`...lora_embedding_A` / `...lora_embedding_B` (embeddings), `...lora_magnitude_vector` (DoRA's
magnitudes, in PEFT's shapes: see `lora_spec.dora`) and `base_model.model.<path>.<param>` for fully
trained parameters (`modules_to_save`, biases). A and B are in the reference layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_spec import safetensors_io
from lora_spec.config import LoRAConfig
from lora_spec.dora import magnitude_shape
from lora_spec.multi_adapter import DEFAULT_ADAPTER

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_SUFFIXES = {
    ".lora_A.weight": ("lora_A", False),
    ".lora_B.weight": ("lora_B", False),
    ".lora_embedding_A": ("lora_A", True),
    ".lora_embedding_B": ("lora_B", True),
}
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
# PEFT's files end with MAGNITUDE_SUFFIX; its modules hold the tensor one level down, as `.weight`.
_MAGNITUDE_SUFFIXES = (MAGNITUDE_SUFFIX, MAGNITUDE_SUFFIX + ".weight")


@dataclasses.dataclass
class AdapterWeights:
    """The tensors of an adapter, keyed by module path.

    `lora` maps a module path to `(A, B)` in the reference layout; `embeddings` names the paths
    that are embeddings (their keys differ in PEFT's files); `magnitudes` maps the paths of DoRA
    adapters to their magnitudes, in PEFT's shapes; `extra` maps `<module path>.<parameter>` to
    fully trained tensors (modules to save, biases).
    """

    lora: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    embeddings: set[str] = dataclasses.field(default_factory=set)
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    magnitudes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def layer(self, path: str) -> str:
        """The reference's kind of layer of the adapter at `path`: "linear", "embedding" or "conv2d"."""
        if path in self.embeddings:
            return "embedding"
        return "conv2d" if self.lora[path][0].ndim == 4 else "linear"

    def to_peft_tensors(self) -> dict[str, np.ndarray]:
        """The safetensors content, with PEFT's key names."""
        tensors = {}
        for path, (lora_a, lora_b) in self.lora.items():
            a_suffix, b_suffix = (
                (".lora_embedding_A", ".lora_embedding_B")
                if path in self.embeddings
                else (".lora_A.weight", ".lora_B.weight")
            )
            tensors[PREFIX + path + a_suffix] = lora_a
            tensors[PREFIX + path + b_suffix] = lora_b
        tensors.update({PREFIX + path + MAGNITUDE_SUFFIX: value for path, value in self.magnitudes.items()})
        tensors.update({PREFIX + name: value for name, value in self.extra.items()})
        return tensors

    def check_finite(self) -> None:
        """Raise ValueError naming the first tensor that holds NaN or inf."""
        for key, value in self.to_peft_tensors().items():
            if not np.all(np.isfinite(value)):
                raise ValueError(f"adapter tensor {key} holds NaN or inf: the training diverged; nothing was saved.")

    @classmethod
    def from_peft_tensors(cls, tensors: Mapping[str, np.ndarray]) -> AdapterWeights:
        """Split a PEFT state dict into LoRA pairs, magnitudes and extra tensors; a pair missing a half,
        or a magnitude without a pair or of a shape that does not fit it, raises."""
        weights = cls()
        halves: dict[str, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            magnitude_suffix = next((suffix for suffix in _MAGNITUDE_SUFFIXES if name.endswith(suffix)), None)
            if magnitude_suffix:
                weights.magnitudes[name[: -len(magnitude_suffix)]] = value
                continue
            for suffix, (half, is_embedding) in _LORA_SUFFIXES.items():
                if name.endswith(suffix):
                    path = name[: -len(suffix)]
                    halves.setdefault(path, {})[half] = value
                    if is_embedding:
                        weights.embeddings.add(path)
                    break
            else:
                weights.extra[name] = value
        for path, pair in halves.items():
            if set(pair) != {"lora_A", "lora_B"}:
                missing = ({"lora_A", "lora_B"} - set(pair)).pop()
                raise ValueError(f"adapter has no {missing} for module {path!r}: the file is incomplete, re-save it.")
            weights.lora[path] = (pair["lora_A"], pair["lora_B"])
        for path, magnitude in weights.magnitudes.items():
            weights._check_magnitude(path, magnitude)
        return weights

    def _check_magnitude(self, path: str, magnitude: np.ndarray) -> None:
        if path not in self.lora:
            raise ValueError(
                f"adapter has a DoRA magnitude for module {path!r} but no lora_A/lora_B: the file is "
                "incomplete, re-save it."
            )
        lora_a, lora_b = self.lora[path]
        features = lora_b.shape[0]
        if lora_a.ndim in (2, 4):
            expected = magnitude_shape(self.layer(path), features)
        else:  # PEFT's shape for a Conv1d or Conv3d: whether the model can hold it is the backend's to say
            expected = (1, features) + (1,) * (lora_a.ndim - 2)
        if tuple(magnitude.shape) != expected:
            raise ValueError(
                f"adapter tensor {path}{MAGNITUDE_SUFFIX} has shape {tuple(magnitude.shape)}, but the "
                f"module's lora_B makes {features} output features, so PEFT's shape is {expected}: the "
                "file is inconsistent, re-save it."
            )


def save_adapter_dir(path: str | os.PathLike, config_dict: Mapping[str, Any], weights: AdapterWeights) -> None:
    """Write an adapter directory; the files are replaced only once both are complete."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: save_adapter needs a directory path.")
    weights.check_finite()
    path.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter.", dir=path))
    try:
        safetensors_io.save(staging / WEIGHTS_NAME, weights.to_peft_tensors(), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(dict(config_dict), indent=2, sort_keys=True) + "\n")
        os.replace(staging / WEIGHTS_NAME, path / WEIGHTS_NAME)
        os.replace(staging / CONFIG_NAME, path / CONFIG_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_adapter_dir(path: str | os.PathLike) -> tuple[LoRAConfig, dict[str, Any], AdapterWeights]:
    """Read `(config, the raw adapter_config.json dict, weights)` from an adapter directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"adapter directory {path} does not exist: pass the folder that holds {CONFIG_NAME}.")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise ValueError(f"{path} has no {CONFIG_NAME}: pass a folder written by save_adapter or PEFT.")
    if not weights_file.is_file():
        pickled = (
            " (adapter_model.bin is pickle, which lora_spec never loads: re-save it with safetensors)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise ValueError(f"{path} has no {WEIGHTS_NAME}{pickled}.")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}): re-save the adapter.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} does not hold a JSON object: re-save the adapter.")
    tensors, _ = safetensors_io.load(weights_file)
    config, weights = LoRAConfig.from_peft_dict(raw), AdapterWeights.from_peft_tensors(tensors)
    _check_dora(config, weights, path)
    return config, raw, weights


def _check_dora(config: LoRAConfig, weights: AdapterWeights, path: Path) -> None:
    """A DoRA adapter has a magnitude for every module, a plain one none (PEFT's loader would
    silently keep a missing magnitude at its initial value, or drop an unexpected one)."""
    if config.use_dora:
        missing = [module for module in weights.lora if module not in weights.magnitudes]
        if missing and not weights.magnitudes:
            raise ValueError(
                f"{path} is a DoRA adapter (use_dora=true) without any lora_magnitude_vector: PEFT's "
                "save_pretrained(path_initial_model_for_weight_conversion=...) drops the magnitudes of a "
                "PiSSA/OLoRA DoRA adapter, so the trained model is lost; save it unconverted in PEFT, or "
                "with lora_spec's save_adapter, which keeps them."
            )
        if missing:
            raise ValueError(
                f"{path} is a DoRA adapter (use_dora=true) without a lora_magnitude_vector for module "
                f"{missing[0]!r}: the file is incomplete, re-save the adapter."
            )
    elif weights.magnitudes:
        raise ValueError(
            f"{path} holds DoRA magnitudes (module {next(iter(weights.magnitudes))!r}) but its config "
            "has use_dora=false: the files disagree, re-save the adapter."
        )


def adapter_folder(path: str | os.PathLike, adapter_name: str) -> Path:
    """Where PEFT keeps an adapter of a multi-adapter save: `"default"` in `path`, others in `path/<name>`."""
    return Path(path) if adapter_name == DEFAULT_ADAPTER else Path(path) / adapter_name


def adapter_folders(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """`(name, folder)` of the adapters PEFT's multi-adapter layout holds in `path`: `"default"` in the folder
    itself when it has an adapter_config.json, and each subfolder with one under its own name."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"adapter directory {path} does not exist: pass the folder that holds {CONFIG_NAME}.")
    found = [(DEFAULT_ADAPTER, path)] if (path / CONFIG_NAME).is_file() else []
    found += sorted((child.name, child) for child in path.iterdir() if (child / CONFIG_NAME).is_file())
    if not found:
        raise ValueError(
            f"{path} has no {CONFIG_NAME}, nor subfolders with one: pass a folder written by save_adapter or PEFT."
        )
    return found
