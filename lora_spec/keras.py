"""LoRA for Keras 3: `LoRADense`, `apply`, `merge`, `unmerge`, `merge_and_unload`, adapter files.

    import lora_spec.keras as lora
    model = lora.apply(model, r=16, alpha=32, target_modules=["query", "value"])
    model.compile(...); model.fit(...)
    lora.save_adapter(model, "adapter/")          # PEFT's format: lora_spec.torch and PEFT read it
    model = lora.merge_and_unload(model)          # plain Keras layers, no inference cost
"""

from lora_spec._lazy import require

require("keras", "keras")

from lora_spec.backends.keras_adapter import load_adapter, save_adapter  # noqa: E402
from lora_spec.backends.keras_layers import (  # noqa: E402
    LoRAConv2D,
    LoRADense,
    LoRAEinsumDense,
    LoRAEmbedding,
    LoRALayer,
)
from lora_spec.backends.keras_model import (  # noqa: E402
    TrainableParameters,
    apply,
    lora_layers,
    merge,
    merge_and_unload,
    named_layers,
    trainable_parameters,
    unload,
    unmerge,
)
from lora_spec.config import LoRAConfig  # noqa: E402

__all__ = [
    "LoRAConfig", "LoRAConv2D", "LoRADense", "LoRAEinsumDense", "LoRAEmbedding", "LoRALayer", "TrainableParameters",
    "apply", "load_adapter", "lora_layers", "merge", "merge_and_unload", "named_layers", "save_adapter",
    "trainable_parameters", "unload", "unmerge",
]
