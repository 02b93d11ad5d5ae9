"""lora_spec: LoRA fine-tuning with one NumPy reference and thin PyTorch, Keras and ONNX backends.

Importing this package imports NumPy only; `lora_spec.torch` and `lora_spec.keras` import their
framework when they are first imported.
"""

from lora_spec.adapter_io import AdapterWeights, load_adapter_dir, save_adapter_dir
from lora_spec.config import LoRAConfig, matches_module, scaling
from lora_spec.multi_adapter import BASE_MODEL, Factors, combine, routed_forward
from lora_spec.reference import (
    Gradients,
    backward,
    conv2d_backward,
    conv2d_delta_weight,
    conv2d_forward,
    conv2d_init,
    delta_weight,
    embedding_backward,
    embedding_delta_weight,
    embedding_forward,
    embedding_init,
    forward,
    init,
    merge,
    unmerge,
)

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.2.0"

__all__ = [
    "BASE_MODEL",
    "AdapterWeights",
    "Factors",
    "Gradients",
    "LoRAConfig",
    "backward",
    "combine",
    "conv2d_backward",
    "conv2d_delta_weight",
    "conv2d_forward",
    "conv2d_init",
    "delta_weight",
    "embedding_backward",
    "embedding_delta_weight",
    "embedding_forward",
    "embedding_init",
    "forward",
    "init",
    "load_adapter_dir",
    "matches_module",
    "merge",
    "routed_forward",
    "save_adapter_dir",
    "scaling",
    "unmerge",
]
