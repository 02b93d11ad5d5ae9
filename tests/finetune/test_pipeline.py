"""`lora-spec finetune` end to end on a tiny BERT built offline and a small CSV (the general path).

What it pins: the outputs exist and load (PEFT and lora_spec read the adapter, head included,
and reproduce the merged ONNX model's logits), the merged ONNX predictions equal PyTorch's, the
same seed gives the same run, and Ctrl-C leaves the previous outputs intact.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")  # the loss curve; in the demo extra
lora_torch = pytest.importorskip("lora_spec.torch")
pytest.importorskip("lora_spec.export")

import torch

from lora_spec import cli
from lora_spec.finetune import deploy, pipeline, train
from lora_spec.finetune import model as model_module
from lora_spec.finetune.options import FinetuneOptions
from tests.finetune.tiny import rows, write_csv, write_tiny_bert

QUICK = ("--epochs", "2", "--batch-size", "16", "--lr", "1e-2", "--head-epochs", "2", "--no-progress")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert):
    """`(output folder, stdout, exit status)` of one quick run of the command."""
    folder = tmp_path_factory.mktemp("run")
    data = write_csv(folder / "rows.csv", rows(repeat=2))
    output = folder / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(["finetune", "--model", str(tiny_bert), "--data", str(data), "--output", str(output), *QUICK])
    return output, stdout.getvalue(), status


def test_run_writes_every_output_and_prints_the_summary_table(finished_run):
    output, stdout, status = finished_run
    assert status == 0
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "tokenizer/tokenizer_config.json",
        "model.onnx",
        "model.merged.onnx",
        "loss_curve.png",
        "summary.md",
        "metrics.json",
    ):
        assert (output / name).is_file(), name
    assert not (output / ".base.onnx").exists()
    assert "| validation accuracy, LoRA |" in stdout and "| merged ONNX predictions equal PyTorch's |" in stdout
    assert (output / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert [path.name for path in output.parent.iterdir() if path.name.startswith(".")] == []


def test_merged_onnx_predictions_equal_pytorch_on_every_validation_example(finished_run):
    metrics = json.loads((finished_run[0] / "metrics.json").read_text())
    assert metrics["matching_predictions"] == metrics["validation_examples"] == 12
    assert metrics["max_logit_difference"] < 1e-4
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]


def test_merged_graph_has_no_lora_branch_left(finished_run):
    onnx = pytest.importorskip("onnx")

    def matmuls(name):
        return sum(node.op_type in ("MatMul", "Gemm") for node in onnx.load(str(finished_run[0] / name)).graph.node)

    # Two adapted projections per layer, two layers, two low-rank products each.
    assert matmuls("model.onnx") - matmuls("model.merged.onnx") == 2 * 2 * 2


def test_adapter_is_peft_format_with_query_value_and_the_head(finished_run):
    config = json.loads((finished_run[0] / "adapter" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 4  # two layers
    assert all(path.endswith((".attention.self.query", ".attention.self.value")) for path in config["target_modules"])
    assert config["modules_to_save"] == ["classifier"]
    assert config["peft_type"] == "LORA"


def _validation_batch(tiny_bert):
    tokenizer, _ = model_module.load_pretrained(tiny_bert, 3)
    ids = model_module.tokenize(tokenizer, ["good table", "awful", "paper", "love chair door"], 32)
    return model_module.pad_batch(ids, tokenizer.pad_token_id)


@pytest.mark.parametrize("loader", ["lora_spec", "peft"])
def test_saved_adapter_reproduces_the_merged_onnx_logits(finished_run, tiny_bert, loader):
    output = finished_run[0]
    input_ids, attention_mask = _validation_batch(tiny_bert)
    _, fresh = model_module.load_pretrained(tiny_bert, 3)
    if loader == "peft":
        peft = pytest.importorskip("peft")
        adapted = peft.PeftModel.from_pretrained(fresh, output / "adapter").eval()
    else:
        adapted = lora_torch.load_adapter(fresh, output / "adapter") or fresh
        adapted.eval()
    with torch.no_grad():
        logits = adapted(input_ids, attention_mask).numpy()
    onnx_logits = deploy.session(output / "model.merged.onnx").run(
        None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    )[0]
    np.testing.assert_allclose(logits, onnx_logits, rtol=1e-4, atol=1e-5)


def test_the_same_seed_gives_the_same_losses_and_predictions(tmp_path, tiny_bert):
    options = FinetuneOptions(
        model=tiny_bert,
        data=write_csv(tmp_path / "rows.csv", rows(repeat=2)),
        epochs=1,
        batch_size=16,
        learning_rate=1e-2,
        head_epochs=1,
        dropout=0.5,
        progress=False,
        seed=5,
    )
    runs = []
    for _ in range(2):
        prepared = pipeline.prepare(options, options.seed)
        head_accuracy, head_losses = pipeline.train_head_only(prepared, options, options.seed)
        logits, losses, _ = pipeline.train_lora(prepared, options, options.seed)
        runs.append((head_accuracy, head_losses, losses, logits))
    assert runs[0][:3] == runs[1][:3]
    np.testing.assert_array_equal(runs[0][3], runs[1][3])


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def _kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this sleep
    raise AssertionError("SIGTERM did not interrupt the run")


@pytest.mark.parametrize("interrupt", [_ctrl_c, _kill], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_leaves_the_previous_outputs_intact(finished_run, tiny_bert, monkeypatch, capsys, interrupt):
    output = finished_run[0]
    before = {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    monkeypatch.setattr(train, "train", interrupt)
    status = cli.main(
        [
            "finetune",
            "--model",
            str(tiny_bert),
            "--data",
            str(output.parent / "rows.csv"),
            "--output",
            str(output),
            *QUICK,
        ]
    )
    assert status == cli.EXIT_INTERRUPTED
    assert "interrupted; the previous outputs are unchanged" in capsys.readouterr().err
    after = {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    assert after == before
    assert [path.name for path in output.parent.iterdir() if path.name.startswith(".")] == []


def test_compare_prints_one_row_per_seed_with_mean_spread_and_verdict(tmp_path, tiny_bert, capsys):
    data = write_csv(tmp_path / "rows.csv", rows(repeat=2))
    status = cli.main(["compare", "--seeds", "0", "1", "--model", str(tiny_bert), "--data", str(data), *QUICK])
    out = capsys.readouterr().out
    assert status == 0
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")][1:] == [
        "0",
        "1",
        "mean ± std",
    ]
    assert "head-only by" in out and "the sum of both standard deviations" in out
    assert list(tmp_path.iterdir()) == [data]


def test_threads_option_sets_the_threads_torch_and_onnxruntime_use(tmp_path, tiny_bert):
    threads = torch.get_num_threads()
    try:
        pipeline.prepare(
            FinetuneOptions(
                model=tiny_bert, data=write_csv(tmp_path / "rows.csv", rows(repeat=2)), threads=1, progress=False
            ),
            seed=0,
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
