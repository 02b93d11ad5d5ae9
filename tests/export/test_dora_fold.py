"""Folding DoRA layers: generated graphs in every form against the reference, PEFT's real exports, refusals."""

import copy
import warnings

import numpy as np
import pytest
from hypothesis import given, settings

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lora_spec.export import NoLoRABranchError, merge_onnx
from lora_spec.export.verify import session
from tests import strategies
from tests.export.onnx_roundtrip import compute_ops
from tests.numerics import assert_close


def _merge(tmp_path_factory, case: strategies.DoRAGraphCase, verify):
    folder = tmp_path_factory.mktemp("dora")
    onnx.save(case.model, folder / "model.onnx")
    onnx.save(case.base_model, folder / "base.onnx")
    return merge_onnx(folder / "model.onnx", verify=verify, progress=False)


@settings(max_examples=40)
@given(strategies.dora_graph_cases())
def test_folded_dora_graph_computes_the_reference_dora_layer_with_the_base_nodes(tmp_path_factory, case):
    result = _merge(tmp_path_factory, case, verify="full")
    assert len(result.folds) == 1 and "DoRA" in result.folds[0], (case.form, case.base, case.bias)
    (output,) = session(result.output).run(None, {"x": case.x})
    assert_close(output, case.expected, np.float32, factor=50)
    assert compute_ops(result.output) == compute_ops(result.output.with_name("base.onnx")), (case.form, case.base)
    assert {node.op_type for node in onnx.load(result.output).graph.node} <= {"MatMul", "Gemm", "Add", "Identity"}


@settings(max_examples=15)
@given(strategies.dora_graph_cases())
def test_layer_by_layer_verification_checks_dora_folds(tmp_path_factory, case):
    result = _merge(tmp_path_factory, case, verify="layers")
    assert result.verification.mode == "layers" and result.verification.passed
    assert_close(session(result.output).run(None, {"x": case.x})[0], case.expected, np.float32, factor=50)


def test_a_scale_that_varies_along_the_batch_is_refused_not_folded(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "weight": rng.standard_normal((4, 3)),
        "lora_A": rng.standard_normal((4, 2)),
        "lora_B": rng.standard_normal((2, 3)),
        "rows": rng.standard_normal((2, 1)),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "weight"], ["base"]),
        helper.make_node("Mul", ["base", "rows"], ["rescaled"]),
        helper.make_node("MatMul", ["x", "lora_A"], ["low"]),
        helper.make_node("MatMul", ["low", "lora_B"], ["up"]),
        helper.make_node("Add", ["rescaled", "up"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in arrays.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    with pytest.raises(NoLoRABranchError, match=r"a constant of shape \(2, 1\) does not act per output feature"):
        merge_onnx(tmp_path / "model.onnx", progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]


def _keras_like_graph(form: str):
    """One layer as tf2onnx writes Keras's DoRA layers after TensorFlow's graph optimizer, on a (2, 4)
    input with 6 output features: `(x W) * f + (x A) (B * s * f)` in one of these forms, and its weights.

    - "untrained": f is all ones (the magnitude still at its norm), the bias after the sum;
    - "moved_bias": the optimizer moved the bias onto the low-rank side, `(x W) * f + ((x A) B' + b)`;
    - "heads": both sides reshaped into (2, 3) heads and scaled by a (2, 3) factor, the bias after;
    - "per_head_only": the same with a (2, 1) factor, one value per head: refused.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    factor = {"untrained": np.ones(6), "per_head_only": rng.uniform(0.5, 2, (2, 1))}.get(form, rng.uniform(0.5, 2, 6))
    heads = form in ("heads", "per_head_only")
    shaped = factor.reshape(2, 3) if form == "heads" else factor
    arrays = {
        "weight": rng.standard_normal((4, 6)),
        "lora_A": rng.standard_normal((4, 2)),
        "lora_B": rng.standard_normal((2, 6)) * (1 if heads else factor),
        "factor": shaped,
        "bias": rng.standard_normal((2, 3) if heads else 6),
        "heads": np.array([2, 2, 3]),
    }
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "weight"], ["base"]),
        node("MatMul", ["x", "lora_A"], ["low"]),
        node("MatMul", ["low", "lora_B"], ["up"]),
    ]
    if heads:
        nodes += [
            node("Reshape", ["base", "heads"], ["base_heads"]),
            node("Reshape", ["up", "heads"], ["up_heads"]),
            node("Mul", ["base_heads", "factor"], ["rescaled"]),
            node("Mul", ["up_heads", "factor"], ["update"]),
            node("Add", ["rescaled", "update"], ["sum"]),
            node("Add", ["sum", "bias"], ["y"]),
        ]
    elif form == "untrained":
        nodes += [
            node("Mul", ["base", "factor"], ["rescaled"]),
            node("Add", ["rescaled", "up"], ["sum"]),
            node("Add", ["sum", "bias"], ["y"]),
        ]
    else:
        nodes += [
            node("Mul", ["base", "factor"], ["rescaled"]),
            node("Add", ["up", "bias"], ["biased"]),
            node("Add", ["rescaled", "biased"], ["y"]),
        ]
    output_shape = [2, 2, 3] if heads else [2, 6]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [
            numpy_helper.from_array(value.astype(np.int64 if name == "heads" else np.float32), name)
            for name, value in arrays.items()
            if any(name in item.input for item in nodes)
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("form", ["untrained", "moved_bias", "heads"])
def test_tf2onnx_forms_of_keras_dora_layers_fold_to_a_product_and_a_bias_add(tmp_path, form):
    onnx.save(_keras_like_graph(form), tmp_path / "model.onnx")
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    (expected,) = session(tmp_path / "model.onnx").run(None, {"x": x})
    result = merge_onnx(tmp_path / "model.onnx", verify="full", progress=False)
    assert len(result.folds) == 1
    assert sorted(node.op_type for node in onnx.load(result.output).graph.node) == (
        ["Add", "MatMul", "Reshape"] if form == "heads" else ["Add", "MatMul"]
    )
    assert_close(session(result.output).run(None, {"x": x})[0], expected, np.float32, factor=10)


def test_a_factor_per_head_rather_than_per_feature_is_refused(tmp_path):
    onnx.save(_keras_like_graph("per_head_only"), tmp_path / "model.onnx")
    with pytest.raises(NoLoRABranchError, match=r"a constant of shape \(2, 1\) does not act per output feature"):
        merge_onnx(tmp_path / "model.onnx", progress=False)


# --- PEFT's DoRA layers through PyTorch's exporters -----------------------------------------------------------

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class _Layers(torch.nn.Module):
    """An embedding, linear layers with and without bias on 2-D and 3-D inputs, and a conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.proj = torch.nn.Embedding(11, 4), torch.nn.Linear(4, 6)
        self.head, self.conv = torch.nn.Linear(6, 3, bias=False), torch.nn.Conv2d(3, 5, 3, padding=1, stride=2)

    def forward(self, ids, matrix, image):
        hidden = self.proj(self.embed(ids))
        return self.head(torch.relu(hidden)), self.head(torch.relu(self.proj(matrix))), self.conv(image)


INPUT_NAMES = ["ids", "matrix", "image"]


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, 11, (2, 5), generator=generator),
        torch.randn(3, 4, generator=generator),
        torch.randn(2, 3, 7, 7, generator=generator),
    )


def _export(model, path, dynamo: bool, inputs=None) -> None:
    if dynamo:
        pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            inputs or _inputs(),
            str(path),
            input_names=INPUT_NAMES,
            dynamo=dynamo,
            **({} if dynamo else {"opset_version": 17}),
        )


def peft_dora_model(base: torch.nn.Module, targets=("embed", "proj", "head", "conv")) -> torch.nn.Module:
    """PEFT's DoRA on `targets` of a copy of `base`, trained-looking: B (the embedding's A) non-zero and
    the magnitudes away from the norms they start at."""
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=6, target_modules=list(targets), use_dora=True)
    )
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            elif "magnitude" in name:
                parameter.mul_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["torchscript", "dynamo"])
def dora_export(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft_dora")
    base = _Layers().eval()
    model = peft_dora_model(base)
    _export(model, folder / "model.onnx", dynamo=request.param)
    _export(base, folder / "base.onnx", dynamo=False)
    with torch.no_grad():
        expected = [output.numpy() for output in model(*_inputs())]
    return folder, expected


def test_merged_peft_dora_export_reproduces_the_model_with_the_base_nodes(dora_export):
    folder, expected = dora_export
    result = merge_onnx(folder / "model.onnx", verify="full", progress=False)
    # proj and head run twice: each call folds on its own (the weight copied for the second)
    assert len(result.folds) == 6 and all("DoRA" in fold for fold in result.folds)
    feeds = {name: value.numpy() for name, value in zip(INPUT_NAMES, _inputs(), strict=True)}
    for output, want in zip(session(result.output).run(None, feeds), expected, strict=True):
        assert_close(output, want, np.float32, factor=20)
    # The base is exported by TorchScript, which writes some products as MatMul where dynamo writes Gemm.
    merged, base = compute_ops(result.output), compute_ops(folder / "base.onnx")
    assert merged["MatMul"] + merged["Gemm"] == base["MatMul"] + base["Gemm"] and merged["Add"] == base["Add"]
    merged_ops = {node.op_type for node in onnx.load(result.output).graph.node}
    assert not {"ReduceL2", "EyeLike", "Div", "Sub", "Mul"} & merged_ops


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_peft_half_precision_dora_export_folds_casts_and_all(tmp_path, dynamo):
    """PEFT runs float16 bases with float32 adapters: the base output is cast up, and the sum cast back."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).half()
    model = peft_dora_model(base, targets=("0", "2"))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)).half()
    if dynamo:
        pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(tmp_path / "half.onnx"),
            input_names=["matrix"],
            dynamo=dynamo,
            **({} if dynamo else {"opset_version": 17}),
        )
    result = merge_onnx(tmp_path / "half.onnx", progress=False)
    assert result.verification.tolerance == 1e-2 and result.verification.passed
    assert [node.op_type for node in onnx.load(result.output).graph.node] == ["Gemm", "Relu", "Gemm"]
    output = session(result.output).run(None, {"matrix": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).float().numpy()
    assert output.dtype == np.float16
    assert_close(output, expected, np.float16, factor=2)
