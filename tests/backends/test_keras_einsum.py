"""The linear view of `EinsumDense` equations: which are linear maps, and the kernel <-> `W (out, in)` layouts."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec.backends import keras_einsum
from tests import strategies

LINEAR_EQUATIONS = {
    # equation: (kernel axes that are inputs, kernel axes that are outputs)
    "ab,bc->ac": ("b", "c"),
    "abc,cd->abd": ("c", "d"),
    "abc,cde->abde": ("c", "de"),
    "abcd,cde->abe": ("cd", "e"),
    "...b,bc->...c": ("b", "c"),
    "abc,dce->abde": ("c", "de"),
}


@pytest.mark.parametrize(("equation", "axes"), LINEAR_EQUATIONS.items())
def test_linear_equations_split_kernel_axes_into_inputs_and_outputs(equation, axes):
    plan = keras_einsum.plan(equation)
    assert (plan.input_axes, plan.output_axes) == axes


@pytest.mark.parametrize("equation", ["abc,bcd->abd", "ab,bc->a", "abc,cd", "ab,bb->ab", "ab,->ab"])
def test_equations_that_are_not_one_linear_map_have_no_plan(equation):
    assert keras_einsum.plan(equation) is None


@pytest.mark.parametrize("equation", LINEAR_EQUATIONS)
@given(sizes=st.lists(st.integers(1, 4), min_size=4, max_size=4), seed=strategies.seeds, rank=strategies.ranks)
def test_low_rank_einsums_equal_the_reference_update_on_the_flattened_kernel(equation, sizes, seed, rank):
    plan = keras_einsum.plan(equation)
    inputs, _outputs = equation.split("->")[0].split(",")
    size = dict(zip(plan.kernel_axes, sizes, strict=True))
    kernel_shape = tuple(size[a] for a in plan.kernel_axes)
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal(kernel_shape)
    weight = plan.to_reference(kernel)
    np.testing.assert_array_equal(plan.from_reference(weight, kernel_shape), kernel)
    input_dims, output_dims = plan.dims(kernel_shape)
    lora_a = rng.standard_normal((*input_dims, rank))
    lora_b = rng.standard_normal((rank, *output_dims))
    x = rng.standard_normal(tuple(size.get(a, 2) for a in inputs.replace("...", "z")))
    low_rank = np.einsum(plan.from_hidden, np.einsum(plan.to_hidden, x, lora_a), lora_b)
    A, B = lora_a.reshape(-1, rank).T, lora_b.reshape(rank, -1).T
    merged = plan.from_reference(weight + B @ A, kernel_shape)
    np.testing.assert_allclose(np.einsum(equation, x, kernel) + low_rank, np.einsum(equation, x, merged), atol=1e-10)
