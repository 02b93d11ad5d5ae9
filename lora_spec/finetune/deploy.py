"""The deployment half of a run: export to ONNX, merge with lora-export, check and time in onnxruntime."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lora_spec.finetune.model import pad_batch

if TYPE_CHECKING:
    import onnxruntime

    from lora_spec.export.merge import MergeResult

INPUT_NAMES = ("input_ids", "attention_mask")
OPSET = 17


def export_onnx(model: torch.nn.Module, path: Path, example_ids: Sequence[Sequence[int]], pad_id: int) -> None:
    """Export `model(input_ids, attention_mask) -> logits` with dynamic batch and sequence axes.

    The TorchScript exporter traces the eval-mode forward, so the LoRA branches appear in the
    graph as the plain `base(x) + s * ((x @ A.T) @ B.T)` that lora-export folds.
    """
    model.eval()
    dynamic = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow in transformers
        torch.onnx.export(
            model,
            pad_batch(example_ids, pad_id),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def merge_onnx_file(source: Path, target: Path, progress: bool = True) -> MergeResult:
    """Fold the LoRA branches of `source` into its base weights (`lora-export --merge`), writing `target`.

    lora-export checks the merged graph against the original in onnxruntime before writing it;
    its `MergeResult` says what was folded and by how much the outputs differ.
    """
    from lora_spec.export import merge_onnx

    return merge_onnx(source, output=target, progress=progress)


def session(path: Path) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session using the process's threads, without busy-waiting between runs."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(path: Path, token_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> np.ndarray:
    """The logits of the ONNX model at `path` for every text, batched like the PyTorch evaluation."""
    runner = session(path)
    outputs = []
    for start in range(0, len(token_ids), batch_size):
        input_ids, attention_mask = pad_batch(token_ids[start : start + batch_size], pad_id)
        outputs.append(runner.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0])
    return np.concatenate(outputs)


def latencies(
    paths: Mapping[str, Path], token_ids: Sequence[Sequence[int]], pad_id: int, rounds: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per batch of each model on the same batch, timed in interleaved rounds.

    Interleaving spreads machine drift over every model alike, so their ratios hold on a
    shared machine even when the absolute times do not.
    """
    input_ids, attention_mask = pad_batch(token_ids, pad_id)
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    runners = {name: session(path) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(warmup):
        for runner in runners.values():
            runner.run(None, feeds)
    for _ in range(rounds):
        for name, runner in runners.items():
            started = time.perf_counter()
            runner.run(None, feeds)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}
