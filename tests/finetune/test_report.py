"""The summary table, the multi-seed verdict and the loss-curve PNG."""

from __future__ import annotations

import pytest

from lora_spec.finetune import report


def _summary(**changes):
    values = dict(
        data="VADER lexicon (vader_lexicon.txt)",
        train_examples=6016,
        validation_examples=1504,
        trainable_parameters=152_067,
        head_parameters=1_155,
        total_parameters=22_714_371,
        head_only_accuracy=0.738,
        lora_accuracy=0.801,
        adapter_bytes=611_000,
        model_bytes=90_868_376,
        latency_batch_size=32,
        base_latency_s=0.0050,
        unmerged_latency_s=0.0060,
        merged_latency_s=0.0051,
        matching_predictions=1504,
        max_logit_difference=2e-6,
        train_seconds=250.0,
    )
    values.update(changes)
    return report.Summary(**values)


def test_summary_table_shows_parameters_accuracies_sizes_and_latencies():
    table = report.summary_table(_summary())
    for expected in (
        "152,067 of 22,714,371 (0.67%)",
        "1,155 (0.005%)",
        "73.8%",
        "80.1% (+6.3 points)",
        "611.0 KB vs 90.9 MB (0.67%)",
        "5.00 / 6.00 / 5.10 ms",
        "merged/base 1.02x",
        "unmerged/merged 1.18x",
        "1504 of 1504",
        "6016 train, 1504 validation",
    ):
        assert expected in table
    assert all(line.startswith("|") and line.endswith("|") for line in table.splitlines())


@pytest.mark.parametrize("matching, verified", [(1504, True), (1503, False)])
def test_a_run_is_verified_only_when_every_merged_prediction_matches(matching, verified):
    assert _summary(matching_predictions=matching).verified is verified


@pytest.mark.parametrize(
    "head, lora, beats",
    [
        ((0.70, 0.72, 0.71), (0.80, 0.81, 0.79), True),  # gain 9 points, spread 2
        ((0.70, 0.75, 0.65), (0.78, 0.70, 0.80), False),  # gain 6 points, spread 10
    ],
)
def test_seeds_table_says_whether_the_mean_gain_exceeds_the_summed_spread(head, lora, beats):
    results = [
        report.SeedResult(seed, head_only, with_lora)
        for seed, (head_only, with_lora) in enumerate(zip(head, lora, strict=True))
    ]
    text, verdict = report.seeds_table(results)
    assert verdict is beats
    assert ("LoRA beats head-only" in text) is beats
    assert "| mean ± std |" in text


def test_seeds_table_reports_mean_and_sample_standard_deviation():
    results = [report.SeedResult(0, 0.70, 0.80), report.SeedResult(1, 0.72, 0.84)]
    text, _ = report.seeds_table(results)
    assert "71.0 ± 1.4%" in text and "82.0 ± 2.8%" in text and "+11.0" in text


def test_loss_curve_is_written_as_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "loss_curve.png"
    report.plot_losses({"LoRA": [1.1, 0.9, 0.7, 0.6] * 10, "head only": [1.0, 0.8] * 30}, 4, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
