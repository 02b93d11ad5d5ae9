"""The training loop (AdamW, linear warm-up and decay, a tqdm bar with loss and throughput) and evaluation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lora_spec.finetune.model import SentenceClassifier, pad_batch

WARMUP_FRACTION = 0.06  # the BERT fine-tuning recipe's warm-up share of the steps


def epoch_batches(num_examples: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The index batches of every epoch, each epoch in its own seeded shuffle; the order depends on `seed` alone."""
    rng = np.random.default_rng(seed)
    batches: list[np.ndarray] = []
    for _ in range(epochs):
        order = rng.permutation(num_examples)
        batches.extend(order[start : start + batch_size] for start in range(0, num_examples, batch_size))
    return batches


def train(
    batch_loss: Callable[[np.ndarray], torch.Tensor],
    parameters: Iterable[torch.nn.Parameter],
    num_examples: int,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    weight_decay: float = 0.01,
    description: str = "training",
    progress: bool = True,
) -> list[float]:
    """Minimise `batch_loss(indices)` over shuffled batches; return the loss of every step.

    The learning rate warms up linearly over the first 6% of steps and decays linearly to zero,
    the schedule BERT and the LoRA paper fine-tune with.
    """
    parameters = [p for p in parameters if p.requires_grad]
    batches = epoch_batches(num_examples, batch_size, epochs, seed)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, round(WARMUP_FRACTION * len(batches)))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (len(batches) - step) / (len(batches) - warmup + 1)))
    )
    losses = []
    started, seen = time.perf_counter(), 0
    with tqdm(batches, desc=description, unit="step", disable=not progress, leave=False) as bar:
        for indices in bar:
            loss = batch_loss(indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            seen += len(indices)
            bar.set_postfix(
                loss=f"{np.mean(losses[-20:]):.4f}",
                examples_per_s=f"{seen / (time.perf_counter() - started):.0f}",
                refresh=False,
            )
    return losses


def classifier_loss(
    model: SentenceClassifier, token_ids: Sequence[Sequence[int]], labels: np.ndarray, pad_id: int
) -> Callable[[np.ndarray], torch.Tensor]:
    """`batch_loss` for the whole model: pad the batch, run it, cross-entropy against the labels."""
    targets = torch.from_numpy(labels)

    def batch_loss(indices: np.ndarray) -> torch.Tensor:
        input_ids, attention_mask = pad_batch([token_ids[i] for i in indices], pad_id)
        return torch.nn.functional.cross_entropy(model(input_ids, attention_mask), targets[indices])

    return batch_loss


def head_loss(
    head: torch.nn.Module, features: torch.Tensor, labels: np.ndarray
) -> Callable[[np.ndarray], torch.Tensor]:
    """`batch_loss` for a head alone on cached features of a frozen encoder."""
    targets = torch.from_numpy(labels)

    def batch_loss(indices: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(features[indices]), targets[indices])

    return batch_loss


@torch.no_grad()
def run_batches(
    function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    token_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    description: str,
    progress: bool = True,
) -> torch.Tensor:
    """`function(input_ids, attention_mask)` over every text in batches, concatenated in order."""
    outputs = []
    starts = range(0, len(token_ids), batch_size)
    for start in tqdm(starts, desc=description, unit="batch", disable=not progress, leave=False):
        outputs.append(function(*pad_batch(token_ids[start : start + batch_size], pad_id)))
    return torch.cat(outputs)


def accuracy(logits: torch.Tensor | np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose arg-max is the label."""
    return float(np.mean(np.asarray(logits).argmax(-1) == labels))
