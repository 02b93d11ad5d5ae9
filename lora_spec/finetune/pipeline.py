"""`lora-spec finetune` end to end: check everything, train head-only and LoRA, save, export, merge, verify, report."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_spec import torch as lora_torch
from lora_spec._lazy import require
from lora_spec.finetune import data as data_module
from lora_spec.finetune import deploy, outputs, report, train
from lora_spec.finetune import model as model_module
from lora_spec.finetune.model import HEAD, SentenceClassifier
from lora_spec.finetune.options import FinetuneOptions

LATENCY_BATCH_SIZE = 32
EVALUATION_BATCH_SIZE = 256


@dataclasses.dataclass
class Prepared:
    """Everything a run needs, loaded and checked before any training."""

    dataset: data_module.TextDataset
    sampled_from: int | None
    train_indices: np.ndarray
    validation_indices: np.ndarray
    tokenizer: Any  # a transformers tokenizer
    base: SentenceClassifier
    lora_model: SentenceClassifier
    token_ids: list[list[int]]
    model_dir: Path

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def ids(self, indices: np.ndarray) -> list[list[int]]:
        return [self.token_ids[i] for i in indices]


_STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress lines, stamped with the seconds since start, go to stderr: stdout holds the results alone."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def load_data(options: FinetuneOptions) -> data_module.TextDataset:
    if options.data is None:
        return data_module.load_vader()
    return data_module.load_table(options.data, options.labels, options.text_column, options.label_column)


def prepare(options: FinetuneOptions, seed: int) -> Prepared:
    """Load and check the data and the model, split, tokenize and apply LoRA: every bad input fails here."""
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    dataset = load_data(options)
    sampled_from = None
    if options.max_examples is not None and options.max_examples < len(dataset):
        sampled_from = len(dataset)
        dataset = dataset.subset(data_module.stratified_sample(dataset.labels, options.max_examples, seed))
    for name, count in dataset.class_counts().items():
        if count < 2:
            raise ValueError(
                f"label {name!r} has {count} example{'s' * (count != 1)} in {dataset.source}: "
                "every label needs at least 2 "
                "(one to train on, one to validate); add examples or drop the label."
            )
    train_indices, validation_indices = data_module.stratified_split(dataset.labels, options.validation_fraction, seed)
    model_dir = model_module.check_model_dir(options.model) if options.model else model_module.default_model_dir()
    torch.manual_seed(seed)
    tokenizer, base = model_module.load_pretrained(model_dir, len(dataset.label_names), options.pooling)
    base.requires_grad_(False)
    lora_model = lora_torch.apply(
        copy.deepcopy(base),
        r=options.r,
        alpha=options.alpha,
        dropout=options.dropout,
        target_modules=list(options.targets),
        modules_to_save=[HEAD],
    )
    token_ids = model_module.tokenize(tokenizer, dataset.texts, options.max_length)
    return Prepared(
        dataset, sampled_from, train_indices, validation_indices, tokenizer, base, lora_model, token_ids, model_dir
    )


def train_head_only(prepared: Prepared, options: FinetuneOptions, seed: int) -> tuple[float, list[float]]:
    """Train `prepared.base.classifier` on cached features of the frozen encoder; return (accuracy, losses).

    The encoder never changes, so its pooled features are computed once (in eval mode) and the
    head trains on them for many cheap epochs: the strongest baseline a frozen base allows.
    """
    base = prepared.base.eval()
    features = train.run_batches(
        base.features, prepared.token_ids, prepared.pad_id, EVALUATION_BATCH_SIZE, "frozen features", options.progress
    )
    head = base.classifier.requires_grad_(True)
    labels = prepared.dataset.labels
    losses = train.train(
        train.head_loss(head, features[prepared.train_indices], labels[prepared.train_indices]),
        head.parameters(),
        len(prepared.train_indices),
        epochs=options.head_epochs,
        batch_size=options.batch_size,
        learning_rate=options.head_learning_rate,
        seed=seed,
        description="head only",
        progress=options.progress,
    )
    head.requires_grad_(False)
    with torch.no_grad():
        logits = head(features[prepared.validation_indices])
    return train.accuracy(logits, labels[prepared.validation_indices]), losses


def train_lora(prepared: Prepared, options: FinetuneOptions, seed: int) -> tuple[np.ndarray, list[float], float]:
    """Train the LoRA adapter and its head; return (validation logits, losses, seconds)."""
    model = prepared.lora_model.train()
    labels = prepared.dataset.labels
    torch.manual_seed(seed)
    started = time.perf_counter()
    losses = train.train(
        train.classifier_loss(
            model, prepared.ids(prepared.train_indices), labels[prepared.train_indices], prepared.pad_id
        ),
        model.parameters(),
        len(prepared.train_indices),
        epochs=options.epochs,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        seed=seed,
        description="LoRA",
        progress=options.progress,
    )
    seconds = time.perf_counter() - started
    model.eval()
    logits = train.run_batches(
        model,
        prepared.ids(prepared.validation_indices),
        prepared.pad_id,
        EVALUATION_BATCH_SIZE,
        "evaluating",
        options.progress,
    )
    return logits.numpy(), losses, seconds


def _files_bytes(folder: Path, patterns: Sequence[str]) -> int:
    return sum(path.stat().st_size for pattern in patterns for path in folder.glob(pattern) if path.is_file())


def _model_bytes(prepared: Prepared) -> int:
    """The pretrained weights on disk, or their in-memory size when the folder format is unknown."""
    on_disk = _files_bytes(prepared.model_dir, ("*.safetensors", "*.bin"))
    return on_disk or sum(p.numel() * p.element_size() for p in prepared.base.encoder.parameters())


# What the steps after training import: checked first, so a missing package never costs a training run.
DEPLOYMENT_MODULES = (("onnxruntime", "onnx"), ("lora_spec.export", "onnx"), ("matplotlib", "demo"))


def run(options: FinetuneOptions) -> report.Summary:
    """The whole job; outputs appear in `options.output` only once everything succeeded."""
    for module, extra in DEPLOYMENT_MODULES:
        require(module, extra)
    output = outputs.check_output_dir(options.output)
    prepared = prepare(options, options.seed)
    dataset = prepared.dataset
    if prepared.sampled_from is not None:
        log(f"sampled {len(dataset)} of {prepared.sampled_from} examples (--max-examples), keeping class proportions")
    log(
        f"data: {dataset.source}, {len(prepared.train_indices)} train / {len(prepared.validation_indices)} validation, "
        f"classes {dataset.class_counts()}"
    )
    with outputs.staged_output(output) as staging:
        head_accuracy, head_losses = train_head_only(prepared, options, options.seed)
        log(f"head only: validation accuracy {100 * head_accuracy:.1f}%")
        lora_logits, lora_losses, train_seconds = train_lora(prepared, options, options.seed)
        lora_accuracy = train.accuracy(lora_logits, dataset.labels[prepared.validation_indices])
        log(f"LoRA: validation accuracy {100 * lora_accuracy:.1f}% after {train_seconds:.0f} s of training")
        lora_torch.save_adapter(prepared.lora_model, staging / "adapter")
        prepared.tokenizer.save_pretrained(staging / "tokenizer")
        deployment = deploy_onnx(prepared, options, staging, lora_logits)
        summary = report.Summary(
            data=dataset.source + (f" (sampled from {prepared.sampled_from})" if prepared.sampled_from else ""),
            train_examples=len(prepared.train_indices),
            validation_examples=len(prepared.validation_indices),
            trainable_parameters=lora_torch.trainable_parameters(prepared.lora_model).trainable,
            head_parameters=sum(p.numel() for p in prepared.base.classifier.parameters()),
            total_parameters=sum(p.numel() for p in prepared.base.parameters()),
            head_only_accuracy=head_accuracy,
            lora_accuracy=lora_accuracy,
            adapter_bytes=_files_bytes(staging / "adapter", ("*",)),
            model_bytes=_model_bytes(prepared),
            train_seconds=train_seconds,
            **deployment,
        )
        report.plot_losses(
            {"LoRA": lora_losses, "head only (frozen base)": head_losses},
            -(-len(prepared.train_indices) // options.batch_size),
            staging / "loss_curve.png",
        )
        (staging / "summary.md").write_text(report.summary_table(summary) + "\n")
        metrics = dataclasses.asdict(summary) | {"options": _plain(options), "labels": list(dataset.label_names)}
        (staging / outputs.MARKER).write_text(json.dumps(metrics, indent=2) + "\n")
    return summary


def deploy_onnx(prepared: Prepared, options: FinetuneOptions, staging: Path, lora_logits: np.ndarray) -> dict:
    """Export, merge, check the merged predictions against PyTorch's `lora_logits`, and time the models.

    Writes `model.onnx` (LoRA branches in the graph) and `model.merged.onnx` into `staging`; the
    base model (frozen encoder and the head-only baseline's head) is exported only to be timed.
    Returns the deployment fields of `report.Summary`.
    """
    log("exporting to ONNX and merging with lora-export")
    example = prepared.ids(prepared.validation_indices[:LATENCY_BATCH_SIZE])
    unmerged, merged, base = staging / "model.onnx", staging / "model.merged.onnx", staging / ".base.onnx"
    deploy.export_onnx(prepared.lora_model, unmerged, example, prepared.pad_id)
    result = deploy.merge_onnx_file(unmerged, merged, options.progress)
    assert result.verification is not None  # verify="auto" always checks: the whole model or layer by layer
    log(f"lora-export folded {len(result.folds)} LoRA branches; {result.verification.describe()}")
    deploy.export_onnx(prepared.base, base, example, prepared.pad_id)
    merged_logits = deploy.onnx_logits(
        merged, prepared.ids(prepared.validation_indices), prepared.pad_id, EVALUATION_BATCH_SIZE
    )
    log("timing the base, unmerged and merged ONNX models")
    latency = deploy.latencies({"base": base, "unmerged": unmerged, "merged": merged}, example, prepared.pad_id)
    base.unlink()
    return dict(
        latency_batch_size=len(example),
        base_latency_s=latency["base"],
        unmerged_latency_s=latency["unmerged"],
        merged_latency_s=latency["merged"],
        matching_predictions=int(np.sum(merged_logits.argmax(-1) == lora_logits.argmax(-1))),
        max_logit_difference=float(np.abs(merged_logits - lora_logits).max()),
    )


def _plain(options: FinetuneOptions) -> dict:
    return {
        name: (str(value) if isinstance(value, Path) else value) for name, value in dataclasses.asdict(options).items()
    }


def compare_seeds(
    options: FinetuneOptions, seeds: Sequence[int], on_result: Callable[[report.SeedResult], None] = lambda result: None
) -> list[report.SeedResult]:
    """Head-only and LoRA validation accuracy for each seed (its own split, initialisation and data order)."""
    results = []
    for seed in seeds:
        log(f"seed {seed}")
        prepared = prepare(options, seed)
        head_accuracy, _ = train_head_only(prepared, options, seed)
        logits, _, _ = train_lora(prepared, options, seed)
        result = report.SeedResult(
            seed, head_accuracy, train.accuracy(logits, prepared.dataset.labels[prepared.validation_indices])
        )
        on_result(result)
        results.append(result)
    return results
