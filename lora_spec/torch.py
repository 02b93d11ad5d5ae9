"""LoRA for PyTorch: named adapters, `merge`, `unmerge`, `merge_and_unload`, routing, hot-swap, adapter files.

    import lora_spec.torch as lora
    model = lora.apply(model, r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    ...train...
    lora.save_adapter(model, "adapter/")          # PEFT's format: PeftModel.from_pretrained reads it
    model = lora.merge_and_unload(model)          # plain torch layers, no inference cost

Several adapters on one model use PEFT's names: `apply(..., adapter_name=)`, `load_adapter(...,
adapter_name=)`, `set_adapter`, `delete_adapter`, `add_weighted_adapter`, `routed` (PEFT's
`adapter_names=`), `prepare_model_for_compiled_hotswap` and `hotswap_adapter`.
"""

from lora_spec._lazy import require

require("torch", "torch")

from lora_spec.backends.torch_adapter import load_adapter, save_adapter  # noqa: E402
from lora_spec.backends.torch_combine import add_weighted_adapter  # noqa: E402
from lora_spec.backends.torch_dropout import DropoutMask, SeededMask, draw_mask  # noqa: E402
from lora_spec.backends.torch_hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap  # noqa: E402
from lora_spec.backends.torch_layers import LoRAAdapter, LoRAConv2d, LoRAEmbedding, LoRALayer, LoRALinear  # noqa: E402
from lora_spec.backends.torch_linear import LinearLoRAFunction, linear_lora  # noqa: E402
from lora_spec.backends.torch_model import (  # noqa: E402
    ModulesToSave,
    TrainableParameters,
    active_adapters,
    adapter_names,
    apply,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    routed,
    set_adapter,
    trainable_parameters,
    unmerge,
)
from lora_spec.config import LoRAConfig  # noqa: E402
from lora_spec.dropout import keep_probability  # noqa: E402

__all__ = [
    "DropoutMask",
    "LinearLoRAFunction",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRAConv2d",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "ModulesToSave",
    "SeededMask",
    "TrainableParameters",
    "active_adapters",
    "adapter_names",
    "add_weighted_adapter",
    "apply",
    "delete_adapter",
    "disable_adapters",
    "draw_mask",
    "hotswap_adapter",
    "keep_probability",
    "linear_lora",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "prepare_model_for_compiled_hotswap",
    "routed",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
]
