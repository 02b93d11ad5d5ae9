"""Inference latency in onnxruntime: LoRA merged by lora-export vs the base model vs LoRA left in the graph.

Models: the MLP of the backend benchmarks (4 x Linear(1024, 1024) + GELU, LoRA r=16 on every
layer) and a small BERT (4 layers, hidden 256, LoRA r=16 on query/value), both exported with
`torch.onnx.export` (TorchScript): once without LoRA ("base"), once with the LoRA branches
("unmerged"), then merged by `lora_spec.export.merge_onnx` ("merged"). Every session uses 2
threads with spinning off, so the three sessions sharing the cores do not distort each other.
Rounds interleave the three models (in a rotating order) on the same input; medians are reported.

    python benchmarks/bench_onnx_latency.py           # batches 1, 32 and 512
    python benchmarks/bench_onnx_latency.py --quick   # batches 1 and 32, few rounds

Target (issue 5): merged / base <= 1.02; unmerged / merged is what merging saves.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from interleave import interleaved_medians
from torch import nn

import lora_spec.torch as lora
from lora_spec.export import merge_onnx

WIDTH, DEPTH, RANK, ALPHA = 1024, 4, 16, 32
SEQUENCE = 16
THREADS = 2


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(module for _ in range(DEPTH) for module in (nn.Linear(WIDTH, WIDTH), nn.GELU())))


def small_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=64,
    )
    return BertModel(config, add_pooling_layer=False)


class _LastHidden(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


MODELS = {
    "MLP 4x1024": (
        mlp,
        ["0", "2", "4", "6"],
        lambda batch: {"x": np.random.default_rng(0).standard_normal((batch, WIDTH)).astype(np.float32)},
    ),
    "BERT 4x256": (
        lambda: _LastHidden(small_bert()),
        ["query", "value"],
        lambda batch: {"x": np.random.default_rng(0).integers(0, 1000, (batch, SEQUENCE)).astype(np.int64)},
    ),
}


def export(model: nn.Module, example: dict, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.from_numpy(example["x"]),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def build(folder: Path, name: str) -> dict[str, Path]:
    """`base`, `unmerged` and `merged` ONNX files of one model."""
    factory, targets, inputs = MODELS[name]
    base = factory().eval()
    adapted = lora.apply(copy.deepcopy(base), r=RANK, alpha=ALPHA, target_modules=targets).eval()
    with torch.no_grad():
        for parameter_name, parameter in adapted.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.01)
    paths = {variant: folder / f"{name.split()[0]}_{variant}.onnx" for variant in ("base", "unmerged", "merged")}
    export(base, inputs(2), paths["base"])
    export(adapted, inputs(2), paths["unmerged"])
    merge_onnx(paths["unmerged"], paths["merged"], progress=False)
    return paths


def session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latencies(paths: dict[str, Path], feeds: dict, rounds: int) -> dict[str, float]:
    """Median seconds per run of each variant, in interleaved rounds with a rotating order."""
    sessions = {variant: session(path) for variant, path in paths.items()}
    return interleaved_medians(
        {variant: lambda runner=runner: runner.run(None, feeds) for variant, runner in sessions.items()}, rounds
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 32 only, 5 rounds")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds per batch (default 400 for batch 1, 200 for 32, 20 for 512)"
    )
    arguments = parser.parse_args()
    batches = (1, 32) if arguments.quick else (1, 32, 512)
    print(
        f"onnxruntime {onnxruntime.__version__}, CPU, {THREADS} threads, spinning off; medians of interleaved rounds\n"
    )
    print("| model | batch | base (ms) | merged (ms) | unmerged (ms) | merged / base | unmerged / merged |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_onnx_latency_") as folder:
        for name, (_, _, inputs) in MODELS.items():
            paths = build(Path(folder), name)
            for batch in batches:
                rounds = arguments.rounds or (5 if arguments.quick else {1: 400, 32: 200}.get(batch, 20))
                median = latencies(paths, inputs(batch), rounds)
                print(
                    f"| {name} | {batch} | {median['base'] * 1e3:.2f} | {median['merged'] * 1e3:.2f} | "
                    f"{median['unmerged'] * 1e3:.2f} | {median['merged'] / median['base']:.3f} | "
                    f"{median['unmerged'] / median['merged']:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
