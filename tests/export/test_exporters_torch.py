"""End to end from PyTorch exporters: PEFT and lora_spec.torch models (TorchScript and dynamo).

Each model is exported with its LoRA branches, merged by `merge_onnx`, and run in onnxruntime:
the output equals the framework's, and the merged graph has the compute nodes of the base model
exported without LoRA. The models and exports are shared (`torch_models.py`).
"""

import re
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lora_spec.export import NoLoRABranchError, merge_onnx
from lora_spec.export.verify import session
from tests.export.onnx_roundtrip import (
    INPUT_SHAPES,
    assert_folds_to_the_base_compute_nodes,
    assert_merge_reproduces,
)
from tests.numerics import assert_close

torch = pytest.importorskip("torch")

from tests.export.torch_models import MLP, adapted, export_torch


@pytest.fixture(
    scope="module",
    params=[(library, dynamo) for library in ("peft", "lora_spec") for dynamo in (False, True)],
    ids=lambda p: f"{p[0]}-{'dynamo' if p[1] else 'torchscript'}",
)
def torch_export(request, tmp_path_factory):
    """The adapted model exported with its LoRA branches, and the base model (TorchScript: same compute nodes)."""
    library, dynamo = request.param
    folder = tmp_path_factory.mktemp("torch")
    base = MLP().eval()
    model = adapted(library, base)
    generator = torch.Generator().manual_seed(1)
    inputs = (torch.randn(INPUT_SHAPES[2], generator=generator), torch.randn(INPUT_SHAPES[3], generator=generator))
    export_torch(model, inputs, folder / "model.onnx", dynamo)
    export_torch(base, inputs, folder / "base.onnx", dynamo=False)
    with torch.no_grad():
        expected = [output.numpy() for output in model(*inputs)]
    return folder, {"matrix": inputs[0].numpy(), "batch": inputs[1].numpy()}, expected


def test_merged_torch_export_reproduces_the_adapted_model_on_2d_and_3d_inputs(torch_export):
    folder, feeds, expected = torch_export
    assert_merge_reproduces(folder / "model.onnx", feeds, expected)


def test_merged_torch_export_has_the_compute_nodes_of_the_base_export(torch_export):
    assert_folds_to_the_base_compute_nodes(torch_export[0], folds=4)


class _TwinProjections(torch.nn.Module):
    """Two projections of one input with equal base weights: exporters store the weight once."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query, self.value = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.value.weight.copy_(self.query.weight)

    def forward(self, x):
        return self.query(x), self.value(x)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_layers_with_equal_base_weights_and_zero_b_merge_each_their_own_adapter(tmp_path, dynamo):
    import lora_spec.torch as lora

    model = lora.apply(_TwinProjections(), r=2, alpha=2, target_modules=["query", "value"]).eval()
    with torch.no_grad():
        model.query.lora_B.normal_()  # value's B stays all zeros, as exported right after initialisation
    x = torch.randn(3, 4)
    export_torch(model, (x,), tmp_path / "twins.onnx", dynamo, output_names=("q", "v"))
    result = merge_onnx(tmp_path / "twins.onnx", verify="full", progress=False)
    query, value = session(result.output).run(None, {"matrix": x.numpy()})
    with torch.no_grad():
        expected_query, expected_value = model(x)
    assert_close(query, expected_query.numpy(), np.float32, factor=5)
    assert_close(value, expected_value.numpy(), np.float32, factor=5)
    assert not np.allclose(query, value)


class _TokenClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.proj = torch.nn.Embedding(11, 4), torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.proj(self.embed(ids))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_peft_embedding_lora_folds_into_the_table(tmp_path, dynamo):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _TokenClassifier(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "proj"])
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                parameter.normal_()
    model.eval()
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    export_torch(model, (ids,), tmp_path / "tokens.onnx", dynamo, output_names=("logits",))
    result = merge_onnx(tmp_path / "tokens.onnx", verify="full", progress=False)
    assert len(result.folds) == 2 and result.verification.passed
    # The table read by proj's base MatMul looks like a product pair; proj's bias Add is no refused branch.
    assert result.refused == []
    nodes = [node.op_type for node in onnx.load(result.output).graph.node]
    assert nodes.count("Gather") == 1 and "Mul" not in nodes
    with torch.no_grad():
        expected = model(ids).numpy()
    assert_close(session(result.output).run(None, {"matrix": ids.numpy()})[0], expected, np.float32, factor=5)


class _ConvNet(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=groups)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("library", ["peft", "lora_spec"])
def test_conv_lora_folds_into_the_conv_weight(tmp_path, library):
    model = adapted(library, _ConvNet(groups=1), targets=["conv"])
    x = torch.randn(1, 4, 8, 8)
    export_torch(model, (x,), tmp_path / "conv.onnx", dynamo=False, output_names=("y",))
    result = merge_onnx(tmp_path / "conv.onnx", verify="full", progress=False)
    assert [node.op_type for node in onnx.load(result.output).graph.node] == ["Conv"]
    with torch.no_grad():
        expected = model(x).numpy()
    assert_close(session(result.output).run(None, {"matrix": x.numpy()})[0], expected, np.float32, factor=5)


def _peft_conv(groups: int):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_ConvNet(groups), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    return model.eval()


def test_peft_grouped_conv_lora_is_refused_with_the_reason(tmp_path):
    from lora_spec.export import NoLoRABranchError

    export_torch(
        _peft_conv(groups=2), (torch.randn(1, 4, 8, 8),), tmp_path / "conv.onnx", dynamo=False, output_names=("y",)
    )
    with pytest.raises(NoLoRABranchError, match="A conv's group"):
        merge_onnx(tmp_path / "conv.onnx", progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["conv.onnx"]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_peft_half_precision_export_folds_casts_and_all(tmp_path, dynamo):
    """PEFT runs float16 bases with float32 adapters: the base output is cast up, added, cast back."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).half()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    model.eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)).half()
    export_torch(model, (x,), tmp_path / "half.onnx", dynamo, output_names=("y",))
    result = merge_onnx(tmp_path / "half.onnx", progress=False)
    assert result.verification.tolerance == 1e-2 and result.verification.passed
    assert [node.op_type for node in onnx.load(result.output).graph.node] == ["Gemm", "Relu", "Gemm"]
    with torch.no_grad():
        expected = model(x).float().numpy()
    output = session(result.output).run(None, {"matrix": x.numpy()})[0]
    assert output.dtype == np.float16
    assert_close(output, expected, np.float16, factor=2)


class _MergedHeadsProjection(torch.nn.Module):
    """GPT-2's attention output projection: heads merged by a reshape, then a `Conv1D`, which views its input
    as rows (a second reshape). The dynamo exporter merges the two reshapes in the base model, not in an adapted
    one, whose LoRA branch reads the merged heads."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        self.proj = transformers.pytorch_utils.Conv1D(6, 8)

    def forward(self, heads):
        return self.proj(heads.reshape(heads.shape[0], heads.shape[1], 8))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_reshapes_kept_apart_by_a_branch_are_rejoined_as_in_the_base_export(tmp_path, use_dora):
    pytest.importorskip("onnxscript")
    peft = pytest.importorskip("peft")
    from tests.export.torch_models import export, randomize

    base = _MergedHeadsProjection().eval()
    model = peft.get_peft_model(
        _MergedHeadsProjection(),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], use_dora=use_dora, fan_in_fan_out=True),
    )
    randomize(model, ("lora_B", "lora_magnitude_vector"))
    heads = torch.randn(2, 3, 2, 4, generator=torch.Generator().manual_seed(1))
    export(model.get_base_model(), (heads,), tmp_path / "model.onnx", dynamo=True, names=["heads"])
    export(base, (heads,), tmp_path / "base.onnx", dynamo=True, names=["heads"])
    result = merge_onnx(tmp_path / "model.onnx", verify="full", progress=False)
    merged_nodes = sorted(node.op_type for node in onnx.load(result.output).graph.node)
    assert merged_nodes == sorted(node.op_type for node in onnx.load(tmp_path / "base.onnx").graph.node)
    assert merged_nodes.count("Reshape") == 2
    with torch.no_grad():
        expected = model(heads).numpy()
    assert_close(session(result.output).run(None, {"heads": heads.numpy()})[0], expected, np.float32, factor=5)


class _Signal(torch.nn.Module):
    """A 1-D convolution (PEFT adapts `Conv1d`, lora-export folds 2-D convolutions only) and, optionally, a head."""

    def __init__(self, head: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(3, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 2) if head else None

    def forward(self, signal):
        features = self.conv(signal)
        return features if self.head is None else self.head(features.mean(-1))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_1d_convolution_branch_is_named_as_not_folded_never_passed_over(tmp_path, dynamo, use_dora):
    peft = pytest.importorskip("peft")
    from tests.export.torch_models import randomize

    signal = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(1))
    for head in (True, False):
        targets = ["conv", "head"] if head else ["conv"]
        model = peft.get_peft_model(
            _Signal(head), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=use_dora)
        )
        randomize(model, ("lora_B",))
        export_torch(model.get_base_model().eval(), (signal,), tmp_path / f"head_{head}.onnx", dynamo, ("y",))
    unfolded = (
        r"a rank-2 pair of 1-D convolutions \(.+ then this\) stays unmerged: "
        + "lora-export folds LoRA on 2-D convolutions only"
    )
    result = merge_onnx(tmp_path / "head_True.onnx", verify="full", progress=False)
    assert len(result.folds) == 1 and len(result.refused) == 1
    assert re.fullmatch(r".+: " + unfolded, result.refused[0])
    with pytest.raises(NoLoRABranchError, match=unfolded):
        merge_onnx(tmp_path / "head_False.onnx", verify="full", progress=False)
    assert not (tmp_path / "head_False.merged.onnx").exists()


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(training=torch.onnx.TrainingMode.TRAINING), "its Dropout runs in training mode: export the model after"),
        (dict(export_params=False), "it holds no weights: export the model with its parameters"),
    ],
    ids=["training-mode", "no-parameters"],
)
def test_an_export_that_rules_out_every_branch_says_how_it_was_exported(tmp_path, options, reason):
    """A training-mode export keeps the adapter's dropout in the branch, and one without parameters has no weight to
    fold into: the one line names that, not a missing adapter."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["mlp.0", "mlp.2"])
    model = peft.get_peft_model(MLP(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 4), torch.randn(2, 3, 4)), str(tmp_path / "model.onnx"), **options)
    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(NoLoRABranchError, match=re.escape(reason)) as error:
        merge_onnx(tmp_path / "model.onnx")
    assert "\n" not in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == before
