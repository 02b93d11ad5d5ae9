"""The KerasHub architectures whose adapters cross to Hugging Face transformers, and the KerasHub versions tested.

What KerasHub's converters cannot tell (they read a Hugging Face config and write Keras weights) is kept
here, one row per architecture: the transformers classes an adapter is named for, the attribute under
which their task classes hold the base model (`base_model_prefix`), and the few config values a
converter reads while porting weights. `tests/backends/test_keras_hub_names.py` checks every row
against transformers and KerasHub.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import keras

from lora_spec._lazy import require

# KerasHub minor versions whose converters were tested (their modules are private, so others may differ).
SUPPORTED_KERAS_HUB = ("0.32",)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One transformers architecture as KerasHub converts it.

    `causal_lm` is the class adapters are named for by default (`None` for encoders, named for
    `bare`, the class without a head); `base_prefix` is transformers' `base_model_prefix`, the
    attribute holding the bare model in every other class; `head` names the modules that task
    classes add beside it; `converter_config` gives the Hugging Face config values the converter
    reads while porting weights besides `model_type`, from the Keras backbone.
    """

    model_type: str
    bare: str
    causal_lm: str | None
    base_prefix: str
    config_values: Callable[[keras.Model], dict[str, Any]] = lambda backbone: {}
    head: tuple[str, ...] = ("lm_head",)

    @property
    def default_class(self) -> str:
        return self.causal_lm or self.bare

    def converter_config(self, backbone: keras.Model) -> dict[str, Any]:
        """The Hugging Face config that KerasHub's converter reads while porting this backbone's weights."""
        return {"model_type": self.model_type, **self.config_values(backbone)}


def _gemma(backbone: keras.Model) -> Architecture:
    # KerasHub's GemmaBackbone is Gemma 2 when it has the extra norms its converter gives Gemma 2.
    if backbone.use_post_ffw_norm:
        return Architecture("gemma2", "Gemma2Model", "Gemma2ForCausalLM", "model")
    return Architecture("gemma", "GemmaModel", "GemmaForCausalLM", "model")


def _gemma3(backbone: keras.Model) -> Architecture:
    if backbone.vision_encoder is not None:
        raise ValueError(
            "this Gemma3Backbone has a vision encoder: lora_spec names adapters for the text-only "
            "Gemma3ForCausalLM; load the text model (a gemma3_text checkpoint)."
        )
    return Architecture("gemma3_text", "Gemma3TextModel", "Gemma3ForCausalLM", "model")


_ARCHITECTURES: dict[str, Callable[[keras.Model], Architecture]] = {
    "Llama3Backbone": lambda backbone: Architecture("llama", "LlamaModel", "LlamaForCausalLM", "model"),
    "MistralBackbone": lambda backbone: Architecture("mistral", "MistralModel", "MistralForCausalLM", "model"),
    "QwenBackbone": lambda backbone: Architecture("qwen2", "Qwen2Model", "Qwen2ForCausalLM", "model"),
    "Qwen3Backbone": lambda backbone: Architecture("qwen3", "Qwen3Model", "Qwen3ForCausalLM", "model"),
    "GemmaBackbone": _gemma,
    "Gemma3Backbone": _gemma3,
    "GPT2Backbone": lambda backbone: Architecture(
        "gpt2", "GPT2Model", "GPT2LMHeadModel", "transformer", lambda backbone: {"n_embd": backbone.hidden_dim}
    ),
    "BertBackbone": lambda backbone: Architecture("bert", "BertModel", None, "bert", head=()),
}
SUPPORTED_BACKBONES = tuple(_ARCHITECTURES)


def keras_hub_module() -> ModuleType:
    """`keras_hub`, checked to be a tested version; another fails with one line naming the tested ones."""
    keras_hub = require("keras_hub", "hub")
    minor = ".".join(keras_hub.__version__.split(".")[:2])
    if minor not in SUPPORTED_KERAS_HUB:
        raise ImportError(
            f"lora_spec's transformers naming supports KerasHub {', '.join(SUPPORTED_KERAS_HUB)}, "
            f"not {keras_hub.__version__}: install a supported one with "
            'pip install "lora-spec[hub]".'
        )
    return keras_hub


def is_keras_hub_model(model: Any) -> bool:
    """Whether `model` holds a KerasHub backbone; never imports KerasHub (a KerasHub model imported it)."""
    if "keras_hub" not in sys.modules or not isinstance(model, keras.layers.Layer):
        return False
    from keras_hub.src.models.backbone import Backbone

    return isinstance(model, Backbone) or isinstance(getattr(model, "backbone", None), Backbone)


def backbone_of(model: keras.layers.Layer) -> tuple[keras.Model, Architecture, Any]:
    """`(backbone, architecture, converter module)` of a KerasHub backbone or task model."""
    keras_hub_module()
    from keras_hub.src.models.backbone import Backbone
    from keras_hub.src.utils.transformers import preset_loader

    backbone = model if isinstance(model, Backbone) else getattr(model, "backbone", None)
    if not isinstance(backbone, Backbone):
        raise ValueError(
            f"naming='transformers' needs a KerasHub backbone or task model, not a "
            f"{type(model).__name__}: load the model with keras_hub's from_preset."
        )
    name = type(backbone).__name__
    if name not in _ARCHITECTURES:
        raise ValueError(
            f"KerasHub's {name} has no transformers naming in lora_spec: the supported backbones are "
            f"{', '.join(SUPPORTED_BACKBONES)}."
        )
    converter = next(
        module
        for attribute, module in vars(preset_loader).items()
        if attribute.startswith("convert_") and getattr(module, "backbone_cls", None) is type(backbone)
    )
    return backbone, _ARCHITECTURES[name](backbone), converter
