"""Inverted-dropout masks drawn from 16-bit random integers (`lora_spec.dropout`), four per 64-bit draw.

A `SeededMask` is drawn from its own generator, seeded from torch's default one (so
`torch.manual_seed` reproduces it). The training path keeps its 16-bit draws for backward (half the
size of a float32 mask) rather than drawing them again: the random numbers cost more than the
comparison that turns them back into the mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_spec.dropout import LEVELS, keep_threshold, kept_levels


class DropoutMask(NamedTuple):
    """Which inputs are kept (1) or dropped (0), in the input's shape and dtype, and the factor of kept ones."""

    keep: torch.Tensor
    scale: float

    @classmethod
    def from_reference(cls, mask: torch.Tensor) -> DropoutMask:
        """From the reference's explicit mask (0 or `1 / (1 - p)` per element)."""
        kept = mask != 0
        return cls(kept.to(mask.dtype), float(mask[kept][0]) if bool(kept.any()) else 1.0)


class SeededMask(NamedTuple):
    """A mask given by a seed and a dropout probability: `draw` gives the same mask every time."""

    seed: int
    p: float

    @classmethod
    def new(cls, p: float) -> SeededMask:
        """A fresh seed from torch's default generator."""
        return cls(int(torch.randint(0, 1 << 62, ())), p)

    def draws(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The mask's random 16-bit integers (int16, in `shape`), the same for every call."""
        numel = shape.numel()
        generator = torch.Generator(device=device).manual_seed(self.seed)
        words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
        # The full 64-bit range: every bit, hence each of the four 16-bit quarters, is uniform.
        words.random_(torch.iinfo(torch.int64).min, None, generator=generator)
        return words.view(torch.int16)[:numel].view(shape)

    def mask_of(self, draws: torch.Tensor, dtype: torch.dtype) -> DropoutMask:
        """The mask that `draws` (from `draws()`) give, in `dtype`."""
        keep = torch.empty(draws.shape, dtype=dtype, device=draws.device)
        # Comparing straight into the float mask: no boolean tensor, no cast pass.
        torch.ge(draws, keep_threshold(self.p), out=keep)
        return DropoutMask(keep, LEVELS / kept_levels(self.p))

    def draw(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> DropoutMask:
        """The mask in `shape` and `dtype`."""
        return self.mask_of(self.draws(shape, device), dtype)


def mask_rows(
    mask: DropoutMask | SeededMask | None, rows: torch.Tensor
) -> tuple[DropoutMask | None, torch.Tensor | None]:
    """`(mask of rows, what backward keeps to rebuild it with saved_mask)`: an explicit mask's `keep`, a
    seeded mask's draws; `(None, None)` without dropout."""
    if mask is None:
        return None, None
    if isinstance(mask, SeededMask):
        draws = mask.draws(rows.shape, rows.device)
        return mask.mask_of(draws, rows.dtype), draws
    keep = mask.keep.reshape(rows.shape)
    return DropoutMask(keep, mask.scale), keep


def saved_mask(
    mask: DropoutMask | SeededMask | None, saved: torch.Tensor | None, dtype: torch.dtype
) -> DropoutMask | None:
    """The mask `mask_rows(mask, rows)` gave, from what it kept (`saved`) and the rows' `dtype`."""
    if mask is None or saved is None:
        return None
    if isinstance(mask, SeededMask):
        return mask.mask_of(saved, dtype)
    return DropoutMask(saved, mask.scale)


def draw_mask(shape: torch.Size, p: float, device: torch.device, dtype: torch.dtype = torch.float32) -> DropoutMask:
    """A fresh mask keeping each element with probability `keep_probability(p)`."""
    return SeededMask.new(p).draw(shape, device, dtype)
