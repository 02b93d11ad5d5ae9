"""Serving many adapters from one switchable ONNX model against one merged model per adapter.

Models: the MLP and the small BERT of `bench_onnx_latency.py` (LoRA r=16 on every linear layer /
on query and value), exported without LoRA (TorchScript). Eight `lora_spec.torch` adapters (own
seeds) are saved; `lora-export --switchable` makes the base switchable, `--pack` writes one
`.onnx_adapter` per adapter, and `--merge --adapter` one merged model per adapter. Sessions use 2
threads with spinning off, as in `bench_onnx_latency.py`.

- Switch cost: loading an adapter file (`LoraAdapter.Load` plus `RunOptions.add_active_adapter`)
  against creating an `InferenceSession` of a merged model, in interleaved rounds; and the first
  run after loading a new adapter against a steady-state run with it (batch 32).
- Per-run latency at batch 1, 32 and 512: the switchable model with an adapter active, the same
  without adapter (rank 0), and the merged model, in interleaved rounds (medians); then the same in
  CPU time (every thread of the process), which other jobs on shared cores disturb far less.
- Memory: resident memory added by one switchable session with the 8 adapters loaded (each run
  once), against 8 sessions of the merged models (each run once); each case in its own process,
  over that process's resident memory after its imports; the median of `--memory-repeats` processes.

    python benchmarks/bench_onnx_switch.py            # both models, batches 1, 32, 512
    python benchmarks/bench_onnx_switch.py --quick    # fewer rounds, batches 1 and 32

Targets (issue 12): switch >= 50x cheaper than a session, first run <= 1.2x steady, served/merged
<= 1.20 at batch 32, memory <= 0.3x.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
from bench_onnx_latency import ALPHA, MODELS, RANK, THREADS, export, session
from interleave import interleaved_medians

import lora_spec.torch as lora
from lora_spec.export import make_switchable, merge_onnx, pack_adapter

ADAPTERS = 8
# The switchable model's factor inputs are initializers listed among the graph inputs, on purpose: without
# this, onnxruntime warns once per input for every session.
onnxruntime.set_default_logger_severity(3)
SWITCH_RATIO_MIN, FIRST_RUN_MAX, LATENCY_MAX, MEMORY_MAX = 50.0, 1.2, 1.20, 0.3


def build(folder: Path, name: str) -> dict:
    """The switchable model, the adapter files and the merged models of one benchmark model."""
    factory, targets, inputs = MODELS[name]
    base = factory().eval()
    stem = folder / name.split()[0]
    export(base, inputs(2), stem.with_suffix(".onnx"))
    directories = []
    for number in range(ADAPTERS):
        adapted = lora.apply(copy.deepcopy(base), r=RANK, alpha=ALPHA, target_modules=targets)
        torch.manual_seed(number)
        with torch.no_grad():
            for parameter_name, parameter in adapted.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.normal_(0, 0.01)
        directories.append(folder / f"{stem.name}_adapter{number}")
        lora.save_adapter(adapted, directories[-1])
    served = make_switchable(stem.with_suffix(".onnx"), adapters=directories[:1], progress=False).output
    files = [
        pack_adapter(served, [directory], directory.with_suffix(".onnx_adapter"), progress=False).output
        for directory in directories
    ]
    merged = [
        merge_onnx(
            stem.with_suffix(".onnx"),
            directory.with_suffix(".merged.onnx"),
            adapters=[directory],
            verify="off",
            progress=False,
        ).output
        for directory in directories
    ]
    return {"served": served, "files": files, "merged": merged}


def options_with(path: Path) -> tuple:
    """Run options with the adapter file at `path` active, and the adapter (which they only point to)."""
    adapter = onnxruntime.LoraAdapter()
    adapter.Load(str(path))
    options = onnxruntime.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter


def switch_cost(paths: dict, rounds: int) -> dict[str, float]:
    """Median seconds to activate an adapter file and to create a merged model's session."""
    files = iter(paths["files"] * rounds * 2)
    return interleaved_medians(
        {"switch": lambda: options_with(next(files)), "session": lambda: session(paths["merged"][0])}, rounds
    )


def first_run(paths: dict, feeds: dict, rounds: int) -> tuple[float, float]:
    """Median seconds of the first run after loading an adapter file, and of the runs after it."""
    runner = session(paths["served"])
    runner.run(None, feeds)
    first, steady = [], []
    for round_index in range(rounds):
        options, _adapter = options_with(paths["files"][round_index % ADAPTERS])
        for sample in (first, steady, steady):
            start = time.perf_counter()
            runner.run(None, feeds, options)
            sample.append(time.perf_counter() - start)
    return statistics.median(first), statistics.median(steady)


def latencies(paths: dict, feeds: dict, rounds: int, clock) -> dict[str, float]:
    """Median `clock` seconds per run: with an adapter active, without one (rank 0), and of the merged model."""
    served, merged = session(paths["served"]), session(paths["merged"][0])
    options, _adapter = options_with(paths["files"][0])
    return interleaved_medians(
        {
            "adapter": lambda: served.run(None, feeds, options),
            "rank 0": lambda: served.run(None, feeds),
            "merged": lambda: merged.run(None, feeds),
        },
        rounds,
        clock=clock,
    )


# Each memory case runs in a fresh interpreter: its pages are its own, measured over its baseline.
_MEMORY_CASE = """
import json, sys
from bench_onnx_latency import MODELS, session
from bench_onnx_switch import options_with

def resident():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

case, name, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
feeds = MODELS[name][2](32)
before = resident()
if case == "served":
    runner = session(paths["served"])
    adapters = [options_with(path) for path in paths["files"]]
    for options, _adapter in adapters:
        runner.run(None, feeds, options)
else:
    runners = [session(path) for path in paths["merged"]]
    for runner in runners:
        runner.run(None, feeds)
print(resident() - before)
"""


def memory(paths: dict, name: str, repeats: int) -> dict[str, float]:
    """Median bytes of resident memory each case adds, each measured in its own process."""
    arguments = json.dumps(
        {key: [str(path) for path in value] if isinstance(value, list) else str(value) for key, value in paths.items()}
    )
    samples: dict[str, list[int]] = {"served": [], "merged": []}
    for _ in range(repeats):
        for case in samples:
            done = subprocess.run(
                [sys.executable, "-c", _MEMORY_CASE, case, name, arguments],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).parent,
            )
            samples[case].append(int(done.stdout.split()[-1]))
    return {case: statistics.median(values) for case, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 32, few rounds, one memory process each")
    parser.add_argument("--memory-repeats", type=int, default=3, help="processes per memory case (default 3)")
    arguments = parser.parse_args()
    batches = (1, 32) if arguments.quick else (1, 32, 512)
    rounds = (lambda batch: 20) if arguments.quick else (lambda batch: {1: 400, 32: 200}.get(batch, 20))
    repeats = 1 if arguments.quick else arguments.memory_repeats
    print(
        f"onnxruntime {onnxruntime.__version__}, CPU, {THREADS} threads, spinning off; {ADAPTERS} adapters of rank "
        f"{RANK}; medians of interleaved rounds\n"
    )
    switch_rows, latency_rows, memory_rows = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_onnx_switch_") as folder:
        for name, (_, _, inputs) in MODELS.items():
            paths = build(Path(folder), name)
            cost = switch_cost(paths, 20 if arguments.quick else 100)
            first, steady = first_run(paths, inputs(32), 20 if arguments.quick else 50)
            switch_rows.append(
                f"| {name} | {cost['switch'] * 1e3:.3f} | {cost['session'] * 1e3:.1f} | "
                f"{cost['session'] / cost['switch']:.0f} | {first * 1e3:.2f} | {steady * 1e3:.2f} | "
                f"{first / steady:.3f} |"
            )
            for batch in batches:
                wall = latencies(paths, inputs(batch), rounds(batch), time.perf_counter)
                cpu = latencies(paths, inputs(batch), rounds(batch), time.process_time)
                latency_rows.append(
                    f"| {name} | {batch} | {wall['merged'] * 1e3:.2f} | {wall['adapter'] * 1e3:.2f} | "
                    f"{wall['rank 0'] * 1e3:.2f} | {wall['adapter'] / wall['merged']:.3f} | "
                    f"{wall['rank 0'] / wall['merged']:.3f} | {cpu['adapter'] / cpu['merged']:.3f} | "
                    f"{cpu['rank 0'] / cpu['merged']:.3f} |"
                )
            added = memory(paths, name, repeats)
            memory_rows.append(
                f"| {name} | {added['served'] / 2**20:.1f} | {added['merged'] / 2**20:.1f} | "
                f"{added['served'] / added['merged']:.3f} |"
            )
            print(f"measured {name}", file=sys.stderr, flush=True)
    print(
        f"Switch cost (required: session / switch >= {SWITCH_RATIO_MIN:g}, first run / steady <= {FIRST_RUN_MAX}; "
        "runs at batch 32):\n"
    )
    print(
        "| model | load adapter file (ms) | new session of a merged model (ms) | session / switch | first run after "
        "loading (ms) | steady run (ms) | first / steady |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(switch_rows))
    print(f"\nPer-run latency (required: adapter / merged <= {LATENCY_MAX} at batch 32):\n")
    print(
        "| model | batch | merged (ms) | switchable, adapter active (ms) | switchable, no adapter (ms) | "
        "adapter / merged | no adapter / merged | adapter / merged, CPU time | no adapter / merged, CPU time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(latency_rows))
    print(f"\nResident memory added (required: served / merged <= {MEMORY_MAX}):\n")
    print(
        f"| model | 1 switchable session + {ADAPTERS} adapter files (MiB) | {ADAPTERS} merged sessions (MiB) | "
        "served / merged |"
    )
    print("|---|---|---|---|")
    print("\n".join(memory_rows))


if __name__ == "__main__":
    main()
