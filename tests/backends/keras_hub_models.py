"""Tiny Hugging Face checkpoints of every architecture lora_spec maps to KerasHub, and their KerasHub twins.

Nothing is downloaded: each transformers model is built from a small random config, saved with
`save_pretrained`, and loaded by KerasHub with `from_preset(folder)`. Shared by the in-process
tests and, run as a script, by the subprocess that repeats them on Keras's JAX and torch backends:

    KERAS_BACKEND=jax python tests/backends/keras_hub_models.py <folder from prepare()> <output> <steps> <names...>
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

TOKEN_IDS = np.array([[1, 5, 9, 3, 7, 2, 11, 4], [3, 3, 8, 1, 0, 6, 2, 9]], dtype="int32")
NEXT_TOKENS = np.roll(TOKEN_IDS, -1, axis=1)
DECODER = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 4, 8


@dataclasses.dataclass(frozen=True)
class Case:
    """One architecture: its transformers config class and fields, model class, KerasHub task, LoRA targets,
    and further LoRA options (the same on both sides)."""

    config_class: str
    config: dict[str, Any]
    model_class: str
    keras_task: str  # the KerasHub task adapters are trained through
    targets: tuple[str, ...]  # attention and MLP projections, transformers' names
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_encoder(self) -> bool:
        return self.model_class == "BertModel"


CASES = {
    "llama": Case(
        "LlamaConfig",
        dict(DECODER, tie_word_embeddings=False),
        "LlamaForCausalLM",
        "Llama3CausalLM",
        PROJECTIONS,
        dict(rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0}, use_rslora=True),
    ),
    "mistral": Case(
        "MistralConfig", dict(DECODER, tie_word_embeddings=False), "MistralForCausalLM", "MistralCausalLM", PROJECTIONS
    ),
    "qwen2": Case(
        "Qwen2Config", dict(DECODER, tie_word_embeddings=True), "Qwen2ForCausalLM", "QwenCausalLM", PROJECTIONS
    ),
    "qwen3": Case(
        "Qwen3Config",
        dict(DECODER, head_dim=8, tie_word_embeddings=True),
        "Qwen3ForCausalLM",
        "Qwen3CausalLM",
        PROJECTIONS,
    ),
    # One key-value head: multi-query attention, the Gemma 2B layout.
    "gemma": Case(
        "GemmaConfig",
        dict(DECODER, num_key_value_heads=1, head_dim=8),
        "GemmaForCausalLM",
        "GemmaCausalLM",
        PROJECTIONS,
    ),
    # query_pre_attn_scalar = head_dim: the query scaling KerasHub's converter can express.
    "gemma2": Case(
        "Gemma2Config",
        dict(DECODER, head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
        "Gemma2ForCausalLM",
        "GemmaCausalLM",
        PROJECTIONS,
    ),
    "gemma3": Case(
        "Gemma3TextConfig",
        dict(DECODER, head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
        "Gemma3ForCausalLM",
        "Gemma3CausalLM",
        PROJECTIONS,
    ),
    "gpt2": Case(
        "GPT2Config",
        dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "GPT2LMHeadModel",
        "GPT2CausalLM",
        ("c_attn", "c_proj", "c_fc"),
        dict(use_rslora=True),
    ),
    # KerasHub's BERT uses the tanh GELU ("gelu_new"); BERT checkpoints' erf GELU differs from it by up to 1e-3.
    "bert": Case(
        "BertConfig",
        dict(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            hidden_act="gelu_new",
        ),
        "BertModel",
        "BertTextClassifier",
        ("query", "key", "value", "dense"),
    ),
}


# -- the transformers side (PyTorch) -------------------------------------------------------------------


def transformers_model(name: str, folder: Path | None = None, seed: int = 0):
    """The random transformers model of `name`, in eval mode; saved to `folder` when given.

    Weights are rounded to float16 values first: KerasHub's Mistral converter casts every tensor to
    float16, so this keeps the two base models equal to float32 rounding for every architecture.
    """
    import torch
    import transformers

    case = CASES[name]
    if folder is not None and (folder / "config.json").exists():
        return getattr(transformers, case.model_class).from_pretrained(folder).eval()
    torch.manual_seed(seed)
    model = getattr(transformers, case.model_class)(getattr(transformers, case.config_class)(**case.config))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    if folder is not None:
        model.save_pretrained(folder)
    return model.eval()


def transformers_outputs(model) -> np.ndarray:
    """Logits of a causal LM; an encoder's last hidden states followed by its pooled output (PEFT-wrapped or not)."""
    import torch

    with torch.no_grad():
        outputs = model(input_ids=torch.tensor(TOKEN_IDS, dtype=torch.long))
    if hasattr(outputs, "logits"):
        return outputs.logits.numpy()
    return np.concatenate([outputs.last_hidden_state.numpy(), outputs.pooler_output.numpy()[:, None]], axis=1)


def randomize_peft(model, seed: int = 1):
    """Non-zero values for every tensor PEFT trains (and saves), so that every one shows in the outputs."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def peft_adapter(name: str, checkpoint: Path, folder: Path, **options):
    """A PEFT adapter with random non-zero weights on the attention and MLP projections of `name`, saved to
    `folder`; returns the PEFT model."""
    import peft

    config = peft.LoraConfig(
        **{
            "r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": list(CASES[name].targets),
            **CASES[name].options,
            **options,
        }
    )
    model = peft.get_peft_model(transformers_model(name, checkpoint), config)
    randomize_peft(model)
    model.save_pretrained(folder)
    return model


# -- the KerasHub side (any Keras backend) -----------------------------------------------------------------


def keras_task(name: str, checkpoint: Path):
    """The KerasHub task of `name` over the backbone loaded from the Hugging Face `checkpoint` folder."""
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(checkpoint))
    arguments = dict(num_classes=2, dropout=0.0) if CASES[name].is_encoder else {}
    return getattr(keras_hub.models, CASES[name].keras_task)(backbone=backbone, preprocessor=None, **arguments)


def keras_inputs(name: str) -> dict[str, np.ndarray]:
    inputs = {"token_ids": TOKEN_IDS, "padding_mask": np.ones_like(TOKEN_IDS)}
    if CASES[name].is_encoder:
        inputs["segment_ids"] = np.zeros_like(TOKEN_IDS)
    return inputs


def keras_outputs(name: str, model) -> np.ndarray:
    """What `transformers_outputs` gives for the transformers twin: a task's logits, or a BERT backbone's
    (or classifier's backbone's) sequence output followed by its pooled output."""
    import keras

    if CASES[name].is_encoder:
        outputs = getattr(model, "backbone", model)(keras_inputs(name))
        return np.concatenate(
            [
                keras.ops.convert_to_numpy(outputs["sequence_output"]),
                keras.ops.convert_to_numpy(outputs["pooled_output"])[:, None],
            ],
            axis=1,
        )
    return keras.ops.convert_to_numpy(model(keras_inputs(name)))


def train(name: str, model, steps: int = 2, seed: int = 2):
    """Random non-zero adapters (B starts at zero), then `steps` optimizer steps of the task's own loss."""
    import keras

    rng = np.random.default_rng(seed)
    for weight in model.trainable_weights:
        weight.assign(rng.standard_normal(weight.shape) * 0.2)
    if steps:
        labels = TOKEN_IDS[:, 0] % 2 if CASES[name].is_encoder else NEXT_TOKENS
        # Eager: tracing a whole KerasHub model costs seconds, far more than a few steps of a tiny one.
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            run_eagerly=True,
        )
        for _ in range(steps):
            model.train_on_batch(keras_inputs(name), labels)
    return model


# -- the other backends, in a subprocess ---------------------------------------------------------------


def prepare(folder: Path, names: list[str]) -> None:
    """For each architecture, under `folder/name`: its checkpoint, the base model's outputs, a PEFT adapter
    and PEFT's outputs with it."""
    for name in names:
        base = transformers_model(name, folder / name / "checkpoint")
        np.save(folder / name / "base_outputs.npy", transformers_outputs(base))
        peft_model = peft_adapter(name, folder / name / "checkpoint", folder / name / "peft")
        np.save(folder / name / "peft_outputs.npy", transformers_outputs(peft_model))


def run_on_this_backend(folder: Path, output: Path, names: list[str], steps: int = 2) -> dict[str, Any]:
    """Both directions on the current Keras backend, per architecture prepared in `folder`: the largest
    differences of the KerasHub model to the transformers one without adapter (`base`) and with PEFT's
    adapter loaded (`peft`); then an adapter trained here for `steps` steps, saved with transformers' names
    to `output/name/keras` beside its outputs, for the caller to run in PEFT."""
    import keras

    import lora_spec.keras as lora

    results: dict[str, Any] = {"backend": keras.backend.backend()}
    for name in names:
        model = keras_task(name, folder / name / "checkpoint")
        base = np.max(np.abs(keras_outputs(name, model) - np.load(folder / name / "base_outputs.npy")))
        lora.load_adapter(model, folder / name / "peft")
        peft = np.max(np.abs(keras_outputs(name, model) - np.load(folder / name / "peft_outputs.npy")))
        results[name] = {"base": float(base), "peft": float(peft)}
        model = keras_task(name, folder / name / "checkpoint")
        lora.apply(
            model,
            naming="transformers",
            target_modules=list(CASES[name].targets),
            r=RANK,
            alpha=ALPHA,
            **CASES[name].options,
        )
        train(name, model, steps)
        lora.save_adapter(model, output / name / "keras", naming="transformers")
        np.save(output / name / "keras_outputs.npy", keras_outputs(name, model))
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    folder, output, steps, *names = sys.argv[1:]
    print(json.dumps(run_on_this_backend(Path(folder), Path(output), names, int(steps))))
