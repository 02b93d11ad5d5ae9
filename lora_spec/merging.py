"""Model-wide merge as one transaction, shared by the backends' `merge(model)`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Mergeable(Protocol):
    """A backend's LoRA layer: a merged flag and the two transitions."""

    @property
    def merged(self) -> bool: ...

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


def merge_all_or_none(layers: Iterable[tuple[str, Mergeable]], noun: str = "module") -> None:
    """Merge every `(path, layer)` not yet merged; if one refuses (ValueError), unmerge the
    layers merged here and raise naming the path (`noun` is the framework's word for a layer),
    so the model is never left half merged."""
    merged_now: list[Mergeable] = []
    for path, layer in layers:
        if layer.merged:
            continue
        try:
            layer.merge()
        except ValueError as error:
            for done in merged_now:
                done.unmerge()
            raise ValueError(f"{noun} {path!r}: {error}") from None
        merged_now.append(layer)
