"""Several adapters on one model, inference: routed mixed batches and hot-swapping in a compiled model.

Mixed batch: 4 adapters (r = 16, alpha = 32) on the 4 x Linear(1024) + GELU MLP of bench_torch.py,
512 rows each (2048 in all), no gradients. Rows: the base model alone (the floor), our forward of
the 2048 rows through one adapter, our routed batch (`lora.routed`) with each adapter's rows
together and with the rows interleaved, and PEFT's `adapter_names=` and 4 `set_adapter` passes
of 512 rows. All rows run in interleaved rounds in one process; medians are reported.

Hot-swap: the same MLP compiled with `torch.compile` after `prepare_model_for_compiled_hotswap`;
one sample is a swap of the adapter file plus the first forward of 2048 rows, ours
(`lora.hotswap_adapter`) and PEFT's (`peft.utils.hotswap.hotswap_adapter`), alternating between
two adapters of ranks 8 and 16; the recompile count comes from dynamo's counters.

    python benchmarks/bench_multi_adapter.py            # 30 rounds, 7 swaps each
    python benchmarks/bench_multi_adapter.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from interleave import interleaved_medians
from torch import nn

WIDTH, DEPTH, ROWS_PER_ADAPTER, RANK, ALPHA = 1024, 4, 512, 16, 32
ADAPTERS = [f"task{index}" for index in range(4)]
TARGETS = [str(2 * i) for i in range(DEPTH)]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(module for _ in range(DEPTH) for module in (nn.Linear(WIDTH, WIDTH), nn.GELU())))


def randomise(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def ours_with_adapters() -> nn.Module:
    import lora_spec.torch as lora

    model = mlp()
    for name in ADAPTERS:
        lora.apply(model, adapter_name=name, r=RANK, alpha=ALPHA, target_modules=TARGETS)
    return randomise(model, 1).eval()


def peft_with_adapters() -> nn.Module:
    import peft

    config = dict(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    model = peft.get_peft_model(mlp(), peft.LoraConfig(**config), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, peft.LoraConfig(**config))
    return randomise(model, 1).eval()


def mixed_batch_rows() -> dict[str, object]:
    import lora_spec.torch as lora

    x = torch.randn(len(ADAPTERS) * ROWS_PER_ADAPTER, WIDTH, generator=torch.Generator().manual_seed(2))
    grouped = [name for name in ADAPTERS for _ in range(ROWS_PER_ADAPTER)]
    interleaved = [ADAPTERS[row % len(ADAPTERS)] for row in range(len(grouped))]
    base, ours, theirs = mlp().eval(), ours_with_adapters(), peft_with_adapters()

    def routed(routes):
        def run():
            with lora.routed(ours, routes):
                ours(x)

        return run

    def peft_passes():
        for index, name in enumerate(ADAPTERS):
            theirs.set_adapter(name)
            theirs(x[index * ROWS_PER_ADAPTER : (index + 1) * ROWS_PER_ADAPTER])

    return {
        "base model alone": lambda: base(x),
        "lora_spec, one adapter for all rows": lambda: ours(x),
        "lora_spec routed, rows grouped by adapter": routed(grouped),
        "lora_spec routed, rows interleaved": routed(interleaved),
        "PEFT adapter_names=, rows grouped": lambda: theirs(x, adapter_names=grouped),
        "PEFT 4 set_adapter passes": peft_passes,
    }


def mixed_batch_table(rounds: int) -> str:
    with torch.inference_mode():
        times = interleaved_medians(mixed_batch_rows(), rounds, warmup=2)
    single = times["lora_spec, one adapter for all rows"]
    peft = times["PEFT adapter_names=, rows grouped"]
    lines = ["| row | ms | vs our one-adapter forward | vs PEFT adapter_names= |", "|---|---:|---:|---:|"]
    for row, seconds in times.items():
        lines.append(f"| {row} | {seconds * 1e3:.1f} | {seconds / single:.3f} | {seconds / peft:.3f} |")
    return "\n".join(lines)


def _adapter_folders(folder: Path) -> list[Path]:
    """Two PEFT-format adapters of the MLP, ranks 8 and 16 with other alphas, written by PEFT."""
    import peft

    paths = []
    for index, (rank, alpha) in enumerate([(8, 16), (16, 8)]):
        model = peft.get_peft_model(mlp(), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
        randomise(model, 10 + index).save_pretrained(folder / str(index))
        paths.append(folder / str(index))
    return paths


def _swap_times(load, prepare, swap, paths: list[Path], x: torch.Tensor, swaps: int) -> tuple[list[float], int]:
    from torch._dynamo.utils import counters

    model = load(paths[0])
    prepare(model)
    compiled = torch.compile(model)
    with torch.inference_mode():
        compiled(x)
        before = counters["stats"]["unique_graphs"]
        samples = []
        for index in range(swaps):
            start = time.perf_counter()
            swap(compiled, paths[(index + 1) % 2])
            compiled(x)
            samples.append(time.perf_counter() - start)
        recompiles = counters["stats"]["unique_graphs"] - before
    return samples, recompiles


def hotswap_table(rounds: int, swaps: int) -> str:
    import peft
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare

    import lora_spec.torch as lora

    x = torch.randn(len(ADAPTERS) * ROWS_PER_ADAPTER, WIDTH, generator=torch.Generator().manual_seed(3))
    rows = {
        "lora_spec hotswap_adapter": (
            lambda path: lora.load_adapter(mlp(), path).eval(),
            lambda model: lora.prepare_model_for_compiled_hotswap(model, target_rank=16),
            lambda model, path: lora.hotswap_adapter(model, path, "default"),
        ),
        "PEFT hotswap_adapter": (
            lambda path: peft.PeftModel.from_pretrained(mlp(), path).eval(),
            lambda model: peft_prepare(model, target_rank=16),
            lambda model, path: peft_hotswap(model, str(path), "default", torch_device="cpu"),
        ),
    }
    samples = {row: [] for row in rows}
    recompiles = {row: 0 for row in rows}
    with tempfile.TemporaryDirectory() as folder:
        paths = _adapter_folders(Path(folder))
        for round_index in range(rounds):
            order = list(rows) if round_index % 2 == 0 else list(rows)[::-1]
            for row in order:
                torch._dynamo.reset()
                times, count = _swap_times(*rows[row], paths, x, swaps)
                samples[row] += times
                recompiles[row] += count
    medians = {row: statistics.median(values) for row, values in samples.items()}
    peft_median = medians["PEFT hotswap_adapter"]
    lines = [
        "| row | swap + first forward (ms) | vs PEFT | recompiles after the first compile |",
        "|---|---:|---:|---:|",
    ]
    for row, seconds in medians.items():
        lines.append(f"| {row} | {seconds * 1e3:.1f} | {seconds / peft_median:.3f} | {recompiles[row]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of the mixed batch (default 30)")
    parser.add_argument("--swap-rounds", type=int, default=2, help="compiled models per hot-swap row (default 2)")
    parser.add_argument("--swaps", type=int, default=7, help="swaps per compiled model (default 7)")
    args = parser.parse_args()
    rounds, swap_rounds, swaps = (3, 1, 3) if args.quick else (args.rounds, args.swap_rounds, args.swaps)
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP {DEPTH}x{WIDTH}, {len(ADAPTERS)} adapters "
        f"r={RANK}, {ROWS_PER_ADAPTER} rows each; {rounds} interleaved rounds, medians",
        flush=True,
    )
    print(mixed_batch_table(rounds), flush=True)
    print(
        f"\nhot-swap in a compiled model: {swap_rounds} compiled models per row, {swaps} swaps each, medians",
        flush=True,
    )
    print(hotswap_table(swap_rounds, swaps))


if __name__ == "__main__":
    main()
