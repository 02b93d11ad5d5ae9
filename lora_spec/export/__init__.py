"""Latency-free ONNX deployment: fold LoRA branches (or adapter files) into a graph's base weights.

    from lora_spec.export import merge_onnx
    merge_onnx("model.onnx")            # writes model.merged.onnx, verified in onnxruntime

The command line is `lora-export --merge model.onnx` (see `lora-export --help`).
"""

from lora_spec._lazy import require

require("onnx", "onnx")

from lora_spec.export.merge import MergeResult, VerificationError, merge_onnx  # noqa: E402
from lora_spec.export.model_io import ExportError, NoLoRABranchError  # noqa: E402

__all__ = ["ExportError", "MergeResult", "NoLoRABranchError", "VerificationError", "merge_onnx"]
