"""Tiny PyTorch models, their adapters and exports, shared by the exporter tests (merge, switchable)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

EXPORTERS = {"torchscript": False, "dynamo": True}


class MLP(torch.nn.Module):
    """One MLP applied to a 2-D and a 3-D input, so one export covers both forms of each layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))

    def forward(self, matrix, batch):
        return self.mlp(matrix), self.mlp(batch)


def adapted(
    library: str, base: torch.nn.Module, targets=("mlp.0", "mlp.2"), r: int = 2, alpha: float = 6
) -> torch.nn.Module:
    """A copy of `base` adapted by PEFT or `lora_spec.torch`, in eval mode, B random (the branch shows)."""
    model = copy.deepcopy(base)
    if library == "peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    else:
        import lora_spec.torch as lora

        lora.apply(model, r=r, alpha=alpha, target_modules=list(targets))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the branch show in the output
                parameter.normal_()
    return model.eval()


def export_torch(model, inputs, path, dynamo: bool, output_names=("y2", "y3")) -> None:
    """`model` exported with inputs named `matrix` (and `batch`)."""
    if dynamo:
        pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            str(path),
            input_names=["matrix", "batch"][: len(inputs)],
            output_names=list(output_names),
            dynamo=dynamo,
            **({} if dynamo else {"opset_version": 17}),
        )


def export(model: torch.nn.Module, args: tuple, path: Path, dynamo: bool, names: list[str]) -> Path:
    """The exported file (the dynamo exporter may put the weights in external data beside it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = {"verbose": False} if dynamo else {"opset_version": 17}
        torch.onnx.export(model.eval(), args, str(path), dynamo=dynamo, input_names=names, **options)
    return path


def randomize(model: torch.nn.Module, names: tuple[str, ...], seed: int = 0) -> None:
    """Non-zero values for every parameter whose name contains one of `names`, so the merge shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in names):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def peft_adapter(base: torch.nn.Module, directory: Path, **config) -> torch.nn.Module:
    """A PEFT adapter of a copy of `base` saved to `directory`; returns PEFT's merged model."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    trained_biases = ("base_layer.bias",) if config.get("bias", "none") != "none" else ()
    randomize(model, ("lora_B", "lora_embedding_A", "modules_to_save", *trained_biases))
    model.save_pretrained(str(directory))
    return model.merge_and_unload().eval()


def convolutions(batch_norm: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    norm = [torch.nn.BatchNorm2d(4)] if batch_norm else []
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), *norm, torch.nn.ReLU(), torch.nn.Conv2d(4, 2, (1, 2), stride=2)
    )
    if batch_norm:
        with torch.no_grad():
            model[1].running_var.uniform_(0.5, 2.0)
            model[1].weight.uniform_(0.5, 2.0)
    return model.eval()


class Classifier(torch.nn.Module):
    """An encoder and a linear head over every token, like a token-classification model."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.classifier(hidden)


def tiny_bert() -> Classifier:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    return Classifier(transformers.BertModel(config)).eval()


def token_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def feeds() -> dict[str, np.ndarray]:
    ids, mask = token_inputs()
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
