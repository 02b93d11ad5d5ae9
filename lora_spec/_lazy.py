"""Framework imports that fail with the pip extra to install, not a bare ModuleNotFoundError."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise ImportError naming `pip install "lora-spec[extra]"`."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f'this part of lora_spec needs {module!r} ({error}): install it with pip install "lora-spec[{extra}]".'
        ) from None
