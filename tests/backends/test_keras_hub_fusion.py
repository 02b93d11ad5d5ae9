"""The adapter math of KerasHub layers that are blocks of one transformers layer, against the reference."""

import numpy as np
import pytest
from hypothesis import given

pytest.importorskip("keras")

from lora_spec import dora, reference
from lora_spec.backends.keras_hub_names import fuse, fuse_magnitudes, split
from lora_spec.backends.keras_hub_recording import LinearPlacement
from tests import strategies


def _placements(case):
    return [
        LinearPlacement("fused.weight", case.out_features, case.in_features, rows, columns, False)
        for rows, columns, *_ in case.layers
    ]


@given(strategies.fused_linear_cases())
def test_fused_adapter_holds_each_layer_update_in_its_block_and_zero_elsewhere(case):
    placements = _placements(case)
    lora_a, lora_b = fuse(
        [(placement, A, B, s) for placement, (_, _, A, B, s) in zip(placements, case.layers, strict=True)]
    )
    assert lora_a.shape[0] == sum(A.shape[0] for _, _, A, _, _ in case.layers)
    delta = reference.delta_weight(lora_a, lora_b, case.layers[0][4])
    covered = np.zeros(delta.shape, bool)
    for rows, columns, A, B, s in case.layers:
        np.testing.assert_allclose(
            delta[np.ix_(rows, columns)], reference.delta_weight(A, B, s), rtol=1e-12, atol=1e-12
        )
        covered[rows] = True
    assert not delta[~covered].any()


@given(strategies.fused_linear_cases())
def test_split_gives_each_layer_its_block_of_the_transformers_update(case):
    placements = _placements(case)
    lora_a, lora_b = fuse(
        [(placement, A, B, s) for placement, (_, _, A, B, s) in zip(placements, case.layers, strict=True)]
    )
    scaling = case.layers[0][4]
    for placement, (_, _, A, B, s) in zip(placements, case.layers, strict=True):
        np.testing.assert_allclose(
            reference.delta_weight(*split(placement, lora_a, lora_b), scaling),
            reference.delta_weight(A, B, s),
            rtol=1e-12,
            atol=1e-12,
        )


@given(strategies.fused_linear_cases(), strategies.seeds)
def test_fused_dora_weight_holds_each_layer_dora_weight_in_its_rows_and_the_base_in_the_others(case, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((case.out_features, case.in_features))
    placements = _placements(case)
    magnitudes = [rng.uniform(0.5, 2.0, len(rows)) for rows, *_ in case.layers]
    # The rows no layer's adapter covers: a layer without the adapter, at its base rows' norms.
    others = np.setdiff1d(np.arange(case.out_features), np.concatenate([rows for rows, *_ in case.layers]))
    unadapted = LinearPlacement(
        "fused.weight", case.out_features, case.in_features, others, np.arange(case.in_features), False
    )
    lora_a, lora_b = fuse(
        [(placement, A, B, s) for placement, (_, _, A, B, s) in zip(placements, case.layers, strict=True)]
    )
    magnitude = fuse_magnitudes(
        [*zip(placements, magnitudes, strict=True), (unadapted, np.linalg.norm(weight[others], axis=1))]
    )
    merged = dora.dora_merge(weight, lora_a, lora_b, case.layers[0][4], magnitude)
    for (rows, columns, A, B, s), layer_magnitude in zip(case.layers, magnitudes, strict=True):
        np.testing.assert_allclose(
            merged[np.ix_(rows, columns)],
            dora.dora_merge(weight[np.ix_(rows, columns)], A, B, s, layer_magnitude),
            rtol=1e-12,
            atol=1e-12,
        )
    np.testing.assert_allclose(merged[others], weight[others], rtol=1e-12, atol=1e-12)
