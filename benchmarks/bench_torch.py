"""Training-step time and peak memory: full fine-tuning, PEFT LoRA and lora_spec LoRA (issue 3).

Workload: a 4-layer MLP of width 1024 (Linear + GELU), a batch of 2048 rows, r = 16, alpha = 32,
AdamW; a step is forward + backward + optimizer step. The rows run in interleaved rounds in one
process, so machine drift hits them alike, and each row's median is reported. Peak memory
(`ru_maxrss`) is measured per row in its own subprocess.

    python benchmarks/bench_torch.py            # 15 rounds
    python benchmarks/bench_torch.py --quick    # a short smoke run
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

WIDTH, DEPTH, BATCH, RANK, ALPHA = 1024, 4, 2048, 16, 32
TARGETS = [str(2 * i) for i in range(DEPTH)]
ROWS = ["full", "peft p=0", "lora_spec p=0", "peft p=0.1", "lora_spec p=0.1"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(module for _ in range(DEPTH) for module in (nn.Linear(WIDTH, WIDTH), nn.GELU())))


def build(row: str) -> nn.Module:
    """The model of one row, trainable parameters set."""
    model = mlp()
    if row == "full":
        return model
    library, dropout = row.split(" p=")
    if library == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=float(dropout),
                                                          target_modules=TARGETS))
    import lora_spec.torch as lora

    return lora.apply(model, r=RANK, alpha=ALPHA, dropout=float(dropout), target_modules=TARGETS)


class Trainer:
    """One row: model, optimizer and a fixed batch; `step()` runs one training step."""

    def __init__(self, row: str) -> None:
        self.model = build(row).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1))

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.x).square().mean().backward()
        self.optimizer.step()


def time_rows(rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each row, rows interleaved within each round."""
    trainers = {row: Trainer(row) for row in ROWS}
    return interleaved_medians({row: trainer.step for row, trainer in trainers.items()}, rounds, warmup)


def peak_memory(row: str, steps: int) -> float:
    """Peak resident memory (MiB) of a fresh process that builds `row` and trains `steps` steps."""
    output = subprocess.run([sys.executable, __file__, "--memory-of", row, "--steps", str(steps)],
                            capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def _report_own_peak(row: str, steps: int) -> None:
    trainer = Trainer(row)
    for _ in range(steps):
        trainer.step()
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def table(times: dict[str, float], memory: dict[str, float]) -> str:
    lines = ["| row | ms / step | vs full | vs PEFT | peak memory (MiB) | memory vs PEFT |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in ROWS:
        peft_row = row.replace("lora_spec", "peft")
        versus_peft = f"{times[row] / times[peft_row]:.3f}" if row.startswith("lora_spec") else ""
        memory_peft = f"{memory[row] / memory[peft_row]:.3f}" if row.startswith("lora_spec") else ""
        lines.append(f"| {row} | {times[row] * 1e3:.1f} | {times[row] / times['full']:.3f} | {versus_peft} | "
                     f"{memory[row]:.0f} | {memory_peft} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds and 2 memory steps: a smoke run")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (each runs every row once)")
    parser.add_argument("--memory-of", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        _report_own_peak(args.memory_of, args.steps)
        return
    rounds, warmup, steps = (3, 1, 2) if args.quick else (args.rounds, 2, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP {DEPTH}x{WIDTH}, batch {BATCH}, "
          f"r={RANK}, alpha={ALPHA}, AdamW; {rounds} interleaved rounds, medians", flush=True)
    memory = {row: peak_memory(row, steps) for row in ROWS}
    print(table(time_rows(rounds, warmup), memory))


if __name__ == "__main__":
    main()
