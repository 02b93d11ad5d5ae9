"""LoRA for Keras 3: `LoRADense`, `apply`, named adapters, `merge`, `unmerge`, `merge_and_unload`, adapter files.

    import lora_spec.keras as lora
    model = lora.apply(model, r=16, alpha=32, target_modules=["query", "value"])
    model.compile(...); model.fit(...)
    lora.save_adapter(model, "adapter/")          # PEFT's format: lora_spec.torch and PEFT read it
    model = lora.merge_and_unload(model)          # plain Keras layers, no inference cost

Several adapters use PEFT's names, as `lora_spec.torch`: `apply(..., adapter_name=)`,
`load_adapter(..., adapter_name=)`, `set_adapter`, `delete_adapter`, `add_weighted_adapter`,
`routed` / `RoutedModel` (per-row adapters) and `disable_adapters`. `use_dora=True` and
`init="pissa"` / `"pissa_niter_<K>"` / `"olora"` work as in PEFT (`docs/dora_and_pissa.md`).
"""

from lora_spec._lazy import require

require("keras", "keras")

from lora_spec.backends.keras_adapter import load_adapter, save_adapter  # noqa: E402
from lora_spec.backends.keras_layers import (  # noqa: E402
    DoRAAdapter,
    LoRAAdapter,
    LoRAConv2D,
    LoRADense,
    LoRAEinsumDense,
    LoRAEmbedding,
    LoRALayer,
)
from lora_spec.backends.keras_model import (  # noqa: E402
    RoutedModel,
    TrainableParameters,
    active_adapters,
    adapter_names,
    add_weighted_adapter,
    apply,
    delete_adapter,
    disable_adapters,
    lora_layers,
    merge,
    merge_and_unload,
    named_layers,
    routed,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from lora_spec.config import LoRAConfig  # noqa: E402

__all__ = [
    "DoRAAdapter",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRAConv2D",
    "LoRADense",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "LoRALayer",
    "RoutedModel",
    "TrainableParameters",
    "active_adapters",
    "adapter_names",
    "add_weighted_adapter",
    "apply",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "named_layers",
    "routed",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
