"""The dropout sampling convention the backends share: 16-bit draws and their exact keep probability."""

import numpy as np
import pytest

from lora_spec.dropout import keep_probability, keep_threshold, kept_levels


@pytest.mark.parametrize("p", [0.0001, 0.1, 0.3333, 0.5, 0.9, 0.99])
def test_keep_probability_is_within_1e_4_of_one_minus_p(p):
    assert abs(keep_probability(p) - (1 - p)) <= 1e-4


@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.5, 0.99, 0.999999])
def test_the_threshold_keeps_exactly_the_stated_share_of_16_bit_values(p):
    values = np.arange(-(1 << 15), 1 << 15, dtype=np.int32)
    kept = int((values >= keep_threshold(p)).sum())
    assert kept == kept_levels(p) == round(keep_probability(p) * 65536)
    assert kept >= 1  # even p near 1 keeps something, so the scale stays finite
