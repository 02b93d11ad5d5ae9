"""Inits that compute A and B from the base weight, which becomes the residual: PiSSA and OLoRA, as PEFT.

`init_from_weight(W, init, r, s)` returns `A`, `B` and the residual weight, with
`residual + s * B @ A == W` up to rounding, so the adapted layer starts as the original one.
`W` is `(out, in)` (Hugging Face's `Conv1D` stores it transposed: pass `W.T` and transpose the
residual back, as PEFT does for PiSSA).

- PiSSA (arXiv 2404.02948; `init="pissa"`): W's top r singular triplets `W ~ U_r S_r V_r^T`,
  `A = sqrt(S_r / s) V_r^T`, `B = U_r sqrt(S_r / s)`, so `s * B @ A = U_r S_r V_r^T`.
- `init="pissa_niter_<K>"`: the same from the randomized SVD `svd_lowrank` with K subspace
  iterations (Halko, Martinsson and Tropp 2009, algorithm 5.1; `torch.svd_lowrank`, which PEFT
  calls), much faster for large weights.
- OLoRA (arXiv 2406.01775; `init="olora"`): `W = Q R` (reduced QR), `B = Q[:, :r]`, `A = R[:r]`.

Everything is computed in at least float32; the residual is cast back to W's dtype once, and A
and B keep the compute dtype. Integer (quantised) weights are refused, as PEFT refuses them.

A model trained from such an init only works on the residual base. `convert_to_lora` turns the
trained adapter into a rank-2r LoRA adapter of the original base: PEFT's
`save_pretrained(..., path_initial_model_for_weight_conversion=...)`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import DTypeLike

from lora_spec.config import LoRAConfig, is_weight_init, pissa_iterations


class WeightInit(NamedTuple):
    """An adapter initialised from the base weight: `residual + s * lora_b @ lora_a == W`."""

    lora_a: np.ndarray
    lora_b: np.ndarray
    residual: np.ndarray


def _compute_weight(W: np.ndarray, method: str, r: int) -> np.ndarray:
    """W as a float matrix of the compute dtype (W itself when it has it), after the checks every method needs."""
    W = np.asarray(W)
    if W.dtype.kind != "f" and W.dtype.name != "bfloat16":
        raise ValueError(
            f"{method} needs a floating-point base weight, not {W.dtype}: initialise it on the float32, "
            "float16 or bfloat16 weight and quantise the residual afterwards, as PEFT advises."
        )
    if W.ndim != 2:
        raise ValueError(f"{method} initialises linear layers, whose weight is 2-D, not of shape {W.shape}.")
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= min(W.shape):
        raise ValueError(
            f"rank r={r!r} does not fit {method} of a {W.shape[0]}x{W.shape[1]} weight: use "
            f"1 <= r <= {min(W.shape)}, the number of directions W has."
        )
    return W.astype(np.promote_types(W.dtype, np.float32), copy=False)


def _residual(weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, s: float, dtype: DTypeLike) -> np.ndarray:
    """`weight - s * B @ A`, computed in the product's memory (one full-size array), cast to `dtype` once."""
    residual = lora_b @ lora_a
    residual *= -s
    residual += weight
    return residual.astype(dtype, copy=False)


def _orthonormal_basis(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.qr(matrix)[0]


def svd_lowrank(
    W: np.ndarray, q: int, niter: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(U (m, q), S (q,), V (n, q))` with `W ~ U diag(S) V.T`: `torch.svd_lowrank`'s algorithm.

    A random Gaussian `(n, q)` test matrix (from `rng`) spans a guess of W's range, refined by
    `niter` subspace iterations (each re-orthonormalised by QR); the SVD of W projected on that
    basis gives the triplets. Like torch, it works on W.T when W is wide, and uses no oversampling.
    """
    tall = W if W.shape[0] >= W.shape[1] else W.T
    basis = _orthonormal_basis(tall @ rng.standard_normal((tall.shape[1], q)).astype(tall.dtype))
    for _ in range(niter):
        basis = _orthonormal_basis(tall.T @ basis)
        basis = _orthonormal_basis(tall @ basis)
    left, values, right_transposed = np.linalg.svd(basis.T @ tall, full_matrices=False)
    U, V = basis @ left, right_transposed.T
    return (U, values, V) if tall is W else (V, values, U)


def pissa_init(
    W: np.ndarray, r: int, s: float, niter: int | None = None, rng: np.random.Generator | None = None
) -> WeightInit:
    """PiSSA: A and B from W's top r singular triplets, scaled so that `s * B @ A` is their sum.

    `niter=None` takes them from the exact SVD ("pissa"), an integer from `svd_lowrank` with that
    many iterations ("pissa_niter_<K>"), whose random test matrix `rng` draws (default: fresh
    entropy, as PEFT draws from torch's global generator).
    """
    weight = _compute_weight(W, "PiSSA", r)
    if niter is None:
        left, values, right_transposed = np.linalg.svd(weight, full_matrices=False)
        left, values, right_transposed = left[:, :r], values[:r], right_transposed[:r]
    else:
        if isinstance(niter, bool) or not isinstance(niter, (int, np.integer)) or niter < 0:
            raise ValueError(f"niter={niter!r} is invalid: use an integer >= 0 (pissa_niter_<K>).")
        left, values, right = svd_lowrank(weight, r, niter, rng if rng is not None else np.random.default_rng())
        right_transposed = right.T
    root = np.sqrt(values / s)
    lora_a, lora_b = root[:, None] * right_transposed, left * root
    return WeightInit(lora_a, lora_b, _residual(weight, lora_a, lora_b, s, np.asarray(W).dtype))


def olora_init(W: np.ndarray, r: int, s: float) -> WeightInit:
    """OLoRA: `W = Q R`; B the first r columns of Q (orthonormal), A the first r rows of R."""
    weight = _compute_weight(W, "OLoRA", r)
    orthonormal, triangular = np.linalg.qr(weight)
    lora_a, lora_b = np.ascontiguousarray(triangular[:r]), np.ascontiguousarray(orthonormal[:, :r])
    return WeightInit(lora_a, lora_b, _residual(weight, lora_a, lora_b, s, np.asarray(W).dtype))


def init_from_weight(W: np.ndarray, init: str, r: int, s: float, rng: np.random.Generator | None = None) -> WeightInit:
    """A, B and the residual for `init` ("pissa", "pissa_niter_<K>" or "olora", `LoRAConfig.init`)."""
    if init == "olora":
        return olora_init(W, r, s)
    if init == "pissa" or pissa_iterations(init) is not None:
        return pissa_init(W, r, s, pissa_iterations(init), rng)
    raise ValueError(
        f"init={init!r} does not compute A and B from the base weight: use 'pissa', 'pissa_niter_<K>' or 'olora'."
    )


def convert_to_lora(
    lora_a: np.ndarray, lora_b: np.ndarray, initial_a: np.ndarray, initial_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A trained adapter of the residual base as a rank-2r adapter of the original base.

    `W = residual + s * B0 @ A0`, so `residual + s * B @ A = W + s * (B @ A - B0 @ A0)
    = W + s * [B | -B0] @ [A ; A0]` (PEFT's `subtract_mutated_init`). Use it with
    `converted_config`, which keeps `s` at twice the rank. A DoRA magnitude carries over as it
    is: the adapted weight, hence its norm, is the same.
    """
    return (np.concatenate([lora_a, initial_a], axis=0), np.concatenate([lora_b, -np.asarray(initial_b)], axis=1))


def converted_config(config: LoRAConfig) -> LoRAConfig:
    """The config of `convert_to_lora`'s adapter: PEFT's, twice the rank at the same scaling.

    `r` and `rank_pattern` double; `alpha` and `alpha_pattern` double (times sqrt(2) for `alpha`
    with rsLoRA); `init` becomes "kaiming", so that loading never re-runs the init. rsLoRA with
    rank or alpha patterns is refused, as PEFT refuses it.
    """
    if not is_weight_init(config.init):
        raise ValueError(
            f"init={config.init!r} leaves the base weight as it is: only PiSSA and OLoRA adapters need "
            "converting to LoRA."
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "converting to LoRA is not supported with use_rslora=True and rank_pattern or alpha_pattern, "
            "as in PEFT: their scaling cannot be kept at twice the rank."
        )
    assert config.alpha is not None  # LoRAConfig defaults it to r
    return config.replace(
        r=2 * config.r,
        alpha=config.alpha * (2**0.5 if config.use_rslora else 2),
        init="kaiming",
        rank_pattern={key: 2 * value for key, value in config.rank_pattern.items()},
        alpha_pattern={key: 2 * value for key, value in config.alpha_pattern.items()},
    )
