"""Grouped 2-D convolution and its gradients in NumPy, by im2col, for the reference.

Layouts are PyTorch's: `x (N, C, H, W)`, `weight (out, C / groups, kh, kw)`.
"""

from __future__ import annotations

import numpy as np

Pair = tuple[int, int]


def _windows(
    height: int, width: int, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> tuple[dict[Pair, tuple[slice, slice]], Pair]:
    """For each kernel offset (i, j): the slices of the padded input it reads, and the output size."""
    out_h = (height + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    slices = {
        (i, j): (
            slice(i * dilation[0], i * dilation[0] + stride[0] * (out_h - 1) + 1, stride[0]),
            slice(j * dilation[1], j * dilation[1] + stride[1] * (out_w - 1) + 1, stride[1]),
        )
        for i in range(kernel[0])
        for j in range(kernel[1])
    }
    return slices, (out_h, out_w)


def unfold(x: np.ndarray, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> np.ndarray:
    """im2col: `(N, C, H, W)` to columns `(N, C, kh, kw, out_h, out_w)`."""
    slices, out_size = _windows(x.shape[2], x.shape[3], kernel, stride, padding, dilation)
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    columns = np.empty(x.shape[:2] + kernel + out_size, dtype=x.dtype)
    for (i, j), (rows, cols) in slices.items():
        columns[:, :, i, j] = padded[:, :, rows, cols]
    return columns


def fold(columns: np.ndarray, x_shape: tuple[int, ...], stride: Pair, padding: Pair, dilation: Pair) -> np.ndarray:
    """The adjoint of `unfold`: sums each column entry back into the input position it came from."""
    kernel = columns.shape[2:4]
    slices, _ = _windows(x_shape[2], x_shape[3], kernel, stride, padding, dilation)
    padded = np.zeros((*x_shape[:2], x_shape[2] + 2 * padding[0], x_shape[3] + 2 * padding[1]), columns.dtype)
    for (i, j), (rows, cols) in slices.items():
        padded[:, :, rows, cols] += columns[:, :, i, j]
    return padded[:, :, padding[0] : padding[0] + x_shape[2], padding[1] : padding[1] + x_shape[3]]


def _grouped(columns: np.ndarray, weight: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns as `(N, groups, C/groups * kh * kw, L)` and weight as `(groups, out/groups, same)`."""
    n, _, _, _, out_h, out_w = columns.shape
    grouped_columns = columns.reshape(n, groups, -1, out_h * out_w)
    grouped_weight = weight.reshape(groups, weight.shape[0] // groups, -1)
    return grouped_columns, grouped_weight


def conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
) -> np.ndarray:
    """Cross-correlation as PyTorch's `conv2d` computes it, without bias."""
    columns = unfold(x, weight.shape[2:], stride, padding, dilation)
    grouped_columns, grouped_weight = _grouped(columns, weight, groups)
    y = np.einsum("gok,ngkl->ngol", grouped_weight, grouped_columns)
    return y.reshape(x.shape[0], weight.shape[0], *columns.shape[4:])


def conv2d_grads(
    x: np.ndarray,
    weight: np.ndarray,
    grad_y: np.ndarray,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients `(dx, dweight)` of `sum(grad_y * conv2d(x, weight))`."""
    columns = unfold(x, weight.shape[2:], stride, padding, dilation)
    grouped_columns, grouped_weight = _grouped(columns, weight, groups)
    grouped_grad = grad_y.reshape(x.shape[0], groups, weight.shape[0] // groups, -1)
    dweight = np.einsum("ngol,ngkl->gok", grouped_grad, grouped_columns).reshape(weight.shape)
    dcolumns = np.einsum("gok,ngol->ngkl", grouped_weight, grouped_grad).reshape(columns.shape)
    return fold(dcolumns, x.shape, stride, padding, dilation), dweight
