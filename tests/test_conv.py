"""The reference's im2col convolution against a direct loop over output positions."""

import numpy as np
from hypothesis import given

from lora_spec import _conv
from tests import strategies
from tests.numerics import assert_close


def _direct_conv2d(x, weight, stride, padding, dilation, groups):
    n, _, height, width = x.shape
    out_channels, group_channels, kh, kw = weight.shape
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, out_channels, out_h, out_w))
    for o in range(out_channels):
        group = o // (out_channels // groups)
        channels = slice(group * group_channels, (group + 1) * group_channels)
        for i in range(out_h):
            for j in range(out_w):
                rows = slice(i * stride[0], i * stride[0] + dilation[0] * (kh - 1) + 1, dilation[0])
                cols = slice(j * stride[1], j * stride[1] + dilation[1] * (kw - 1) + 1, dilation[1])
                y[:, o, i, j] = np.einsum("nchw,chw->n", padded[:, channels, rows, cols], weight[o])
    return y


@given(strategies.conv2d_cases(dtype=np.float64, dropout=False))
def test_im2col_conv2d_equals_the_direct_definition(case):
    geometry = (case.stride, case.padding, case.dilation, case.groups)
    assert_close(_conv.conv2d(case.x, case.W, *geometry), _direct_conv2d(case.x, case.W, *geometry), factor=100)
