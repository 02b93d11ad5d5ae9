"""PiSSA and OLoRA for the PyTorch backend: PEFT's algorithms in torch ops on the weight's device.

`lora_spec.inits` is the reference. The factors are computed in at least float32 from the weight
`(out, in)` (a Conv1D's transposed view), and the weight is overwritten with the residual
`W - s * B @ A` in place (one product accumulated into it; a half-precision weight is computed in
a float32 copy and cast back once). `"pissa_niter_<K>"` calls `torch.svd_lowrank`, as PEFT does, so
its random test matrix comes from torch's default generator (`torch.manual_seed` reproduces it).
"""

from __future__ import annotations

import torch

from lora_spec.config import is_weight_init, pissa_iterations

_METHODS = {"olora": "OLoRA"}


def method_name(init: str) -> str:
    """The name a message gives `init`: "PiSSA" or "OLoRA"."""
    return _METHODS.get(init, "PiSSA")


def check_weight(weight: torch.Tensor, init: str, r: int) -> None:
    """Refuse in one line a weight `init` cannot start from: not floating point (quantised), or a rank it lacks."""
    method = method_name(init)
    if not weight.dtype.is_floating_point:
        raise ValueError(
            f"{method} needs a floating-point base weight, not {weight.dtype}: initialise it on the "
            "float32, float16 or bfloat16 weight and quantise the residual afterwards, as PEFT advises."
        )
    if not 1 <= r <= min(weight.shape):
        raise ValueError(
            f"rank r={r} does not fit {method} of a {weight.shape[0]}x{weight.shape[1]} weight: use "
            f"1 <= r <= {min(weight.shape)}, the number of directions W has."
        )


def _principal_triplets(weight: torch.Tensor, init: str, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(U_r, S_r, Vh_r)`: the exact SVD's top r ("pissa"), or `torch.svd_lowrank`'s ("pissa_niter_<K>")."""
    iterations = pissa_iterations(init)
    if iterations is None:
        left, values, right_transposed = torch.linalg.svd(weight, full_matrices=False)
        return left[:, :r], values[:r], right_transposed[:r]
    left, values, right = torch.svd_lowrank(weight, q=r, niter=iterations)
    return left, values, right.T


def init_from_weight(weight: torch.Tensor, init: str, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B)` of `init` ("pissa", "pissa_niter_<K>" or "olora") from `weight (out, in)`, which becomes the residual.

    PiSSA: `A = sqrt(S_r / s) Vh_r`, `B = U_r sqrt(S_r / s)`; OLoRA: `W = Q R`, `B = Q[:, :r]`,
    `A = R[:r]`; then `weight -= s * B @ A`. A and B have the compute dtype (at least float32).
    """
    if not is_weight_init(init):
        raise ValueError(
            f"init={init!r} does not compute A and B from the base weight: use 'pissa', 'pissa_niter_<K>' or 'olora'."
        )
    check_weight(weight, init, r)
    compute = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        residual = weight.detach().to(compute)
        if init == "olora":
            orthonormal, triangular = torch.linalg.qr(residual)
            lora_a, lora_b = triangular[:r].contiguous(), orthonormal[:, :r].contiguous()
        else:
            left, values, right_transposed = _principal_triplets(residual, init, r)
            root = (values / scaling).sqrt()
            lora_a, lora_b = root[:, None] * right_transposed, left * root
        residual.addmm_(lora_b, lora_a, alpha=-scaling)
        if residual.data_ptr() != weight.data_ptr():
            weight.copy_(residual)
    return lora_a, lora_b
