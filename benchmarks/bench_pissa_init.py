"""PiSSA's fast init on the CPU: PEFT's against lora_spec's (issue 13: the torch backend's <= 1.1 x PEFT's).

Workload: one 4096 x 4096 float32 linear weight, rank 16, `init_lora_weights="pissa_niter_4"` (a randomized
SVD with 4 subspace iterations, then A, B and the residual weight). PEFT's row re-runs its layer's
`pissa_init`, and the torch backend's row `lora_spec.torch`'s init of a LoRA layer (each run decomposes
the residual the previous run left, at the same cost); the reference's row runs
`lora_spec.inits.pissa_init` on the weight. Rows run in interleaved rounds in one process; medians.

    python benchmarks/bench_pissa_init.py            # 7 rounds
    python benchmarks/bench_pissa_init.py --quick    # a short smoke run
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from interleave import interleaved_medians

from lora_spec import inits

SIZE, RANK, ALPHA, INIT = 4096, 16, 32, "pissa_niter_4"
ROWS = ["PEFT (torch)", "lora_spec.torch", "lora_spec reference (NumPy)"]


def peft_step():
    """A function running PEFT's init of a fresh LoRA layer on the benchmark weight."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(SIZE, SIZE)),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"], init_lora_weights=True),
    )
    layer = model.base_model.model[0]
    return lambda: layer.pissa_init("default", INIT)


def torch_backend_step():
    """A function running lora_spec.torch's init of a LoRA layer on the benchmark weight."""
    import lora_spec.torch as lora

    torch.manual_seed(0)
    layer = lora.apply(torch.nn.Sequential(torch.nn.Linear(SIZE, SIZE)), r=RANK, alpha=ALPHA, target_modules=["0"])[0]
    return lambda: layer.init_from_weight(layer.adapters["default"], INIT)


def reference_step():
    torch.manual_seed(0)
    weight = torch.nn.Linear(SIZE, SIZE).weight.detach().numpy().copy()
    rng = np.random.default_rng(0)
    return lambda: inits.init_from_weight(weight, INIT, RANK, ALPHA / RANK, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs every row once)")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}; {SIZE}x{SIZE} "
        f"float32, r={RANK}, {INIT}; {rounds} interleaved rounds, medians",
        flush=True,
    )
    times = interleaved_medians(
        {ROWS[0]: peft_step(), ROWS[1]: torch_backend_step(), ROWS[2]: reference_step()}, rounds
    )
    print("| row | ms / init | vs PEFT |\n|---|---:|---:|")
    for row in ROWS:
        print(f"| {row} | {times[row] * 1e3:.1f} | {times[row] / times[ROWS[0]]:.3f} |")


if __name__ == "__main__":
    main()
