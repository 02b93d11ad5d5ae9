"""The training-time DoRA linear as one autograd Function, for speed and memory.

`y = x @ W.T + b + (f - 1) * (d(x) @ W.T) + f * s * (d(x) @ A.T) @ B.T` with `f = m / n` per output
feature, as `lora_spec.dora.dora_forward`; the norm `n` is a constant given by the caller (the
paper's section 4.3; PEFT detaches it). Without dropout that is `f * D + b` with the direction
`D = x @ W.T + s * (x @ A.T) @ B.T`, so:
- the forward pass is the LoRA linear's two products and one pass scaling `D` into the output;
- `D` is kept for the magnitude's gradient `sum(g * D) / n` (the only full-size tensor saved);
- the input gradient is `g @ (f * W) + dh @ A`: the per-feature factor scales the rows of the
  weight (out x in) rather than the gradient (rows x out), and `dh`, `dB` take it on their
  small factors.
With dropout, `D` is the direction of `d(x)` and the output `x @ W.T + b + (f - 1) * (d(x) @ W.T) +
(f * s) * (d(x) @ A.T) @ B.T`: one more product each way, as in PEFT. The mask is kept for backward
as in `torch_linear` (a `SeededMask`'s 16-bit draws, or an explicit `DropoutMask`). The base weight is frozen.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_spec.backends.torch_dropout import DropoutMask, SeededMask, mask_rows, saved_mask


class LinearDoRAFunction(torch.autograd.Function):
    """`forward(x, weight (out, in), bias, lora_a, lora_b, scaling, magnitude (out,), norm (out,), mask)`.

    `weight` may be a transposed view (Conv1D's layout) and must not require grad; `norm` is a
    constant (no gradient flows into it).
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
        magnitude: torch.Tensor,
        norm: torch.Tensor,
        mask: DropoutMask | SeededMask | None,
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        dropout, mask_state = mask_rows(mask, rows)
        factor = magnitude / norm
        out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=rows.dtype, device=x.device)
        out_rows = out.view(-1, weight.shape[0])
        if dropout is None:
            hidden = rows @ lora_a.T
            direction = rows @ weight.T
            direction.addmm_(hidden, lora_b.T, alpha=scaling)
            if bias is None:
                torch.mul(direction, factor, out=out_rows)
            else:
                torch.addcmul(bias, direction, factor, out=out_rows)
        else:
            dropped = rows * dropout.keep
            hidden = (dropped @ lora_a.T).mul_(dropout.scale)
            if bias is None:
                torch.mm(rows, weight.T, out=out_rows)
            else:
                torch.addmm(bias, rows, weight.T, out=out_rows)
            # beta=0: the first argument is ignored; alpha applies the dropout's scale in the product.
            direction = torch.addmm(rows.new_zeros(()), dropped, weight.T, beta=0, alpha=dropout.scale)
            out_rows.addcmul_(direction, factor - 1)
            out_rows.addmm_(hidden, (lora_b * factor[:, None]).T, alpha=scaling)
            direction.addmm_(hidden, lora_b.T, alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, hidden, direction, factor, norm, mask_state)
        ctx.scaling, ctx.mask = scaling, mask
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, hidden, direction, factor, norm, mask_state = ctx.saved_tensors
        needs_x, _, needs_bias, needs_a, needs_b, _, needs_magnitude = ctx.needs_input_grad[:7]
        rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        dropout = saved_mask(ctx.mask, mask_state, rows.dtype)
        scale = 1.0 if dropout is None else dropout.scale
        grad_hidden = grad_rows @ (lora_b * factor[:, None])
        grad_hidden.mul_(ctx.scaling * scale)
        grad_x = grad_a = grad_b = grad_bias = grad_magnitude = None
        if needs_magnitude:
            grad_magnitude = torch.linalg.vecdot(grad_rows, direction, dim=0).div_(norm)
        if needs_b:
            grad_b = (hidden.T @ grad_rows).mul_(factor * ctx.scaling).T
        if needs_a:
            grad_a = grad_hidden.T @ (rows if dropout is None else rows * dropout.keep)
        if needs_x:
            if dropout is None:
                grad_x = (grad_rows @ (weight * factor[:, None])).addmm_(grad_hidden, lora_a)
            else:
                rescaled = grad_rows @ (weight * ((factor - 1) * scale)[:, None])
                grad_x = rescaled.addmm_(grad_hidden, lora_a).mul_(dropout.keep).addmm_(grad_rows, weight)
            grad_x = grad_x.reshape(x.shape)
        if needs_bias:
            grad_bias = grad_rows.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, grad_magnitude, None, None


def linear_weight_norm(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`||W + s * B @ A||` of each row of `weight (out, in)`, without forming the out x in sum:
    `||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T`, which reads W twice (a product of rank r
    and the squares) instead of writing, adding and reading a full-size matrix. Not differentiable."""
    with torch.no_grad():
        squares = torch.linalg.vector_norm(weight, dim=1).square_()
        squares += torch.linalg.vecdot(weight @ lora_a.T, lora_b).mul_(2 * scaling)
        squares += torch.linalg.vecdot(lora_b @ (lora_a @ lora_a.T), lora_b).mul_(scaling * scaling)
        return squares.clamp_min_(0).sqrt_()


def linear_dora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    mask: DropoutMask | SeededMask | None = None,
) -> torch.Tensor:
    """The fused DoRA training path; `weight` is `(out, in)` (pass `W.T` for Conv1D's `(in, out)`), `norm`
    the constant `||W + s * B @ A||` per output feature."""
    return LinearDoRAFunction.apply(x, weight, bias, lora_a, lora_b, scaling, magnitude, norm, mask)
