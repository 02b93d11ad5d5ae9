"""Shared by the exporter round-trip tests: merge a model exported with LoRA and compare it."""

import collections

import numpy as np
import onnx

from lora_spec.export import merge_onnx
from lora_spec.export.verify import session
from tests.numerics import assert_close

COMPUTE_OPS = ("MatMul", "Gemm", "Mul", "Div", "Add")
INPUT_SHAPES = {2: (3, 4), 3: (2, 5, 4), 4: (2, 6, 6, 4)}  # 4: images, channels last


def compute_ops(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node if node.op_type in COMPUTE_OPS)


def assert_merge_reproduces(path, feeds, expected) -> None:
    """Merged with full verification, the model's outputs equal the framework's `expected` ones."""
    result = merge_onnx(path, verify="full", progress=False)
    assert result.verification.passed
    for output, want in zip(session(result.output).run(None, feeds), expected, strict=True):
        assert_close(output, want, np.float32, factor=5)


def assert_folds_to_the_base_compute_nodes(folder, folds: int) -> None:
    result = merge_onnx(folder / "model.onnx", verify="off", progress=False)
    assert len(result.folds) == folds
    assert compute_ops(result.output) == compute_ops(folder / "base.onnx")
