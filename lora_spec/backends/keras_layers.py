"""Keras 3 LoRA layers: `LoRADense`, `LoRAEinsumDense`, `LoRAEmbedding`, `LoRAConv2D`, written with `keras.ops` only.

Each is a subclass of the Keras layer it adapts, so it is a drop-in replacement and an existing
layer can become one in place (`adapt_in_place`). A layer holds named adapters (`LoRAAdapter`,
`DoRAAdapter`) and adds the updates of the active ones. Keras layouts are the transpose of the
reference's: `kernel = W.T (in, out)`, `lora_a = A.T (in, r)`, `lora_b = B.T (r, out)` (an
`EinsumDense` keeps its kernel's input and output axes unflattened). The low-rank path runs on the
activations, `(x @ lora_a) @ (s * lora_b)`, so training never builds a full-size matrix. Merging calls the
reference on the weights; the unmerged kernel is kept so that `unmerge` restores it bit for bit.

An adapter's variant is the adapter's own business: `LoRAAdapter.output` is the plain update, and
`DoRAAdapter` (`lora_spec.dora`) rescales the base output per output feature by `m / n`, with the
norm `n = ||W + s * delta||` computed from the variables each call and held constant for the
gradient. Its magnitude `m` is a variable of one value per output feature, in the reference's
order (PEFT's shape in files). PiSSA and OLoRA (`lora_spec.inits`) compute the adapter from the
base weight when it is built, the weight becoming the residual; the initial A and B stay on the
layer (`initial_lora_a`...) so that `save_adapter` can convert the adapter to LoRA of the original
base.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

from lora_spec import dora, inits, reference
from lora_spec.backends import keras_einsum
from lora_spec.backends.keras_activations import activation_of
from lora_spec.backends.keras_dora_dense import dora_dense_product, is_dense
from lora_spec.config import LoRAConfig, is_weight_init, scaling
from lora_spec.dropout import keep_probability, keep_threshold
from lora_spec.multi_adapter import DEFAULT_ADAPTER, Factors, check_adapter_name, check_routable, combine

PACKAGE = "lora_spec"
# Keras's own LoRA arguments: accepting them would stack a second, merged-on-save adapter.
_KERAS_LORA_ARGUMENTS = ("lora_rank", "lora_alpha")
_MERGED_KEY = "merged"
# The layer's LoRA arguments (`lora_config()`, JSON as bytes) beside its variables in a weights file.
_CONFIG_KEY = "lora_spec_config"

# Keras ships no types: a backend tensor (a KerasTensor, a NumPy array, a torch, TensorFlow or JAX tensor),
# and the store `save_own_variables` writes to (a dict or an HDF5 group).
Tensor = Any
VariableStore = Any
# A factor on lora_b: a float, or one value per output feature shaped by `_lora_b_view`.
Scale = Any

if TYPE_CHECKING:

    class _KerasLayer(keras.layers.Layer):
        """The mixin is always combined with the Keras layer it extends (`base_class`): the checker sees its
        attributes."""

else:
    _KerasLayer = object


def _refuse_keras_lora(kwargs: dict[str, Any], layer: str) -> None:
    for name in _KERAS_LORA_ARGUMENTS:
        if kwargs.get(name) is not None:
            raise TypeError(
                f"{layer} got Keras's own LoRA argument {name}={kwargs[name]!r}: use r= and alpha= instead."
            )
        kwargs.pop(name, None)


def _snapshot(variable: keras.Variable) -> np.ndarray:
    """A copy of the variable's value that later assigns cannot change (some backends hand out views)."""
    return np.array(ops.convert_to_numpy(variable), copy=True)


def _switch_class(layer: keras.layers.Layer, cls: type[keras.layers.Layer]) -> None:
    layer.__class__ = cls
    # Keras binds call arguments with the signature it read at construction.
    layer._call_signature = inspect.signature(layer.call)
    layer.call_signature_parameters = list(layer._call_signature.parameters)


class LoRAAdapter:
    """One adapter on one Keras layer: its variables `lora_a`, `lora_b` (Keras layout, created when the
    layer is built), its hyper-parameters and, with dropout, its seed generator. With a PiSSA or
    OLoRA init, `initial_lora_a` and `initial_lora_b` keep the A and B the init computed."""

    use_dora = False

    def __init__(
        self,
        name: str,
        r: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        checked = LoRAConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)
        self.name = check_adapter_name(name)
        assert checked.alpha is not None  # LoRAConfig defaults it to r
        self.r, self.alpha, self.dropout = checked.r, checked.alpha, checked.dropout
        self.use_rslora, self.init = checked.use_rslora, checked.init
        self.lora_a: keras.Variable | None = None
        self.lora_b: keras.Variable | None = None
        self.initial_lora_a: keras.Variable | None = None
        self.initial_lora_b: keras.Variable | None = None
        self.seed_generator: keras.random.SeedGenerator | None = None

    @property
    def scaling(self) -> float:
        """`alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
        return scaling(self.alpha, self.r, self.use_rslora)

    def _built_factors(self) -> tuple[keras.Variable, keras.Variable]:
        """`(lora_a, lora_b)`, which the layer creates when it builds the adapter."""
        assert self.lora_a is not None and self.lora_b is not None, "the layer has not built this adapter yet"
        return self.lora_a, self.lora_b

    def config(self) -> dict[str, Any]:
        """The constructor arguments of this adapter."""
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "init": self.init,
            "use_dora": self.use_dora,
        }

    def variable_name(self, half: str) -> str:
        """`lora_a`/`lora_b` for the default adapter (as files written before named adapters hold them),
        `lora_a_<name>` for others (Keras's torch backend refuses dots in variable names)."""
        return half if self.name == DEFAULT_ADAPTER else f"{half}_{self.name}"

    @property
    def trained_variables(self) -> list[keras.Variable]:
        """The variables that train while the adapter is active."""
        return [self.lora_a, self.lora_b]

    @property
    def variables(self) -> list[keras.Variable]:
        """Every variable the adapter holds on its layer."""
        initial = [variable for variable in (self.initial_lora_a, self.initial_lora_b) if variable is not None]
        return self.trained_variables + initial

    def build(self, layer: LoRALayer) -> None:
        """Create what the variant adds to `lora_a` and `lora_b`, from the adapter as initialised on `layer`."""

    def output(
        self, layer: LoRALayer, inputs: Tensor, lora_inputs: Tensor, keep_scale: float, rows: Tensor | None
    ) -> tuple[Tensor | None, Tensor]:
        """`(factor, update)`: what the adapter adds to the layer's base output for `inputs`, from the inputs of
        its low-rank path (`lora_inputs`, dropped out and to be scaled by `keep_scale`), and the per-feature
        factor it puts on the base output (None: none)."""
        return None, layer._update(self, lora_inputs, self.scaling * keep_scale, rows)


class DoRAAdapter(LoRAAdapter):
    """A DoRA adapter (`lora_spec.dora`): a LoRA adapter and its `magnitude`, one trained value per output
    feature (the reference's order), which starts at the norm of the initial adapted weight."""

    use_dora = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.magnitude: keras.Variable | None = None

    @property
    def trained_variables(self) -> list[keras.Variable]:
        return [self.lora_a, self.lora_b, self.magnitude]

    def build(self, layer: LoRALayer) -> None:
        norm = dora.init_magnitude(layer.base_weight(), *layer.lora_weights(self.name), self.scaling, layer.lora_kind)
        # Read as stored (no autocast to a half-precision compute dtype): m / n is computed in float32.
        self.magnitude = layer.add_weight(
            name=self.variable_name("lora_magnitude_vector"),
            shape=(norm.size,),
            dtype=layer._adapter_dtype,
            initializer="ones",
            autocast=False,
        )
        self.magnitude.assign(norm.reshape(-1))

    def output(
        self, layer: LoRALayer, inputs: Tensor, lora_inputs: Tensor, keep_scale: float, rows: Tensor | None
    ) -> tuple[Tensor | None, Tensor]:
        factor = layer._dora_factor(self)
        # m/n rides on lora_b, a pass over the small factor instead of the update.
        update = layer._update(self, lora_inputs, layer._lora_b_view(factor * (self.scaling * keep_scale)), rows)
        if lora_inputs is inputs:
            return layer._feature_view(factor), update
        # With dropout, the rescaled base product is that of the dropped-out inputs (PEFT's, the reference's).
        base_factor = layer._feature_view((factor - 1) * keep_scale)
        return None, ops.add(ops.multiply(layer._base_product(lora_inputs), base_factor), update)


def new_adapter(
    name: str,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    use_dora: bool = False,
) -> LoRAAdapter:
    """A `DoRAAdapter` with `use_dora`, else a `LoRAAdapter`."""
    if not isinstance(use_dora, bool):
        raise ValueError(f"use_dora={use_dora!r} is invalid: use True or False.")
    return (DoRAAdapter if use_dora else LoRAAdapter)(name, r, alpha, dropout, use_rslora, init)


def _single(attribute: str) -> property:
    """A layer attribute that is the one active adapter's (as when a layer held one adapter)."""

    def read(layer: LoRALayer) -> Any:
        return getattr(layer.adapter(), attribute)

    def write(layer: LoRALayer, value: Any) -> None:
        setattr(layer.adapter(), attribute, value)

    return property(read, write, doc=f"The `{attribute}` of the layer's one active adapter.")


class LoRALayer(_KerasLayer):
    """What the LoRA layers share: named adapters, which are active, dropout, merge state, routing, saving.

    A subclass names the Keras layer it extends (`base_class`), the variable LoRA updates
    (`_base_weight`), the update's formula in the reference (`lora_kind`), how its base weight
    maps to the reference layout, and how one adapter's update is computed (`_update`).
    """

    base_class: type[keras.layers.Layer]
    lora_kind = "linear"
    # False while Keras builds the layer from a config (`build_from_config`).
    _decomposes = True

    r = _single("r")
    alpha = _single("alpha")
    dropout = _single("dropout")
    use_rslora = _single("use_rslora")
    init = _single("init")
    use_dora = _single("use_dora")
    scaling = _single("scaling")
    lora_a = _single("lora_a")
    lora_b = _single("lora_b")
    seed_generator = _single("seed_generator")

    # -- construction -------------------------------------------------------------------------

    def _set_lora(
        self,
        r: int,
        alpha: float | None,
        dropout: float,
        use_rslora: bool,
        init: str,
        use_dora: bool,
        train_bias: bool,
        adapters: dict[str, dict[str, Any]] | None = None,
        active_adapters: list[str] | None = None,
    ) -> None:
        if not isinstance(train_bias, bool):
            raise ValueError(f"train_bias={train_bias!r} is invalid: use True or False.")
        arguments = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, use_dora=use_dora)
        specs = adapters if adapters else {DEFAULT_ADAPTER: arguments}
        self.train_bias = train_bias
        self._lora_adapters = {name: new_adapter(name, **spec) for name, spec in specs.items()}
        self.active_adapters = list(active_adapters) if active_adapters is not None else [next(iter(specs))]
        self.merged_adapters: list[str] = []
        self.adapter_enabled = True
        self._unmerged_weight: np.ndarray | None = None
        self._routes: tuple[Tensor, dict[str, int]] | None = None
        for adapter in self._lora_adapters.values():
            if adapter.dropout:
                adapter.seed_generator = keras.random.SeedGenerator()

    @classmethod
    def adapt_in_place(
        cls,
        layer: keras.layers.Layer,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        train_bias: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        """Turn a built `base_class` layer into this LoRA layer holding adapter `adapter_name`, keeping the
        object and its weights.

        Functional graphs, parents and optimisers keep pointing at the same layer, which is why
        `apply` converts in place instead of rebuilding the model.
        """
        cls.check_adaptable(layer, r, init, use_dora)
        _switch_class(layer, cls)
        layer._tracker.unlock()
        try:
            spec = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, use_dora=use_dora)
            layer._set_lora(**spec, train_bias=train_bias, adapters={adapter_name: spec})
            layer._build_lora()
        finally:
            layer._tracker.lock()

    @classmethod
    def restore_in_place(cls, layer: keras.layers.Layer, lora_config: dict[str, Any]) -> None:
        """Turn a built `base_class` layer back into the LoRA layer whose variables a file holds, with the
        adapters of its `lora_config()`; loading the variables comes next (as `adapt_in_place`, unchecked: the
        layer was valid when saved)."""
        _switch_class(layer, cls)
        layer._tracker.unlock()
        try:
            layer._set_lora(**lora_config)
            layer._build_lora(decompose=False)
        finally:
            layer._tracker.lock()

    @classmethod
    def check_adaptable(
        cls, layer: keras.layers.Layer, r: int | None = None, init: str = "kaiming", use_dora: bool = False
    ) -> None:
        """Raise the reason `adapt_in_place` would refuse `layer` (with an adapter of rank `r`, `init` and
        `use_dora`), before anything changes."""
        if type(layer) is not cls.base_class:
            raise TypeError(
                f"{cls.__name__} adapts a keras.layers.{cls.base_class.__name__}, not a {type(layer).__name__}."
            )
        if not layer.built:
            raise ValueError(
                f"layer {layer.name!r} is not built: build the model (model.build(input_shape) "
                "or call it on a batch) before adding LoRA."
            )
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"layer {layer.name!r} has Keras's own LoRA enabled: rebuild it without "
                "enable_lora/lora_rank before adding lora_spec's adapter."
            )
        if layer.quantization_mode is not None:
            raise ValueError(
                f"layer {layer.name!r} is quantized ({layer.quantization_mode}): add LoRA to the float model."
            )
        if not keras.backend.is_float_dtype(layer.variable_dtype):
            # Checked before the layer changes class: PiSSA/OLoRA would refuse the weight halfway through.
            raise ValueError(
                f"layer {layer.name!r} holds {layer.variable_dtype} weights: LoRA, DoRA and their inits adapt "
                "floating-point layers; add LoRA to the float model (quantise afterwards)."
            )
        if r is not None:
            cls.check_adapter(layer, r, init, use_dora)

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
    ) -> LoRAAdapter:
        """Add an inactive adapter called `name` to this built layer, initialised as `init` says."""
        if name in self._lora_adapters:
            raise ValueError(
                f"layer {self.name!r} already has an adapter {name!r}: delete it first or choose another name."
            )
        self.check_new_adapter(name, r, init, use_dora)
        adapter = new_adapter(name, r, alpha, dropout, use_rslora, init, use_dora)
        self._tracker.unlock()
        try:
            if adapter.dropout:
                adapter.seed_generator = keras.random.SeedGenerator()
            self._lora_adapters[name] = adapter
            self._build_adapter(adapter)
        finally:
            self._tracker.lock()
        return adapter

    def delete_adapter(self, name: str) -> None:
        """Remove the (unmerged) adapter `name`, its variables and its name from the active ones."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into layer {self.name!r}: unmerge before deleting it.")
        adapter = self._lora_adapters.pop(name)
        for variable in adapter.variables:
            self._untrack_variable(variable)
        if adapter.seed_generator is not None:
            self._tracker.untrack(adapter.seed_generator)
        self.active_adapters = [active for active in self.active_adapters if active != name]

    @property
    def adapters(self) -> dict[str, LoRAAdapter]:
        """The layer's adapters by name, in the order they were added."""
        return dict(self._lora_adapters)

    def adapter(self, name: str | None = None) -> LoRAAdapter:
        """The adapter called `name`, or, by default, the one active adapter of this layer."""
        if name is not None:
            return self._lora_adapters[name]
        active = [active for active in self.active_adapters if active in self._lora_adapters]
        if len(active) != 1:
            raise ValueError(
                f"layer {self.name!r} has {len(active)} active adapters ({', '.join(active) or 'none'}) "
                f"of {', '.join(self._lora_adapters) or 'none'}: name one, layer.adapter(name)."
            )
        return self._lora_adapters[active[0]]

    def set_active_adapters(self, names: list[str]) -> None:
        """Run (and train) the adapters `names` that this layer holds; the others are frozen."""
        self.active_adapters = list(names)
        self._freeze_base()

    def unload(self) -> keras.layers.Layer:
        """Drop the adapters and turn back, in place, into a plain `base_class` layer with the base weights
        (the residual of a PiSSA or OLoRA init, as in PEFT)."""
        self.unmerge()
        return self._to_base_class()

    def merge_and_unload(self) -> keras.layers.Layer:
        """Merge the active adapters for good and turn back, in place, into a plain `base_class` layer."""
        self.merge()
        self._unmerged_weight, self.merged_adapters = None, []
        return self._to_base_class()

    def _to_base_class(self) -> keras.layers.Layer:
        for name in list(self._lora_adapters):
            self.delete_adapter(name)
        for name in (
            "train_bias",
            "_lora_adapters",
            "active_adapters",
            "merged_adapters",
            "adapter_enabled",
            "_unmerged_weight",
            "_routes",
        ):
            self.__dict__.pop(name, None)
        # Trainability stays as it was (base weight frozen), as PEFT leaves requires_grad.
        _switch_class(self, self.base_class)
        return self

    @classmethod
    def from_layer(cls, layer: keras.layers.Layer, config: LoRAConfig | None = None) -> LoRALayer:
        """A new LoRA layer with `layer`'s configuration and a copy of its weights (`layer` is untouched).

        Rank and alpha come from `config` (default `LoRAConfig()`) for the layer's name, after
        `rank_pattern` and `alpha_pattern`.
        """
        config = config if config is not None else LoRAConfig()
        arguments = lora_arguments(config, layer.name)
        cls.check_adaptable(layer, arguments["r"], arguments["init"], arguments["use_dora"])
        base_config = {k: v for k, v in layer.get_config().items() if k not in _KERAS_LORA_ARGUMENTS}
        copy = cls.base_class.from_config(base_config)
        copy.build_from_config(layer.get_build_config())
        for variable, source in zip(copy.weights, layer.weights, strict=True):
            variable.assign(source)
        # Adapted in place once it holds the weights: DoRA and PiSSA/OLoRA start from them.
        cls.adapt_in_place(copy, **arguments)
        return copy

    @classmethod
    def check_adapter(cls, layer: keras.layers.Layer, r: int, init: str = "kaiming", use_dora: bool = False) -> None:
        """Raise when an adapter of rank `r`, `init` and `use_dora` does not fit `layer` (a layer of `base_class`
        or of this class): PiSSA and OLoRA initialise linear layers (`Dense`, `EinsumDense`) of at least `r`
        directions, as in PEFT."""
        if not is_weight_init(init):
            return
        if cls.lora_kind != "linear":
            raise ValueError(
                f"init={init!r} initialises linear layers (Dense, EinsumDense) only, as PEFT's does, and "
                f"layer {layer.name!r} is a {cls.base_class.__name__}: leave it out of target_modules or "
                "use init='kaiming'."
            )
        (_, in_features), (out_features, _) = cls.reference_shapes(layer, r)
        if not isinstance(r, int) or r > min(in_features, out_features):
            raise ValueError(
                f"rank r={r!r} does not fit init={init!r} of layer {layer.name!r}, whose weight is "
                f"{out_features}x{in_features}: use r <= {min(in_features, out_features)}."
            )

    def check_new_adapter(self, name: str | None, r: int, init: str = "kaiming", use_dora: bool = False) -> None:
        """Raise when this layer cannot take a new adapter `name` (None: any) of rank `r`, `init` and `use_dora`
        beside the adapters it holds: a PiSSA or OLoRA init makes the base weight the residual of its own
        adapter, which no other adapter of the layer was trained on (PEFT warns about it)."""
        type(self).check_adapter(self, r, init, use_dora)
        others = [adapter for adapter in self._lora_adapters.values() if adapter.name != name]
        weight_init = next((held for held in [init] + [other.init for other in others] if is_weight_init(held)), None)
        if others and weight_init is not None:
            names = ", ".join(
                ["the new adapter" if name is None else repr(name)] + [repr(other.name) for other in others]
            )
            raise ValueError(
                f"layer {self.name!r} would hold adapters {names}, one with init={weight_init!r}: PiSSA "
                "and OLoRA make the base weight the residual of their own adapter, which other adapters "
                "were not trained on (PEFT warns about it); put them on other layers, or use "
                "init='kaiming'."
            )

    def build(self, input_shape: tuple[int | None, ...] | None = None) -> None:
        super().build(input_shape)
        self._build_lora()

    def build_from_config(self, config: dict[str, Any]) -> None:
        # Keras builds from a config to load a file or to rebuild a model from its config: the base weight is
        # new, so PiSSA/OLoRA would decompose a random weight (minutes for a large model) that loading then
        # overwrites (`_build_lora(decompose=False)`).
        self._decomposes = False
        try:
            super().build_from_config(config)
        finally:
            self._decomposes = True

    def _build_lora(self, decompose: bool | None = None) -> None:
        """Create the variables of the adapters that have none; `decompose` (default: unless building from a
        config) runs PiSSA/OLoRA on the base weight, else they start as the default init, the base untouched."""
        decompose = self._decomposes if decompose is None else decompose
        for adapter in self._lora_adapters.values():
            if adapter.lora_a is None:
                self._build_adapter(adapter, decompose)
        self._freeze_base()

    @property
    def _adapter_dtype(self) -> str:
        # At least float32 whatever the policy: half-precision updates of A and B would underflow.
        return "float64" if self.variable_dtype == "float64" else "float32"

    def _build_adapter(self, adapter: LoRAAdapter, decompose: bool = True) -> None:
        a_shape, b_shape = self._lora_shapes(adapter.r)
        # A maps everything but its last axis (the rank) to the rank: that is its fan-in.
        fan_in = math.prod(a_shape[:-1])
        dtype = self._adapter_dtype
        adapter.lora_a = self.add_weight(
            name=adapter.variable_name("lora_a"),
            shape=a_shape,
            dtype=dtype,
            initializer=self._lora_a_initializer(adapter, fan_in),
        )
        adapter.lora_b = self.add_weight(
            name=adapter.variable_name("lora_b"), shape=b_shape, dtype=dtype, initializer=self._lora_b_initializer()
        )
        if is_weight_init(adapter.init):
            self._initialise_from_weight(adapter, decompose)
        adapter.build(self)
        self._freeze_base()

    def _initialise_from_weight(self, adapter: LoRAAdapter, decompose: bool = True) -> None:
        """PiSSA or OLoRA: A and B from the base weight, which becomes the residual; the initial A and B are kept
        (not trained) for `save_adapter`'s conversion to LoRA of the original base. Without `decompose`, only
        the variables a file fills (the initial A and B zero: with the base untouched, the conversion holds)."""
        if decompose:
            weight = self.base_weight()
            # PEFT's randomized SVD draws from torch's global generator; this one from NumPy's, which
            # keras.utils.set_random_seed seeds.
            start = inits.init_from_weight(
                weight, adapter.init, adapter.r, adapter.scaling, rng=np.random.default_rng(np.random.randint(2**31))
            )
            self._base_weight.assign(self._from_reference(start.residual, tuple(self._base_weight.shape)))
            self.set_lora_weights(start.lora_a, start.lora_b, adapter.name)
        adapter.initial_lora_a, adapter.initial_lora_b = (
            self.add_weight(
                name=f"initial_{adapter.variable_name(half)}",
                shape=variable.shape,
                dtype=variable.dtype,
                initializer="zeros",
                trainable=False,
            )
            for half, variable in zip(("lora_a", "lora_b"), adapter._built_factors(), strict=True)
        )
        if decompose:
            adapter.initial_lora_a.assign(adapter.lora_a)
            adapter.initial_lora_b.assign(adapter.lora_b)

    def _freeze_base(self) -> None:
        """The base weight never trains, the bias only with `train_bias`, and only active adapters train."""
        self._base_weight.trainable = False
        bias = getattr(self, "bias", None)
        if bias is not None:
            bias.trainable = self.trainable and self.train_bias
        for name, adapter in self._lora_adapters.items():
            for variable in adapter.trained_variables:
                if variable is not None:
                    variable.trainable = self.trainable and name in self.active_adapters

    def _lora_a_initializer(self, adapter: LoRAAdapter, fan_in: int) -> keras.initializers.Initializer:
        if adapter.init == "gaussian":
            return keras.initializers.RandomNormal(stddev=1.0 / adapter.r)
        bound = 1.0 / math.sqrt(fan_in)
        return keras.initializers.RandomUniform(-bound, bound)

    def _lora_b_initializer(self) -> keras.initializers.Initializer:
        return keras.initializers.Zeros()

    # -- Keras conventions --------------------------------------------------------------------

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        # The active adapters train; the base weight never does (and the bias only with train_bias).
        keras.layers.Layer.trainable.fset(self, value)
        if getattr(self, "_lora_adapters", None):
            self._freeze_base()

    def lora_config(self) -> dict[str, Any]:
        """The LoRA arguments of the constructor: the first adapter's, plus every adapter and the active
        ones when the layer holds more than the default adapter."""
        first = next(iter(self._lora_adapters.values()))
        config = {**first.config(), "train_bias": self.train_bias}
        if list(self._lora_adapters) != [DEFAULT_ADAPTER] or self.active_adapters != [DEFAULT_ADAPTER]:
            config["adapters"] = {name: adapter.config() for name, adapter in self._lora_adapters.items()}
            config["active_adapters"] = list(self.active_adapters)
        return config

    def get_config(self) -> dict[str, Any]:
        config = {k: v for k, v in super().get_config().items() if k not in _KERAS_LORA_ARGUMENTS}
        return {**config, **self.lora_config()}

    def _own_weights(self) -> dict[str, keras.Variable]:
        return {variable.name: variable for variable in self._trainable_variables + self._non_trainable_variables}

    def save_own_variables(self, store: VariableStore) -> None:
        """Saves the unmerged base weight and the adapters separately, with the merge state."""
        if not self.built:
            return
        for name, variable in self._own_weights().items():
            merged_base = self.merged and variable is self._base_weight
            store[name] = self._unmerged_weight if merged_base else _snapshot(variable)
        store[_MERGED_KEY] = np.array(int(self.merged))
        # A parent that creates this layer in its own build (MultiHeadAttention, KerasHub's attention and MLP
        # blocks) rebuilds it on load as the plain Keras layer, from its own config: the LoRA arguments let that
        # layer turn back into this one (`_restoring_lora`).
        store[_CONFIG_KEY] = np.frombuffer(json.dumps(self.lora_config()).encode(), np.uint8)

    def load_own_variables(self, store: VariableStore) -> None:
        if not self.built:
            return
        weights = self._own_weights()
        stored = sorted(set(store.keys()) - {_MERGED_KEY, _CONFIG_KEY})
        if not stored:
            # Keras keys a weights file by layer class, so a LoRA layer finds nothing in a file
            # saved before LoRA was added.
            raise ValueError(
                f"the file has no weights for LoRA layer {self.name!r}: it was saved without LoRA; "
                "load base weights before lora_spec.keras.apply, and adapters with load_adapter."
            )
        if stored != sorted(weights):
            raise ValueError(
                f"layer {self.name!r} holds variables {sorted(weights)} but the file has {stored}: "
                "load the file into the model that saved it."
            )
        for name, variable in weights.items():
            variable.assign(store[name])
        self.merged_adapters, self._unmerged_weight = [], None
        if _MERGED_KEY in store and int(np.asarray(store[_MERGED_KEY])):
            self.merge()

    # -- the adapters in the reference layout ---------------------------------------------------

    def lora_weights(self, adapter_name: str | None = None, initial: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`(A, B)` of an adapter (default: the one active) in the reference layout (`A (r, in)`, `B (out, r)`;
        a conv's are 4-D), as NumPy arrays; with `initial`, those its PiSSA or OLoRA init computed."""
        adapter = self.adapter(adapter_name)
        halves = (adapter.initial_lora_a, adapter.initial_lora_b) if initial else (adapter.lora_a, adapter.lora_b)
        if halves[0] is None:
            raise ValueError(
                f"adapter {adapter.name!r} of layer {self.name!r} has init={adapter.init!r}, which does "
                "not compute A and B from the base weight: it has no initial A and B."
            )
        lora_a, lora_b = self._factors_to_reference(adapter, *map(_snapshot, halves))
        # Contiguous, so NumPy's products sum in the same order as on arrays built in this layout.
        return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)

    def lora_magnitude(self, adapter_name: str | None = None) -> np.ndarray | None:
        """The DoRA magnitude of an adapter (default: the one active) in PEFT's shape (`lora_spec.dora`), or None
        for a plain LoRA adapter."""
        adapter = self.adapter(adapter_name)
        if not isinstance(adapter, DoRAAdapter):
            return None
        magnitude = _snapshot(adapter.magnitude)
        return magnitude.reshape(dora.magnitude_shape(self.lora_kind, magnitude.size))

    def set_lora_weights(
        self,
        lora_a: np.ndarray,
        lora_b: np.ndarray,
        adapter_name: str | None = None,
        magnitude: np.ndarray | None = None,
    ) -> None:
        """Assign an adapter's (default: the one active) `A` and `B` given in the reference layout, and a DoRA
        adapter's magnitude in PEFT's shape (None: kept)."""
        adapter = self.adapter(adapter_name)
        for half, value, expected in zip("AB", (lora_a, lora_b), self.reference_shapes(self, adapter.r), strict=True):
            if tuple(np.shape(value)) != expected:
                raise ValueError(
                    f"LoRA {half} for layer {self.name!r} has shape {tuple(np.shape(value))}, but the "
                    f"layer needs {expected}: the adapter was trained for another rank or shape."
                )
        if magnitude is not None:
            self._check_magnitude(adapter, magnitude)
        lora_a, lora_b = self._factors_from_reference(adapter, np.asarray(lora_a), np.asarray(lora_b))
        variable_a, variable_b = adapter._built_factors()
        variable_a.assign(lora_a.astype(variable_a.dtype))
        variable_b.assign(lora_b.astype(variable_b.dtype))
        if magnitude is not None:
            # _check_magnitude refused a magnitude for a plain LoRA adapter.
            assert isinstance(adapter, DoRAAdapter) and adapter.magnitude is not None
            adapter.magnitude.assign(np.asarray(magnitude, adapter.magnitude.dtype).reshape(-1))

    def _check_magnitude(self, adapter: LoRAAdapter, magnitude: np.ndarray) -> None:
        if not adapter.use_dora:
            raise ValueError(
                f"adapter {adapter.name!r} of layer {self.name!r} is not a DoRA adapter, so it has no "
                "magnitude: apply it with use_dora=True."
            )
        features = self.reference_shapes(self, adapter.r)[1][0]
        expected = dora.magnitude_shape(self.lora_kind, features)
        if tuple(np.shape(magnitude)) != expected:
            raise ValueError(
                f"DoRA magnitude for layer {self.name!r} has shape {tuple(np.shape(magnitude))}, but the "
                f"layer has {features} output features, so PEFT's shape is {expected}: the magnitude "
                "belongs to another layer."
            )

    def base_weight(self) -> np.ndarray:
        """The unmerged base weight in the reference layout (`W (out, in)`; an embedding's table)."""
        if not self.merged:
            return self._to_reference(_snapshot(self._base_weight))
        assert self._unmerged_weight is not None  # merge keeps it beside the merged adapters' names
        return self._to_reference(self._unmerged_weight.copy())

    @property
    def merged(self) -> bool:
        """Whether adapters are merged into the base weight."""
        return bool(self.merged_adapters)

    def merge(self) -> None:
        """Add the active adapters' `delta_W` to the base weight (no-op if merged or none is active); the call
        then skips the low-rank paths.

        A model traced before merging (`tf.function`, `model.predict`) must be traced again:
        `lora_spec.keras.merge(model)` resets the model's compiled functions.
        """
        names = [name for name in self.active_adapters if name in self._lora_adapters]
        if self.merged or not names:
            return
        unmerged = _snapshot(self._base_weight)
        factors = [Factors(*self.lora_weights(name), self._lora_adapters[name].scaling) for name in names]
        magnitudes = [self.lora_magnitude(name) for name in names]
        weight = np.ascontiguousarray(self._to_reference(unmerged))
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # a diverged adapter is reported below
            if any(magnitude is not None for magnitude in magnitudes):
                merged = dora.merge_adapters(weight, factors, magnitudes, self.lora_kind)
            else:
                # One adapter standing for their sum (the reference's exact "cat"), merged once in float32.
                lora_a, lora_b = combine(factors, [1.0] * len(factors), "cat") if len(factors) > 1 else factors[0][:2]
                scale = 1.0 if len(factors) > 1 else factors[0].s
                merged = reference.merge(weight, lora_a, lora_b, scale, self.lora_kind)
        if not np.all(np.isfinite(merged)):
            raise ValueError("the merged weight would hold NaN or inf: the adapter diverged; nothing was merged.")
        self._base_weight.assign(self._from_reference(merged, unmerged.shape))
        self._unmerged_weight, self.merged_adapters = unmerged, names

    def unmerge(self) -> None:
        """Restore the base weight saved by `merge`, bit for bit (no-op if not merged)."""
        if not self.merged:
            return
        self._base_weight.assign(self._unmerged_weight)
        self._unmerged_weight, self.merged_adapters = None, []

    # -- forward ------------------------------------------------------------------------------

    def route(self, route_ids: Tensor | None, adapter_indices: dict[str, int] | None = None) -> None:
        """Send row `i` of the next batches through the adapter whose index (in `adapter_indices`) is
        `route_ids[i]` (an int tensor; any other index: the base alone); None ends routing. A tensor
        given inside a traced function stays data of that function. DoRA adapters are refused, as in PEFT."""
        if route_ids is None:
            self._routes = None
            return
        if adapter_indices is None:
            raise ValueError(
                "route() got route_ids without adapter_indices: give the index of each adapter name, "
                "e.g. {'default': 0}."
            )
        self.check_routable(adapter_indices)
        self._routes = (route_ids, dict(adapter_indices))

    def check_routable(self, names: Iterable[str]) -> None:
        """Raise when one of the adapters `names` that this layer holds cannot take part in a routed batch."""
        for name in names:
            if name in self._lora_adapters:
                check_routable(name, self._lora_adapters[name].use_dora)

    def _running(self, inputs: Tensor, training: bool | None) -> list[tuple[LoRAAdapter, Any]]:
        """`(adapter, row mask or None)` for every adapter whose update the call adds."""
        if not self.adapter_enabled or self.merged:
            return []
        if self._routes is None:
            return [(self._lora_adapters[name], None) for name in self.active_adapters if name in self._lora_adapters]
        if training:
            raise ValueError("routed batches are for inference: call the model with training=False.")
        route_ids, indices = self._routes
        rows, routed_rows = ops.shape(inputs)[0], ops.shape(route_ids)[0]
        if isinstance(rows, int) and isinstance(routed_rows, int) and rows != routed_rows:
            raise ValueError(
                f"the routing names {routed_rows} adapters, one per row, but this batch has {rows} rows: "
                "give routed() one adapter per row of the batch."
            )
        return [
            (adapter, ops.equal(route_ids, indices[name]))
            for name, adapter in self._lora_adapters.items()
            if name in indices
        ]

    def _lora_update(
        self, inputs: Tensor, training: bool | None, dropout_mask: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """`(factor, update)`: the sum of the running adapters' updates (None when none runs), and the factor per
        output feature that DoRA adapters put on the base output (None when none does): `1 + sum(m/n - 1)`."""
        factor = total = None
        for adapter, rows in self._running(inputs, training):
            lora_inputs, keep_scale = self._lora_inputs(adapter, inputs, training, dropout_mask)
            base_factor, update = adapter.output(self, inputs, lora_inputs, keep_scale, rows)
            total = update if total is None else ops.add(total, update)
            if base_factor is not None:
                factor = base_factor if factor is None else ops.add(factor, base_factor - 1)
        return factor, total

    @staticmethod
    def _updated(outputs: Tensor, factor: Tensor | None, update: Tensor | None) -> Tensor:
        """`outputs * factor + update`, leaving out what is None."""
        if factor is not None:
            outputs = ops.multiply(outputs, factor)
        return outputs if update is None else ops.add(outputs, update)

    def _dora_factor(self, adapter: DoRAAdapter) -> Tensor:
        """`m / n` per output feature (the reference's order) in the compute dtype; the norm is a constant for
        the gradient (the DoRA paper's section 4.3, PEFT's `detach`)."""
        factor = ops.divide(adapter.magnitude, ops.stop_gradient(self._weight_norm(adapter)))
        return ops.cast(factor, self.compute_dtype)

    def _weight_norm(self, adapter: LoRAAdapter) -> Tensor:
        """`||W + s * delta||` per output feature (the reference's order), from the variables, in at least float32.

        Under a mixed policy the kernel is read as the layer computes with it, in the compute dtype."""
        dtype = self._adapter_dtype
        # The scaling rides on lora_a: a pass over the small factor instead of the full-size product.
        lora_a, lora_b = ops.cast(adapter.lora_a, dtype), ops.cast(adapter.lora_b, dtype)
        delta = self._delta(ops.multiply(lora_a, adapter.scaling), lora_b)
        return ops.sqrt(self._feature_sums(ops.square(ops.add(ops.cast(self._base_weight, dtype), delta))))

    def _update(self, adapter: LoRAAdapter, lora_inputs: Tensor, scale: Scale, rows: Tensor | None) -> Tensor:
        """One adapter's update for its (dropped-out) inputs, with `lora_b` times `scale` (a float, or one value
        per output feature shaped by `_lora_b_view`); `rows` (a boolean per batch row, or None) keeps the rows
        routed to it."""
        raise NotImplementedError

    @staticmethod
    def _masked(hidden: Tensor, rows: Tensor | None) -> Tensor:
        """`hidden` with the rows not routed to the adapter zeroed (rows lie on the first axis)."""
        if rows is None:
            return hidden
        mask = ops.cast(rows, hidden.dtype)
        return hidden * ops.reshape(mask, (-1,) + (1,) * (len(hidden.shape) - 1))

    def _activate(self, outputs: Tensor, training: bool | None) -> Tensor:
        activation = activation_of(self, training)
        return outputs if activation is None else activation(outputs)

    def _lora_inputs(
        self, adapter: LoRAAdapter, inputs: Tensor, training: bool | None, dropout_mask: Tensor | None
    ) -> tuple[Tensor, float]:
        """The input of an adapter's low-rank path (`inputs` itself when nothing is dropped) and the factor on its
        output, which takes the dropout scaling (`1 / keep probability`) so that no pass over the inputs is spent
        on it: masked explicitly, by a drawn dropout mask when training, or as is."""
        if dropout_mask is not None:
            return inputs * ops.cast(dropout_mask, inputs.dtype), 1.0
        if training and adapter.dropout:
            kept = ops.where(self._keep(adapter, inputs), inputs, ops.zeros((), inputs.dtype))
            return kept, 1 / keep_probability(adapter.dropout)
        return inputs, 1.0

    @staticmethod
    def _keep(adapter: LoRAAdapter, inputs: Tensor) -> Tensor:
        """Which inputs dropout keeps, from 16-bit draws (`lora_spec.dropout`), two per 32-bit word:
        drawing half as many random numbers as exact Bernoulli dropout is what makes it cheap."""
        *leading, features = ops.shape(inputs)
        words = keras.random.randint(
            (*leading, (features + 1) // 2), -(1 << 31), (1 << 31) - 1, dtype="int32", seed=adapter.seed_generator
        )
        halves = ops.view(words, "int16")
        if not isinstance(features, int) or features % 2:  # only an odd width drew one half too many
            halves = halves[..., :features]
        return ops.greater_equal(halves, keep_threshold(adapter.dropout))

    def _compute(self, variable: keras.Variable) -> Tensor:
        return ops.cast(variable, self.compute_dtype)

    # -- per layer ----------------------------------------------------------------------------

    @property
    def _base_weight(self) -> keras.Variable:
        return self._kernel

    def _lora_dims(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Input and output dimensions of the update: `lora_a` is `(*input, r)`, `lora_b` `(r, *output)`."""
        raise NotImplementedError

    def _base_product(self, inputs: Tensor) -> Tensor:
        """The base weight applied to `inputs`, without the bias."""
        raise NotImplementedError

    def _delta(self, lora_a: Tensor, lora_b: Tensor) -> Tensor:
        """`lora_a` times `lora_b` in the base weight's layout (the update without its scaling)."""
        return ops.matmul(lora_a, lora_b)

    def _feature_sums(self, value: Tensor) -> Tensor:
        """A tensor of the base weight's layout summed per output feature, flat in the reference's order."""
        return ops.sum(value, axis=tuple(range(len(value.shape) - 1)))

    def _feature_view(self, vector: Tensor) -> Tensor:
        """A vector over the output features (the reference's order) shaped to broadcast against the output."""
        return vector

    def _lora_b_view(self, vector: Tensor) -> Tensor:
        """A vector over the output features (the reference's order) shaped to broadcast against `lora_b`."""
        return vector

    @classmethod
    def reference_shapes(cls, layer: keras.layers.Layer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of `A` and `B` (reference layout) of a rank-`r` adapter on `layer`, a layer of
        `base_class` or of this class."""
        input_dims, output_dims = cls._lora_dims(layer)
        return (r, math.prod(input_dims)), (math.prod(output_dims), r)

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of a rank-`r` adapter's `lora_a` and `lora_b` variables."""
        input_dims, output_dims = self._lora_dims()
        return (*input_dims, r), (r, *output_dims)

    def _factors_to_reference(
        self, adapter: LoRAAdapter, lora_a: np.ndarray, lora_b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return lora_a.reshape(-1, adapter.r).T, lora_b.reshape(adapter.r, -1).T

    def _factors_from_reference(
        self, adapter: LoRAAdapter, lora_a: np.ndarray, lora_b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        variable_a, variable_b = adapter._built_factors()
        return lora_a.T.reshape(variable_a.shape), lora_b.T.reshape(variable_b.shape)

    def _to_reference(self, value: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _from_reference(self, weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError


def adapter_arguments(config: LoRAConfig, module_path: str) -> dict[str, Any]:
    """One adapter's arguments for the module at `module_path` under `config` (after its patterns)."""
    return {
        "r": config.rank_for(module_path),
        "alpha": config.alpha_for(module_path),
        "dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "init": config.init,
        "use_dora": config.use_dora,
    }


def lora_arguments(config: LoRAConfig, module_path: str, train_bias: bool = False) -> dict[str, Any]:
    """The LoRA layer arguments for the module at `module_path` under `config` (after its patterns)."""
    return {**adapter_arguments(config, module_path), "train_bias": train_bias}


@keras.saving.register_keras_serializable(package=PACKAGE)
class LoRADense(LoRALayer, keras.layers.Dense):
    """`keras.layers.Dense` with a LoRA adapter: `y = activation(x @ kernel + bias + s * ((x @ lora_a) @ lora_b))`;
    with DoRA, `y = activation((m/n) * (x @ kernel + s * ((x @ lora_a) @ lora_b)) + bias)` without dropout.

    Args:
        units: as `Dense`.
        r: the adapter's rank, as `lora_spec.LoRAConfig`.
        alpha: the adapter's scaling numerator, as `lora_spec.LoRAConfig`.
        dropout: the adapter's dropout probability, as `lora_spec.LoRAConfig`.
        use_rslora: scale by `alpha / sqrt(r)`, as `lora_spec.LoRAConfig`.
        init: the adapter's initialisation, as `lora_spec.LoRAConfig`.
        use_dora: a DoRA adapter, as `lora_spec.LoRAConfig`.
        train_bias: whether the bias trains with the adapter (PEFT's `bias="lora_only"`).
        adapters: named adapters, `{name: {"r": ..., "alpha": ..., ...}}`, instead of one called
            "default" made of the arguments above (what `get_config` writes for several).
        active_adapters: the names that run (default: the first adapter).
        **dense_kwargs: every other `Dense` argument (activation, use_bias, initializers, regularizers,
            constraints, dtype, name...).

    `call(inputs, training=None, dropout_mask=None)`: `dropout_mask` (0 or `1/(1-p)` per input
    element) replaces random dropout, to compare with the reference element for element.
    """

    base_class = keras.layers.Dense

    def __init__(
        self,
        units: int,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        train_bias: bool = False,
        adapters: dict[str, dict[str, Any]] | None = None,
        active_adapters: list[str] | None = None,
        **dense_kwargs: Any,
    ):
        _refuse_keras_lora(dense_kwargs, "LoRADense")
        super().__init__(units, **dense_kwargs)
        self._set_lora(r, alpha, dropout, use_rslora, init, use_dora, train_bias, adapters, active_adapters)

    @classmethod
    def from_dense(cls, dense: keras.layers.Dense, config: LoRAConfig | None = None) -> LoRADense:
        """A `LoRADense` with `dense`'s arguments and weights and a fresh adapter from `config`."""
        return cls.from_layer(dense, config)

    def call(self, inputs: Tensor, training: bool | None = None, dropout_mask: Tensor | None = None) -> Tensor:
        adapter = self._merged_dora(inputs, training, dropout_mask)
        if adapter is not None:
            return self._activate(self._biased(self._merged_dora_product(inputs, adapter)), training)
        outputs = self._base_product(inputs)
        factor, low_rank = self._lora_update(inputs, training, dropout_mask)
        if low_rank is None:
            return self._activate(self._biased(outputs), training)
        # The bias rides on the low-rank product: one full-size pass fewer than on the base output.
        return self._activate(self._updated(outputs, factor, self._biased(low_rank)), training)

    def _merged_dora(self, inputs: Tensor, training: bool | None, dropout_mask: Tensor | None) -> DoRAAdapter | None:
        """The adapter when the call is `keras_dora_dense`'s case, else None: training on TensorFlow without
        dropout, dense inputs, one DoRA adapter running on every row, the kernel frozen, one float32 or float64 dtype.
        Inference keeps the general path, and so every export its graph."""
        if not training or keras.backend.backend() != "tensorflow" or dropout_mask is not None:
            return None
        if not is_dense(inputs):
            return None
        if self._base_weight.trainable:
            return None
        if self.compute_dtype != self.variable_dtype or self.compute_dtype not in ("float32", "float64"):
            return None
        running = self._running(inputs, training)
        if len(running) != 1:
            return None
        adapter, rows = running[0]
        if rows is not None or not isinstance(adapter, DoRAAdapter) or adapter.dropout:
            return None
        return adapter

    def _merged_dora_product(self, inputs: Tensor, adapter: DoRAAdapter) -> Tensor:
        # Tensors, not variables: a custom gradient is for its arguments and must not capture variables.
        kernel, lora_a, lora_b, magnitude = map(
            ops.copy, (self._kernel, adapter.lora_a, adapter.lora_b, adapter.magnitude)
        )
        return dora_dense_product(inputs, kernel, lora_a, lora_b, adapter.scaling, magnitude)

    def _biased(self, outputs: Tensor) -> Tensor:
        return outputs if self.bias is None else ops.add(outputs, self.bias)

    def _update(self, adapter: LoRAAdapter, lora_inputs: Tensor, scale: Scale, rows: Tensor | None) -> Tensor:
        hidden = self._masked(ops.matmul(lora_inputs, self._compute(adapter.lora_a)), rows)
        return ops.matmul(hidden, self._compute(adapter.lora_b) * scale)

    def _base_product(self, inputs: Tensor) -> Tensor:
        return ops.matmul(inputs, self._kernel)

    def _lora_dims(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self._kernel.shape[0],), (self.units,)

    def _to_reference(self, value: np.ndarray) -> np.ndarray:
        return value.T

    def _from_reference(self, weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return weight.T


@keras.saving.register_keras_serializable(package=PACKAGE)
class LoRAEinsumDense(LoRALayer, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` with a LoRA adapter, for equations that are a linear map.

    `lora_a` is `(*input axes, r)` and `lora_b` `(r, *output axes)` in the kernel's axis order;
    flattened, they are the reference's `A.T` and `B.T` (see `lora_spec.backends.keras_einsum`).
    """

    base_class = keras.layers.EinsumDense

    def __init__(
        self,
        equation: str,
        output_shape: int | tuple[int | None, ...],
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        train_bias: bool = False,
        adapters: dict[str, dict[str, Any]] | None = None,
        active_adapters: list[str] | None = None,
        **einsum_kwargs: Any,
    ):
        _refuse_keras_lora(einsum_kwargs, "LoRAEinsumDense")
        if keras_einsum.plan(equation) is None:
            raise ValueError(
                f"equation {equation!r} is not a linear map LoRA can adapt: every kernel axis must "
                "be contracted with the input or appear only in the output."
            )
        super().__init__(equation, output_shape, **einsum_kwargs)
        for spec in (adapters or {DEFAULT_ADAPTER: {"use_dora": use_dora}}).values():
            _check_dora_equation(self, spec.get("use_dora", False))
        self._set_lora(r, alpha, dropout, use_rslora, init, use_dora, train_bias, adapters, active_adapters)

    @property
    def _plan(self) -> keras_einsum.EinsumPlan:
        return keras_einsum.linear_plan(self.equation)

    @classmethod
    def check_adapter(cls, layer: keras.layers.Layer, r: int, init: str = "kaiming", use_dora: bool = False) -> None:
        super().check_adapter(layer, r, init, use_dora)
        _check_dora_equation(layer, use_dora)

    def call(self, inputs: Tensor, training: bool | None = None, dropout_mask: Tensor | None = None) -> Tensor:
        outputs = self._updated(self._base_product(inputs), *self._lora_update(inputs, training, dropout_mask))
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        return self._activate(outputs, training)

    def _update(self, adapter: LoRAAdapter, lora_inputs: Tensor, scale: Scale, rows: Tensor | None) -> Tensor:
        plan = self._plan
        hidden = self._masked(ops.einsum(plan.to_hidden, lora_inputs, self._compute(adapter.lora_a)), rows)
        return ops.einsum(plan.from_hidden, hidden, self._compute(adapter.lora_b) * scale)

    def _base_product(self, inputs: Tensor) -> Tensor:
        return ops.einsum(self.equation, inputs, self._kernel)

    def _delta(self, lora_a: Tensor, lora_b: Tensor) -> Tensor:
        return ops.einsum(self._plan.delta, lora_a, lora_b)

    def _feature_sums(self, value: Tensor) -> Tensor:
        return ops.reshape(ops.einsum(self._plan.feature_sums, value), (-1,))

    def _feature_view(self, vector: Tensor) -> Tensor:
        plan, kernel_shape = self._plan, tuple(self._kernel.shape)
        shape, permutation = plan.features_from_reference(kernel_shape)
        return ops.reshape(ops.transpose(ops.reshape(vector, shape), permutation), plan.feature_shape(kernel_shape))

    def _lora_b_view(self, vector: Tensor) -> Tensor:
        return ops.reshape(vector, self._lora_dims()[1])

    def _lora_dims(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return keras_einsum.linear_plan(self.equation).dims(tuple(self._kernel.shape))

    def _to_reference(self, value: np.ndarray) -> np.ndarray:
        return self._plan.to_reference(value)

    def _from_reference(self, weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return self._plan.from_reference(weight, shape)


@keras.saving.register_keras_serializable(package=PACKAGE)
class LoRAEmbedding(LoRALayer, keras.layers.Embedding):
    """`keras.layers.Embedding` with a LoRA adapter: `y = embeddings[ids] + s * lora_a[ids] @ lora_b`; with DoRA,
    `y = (m/n) * (embeddings[ids] + s * lora_a[ids] @ lora_b)`, the norms taken over the whole table's columns.

    As in PEFT, `lora_a (input_dim, r)` starts at zero and `lora_b (r, output_dim)` normal, and
    there is no dropout (`dropout` is accepted for a shared config and ignored).
    """

    base_class = keras.layers.Embedding
    lora_kind = "embedding"

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        train_bias: bool = False,
        adapters: dict[str, dict[str, Any]] | None = None,
        active_adapters: list[str] | None = None,
        **embedding_kwargs: Any,
    ):
        _refuse_keras_lora(embedding_kwargs, "LoRAEmbedding")
        super().__init__(input_dim, output_dim, **embedding_kwargs)
        self._set_lora(r, alpha, dropout, use_rslora, init, use_dora, train_bias, adapters, active_adapters)

    @property
    def _base_weight(self) -> keras.Variable:
        return self._embeddings

    def call(self, inputs: Tensor, training: bool | None = None) -> Tensor:
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        outputs = ops.take(self._embeddings, inputs, axis=0)
        factor, total = self._lora_update(inputs, training, None)
        if factor is not None:
            outputs = ops.multiply(outputs, ops.cast(factor, outputs.dtype))
        if total is not None:
            outputs = ops.add(outputs, ops.cast(total, outputs.dtype))
        return ops.cast(outputs, self.compute_dtype)

    def _lora_inputs(
        self, adapter: LoRAAdapter, inputs: Tensor, training: bool | None, dropout_mask: Tensor | None
    ) -> tuple[Tensor, float]:
        return inputs, 1.0

    def _update(self, adapter: LoRAAdapter, ids: Tensor, scale: Scale, rows: Tensor | None) -> Tensor:
        hidden = self._masked(ops.take(adapter.lora_a, ids, axis=0), rows)
        return ops.matmul(hidden, adapter.lora_b * scale)

    def _lora_a_initializer(self, adapter: LoRAAdapter, fan_in: int) -> keras.initializers.Initializer:
        return keras.initializers.Zeros()

    def _lora_b_initializer(self) -> keras.initializers.Initializer:
        return keras.initializers.RandomNormal(stddev=1.0)

    def _lora_dims(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.input_dim,), (self.output_dim,)

    def _to_reference(self, value: np.ndarray) -> np.ndarray:
        return value

    def _from_reference(self, weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return weight


@keras.saving.register_keras_serializable(package=PACKAGE)
class LoRAConv2D(LoRALayer, keras.layers.Conv2D):
    """`keras.layers.Conv2D` with a LoRA adapter: `y = conv(x) + bias + s * conv1x1(conv_A(x), lora_b)`.

    `lora_a` `(kh, kw, in/groups, r)` is a conv with the base's kernel size, strides, padding,
    dilation and groups; `lora_b` `(1, 1, r/groups, out)` a 1x1 conv grouped like the base, so the
    update is block-diagonal per group and merges exactly (`r` must be a multiple of `groups`). In
    the reference layout they are PyTorch's: `A (r, in/groups, kh, kw)`, `B (out, r/groups, 1, 1)`.
    """

    base_class = keras.layers.Conv2D
    lora_kind = "conv2d"

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int],
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        train_bias: bool = False,
        adapters: dict[str, dict[str, Any]] | None = None,
        active_adapters: list[str] | None = None,
        **conv_kwargs: Any,
    ):
        _refuse_keras_lora(conv_kwargs, "LoRAConv2D")
        super().__init__(filters, kernel_size, **conv_kwargs)
        for spec in (adapters or {DEFAULT_ADAPTER: {"r": r, "use_dora": use_dora}}).values():
            _check_groups(self, spec.get("r", 8), spec.get("use_dora", False))
        self._set_lora(r, alpha, dropout, use_rslora, init, use_dora, train_bias, adapters, active_adapters)

    @classmethod
    def check_adapter(cls, layer: keras.layers.Layer, r: int, init: str = "kaiming", use_dora: bool = False) -> None:
        super().check_adapter(layer, r, init, use_dora)
        _check_groups(layer, r, use_dora)

    def _update(self, adapter: LoRAAdapter, lora_inputs: Tensor, scale: Scale, rows: Tensor | None) -> Tensor:
        hidden = self._masked(self.convolution_op(lora_inputs, self._compute(adapter.lora_a)), rows)
        return ops.conv(hidden, self._compute(adapter.lora_b) * scale, data_format=self.data_format)

    def _base_product(self, inputs: Tensor) -> Tensor:
        return self.convolution_op(inputs, self._kernel)

    def _delta(self, lora_a: Tensor, lora_b: Tensor) -> Tensor:
        # DoRA's convolutions are ungrouped: lora_b (1, 1, r, out) is one (r, out) matrix.
        return ops.matmul(lora_a, lora_b[0, 0])

    def _feature_view(self, vector: Tensor) -> Tensor:
        return vector if self.data_format == "channels_last" else ops.reshape(vector, (-1, 1, 1))

    def call(self, inputs: Tensor, training: bool | None = None, dropout_mask: Tensor | None = None) -> Tensor:
        outputs = self._updated(self._base_product(inputs), *self._lora_update(inputs, training, dropout_mask))
        if self.use_bias:
            channels_last = self.data_format == "channels_last"
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)))
        return self._activate(outputs, training)

    @classmethod
    def reference_shapes(cls, layer: keras.layers.Layer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        height, width, in_per_group, out = layer._kernel.shape
        return (r, in_per_group, height, width), (out, r // layer.groups, 1, 1)

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        height, width, in_per_group, out = self._kernel.shape
        return (height, width, in_per_group, r), (1, 1, r // self.groups, out)

    def _factors_to_reference(
        self, adapter: LoRAAdapter, lora_a: np.ndarray, lora_b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return lora_a.transpose(3, 2, 0, 1), lora_b.transpose(3, 2, 0, 1)

    def _factors_from_reference(
        self, adapter: LoRAAdapter, lora_a: np.ndarray, lora_b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return lora_a.transpose(2, 3, 1, 0), lora_b.transpose(2, 3, 1, 0)

    def _to_reference(self, value: np.ndarray) -> np.ndarray:
        return value.transpose(3, 2, 0, 1)

    def _from_reference(self, weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return weight.transpose(2, 3, 1, 0)


def _check_groups(layer: keras.layers.Layer, r: int, use_dora: bool = False) -> None:
    if isinstance(r, int) and r % layer.groups:
        raise ValueError(
            f"rank {r} is not a multiple of groups={layer.groups} of layer {layer.name!r}: choose r "
            f"divisible by {layer.groups}, or set a rank_pattern for this layer."
        )
    if use_dora and layer.groups != 1:
        raise ValueError(
            f"DoRA on grouped convolution {layer.name!r} (groups={layer.groups}) is not supported: PEFT's "
            "DoRA puts a grouped update in the wrong channels, so their files would disagree; use plain "
            "LoRA on this layer (use_dora=False, or leave it out of target_modules)."
        )


def _check_dora_equation(layer: keras.layers.Layer, use_dora: bool) -> None:
    if use_dora and keras_einsum.linear_plan(layer.equation).feature_tail is None:
        raise ValueError(
            f"DoRA on EinsumDense {layer.name!r} is not supported: its equation {layer.equation!r} puts "
            "an ellipsis among the output features, so their magnitudes cannot be laid along the output; "
            "use plain LoRA on this layer."
        )


def reference_shapes(layer: keras.layers.Layer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of `A` and `B` (reference layout) that an adapter of rank `r` has on `layer`,
    whether or not `layer` has LoRA yet."""
    lora_class = layer.__class__ if isinstance(layer, LoRALayer) else LORA_LAYERS[type(layer)]
    return lora_class.reference_shapes(layer, r)


LORA_LAYERS: dict[type[keras.layers.Layer], type[LoRALayer]] = {
    layer.base_class: layer for layer in (LoRADense, LoRAEinsumDense, LoRAEmbedding, LoRAConv2D)
}


# Marks the wrapped loaders, so that importing this module again (a reload) does not wrap them twice.
_RESTORES_LORA = "restores_lora"


def _restoring_lora(load: Any) -> Any:
    """`load_own_variables` of a Keras layer class, which first turns a layer whose stored variables are a LoRA
    layer's back into that LoRA layer: a parent that builds its sublayers itself (MultiHeadAttention, KerasHub's
    blocks) recreates them as plain layers when a `.keras` file loads, and their adapters would not load."""

    @functools.wraps(load)
    def load_own_variables(layer: keras.layers.Layer, store: VariableStore) -> None:
        lora_class = LORA_LAYERS.get(type(layer))
        # keys(): a sharded HDF5 store's `in` looks in its current shard only.
        if lora_class is not None and layer.built and _CONFIG_KEY in set(store.keys()):
            lora_config = json.loads(np.asarray(store[_CONFIG_KEY], np.uint8).tobytes())
            lora_class.restore_in_place(layer, lora_config)
            layer.load_own_variables(store)
            return
        load(layer, store)

    setattr(load_own_variables, _RESTORES_LORA, True)
    return load_own_variables


for _base_class in LORA_LAYERS:
    if not getattr(_base_class.load_own_variables, _RESTORES_LORA, False):
        _base_class.load_own_variables = _restoring_lora(_base_class.load_own_variables)
