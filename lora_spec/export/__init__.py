"""ONNX deployment: fold LoRA into a graph's base weights, or serve many adapters from one model.

    from lora_spec.export import make_switchable, merge_onnx, pack_adapter
    merge_onnx("model.onnx")            # writes model.merged.onnx, verified in onnxruntime
    make_switchable("base.onnx", adapters=["adapter/"])       # base.switchable.onnx: LoRA factors as inputs
    pack_adapter("base.switchable.onnx", ["adapter/"], "adapter.onnx_adapter")

The command line is `lora-export --merge model.onnx` (`--switchable`, `--pack`; see `lora-export --help`).
"""

from __future__ import annotations

import importlib
from typing import Any

from lora_spec._lazy import require

# Public name -> the module defining it. Imported on first use, so that `lora-export --help` (which
# imports lora_spec.export.cli) works without onnx, and a missing onnx names the extra to install.
_PUBLIC = {
    "ExportError": "model_io",
    "NoLoRABranchError": "model_io",
    "VerificationError": "model_io",
    "MergeResult": "merge",
    "merge_onnx": "merge",
    "PackResult": "pack",
    "pack_adapter": "pack",
    "SwitchableResult": "switchable",
    "make_switchable": "switchable",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lora_spec.export' has no attribute {name!r}")
    require("onnx", "onnx")
    return getattr(importlib.import_module(f"lora_spec.export.{_PUBLIC[name]}"), name)
