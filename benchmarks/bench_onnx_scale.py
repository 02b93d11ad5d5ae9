"""Merging a >= 2 GB ONNX model with external data: peak resident memory and wall time against a plain copy.

A synthetic float32 model of `--layers` square `--width` MatMul layers, each with a LoRA branch
(`x @ W + s * (x @ A) @ B`), is written with all tensors in one external data file. Each round
times `cp` of the model's files and `lora-export --merge` with the default verification (at this
size: every folded layer checked on its own), each in its own subprocess so that the merge's peak
resident memory (ru_maxrss) is its own. Rows alternate within a round; medians are reported,
with the CPU time (user + system) of each, which other jobs on a shared machine disturb less
than the wall time.

    python benchmarks/bench_onnx_scale.py            # 32 layers of 4096 x 4096: 2 GiB of weights
    python benchmarks/bench_onnx_scale.py --quick    # 8 layers of 2048 x 2048: 128 MiB, one round

Targets (issue 5): peak RSS <= 600 MB, merge time <= 3 x the copy. Files are removed at the end.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

RANK = 16
SCALE = 2.0
PEAK_RSS_LIMIT_MB = 600
TIME_RATIO_LIMIT = 3.0


def write_model(folder: Path, layers: int, width: int) -> Path:
    """The synthetic model, its data written tensor by tensor (never the whole model in memory)."""
    rng = np.random.default_rng(0)
    data_name = "model.onnx.data"
    initializers, nodes = [], []
    with open(folder / data_name, "wb") as data:

        def external(name: str, values: np.ndarray) -> str:
            proto = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(values.shape))
            proto.data_location = TensorProto.EXTERNAL
            offset = data.tell()
            data.write(values.astype(np.float32).tobytes())
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(values.nbytes))):
                proto.external_data.add(key=key, value=value)
            initializers.append(proto)
            return name

        scale = external("scale", np.array(SCALE, np.float32))
        hidden = "x"
        for index in range(layers):
            bound = 1 / np.sqrt(width)
            weight = external(f"layer{index}.weight", rng.uniform(-bound, bound, (width, width)).astype(np.float32))
            lora_a = external(f"layer{index}.lora_A", rng.uniform(-bound, bound, (width, RANK)).astype(np.float32))
            lora_b = external(f"layer{index}.lora_B", rng.normal(0, 0.01, (RANK, width)).astype(np.float32))
            prefix = f"layer{index}"
            nodes += [
                helper.make_node("MatMul", [hidden, weight], [f"{prefix}.base"], name=f"{prefix}.base"),
                helper.make_node("MatMul", [hidden, lora_a], [f"{prefix}.low"], name=f"{prefix}.lora_A"),
                helper.make_node("MatMul", [f"{prefix}.low", lora_b], [f"{prefix}.update"], name=f"{prefix}.lora_B"),
                helper.make_node("Mul", [f"{prefix}.update", scale], [f"{prefix}.scaled"], name=f"{prefix}.scale"),
                helper.make_node(
                    "Add", [f"{prefix}.base", f"{prefix}.scaled"], [f"{prefix}.out"], name=f"{prefix}.add"
                ),
            ]
            hidden = f"{prefix}.out"
    graph = helper.make_graph(
        nodes,
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(hidden, TensorProto.FLOAT, ["batch", width])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder / "model.onnx"


# The child reports its own high-water mark: ru_maxrss of a forked child would include the parent's pages.
_MERGE_AND_REPORT = """
import sys
from lora_spec.export.cli import main
status = main(sys.argv[1:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) / 1024)
sys.exit(status)
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) and stdout of one subprocess; exits on failure."""
    started, cpu_before = time.perf_counter(), _children_cpu()
    completed = subprocess.run(command, capture_output=True, text=True)
    elapsed, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
    if completed.returncode:
        sys.exit(f"{' '.join(command)} failed ({completed.returncode}): {completed.stderr.strip()}")
    return elapsed, cpu, completed.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 128 MiB model and one round")
    parser.add_argument("--layers", type=int, help="number of layers (default 32; 8 with --quick)")
    parser.add_argument("--width", type=int, help="width of each square layer (default 4096; 2048 with --quick)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    parser.add_argument("--folder", help="where to write the temporary files (default: the system temp folder)")
    arguments = parser.parse_args()
    layers = arguments.layers or (8 if arguments.quick else 32)
    width = arguments.width or (2048 if arguments.quick else 4096)
    rounds = arguments.rounds or (1 if arguments.quick else 3)

    folder = Path(tempfile.mkdtemp(prefix="bench_onnx_scale_", dir=arguments.folder))
    try:
        model = write_model(folder, layers, width)
        weight_bytes = (folder / "model.onnx.data").stat().st_size
        print(
            f"model: {layers} layers of {width} x {width} float32 + LoRA r={RANK}, "
            f"{weight_bytes / 2**30:.2f} GiB of external data\n"
        )
        copy_command = ["cp", str(model), str(model.with_name("model.onnx.data")), str(folder / "copy")]
        (folder / "copy").mkdir()
        merge_command = [
            sys.executable,
            "-c",
            _MERGE_AND_REPORT,
            "--merge",
            str(model),
            "-o",
            str(folder / "merged.onnx"),
            "-q",
        ]
        copy_times, copy_cpus, merge_times, merge_cpus, merge_peaks = [], [], [], [], []
        for _ in range(rounds):
            elapsed, cpu, _ = timed(copy_command)
            copy_times.append(elapsed)
            copy_cpus.append(cpu)
            elapsed, cpu, output = timed(merge_command)
            merge_times.append(elapsed)
            merge_cpus.append(cpu)
            merge_peaks.append(float(output.split()[-1]))
            for path in (folder / "merged.onnx", folder / "merged.onnx.data", *(folder / "copy").iterdir()):
                path.unlink()
        copy_time, merge_wall, merge_peak = (
            statistics.median(copy_times),
            statistics.median(merge_times),
            max(merge_peaks),
        )
        print("| row | median wall (s) | median CPU, user + system (s) | peak RSS (MB) | time / copy |")
        print("|---|---|---|---|---|")
        copy_cpu, merge_cpu = statistics.median(copy_cpus), statistics.median(merge_cpus)
        print(f"| cp of model.onnx + model.onnx.data | {copy_time:.2f} | {copy_cpu:.2f} | - | 1.00 |")
        print(
            f"| lora-export --merge (default verification) | {merge_wall:.2f} | {merge_cpu:.2f} | "
            f"{merge_peak:.0f} | {merge_wall / copy_time:.2f} |"
        )
        print(
            f"\npeak RSS of the merge {merge_peak:.0f} MB (target <= {PEAK_RSS_LIMIT_MB}), "
            f"wall time {merge_wall / copy_time:.2f} x the copy (target <= {TIME_RATIO_LIMIT:g}); "
            f"{rounds} round(s), medians; the merge runs the default verification."
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
