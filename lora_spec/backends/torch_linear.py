"""The training-time LoRA linear as one autograd Function, for speed and memory.

`y = x @ W.T + b + s * ((x * mask) @ A.T) @ B.T`, as `lora_spec.reference.forward`, with:
- the scaling and the addition folded into one in-place `addmm` on the base output, so no
  full-size temporary holds the low-rank branch on its own;
- only `x` (which the caller keeps alive anyway), the small `(x * mask) @ A.T` and, with dropout,
  the mask's 16-bit draws saved for backward: the masked input is recomputed there;
- the base weight frozen: its gradient is never computed.

A custom Function has no ONNX symbolic and hides the branch from compilers, so the layer uses
it only in eager training; tracing, export and `torch.compile` see plain ops.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_spec.backends.torch_dropout import DropoutMask, SeededMask, mask_rows, saved_mask


class LinearLoRAFunction(torch.autograd.Function):
    """`forward(x, weight (out, in), bias, lora_a, lora_b, scaling, mask)`.

    `mask` is None, an explicit `DropoutMask` or a `SeededMask` (its draws kept for backward).
    `weight` may be a transposed view (Conv1D's layout) and must not require grad.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        mask: DropoutMask | SeededMask | None,
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        dropout, mask_state = mask_rows(mask, rows)
        hidden = (rows if dropout is None else rows * dropout.keep) @ lora_a.T
        if dropout is not None:
            hidden.mul_(dropout.scale)
        # Allocated in the output's shape and filled through a 2-D view, so what is returned is not
        # a view: FSDP2 warns about (and in-place ops on) views returned by a module.
        out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=hidden.dtype, device=x.device)
        out_rows = out.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(rows, weight.T, out=out_rows)
        else:
            torch.addmm(bias, rows, weight.T, out=out_rows)
        out_rows.addmm_(hidden, lora_b.T, alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, hidden, mask_state)
        ctx.scaling, ctx.mask = scaling, mask
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, hidden, mask_state = ctx.saved_tensors
        needs_x, _, needs_bias, needs_a, needs_b = ctx.needs_input_grad[:5]
        rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        dropout = saved_mask(ctx.mask, mask_state, rows.dtype)
        grad_hidden = grad_rows @ lora_b
        grad_hidden.mul_(ctx.scaling * (1.0 if dropout is None else dropout.scale))
        grad_x = grad_a = grad_b = grad_bias = None
        if needs_b:
            # (h.T @ g).T: BLAS runs the reduction over rows faster in this orientation.
            grad_b = (hidden.T @ grad_rows).mul_(ctx.scaling).T
        if needs_a:
            grad_a = grad_hidden.T @ (rows if dropout is None else rows * dropout.keep)
        if needs_x:
            if dropout is None:
                grad_x = (grad_rows @ weight).addmm_(grad_hidden, lora_a)
            else:
                grad_x = (grad_hidden @ lora_a).mul_(dropout.keep).addmm_(grad_rows, weight)
            grad_x = grad_x.reshape(x.shape)
        if needs_bias:
            grad_bias = grad_rows.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def linear_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    mask: DropoutMask | SeededMask | None = None,
) -> torch.Tensor:
    """The fused training path; `weight` is `(out, in)` (pass `W.T` for Conv1D's `(in, out)`)."""
    return LinearLoRAFunction.apply(x, weight, bias, lora_a, lora_b, scaling, mask)
