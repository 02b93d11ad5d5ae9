"""Modules to save in Keras: one trained copy per adapter, swapped through the layer's own variables.

PEFT keeps a copy of a module to save (a classification head, say) per adapter. A Keras graph
cannot swap the layer it calls, so the copies are kept as values beside the model and the active
adapter's copy is assigned into the layer's variables: those are what trains and what traced
functions read, and nothing is rebuilt. The copy currently in the variables is never duplicated:
`values()` reads it from there. The original values come back whenever no active adapter has a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import keras
import numpy as np
from keras import ops

ORIGINAL = "__original__"
_STORE_ATTRIBUTE = "_lora_spec_saved_modules"


class SavedModules:
    """The copies of a model's modules to save: `{path: {owner: {variable path: value}}}` (a module may hold
    sub-layers: all its weights are copied), and which owner's values each module's variables hold now
    (`owner` is an adapter name or `ORIGINAL`)."""

    def __init__(self) -> None:
        self.copies: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        self.current: dict[str, str] = {}

    @staticmethod
    def of(model: keras.layers.Layer) -> SavedModules:
        """The model's copies (created empty on first use)."""
        store = model.__dict__.get(_STORE_ATTRIBUTE)
        if store is None:
            store = SavedModules()
            object.__setattr__(model, _STORE_ATTRIBUTE, store)
        return store

    def owners(self, path: str) -> list[str]:
        """The adapters with a copy of the module at `path`."""
        return [owner for owner in self.copies.get(path, {}) if owner != ORIGINAL] + (
            [self.current[path]] if self.current.get(path, ORIGINAL) != ORIGINAL else []
        )

    def add(self, path: str, layer: keras.layers.Layer, adapter_name: str) -> None:
        """Give adapter `adapter_name` a copy of the module at `path`, starting from the original values."""
        copies = self.copies.setdefault(path, {})
        if path not in self.current:
            copies[ORIGINAL] = _read(layer)
            self.current[path] = ORIGINAL
        if adapter_name not in self.owners(path):
            copies[adapter_name] = {name: value.copy() for name, value in self.values(path, layer, ORIGINAL).items()}

    def remove(self, path: str, layer: keras.layers.Layer, adapter_name: str) -> None:
        """Drop adapter `adapter_name`'s copy; the original values come back if it was in the variables."""
        if self.current.get(path) == adapter_name:
            self.show(path, layer, ORIGINAL)
        self.copies.get(path, {}).pop(adapter_name, None)

    def show(self, path: str, layer: keras.layers.Layer, owner: str) -> None:
        """Put `owner`'s values into the layer's variables, keeping the values they held as their owner's copy."""
        current = self.current[path]
        if current == owner:
            return
        self.copies[path][current] = _read(layer)
        _write(layer, self.copies[path].pop(owner))
        self.current[path] = owner

    def show_active(self, layers: Mapping[str, keras.layers.Layer], active: Iterable[str]) -> None:
        """Each module shows the copy of the first active adapter that has one, else the original."""
        active = list(active)
        for path, layer in layers.items():
            if path in self.current:
                owners = self.owners(path)
                self.show(path, layer, next((name for name in active if name in owners), ORIGINAL))

    def values(self, path: str, layer: keras.layers.Layer, owner: str) -> dict[str, np.ndarray]:
        """`owner`'s values of the module at `path`, by variable path."""
        return _read(layer) if self.current.get(path) == owner else self.copies[path][owner]

    def assign(self, path: str, owner: str, variable: keras.Variable, value: np.ndarray) -> None:
        """Set one variable of `owner`'s copy of the module at `path`."""
        if self.current.get(path, ORIGINAL) == owner:
            variable.assign(value)
        else:
            self.copies[path][owner][variable.path] = np.array(value, copy=True)


def _variables(layer: keras.layers.Layer) -> dict[str, keras.Variable]:
    return {variable.path: variable for variable in layer.weights}


def _read(layer: keras.layers.Layer) -> dict[str, np.ndarray]:
    return {name: np.array(ops.convert_to_numpy(variable), copy=True) for name, variable in _variables(layer).items()}


def _write(layer: keras.layers.Layer, values: Mapping[str, np.ndarray]) -> None:
    for name, variable in _variables(layer).items():
        variable.assign(values[name])
