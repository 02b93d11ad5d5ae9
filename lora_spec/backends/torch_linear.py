"""The training-time LoRA linear as one autograd Function, for speed and memory.

`y = x @ W.T + b + s * ((x * mask) @ A.T) @ B.T`, as `lora_spec.reference.forward`, with:
- the scaling and the addition folded into one in-place `addmm` on the base output, so no
  full-size temporary holds the low-rank branch on its own;
- only `x` (which the caller keeps alive anyway), the small `(x * mask) @ A.T` and the boolean
  mask saved for backward; the masked input is recomputed there instead of stored in float;
- the base weight frozen: its gradient is never computed.

A custom Function has no ONNX symbolic and hides the branch from compilers, so the layer uses
it only in eager training; tracing, export and `torch.compile` see plain ops.
"""

from __future__ import annotations

import torch

from lora_spec.backends.torch_dropout import DropoutMask


class LinearLoRAFunction(torch.autograd.Function):
    """`forward(x, weight (out, in), bias, lora_a, lora_b, scaling, keep, keep_scale)`.

    `keep` is a boolean mask of `x`'s shape or None; `keep_scale` is the factor of kept inputs.
    `weight` may be a transposed view (Conv1D's layout) and must not require grad.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, keep, keep_scale: float):
        rows = x.reshape(-1, x.shape[-1])
        dropped = rows if keep is None else rows * keep.reshape(rows.shape)
        hidden = dropped @ lora_a.T
        if keep is not None:
            hidden.mul_(keep_scale)
        out = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)
        out.addmm_(hidden, lora_b.T, alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, hidden, keep)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, hidden, keep = ctx.saved_tensors
        needs_x, _, needs_bias, needs_a, needs_b = ctx.needs_input_grad[:5]
        rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        keep_rows = None if keep is None else keep.reshape(rows.shape)
        grad_hidden = grad_rows @ lora_b
        grad_hidden.mul_(ctx.scaling * (1.0 if keep is None else ctx.keep_scale))
        grad_x = grad_a = grad_b = grad_bias = None
        if needs_b:
            # (h.T @ g).T: BLAS runs the reduction over rows faster in this orientation.
            grad_b = (hidden.T @ grad_rows).mul_(ctx.scaling).T
        if needs_a:
            grad_a = grad_hidden.T @ (rows if keep_rows is None else rows * keep_rows)
        if needs_x:
            if keep_rows is None:
                grad_x = (grad_rows @ weight).addmm_(grad_hidden, lora_a)
            else:
                grad_x = (grad_hidden @ lora_a).mul_(keep_rows).addmm_(grad_rows, weight)
            grad_x = grad_x.reshape(x.shape)
        if needs_bias:
            grad_bias = grad_rows.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def linear_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_mask: DropoutMask | None = None) -> torch.Tensor:
    """The fused training path; `weight` is `(out, in)` (pass `W.T` for Conv1D's `(in, out)`)."""
    keep, keep_scale = (None, 1.0) if dropout_mask is None else dropout_mask
    return LinearLoRAFunction.apply(x, weight, bias, lora_a, lora_b, scaling, keep, keep_scale)
