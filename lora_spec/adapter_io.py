"""Adapter directories in PEFT's format, shared by every backend.

A directory holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (linear and conv layers),
`...lora_embedding_A` / `...lora_embedding_B` (embeddings) and `base_model.model.<path>.<param>`
for fully trained parameters (`modules_to_save`, biases). A and B are in the reference layout.
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
from lora_spec.multi_adapter import DEFAULT_ADAPTER

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_SUFFIXES = {
    ".lora_A.weight": ("lora_A", False), ".lora_B.weight": ("lora_B", False),
    ".lora_embedding_A": ("lora_A", True), ".lora_embedding_B": ("lora_B", True),
}


@dataclasses.dataclass
class AdapterWeights:
    """The tensors of an adapter, keyed by module path.

    `lora` maps a module path to `(A, B)` in the reference layout; `embeddings` names the paths
    that are embeddings (their keys differ in PEFT's files); `extra` maps
    `<module path>.<parameter>` to fully trained tensors (modules to save, biases).
    """

    lora: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    embeddings: set[str] = dataclasses.field(default_factory=set)
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def to_peft_tensors(self) -> dict[str, np.ndarray]:
        """The safetensors content, with PEFT's key names."""
        tensors = {}
        for path, (lora_a, lora_b) in self.lora.items():
            a_suffix, b_suffix = (".lora_embedding_A", ".lora_embedding_B") if path in self.embeddings else (
                ".lora_A.weight", ".lora_B.weight")
            tensors[PREFIX + path + a_suffix] = lora_a
            tensors[PREFIX + path + b_suffix] = lora_b
        tensors.update({PREFIX + name: value for name, value in self.extra.items()})
        return tensors

    def check_finite(self) -> None:
        """Raise ValueError naming the first tensor that holds NaN or inf."""
        for key, value in self.to_peft_tensors().items():
            if not np.all(np.isfinite(value)):
                raise ValueError(f"adapter tensor {key} holds NaN or inf: the training diverged; nothing was saved.")

    @classmethod
    def from_peft_tensors(cls, tensors: Mapping[str, np.ndarray]) -> AdapterWeights:
        """Split a PEFT state dict into LoRA pairs and extra tensors; a pair missing a half raises."""
        weights, halves = cls(), {}
        for key, value in tensors.items():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            for suffix, (half, is_embedding) in _LORA_SUFFIXES.items():
                if name.endswith(suffix):
                    path = name[:-len(suffix)]
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
        return weights


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
        pickled = " (adapter_model.bin is pickle, which lora_spec never loads: re-save it with safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise ValueError(f"{path} has no {WEIGHTS_NAME}{pickled}.")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}): re-save the adapter.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} does not hold a JSON object: re-save the adapter.")
    tensors, _ = safetensors_io.load(weights_file)
    return LoRAConfig.from_peft_dict(raw), raw, AdapterWeights.from_peft_tensors(tensors)


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
        raise ValueError(f"{path} has no {CONFIG_NAME}, nor subfolders with one: pass a folder written by "
                         "save_adapter or PEFT.")
    return found
