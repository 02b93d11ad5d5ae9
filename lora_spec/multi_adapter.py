"""The math of several adapters on one layer: weighted combinations and routed batches.

An adapter on one layer is its factors and scaling `(A, B, s)` in the reference layout
(`lora_spec.reference`). A combination is a new adapter whose scaling is 1; its factors are
returned. A conv's factors are grouped like its base (`A (r, in/groups, kh, kw)`,
`B (out, r/groups, 1, 1)`): every combination works group by group, so the result stays
block-diagonal and mergeable.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from lora_spec.config import LoRAConfig, is_weight_init

COMBINATION_TYPES = ("svd", "linear", "cat")
# The name of an adapter nobody named (PEFT's); a multi-adapter folder keeps it at its root.
DEFAULT_ADAPTER = "default"
BASE_MODEL = "__base__"
"""PEFT's name for "no adapter" in a routed batch (`adapter_names=`); None means the same."""
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


class Factors(NamedTuple):
    """One adapter on one layer: `A`, `B` and the scaling `s`, so that `delta_W = s * B @ A`."""

    A: np.ndarray
    B: np.ndarray
    s: float


def check_adapter_name(name: object) -> str:
    """`name` if it can name an adapter (letters, digits, `_` and `-`, not `__base__`), else ValueError."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_MODEL:
        raise ValueError(
            f"adapter name {name!r} is invalid: use letters, digits, '_' and '-' (it becomes part of "
            f"parameter and folder names), and not {BASE_MODEL!r}, which means the base model."
        )
    return name


def weighted_combination(
    names: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str,
    configs: Mapping[str, LoRAConfig],
) -> str:
    """The combination `add_weighted_adapter` runs for adapters `names` with `weights` into a new adapter
    `adapter_name`, `configs` being the model's adapters: `combination_type`, or "linear" for one adapter as
    in PEFT. Raises ValueError, naming the fix, for a bad name, a taken name, a weight count, an unknown type
    or an adapter that does not combine (`check_combinable`)."""
    check_adapter_name(adapter_name)
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter {adapter_name!r}: delete it first or choose another name.")
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} adapters: give one weight per adapter.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"combination_type={combination_type!r} is invalid: use one of {', '.join(map(repr, COMBINATION_TYPES))}."
        )
    for name in names:
        check_combinable(name, configs[name])
    return "linear" if len(names) == 1 else combination_type


def check_combinable(name: str, config: LoRAConfig) -> None:
    """Raise ValueError when adapter `name` cannot enter a weighted combination: a DoRA adapter (its magnitude
    belongs to its own update) or one initialised from the base weight (PiSSA, OLoRA: the base is its residual)."""
    if config.use_dora:
        raise ValueError(
            f"adapter {name!r} is a DoRA adapter: each DoRA adapter rescales its own adapted weight per "
            "feature, so a weighted sum of updates has no magnitude that means it (PEFT keeps one that "
            "means nothing); combine plain LoRA adapters, or run DoRA adapters with set_adapter."
        )
    if is_weight_init(config.init):
        raise ValueError(
            f"adapter {name!r} has init={config.init!r}, so its layers' base weights are residuals that a "
            "combined adapter beside it would see: save it with convert_to_lora=True, load the converted "
            "file into the original model and combine that."
        )


def check_routable(name: str, use_dora: bool) -> None:
    """Raise ValueError when adapter `name` cannot run in a routed batch: a DoRA adapter (PEFT refuses it too)."""
    if use_dora:
        raise ValueError(
            f"adapter {name!r} is a DoRA adapter, which routed batches do not support (nor does "
            "PEFT): run its rows as a batch of their own after set_adapter."
        )


def _groups(adapter: Factors) -> int:
    """How many groups a conv adapter's factors are split into (1 for linear and embedding layers)."""
    return adapter.A.shape[0] // adapter.B.shape[1] if adapter.A.ndim == 4 else 1


def _grouped(adapter: Factors, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """`(A_g (groups, r/groups, fan_in), B_g (groups, out/groups, r/groups))`: `delta_g = s * B_g @ A_g`."""
    rank = adapter.A.shape[0]
    return (
        adapter.A.reshape(groups, rank // groups, -1),
        adapter.B.reshape(groups, adapter.B.shape[0] // groups, rank // groups),
    )


def _ungrouped(grouped_a: np.ndarray, grouped_b: np.ndarray, like: Factors) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_grouped`: factors shaped like `like`'s, with the rank of the grouped ones."""
    groups, rank_per_group, _ = grouped_a.shape
    return (
        grouped_a.reshape(groups * rank_per_group, *like.A.shape[1:]),
        grouped_b.reshape(like.B.shape[0], rank_per_group, *like.B.shape[2:]),
    )


def _check(adapters: Sequence[Factors], weights: Sequence[float]) -> int:
    if not adapters:
        raise ValueError("no adapter to combine: pass at least one.")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters: give one weight per adapter.")
    first = adapters[0]
    groups = _groups(first)
    for adapter in adapters[1:]:
        if (
            adapter.A.shape[1:] != first.A.shape[1:]
            or adapter.B.shape[0] != first.B.shape[0]
            or _groups(adapter) != groups
        ):
            raise ValueError(
                f"adapters of shapes A {first.A.shape}, B {first.B.shape} and A {adapter.A.shape}, "
                f"B {adapter.B.shape} are not on the same layer: combine adapters of one base model."
            )
    return groups


def combine(
    adapters: Sequence[Factors], weights: Sequence[float], combination_type: str = "svd", svd_rank: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`(A, B)` of one adapter of scaling 1 standing for `sum_k weights[k] * delta_k`.

    - `"cat"`: ranks concatenated, `A = [w_k s_k A_k]`, `B = [B_k]`: exact whatever the scalings
      (rsLoRA included), of rank `sum r_k`.
    - `"linear"`: PEFT's definition, `A = sum_k sign_k sqrt|w_k s_k| A_k`, `B = sum_k sqrt|w_k s_k| B_k`
      (equal ranks required). Not exact: the product has cross terms `B_j A_k`; it equals the
      weighted sum only for one adapter.
    - `"svd"`: the best rank-`svd_rank` approximation (in Frobenius norm) of the exact weighted sum,
      by truncated SVD, `B = U S`, `A = V^T`; its error is the norm of the discarded singular values.
      `svd_rank` defaults to the largest input rank; ranks above what the update can hold are zero-padded.

    Computed in at least float32 and returned in the first adapter's dtype. A conv's factors are
    combined group by group (`svd_rank` must then be a multiple of the groups).
    """
    groups = _check(adapters, weights)
    like = adapters[0]
    compute = np.promote_types(like.A.dtype, np.float32)
    grouped = [tuple(factor.astype(compute) for factor in _grouped(adapter, groups)) for adapter in adapters]
    coefficients = [float(weight) * float(adapter.s) for weight, adapter in zip(weights, adapters, strict=True)]
    if combination_type == "cat":
        grouped_a = np.concatenate([c * a for c, (a, _) in zip(coefficients, grouped, strict=True)], axis=1)
        grouped_b = np.concatenate([b for _, b in grouped], axis=2)
    elif combination_type == "linear":
        ranks = sorted({adapter.A.shape[0] for adapter in adapters})
        if len(ranks) > 1:
            raise ValueError(
                f"combination_type='linear' needs adapters of one rank, not ranks {ranks}: use 'cat' (exact) or 'svd'."
            )
        roots = [np.sqrt(abs(c)) for c in coefficients]
        grouped_a = sum(
            np.sign(c or 1.0) * root * a for c, root, (a, _) in zip(coefficients, roots, grouped, strict=True)
        )
        grouped_b = sum(root * b for root, (_, b) in zip(roots, grouped, strict=True))
    elif combination_type == "svd":
        rank = svd_rank if svd_rank is not None else max(adapter.A.shape[0] for adapter in adapters)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or rank % groups:
            raise ValueError(
                f"svd_rank={svd_rank!r} is invalid: use an integer >= 1"
                + (f" and a multiple of the conv's groups={groups}." if groups > 1 else ".")
            )
        delta = sum(c * (b @ a) for c, (a, b) in zip(coefficients, grouped, strict=True))
        grouped_a, grouped_b = _truncated_svd(delta, rank // groups)
    else:
        raise ValueError(
            f"combination_type={combination_type!r} is invalid: use one of {', '.join(map(repr, COMBINATION_TYPES))}."
        )
    lora_a, lora_b = _ungrouped(grouped_a, grouped_b, like)
    return lora_a.astype(like.A.dtype), lora_b.astype(like.B.dtype)


def _truncated_svd(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """`(V^T, U S)` of the `rank` largest singular values of each `delta[g]`, zero-padded to `rank`."""
    left, values, right = np.linalg.svd(delta, full_matrices=False)
    kept = min(rank, values.shape[-1])
    groups, rows, columns = delta.shape
    grouped_a = np.zeros((groups, rank, columns), delta.dtype)
    grouped_b = np.zeros((groups, rows, rank), delta.dtype)
    grouped_a[:, :kept] = right[:, :kept]
    grouped_b[:, :, :kept] = left[:, :, :kept] * values[:, None, :kept]
    return grouped_a, grouped_b


def row_groups(adapter_per_row: Sequence[Hashable | None]) -> list[tuple[Hashable, slice | np.ndarray]]:
    """`(adapter name, rows)` for each adapter a routed batch uses, in order of first use.

    `rows` is a slice when the adapter's rows are one contiguous run (a view, no copy, in every
    framework), else an index array. Rows routed to `None` or `"__base__"` are left out: they
    take the base model alone.
    """
    positions: dict[Hashable, list[int]] = {}
    for row, name in enumerate(adapter_per_row):
        if name is not None and name != BASE_MODEL:
            positions.setdefault(name, []).append(row)
    groups = []
    for name, rows in positions.items():
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        groups.append((name, slice(rows[0], rows[-1] + 1) if contiguous else np.asarray(rows, np.int64)))
    return groups


class Routing(NamedTuple):
    """A routed batch, worked out once for every layer: its number of rows and its `row_groups`."""

    rows: int
    groups: list[tuple[Hashable, slice | np.ndarray]]

    @classmethod
    def of(cls, adapter_per_row: Sequence[Hashable | None]) -> Routing:
        """The routing of a batch whose row `i` takes adapter `adapter_per_row[i]`."""
        return cls(len(adapter_per_row), row_groups(adapter_per_row))


def routed_forward(
    x: np.ndarray,
    W: np.ndarray,
    b: np.ndarray | None,
    adapters: Mapping[Hashable, Factors],
    adapter_per_row: Sequence[Hashable | None],
) -> np.ndarray:
    """A linear layer on a batch whose row `i` (first axis of `x`) goes through adapter `adapter_per_row[i]`,
    or through the base alone for `None` / `"__base__"`: `y[i] = x[i] @ W.T + b + s_k * (x[i] @ A_k.T) @ B_k.T`.
    """
    if len(adapter_per_row) != x.shape[0]:
        raise ValueError(f"{len(adapter_per_row)} adapter names for a batch of {x.shape[0]} rows: give one per row.")
    y = x @ W.T if b is None else x @ W.T + b
    for name, rows in row_groups(adapter_per_row):
        adapter = adapters[name]
        y[rows] += adapter.s * ((x[rows] @ adapter.A.T) @ adapter.B.T)
    return y
