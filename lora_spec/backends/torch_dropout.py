"""Inverted-dropout masks drawn from 16-bit random integers (`lora_spec.dropout`), four per 64-bit draw.

A `SeededMask` is drawn from its own generator, seeded from torch's default one (so
`torch.manual_seed` reproduces it): the training path draws it again in backward instead of
storing it between forward and backward.
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

    def draw(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> DropoutMask:
        numel = shape.numel()
        generator = torch.Generator(device=device).manual_seed(self.seed)
        words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
        # The full 64-bit range: every bit, hence each of the four 16-bit quarters, is uniform.
        words.random_(torch.iinfo(torch.int64).min, None, generator=generator)
        halves = words.view(torch.int16)[:numel].view(shape)
        keep = torch.empty(shape, dtype=dtype, device=device)
        # Comparing straight into the float mask: no boolean tensor, no cast pass.
        torch.ge(halves, keep_threshold(self.p), out=keep)
        return DropoutMask(keep, LEVELS / kept_levels(self.p))


def draw_mask(shape: torch.Size, p: float, device: torch.device, dtype: torch.dtype = torch.float32) -> DropoutMask:
    """A fresh mask keeping each element with probability `keep_probability(p)`."""
    return SeededMask.new(p).draw(shape, device, dtype)
