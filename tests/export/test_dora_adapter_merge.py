"""DoRA adapter files merged into base graphs: the reference's DoRA merge in every layout, PEFT's files on real
exports, and the refusals (a weight other than 1, another adapter on the same weight, grouped convolutions)."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec import dora
from tests import strategies
from tests.numerics import assert_close

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lora_spec.export import ExportError, merge_onnx
from lora_spec.export.adapter_merge import AdapterMergeError, plan_adapter_merge
from tests.export.onnx_graphs import (
    LINEAR_LAYOUTS,
    NAMINGS,
    PATH,
    apply_plan,
    conv_model,
    embedding_model,
    initializer_reader,
    linear_model,
    run,
    write_adapter,
)


def _plan(model, case: strategies.DoRACase, folder: Path, weight: float = 1.0, **options):
    """Plan the merge of the case's DoRA adapter (scaling `s` at alpha = s * r) into `model`."""
    lora = case.case
    directory = write_adapter(
        folder, {PATH: (lora.A, lora.B)}, alpha=lora.s * lora.A.shape[0], magnitudes={PATH: case.magnitude}, **options
    )
    return plan_adapter_merge(model, initializer_reader(model), [(directory, weight)])


@given(
    case=strategies.dora_cases("linear", np.float32, dropout=False),
    layout=st.sampled_from(LINEAR_LAYOUTS),
    naming=st.sampled_from(NAMINGS),
    alpha=st.sampled_from([1.0, 0.5]),
)
def test_dora_linear_adapter_merges_as_the_reference_in_every_layout_and_naming(case, layout, naming, alpha):
    lora = case.case
    x = lora.x.reshape(-1, lora.x.shape[-1])
    bias = np.linspace(-1, 1, lora.W.shape[0])
    model = linear_model(lora.W, bias, layout, naming, alpha=alpha if layout.startswith(("gemm", "fused")) else 1.0)
    with tempfile.TemporaryDirectory() as folder:
        plan = _plan(model, case, Path(folder))
    merged = dora.dora_merge(lora.W.astype(np.float64), lora.A, lora.B, lora.s, case.magnitude)
    assert_close(run(apply_plan(model, plan), x=x), x @ merged.T + bias, np.float32, factor=8)


@given(case=strategies.dora_cases("embedding", np.float32))
def test_dora_embedding_adapter_merges_as_the_reference(case):
    lora = case.case
    model = embedding_model(lora.W)
    with tempfile.TemporaryDirectory() as folder:
        directory = write_adapter(
            Path(folder),
            {PATH: (lora.A, lora.B)},
            embeddings=[PATH],
            alpha=lora.s * lora.A.shape[0],
            magnitudes={PATH: case.magnitude},
        )
        plan = plan_adapter_merge(model, initializer_reader(model), [(directory, 1.0)])
    expected = dora.dora_embedding_forward(lora.ids, lora.W.astype(np.float64), lora.A, lora.B, lora.s, case.magnitude)
    assert_close(run(apply_plan(model, plan), ids=lora.ids.astype(np.int64)), expected, np.float32, factor=8)


@given(case=strategies.dora_cases("conv2d", np.float32, dropout=False))
def test_dora_conv_adapter_merges_as_the_reference(case):
    lora = case.case
    model = conv_model(lora)
    with tempfile.TemporaryDirectory() as folder:
        plan = _plan(model, case, Path(folder))
    expected = dora.dora_conv2d_forward(
        lora.x.astype(np.float64), lora.W, lora.b, lora.A, lora.B, lora.s, case.magnitude, **lora.geometry
    )
    assert_close(run(apply_plan(model, plan), x=lora.x), expected, np.float32, factor=16)


def _linear_case(seed: int = 0) -> strategies.DoRACase:
    rng = np.random.default_rng(seed)
    case = strategies.LinearCase(
        x=rng.standard_normal((2, 4)).astype(np.float32),
        W=rng.standard_normal((3, 4)),
        b=None,
        A=rng.standard_normal((2, 4)),
        B=rng.standard_normal((3, 2)),
        s=2.0,
        dropout_mask=None,
    )
    return strategies.DoRACase("linear", case, rng.random(3) + 0.5)


def test_a_dora_adapter_with_a_weight_other_than_one_is_refused_in_one_line(tmp_path):
    model = linear_model(_linear_case().case.W, np.zeros(3), "gemm_trans_b")
    onnx.save(model, tmp_path / "base.onnx")
    directory = write_adapter(
        tmp_path / "dora",
        {PATH: (_linear_case().case.A, _linear_case().case.B)},
        magnitudes={PATH: _linear_case().magnitude},
    )
    with pytest.raises(
        ExportError,
        match=r"is a DoRA adapter \(use_dora=true\) and has weight 0.5: DoRA normalises "
        "each output feature",
    ) as error:
        merge_onnx(tmp_path / "base.onnx", adapters=[(directory, 0.5)], progress=False)
    assert "\n" not in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base.onnx", "dora"]


def test_a_dora_adapter_beside_another_on_the_same_weight_is_refused(tmp_path):
    case = _linear_case()
    model = linear_model(case.case.W, np.zeros(3), "matmul")
    dora_adapter = write_adapter(
        tmp_path / "dora", {PATH: (case.case.A, case.case.B)}, magnitudes={PATH: case.magnitude}
    )
    lora_adapter = write_adapter(tmp_path / "lora", {PATH: (case.case.A, case.case.B)})
    for adapters in ([(dora_adapter, 1.0), (lora_adapter, 0.5)], [(lora_adapter, 0.5), (dora_adapter, 1.0)]):
        with pytest.raises(
            AdapterMergeError, match=r"is DoRA and .* changes the same weight .*merge one adapter per module there"
        ):
            plan_adapter_merge(model, initializer_reader(model), adapters)


def test_a_dora_adapter_of_a_grouped_conv_is_refused(tmp_path):
    case = strategies.Conv2dCase(
        x=np.ones((1, 4, 3, 3), np.float32),
        W=np.ones((4, 2, 1, 1)),
        b=None,
        A=np.ones((2, 2, 1, 1)),
        B=np.ones((4, 1, 1, 1)),
        s=1.0,
        dropout_mask=None,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups=2,
    )
    directory = write_adapter(tmp_path / "dora", {PATH: (case.A, case.B)}, magnitudes={PATH: np.ones((1, 4, 1, 1))})
    model = conv_model(case)
    with pytest.raises(AdapterMergeError, match=r"module block.proj: DoRA on a grouped convolution \(groups=2\)"):
        plan_adapter_merge(model, initializer_reader(model), [(directory, 1.0)])


# --- PEFT's DoRA files on real exports --------------------------------------------------------------------------

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class _OnePathPerLayer(torch.nn.Module):
    """An embedding, linear layers on 3-D (MatMul) and 2-D (Gemm) inputs, and a conv, each run once: an adapter
    names each module by its path, and TorchScript names a second call of a module differently."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.proj, self.head = torch.nn.Embedding(11, 4), torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
        self.tail, self.conv = torch.nn.Linear(4, 2), torch.nn.Conv2d(3, 5, 3, padding=1, stride=2)

    def forward(self, ids, matrix, image):
        return self.head(torch.relu(self.proj(self.embed(ids)))), self.tail(matrix), self.conv(image)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_peft_dora_adapter_merged_into_a_base_export_gives_pefts_merged_model(tmp_path, dynamo):
    from lora_spec.export.verify import session
    from tests.export.test_dora_fold import INPUT_NAMES, _export, _inputs, peft_dora_model

    base = _OnePathPerLayer().eval()
    model = peft_dora_model(base, targets=("embed", "proj", "head", "tail", "conv"))
    model.save_pretrained(tmp_path / "adapter")
    _export(base, tmp_path / "base.onnx", dynamo)
    result = merge_onnx(tmp_path / "base.onnx", adapters=[str(tmp_path / "adapter")], progress=False)
    assert {path for path, _ in result.adapter_matches} == {"embed", "proj", "head", "tail", "conv"}
    with torch.no_grad():
        expected = [output.numpy() for output in model.merge_and_unload()(*_inputs())]
    feeds = {name: value.numpy() for name, value in zip(INPUT_NAMES, _inputs(), strict=True)}
    for output, want in zip(session(result.output).run(None, feeds), expected, strict=True):
        assert_close(output, want, np.float32, factor=20)
