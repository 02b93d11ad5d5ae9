"""The shared strategies produce what their names promise."""

import numpy as np
from hypothesis import given

from lora_spec import reference
from tests import strategies


@given(strategies.linear_cases())
def test_linear_cases_have_agreeing_shapes_and_one_dtype(case):
    out_features, in_features = case.W.shape
    assert case.x.shape[-1] == in_features and case.A.shape[1] == in_features
    assert case.B.shape == (out_features, case.A.shape[0])
    assert case.b is None or case.b.shape == (out_features,)
    arrays = [a for a in (case.x, case.W, case.b, case.A, case.B, case.dropout_mask) if a is not None]
    assert {a.dtype for a in arrays} == {case.dtype}


@given(strategies.linear_cases())
def test_dropout_masks_hold_zero_or_one_common_inverse_keep_probability(case):
    if case.dropout_mask is not None:
        assert case.dropout_mask.shape == case.x.shape
        kept = np.unique(case.dropout_mask[case.dropout_mask != 0])
        assert len(kept) <= 1 and (len(kept) == 0 or kept[0] >= 1)


@given(strategies.conv2d_cases())
def test_conv2d_cases_give_a_non_empty_output_and_a_rank_divisible_by_groups(case):
    assert case.A.shape[0] % case.groups == 0 and case.B.shape[1] * case.groups == case.A.shape[0]
    y = reference.conv2d_forward(case.x, case.W, case.b, case.A, case.B, case.s, **case.geometry)
    assert y.shape[:2] == (case.x.shape[0], case.W.shape[0]) and min(y.shape[2:]) >= 1


@given(strategies.embedding_cases())
def test_embedding_ids_index_the_table(case):
    assert case.ids.min() >= 0 and case.ids.max() < case.W.shape[0] == case.A.shape[1]


@given(strategies.fused_linear_cases())
def test_fused_linear_cases_are_disjoint_blocks_of_one_weight(case):
    rows = np.concatenate([layer_rows for layer_rows, *_ in case.layers])
    assert len(np.unique(rows)) == len(rows) and rows.max() < case.out_features
    for layer_rows, columns, A, B, _ in case.layers:
        assert sorted(columns) == list(range(case.in_features))
        assert A.shape == (B.shape[1], case.in_features) and B.shape[0] == len(layer_rows)


@given(strategies.dora_adapter_set_cases())
def test_dora_adapter_sets_hold_a_dora_adapter_with_a_magnitude_of_pefts_shape_on_an_ungrouped_layer(case):
    from lora_spec import dora

    assert len(case.magnitudes) == len(case.adapters) and any(m is not None for m in case.magnitudes)
    features = case.W.shape[1 if case.layer == "embedding" else 0]
    for magnitude in case.magnitudes:
        assert magnitude is None or magnitude.shape == dora.magnitude_shape(case.layer, features)
    assert case.layer != "conv2d" or case.base.groups == 1


@given(strategies.spectral_gap_weight_init_cases())
def test_spectral_gap_weights_have_distinct_top_singular_values_far_above_the_rest(case):
    W, r, _, _ = case
    values = np.linalg.svd(W, compute_uv=False)
    assert np.all(np.diff(values[:r]) < -0.1) and values[r - 1] > 0.9
    assert np.all(values[r:] < 1e-4)
