"""ONNX deployment: fold LoRA into a graph's base weights, or serve many adapters from one model.

    from lora_spec.export import make_switchable, merge_onnx, pack_adapter
    merge_onnx("model.onnx")            # writes model.merged.onnx, verified in onnxruntime
    make_switchable("base.onnx", adapters=["adapter/"])       # base.switchable.onnx: LoRA factors as inputs
    pack_adapter("base.switchable.onnx", ["adapter/"], "adapter.onnx_adapter")

The command line is `lora-export --merge model.onnx` (`--switchable`, `--pack`; see `lora-export --help`).
"""

from lora_spec._lazy import require

require("onnx", "onnx")

from lora_spec.export.merge import MergeResult, merge_onnx  # noqa: E402
from lora_spec.export.model_io import ExportError, NoLoRABranchError, VerificationError  # noqa: E402
from lora_spec.export.pack import PackResult, pack_adapter  # noqa: E402
from lora_spec.export.switchable import SwitchableResult, make_switchable  # noqa: E402

__all__ = ["ExportError", "MergeResult", "NoLoRABranchError", "PackResult", "SwitchableResult", "VerificationError",
           "make_switchable", "merge_onnx", "pack_adapter"]
