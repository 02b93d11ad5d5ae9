"""The reference's multi-adapter math: weighted combinations and routed batches."""

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec import reference
from lora_spec.config import LoRAConfig
from lora_spec.multi_adapter import (
    BASE_MODEL,
    Factors,
    check_adapter_name,
    check_combinable,
    check_routable,
    combine,
    routed_forward,
    row_groups,
    weighted_combination,
)
from tests import strategies
from tests.numerics import assert_close


def _weighted_delta(case):
    return sum(
        w * reference.merge(np.zeros_like(case.W), a.A, a.B, a.s, case.layer)
        for w, a in zip(case.weights, case.adapters, strict=True)
    )


def _delta(case, lora_a, lora_b):
    return reference.merge(np.zeros_like(case.W), lora_a, lora_b, 1.0, case.layer)


@given(strategies.adapter_set_cases())
def test_cat_equals_the_weighted_sum_of_the_deltas(case):
    lora_a, lora_b = combine(case.adapters, case.weights, "cat")
    assert lora_a.shape[0] == sum(a.A.shape[0] for a in case.adapters)
    assert_close(_delta(case, lora_a, lora_b), _weighted_delta(case), factor=100)


@given(strategies.adapter_set_cases(), st.integers(1, 6))
def test_svd_error_is_the_norm_of_the_discarded_singular_values(case, rank_per_group):
    groups = case.adapters[0].A.shape[0] // case.adapters[0].B.shape[1] if case.layer == "conv2d" else 1
    exact = _weighted_delta(case)
    lora_a, lora_b = combine(case.adapters, case.weights, "svd", svd_rank=rank_per_group * groups)
    assert lora_a.shape[0] == rank_per_group * groups
    blocks = _blocks(exact, groups, case.layer)
    discarded = np.sqrt(sum(np.sum(np.linalg.svd(block, compute_uv=False)[rank_per_group:] ** 2) for block in blocks))
    error = np.linalg.norm(_delta(case, lora_a, lora_b) - exact)
    assert abs(error - discarded) <= 1e-9 * (1 + np.linalg.norm(exact))


def _blocks(delta, groups, layer):
    """The matrices whose singular values bound the approximation: one per conv group, else the delta."""
    if layer == "embedding":
        return [delta.T]
    if layer == "conv2d":
        return list(delta.reshape(groups, delta.shape[0] // groups, -1))
    return [delta]


@given(strategies.adapter_set_cases(layer="linear"))
def test_svd_covering_the_full_rank_is_exact_and_equals_cat(case):
    full_rank = sum(a.A.shape[0] for a in case.adapters)
    cat = _delta(case, *combine(case.adapters, case.weights, "cat"))
    svd = _delta(case, *combine(case.adapters, case.weights, "svd", svd_rank=full_rank))
    assert_close(svd, _weighted_delta(case), factor=1e3)
    assert_close(svd, cat, factor=1e3)


@given(strategies.adapter_set_cases(layer="linear", equal_ranks=True))
def test_linear_is_peft_formula_and_exact_for_one_adapter(case):
    lora_a, lora_b = combine(case.adapters, case.weights, "linear")
    roots = [np.sqrt(abs(w * a.s)) for w, a in zip(case.weights, case.adapters, strict=True)]
    expected_a = sum(
        np.sign(w * a.s) * root * a.A for w, a, root in zip(case.weights, case.adapters, roots, strict=True)
    )
    expected_b = sum(root * a.B for a, root in zip(case.adapters, roots, strict=True))
    assert_close(lora_a, expected_a)
    assert_close(lora_b, expected_b)
    if len(case.adapters) == 1:
        assert_close(_delta(case, lora_a, lora_b), _weighted_delta(case), factor=100)


def test_linear_is_not_exact_for_two_adapters():
    rng = np.random.default_rng(0)
    adapters = [Factors(rng.standard_normal((2, 5)), rng.standard_normal((4, 2)), 1.0) for _ in range(2)]
    lora_a, lora_b = combine(adapters, [1.0, 1.0], "linear")
    exact = sum(a.B @ a.A for a in adapters)
    assert np.linalg.norm(lora_b @ lora_a - exact) > 0.1 * np.linalg.norm(exact)


def test_combinations_refuse_bad_input_with_the_fix():
    rng = np.random.default_rng(0)
    two = Factors(rng.standard_normal((2, 5)), rng.standard_normal((4, 2)), 1.0)
    three = Factors(rng.standard_normal((3, 5)), rng.standard_normal((4, 3)), 1.0)
    with pytest.raises(ValueError, match=r"one rank, not ranks \[2, 3\].*use 'cat'"):
        combine([two, three], [1, 1], "linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        combine([two, three], [1], "cat")
    with pytest.raises(ValueError, match="combination_type='ties' is invalid"):
        combine([two], [1], "ties")
    with pytest.raises(ValueError, match="svd_rank=0 is invalid"):
        combine([two], [1], "svd", svd_rank=0)
    other_layer = Factors(rng.standard_normal((2, 6)), rng.standard_normal((4, 2)), 1.0)
    with pytest.raises(ValueError, match="not on the same layer"):
        combine([two, other_layer], [1, 1], "cat")


def test_svd_rank_above_the_update_rank_is_zero_padded_and_exact():
    rng = np.random.default_rng(0)
    adapter = Factors(rng.standard_normal((2, 3)), rng.standard_normal((2, 2)), 0.5)
    lora_a, lora_b = combine([adapter], [1.0], "svd", svd_rank=5)
    assert lora_a.shape == (5, 3) and lora_b.shape == (2, 5)
    np.testing.assert_allclose(lora_b @ lora_a, 0.5 * adapter.B @ adapter.A, atol=1e-12)


@st.composite
def routed_cases(draw):
    case = draw(strategies.adapter_set_cases(layer="linear"))
    batch = draw(st.integers(1, 6))
    x = np.random.default_rng(draw(strategies.seeds)).standard_normal((batch, case.W.shape[1]))
    names = [f"adapter{index}" for index in range(len(case.adapters))]
    routes = draw(st.lists(st.sampled_from([*names, None, BASE_MODEL]), min_size=batch, max_size=batch))
    return case, dict(zip(names, case.adapters, strict=True)), x, routes


@given(routed_cases(), st.booleans())
def test_routed_forward_equals_row_by_row_single_adapter_forwards(routed, with_bias):
    case, adapters, x, routes = routed
    bias = np.linspace(-1, 1, case.W.shape[0]) if with_bias else None
    actual = routed_forward(x, case.W, bias, adapters, routes)
    for row, name in enumerate(routes):
        if name in (None, BASE_MODEL):
            expected = x[row] @ case.W.T + (0 if bias is None else bias)
        else:
            adapter = adapters[name]
            expected = reference.forward(x[row], case.W, bias, adapter.A, adapter.B, adapter.s)
        assert_close(actual[row], expected, factor=10)


def test_row_groups_are_slices_for_contiguous_runs_and_indices_otherwise():
    groups = row_groups(["a", "a", "b", None, "a", "__base__", "c", "c"])
    assert [name for name, _ in groups] == ["a", "b", "c"]
    assert groups[1][1] == slice(2, 3) and groups[2][1] == slice(6, 8)
    np.testing.assert_array_equal(groups[0][1], [0, 1, 4])


def test_routing_list_must_match_the_batch():
    with pytest.raises(ValueError, match="3 adapter names for a batch of 2 rows"):
        routed_forward(np.zeros((2, 3)), np.zeros((4, 3)), None, {}, ["a", "b", "c"])


@pytest.mark.parametrize("name", ["", "a.b", "__base__", None, "x/y"])
def test_adapter_names_that_cannot_name_parameters_are_refused(name):
    with pytest.raises(ValueError, match=r"adapter name .* is invalid"):
        check_adapter_name(name)


@pytest.mark.parametrize(
    "names, weights, adapter_name, combination_type, fragment",
    [
        (["a", "b"], [1.0, 1.0], "a", "cat", "already has an adapter 'a'"),
        (["a", "b"], [1.0], "mix", "cat", "1 weights for 2 adapters"),
        (["a", "b"], [1.0, 1.0], "mix", "sum", "combination_type='sum' is invalid"),
        (["a", "b"], [1.0, 1.0], "__base__", "cat", "adapter name '__base__' is invalid"),
    ],
)
def test_weighted_combination_refuses_bad_arguments_in_one_line(
    names, weights, adapter_name, combination_type, fragment
):
    with pytest.raises(ValueError, match=re.escape(fragment)) as error:
        weighted_combination(names, weights, adapter_name, combination_type, {"a": LoRAConfig(), "b": LoRAConfig()})
    assert "\n" not in str(error.value)


def test_weighted_combination_of_one_adapter_is_linear_as_in_peft():
    plain = LoRAConfig()
    assert weighted_combination(["a"], [0.5], "mix", "svd", {"a": plain}) == "linear"
    assert weighted_combination(["a", "b"], [0.5, 0.5], "mix", "svd", {"a": plain, "b": plain}) == "svd"


@pytest.mark.parametrize(
    "config, fragment",
    [
        (LoRAConfig(use_dora=True), "adapter 'b' is a DoRA adapter: each DoRA adapter rescales its own"),
        (LoRAConfig(init="pissa_niter_4"), "adapter 'b' has init='pissa_niter_4', so its layers' base weights"),
        (LoRAConfig(init="olora"), "adapter 'b' has init='olora', so its layers' base weights are residuals"),
    ],
)
def test_weighted_combination_refuses_dora_and_weight_inits_as_peft_does(config, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)) as error:
        weighted_combination(["a", "b"], [1.0, 1.0], "mix", "cat", {"a": LoRAConfig(), "b": config})
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        check_combinable("b", config)
    check_combinable("a", LoRAConfig(init="gaussian"))


def test_only_dora_adapters_are_refused_in_routed_batches():
    with pytest.raises(ValueError, match="adapter 'd' is a DoRA adapter, which routed batches do not support"):
        check_routable("d", use_dora=True)
    check_routable("plain", use_dora=False)
