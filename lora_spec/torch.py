"""LoRA for PyTorch: `apply`, `merge`, `unmerge`, `merge_and_unload`, `disable_adapters`, adapter files.

    import lora_spec.torch as lora
    model = lora.apply(model, r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    ...train...
    lora.save_adapter(model, "adapter/")          # PEFT's format: PeftModel.from_pretrained reads it
    model = lora.merge_and_unload(model)          # plain torch layers, no inference cost
"""

from lora_spec._lazy import require

require("torch", "torch")

from lora_spec.backends.torch_adapter import load_adapter, save_adapter  # noqa: E402
from lora_spec.backends.torch_dropout import DropoutMask, SeededMask, draw_mask  # noqa: E402
from lora_spec.backends.torch_layers import LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear  # noqa: E402
from lora_spec.backends.torch_linear import LinearLoRAFunction, linear_lora  # noqa: E402
from lora_spec.backends.torch_model import (  # noqa: E402
    ModulesToSave,
    TrainableParameters,
    apply,
    disable_adapters,
    merge,
    merge_and_unload,
    trainable_parameters,
    unmerge,
)
from lora_spec.config import LoRAConfig  # noqa: E402
from lora_spec.dropout import keep_probability  # noqa: E402

__all__ = [
    "DropoutMask", "LinearLoRAFunction", "LoRAConfig", "LoRAConv2d", "LoRAEmbedding", "LoRALayer", "LoRALinear",
    "ModulesToSave", "SeededMask", "TrainableParameters", "apply", "disable_adapters", "draw_mask", "keep_probability",
    "linear_lora", "load_adapter", "merge", "merge_and_unload", "save_adapter", "trainable_parameters", "unmerge",
]
