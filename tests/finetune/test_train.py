"""The training loop: seeded batch order, a loss that falls, identical runs from one seed, accuracy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lora_spec.finetune import train


def test_every_epoch_visits_every_example_once_in_a_seeded_order():
    batches = train.epoch_batches(10, 4, epochs=3, seed=7)
    assert [len(batch) for batch in batches] == [4, 4, 2] * 3
    epochs = [np.concatenate(batches[i : i + 3]) for i in (0, 3, 6)]
    for order in epochs:
        assert sorted(order) == list(range(10))
    assert not np.array_equal(epochs[0], epochs[1])
    assert all(np.array_equal(a, b) for a, b in zip(batches, train.epoch_batches(10, 4, epochs=3, seed=7), strict=True))


def _separable_problem(seed: int) -> tuple[torch.nn.Linear, torch.Tensor, np.ndarray]:
    torch.manual_seed(seed)
    features = torch.randn(64, 5)
    labels = (features[:, 0] > 0).long().numpy()
    return torch.nn.Linear(5, 2), features, labels


def test_training_a_head_lowers_the_loss_and_fits_a_separable_problem():
    head, features, labels = _separable_problem(0)
    losses = train.train(
        train.head_loss(head, features, labels),
        head.parameters(),
        64,
        epochs=30,
        batch_size=16,
        learning_rate=0.05,
        seed=0,
        progress=False,
    )
    assert len(losses) == 30 * 4
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert train.accuracy(head(features).detach(), labels) >= 0.95


def test_the_same_seed_gives_the_same_losses_and_weights():
    runs = []
    for _ in range(2):
        head, features, labels = _separable_problem(1)
        losses = train.train(
            train.head_loss(head, features, labels),
            head.parameters(),
            64,
            epochs=3,
            batch_size=8,
            learning_rate=0.01,
            seed=3,
            progress=False,
        )
        runs.append((losses, head.weight.detach().clone()))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)


def test_frozen_parameters_are_left_out_of_the_optimizer():
    head, features, labels = _separable_problem(2)
    head.bias.requires_grad_(False)
    bias = head.bias.detach().clone()
    train.train(
        train.head_loss(head, features, labels),
        head.parameters(),
        64,
        epochs=1,
        batch_size=16,
        learning_rate=0.1,
        seed=0,
        progress=False,
    )
    torch.testing.assert_close(head.bias, bias, rtol=0, atol=0)


def test_learning_rate_warms_up_over_six_percent_of_the_steps_then_decays_to_near_zero(monkeypatch):
    parameter = torch.nn.Parameter(torch.zeros(1))
    rates, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train.train(
        lambda indices: parameter.sum(),
        [parameter],
        100,
        epochs=1,
        batch_size=1,
        learning_rate=1.0,
        seed=0,
        progress=False,
    )
    assert rates[0] == pytest.approx(1 / 6) and rates[5] == pytest.approx(1.0)
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates))
    assert rates[-1] < 0.02


@pytest.mark.parametrize(
    "logits, labels, expected",
    [
        ([[0.1, 0.9], [2.0, -1.0]], [1, 0], 1.0),
        ([[0.1, 0.9], [2.0, -1.0]], [0, 0], 0.5),
        ([[0.1, 0.9, 0.0]], [2], 0.0),
    ],
)
def test_accuracy_is_the_share_of_rows_whose_argmax_is_the_label(logits, labels, expected):
    assert train.accuracy(np.array(logits), np.array(labels)) == expected
