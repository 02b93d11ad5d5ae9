"""Keras 3 LoRA layers: `LoRADense`, `LoRAEinsumDense`, `LoRAEmbedding`, written with `keras.ops` only.

Each is a subclass of the Keras layer it adapts, so it is a drop-in replacement and an existing
layer can become one in place (`adapt_in_place`). Keras layouts are the transpose of the
reference's: `kernel = W.T (in, out)`, `lora_a = A.T (in, r)`, `lora_b = B.T (r, out)` (an
`EinsumDense` keeps its kernel's input and output axes unflattened). The low-rank path runs on the
activations, `((x @ lora_a) * s) @ lora_b`, so training never builds a full-size matrix. Merging
calls the reference on the weights; the unmerged kernel is kept so that `unmerge` restores it
bit for bit.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import keras
import numpy as np
from keras import ops

from lora_spec import reference
from lora_spec.backends import keras_einsum
from lora_spec.backends.keras_activations import activation_of
from lora_spec.config import LoRAConfig, check_backend_support, scaling
from lora_spec.dropout import keep_probability, keep_threshold

PACKAGE = "lora_spec"
# Keras's own LoRA arguments: accepting them would stack a second, merged-on-save adapter.
_KERAS_LORA_ARGUMENTS = ("lora_rank", "lora_alpha")
_MERGED_KEY = "merged"


def _refuse_keras_lora(kwargs: dict[str, Any], layer: str) -> None:
    for name in _KERAS_LORA_ARGUMENTS:
        if kwargs.get(name) is not None:
            raise TypeError(f"{layer} got Keras's own LoRA argument {name}={kwargs[name]!r}: "
                            "use r= and alpha= instead.")
        kwargs.pop(name, None)


def _snapshot(variable: keras.Variable) -> np.ndarray:
    """A copy of the variable's value that later assigns cannot change (some backends hand out views)."""
    return np.array(ops.convert_to_numpy(variable), copy=True)


def _switch_class(layer: keras.layers.Layer, cls: type[keras.layers.Layer]) -> None:
    layer.__class__ = cls
    # Keras binds call arguments with the signature it read at construction.
    layer._call_signature = inspect.signature(layer.call)
    layer.call_signature_parameters = list(layer._call_signature.parameters)


class LoRALayer:
    """What the three LoRA layers share: hyper-parameters, variables, dropout, merge state, saving.

    A subclass names the Keras layer it extends (`base_class`), the variable LoRA updates
    (`_base_weight`), the update's formula in the reference (`lora_kind`), and how its base
    weight maps to the reference layout.
    """

    base_class: type[keras.layers.Layer]
    lora_kind = "linear"

    # -- construction -------------------------------------------------------------------------

    def _set_lora(self, r: int, alpha: float | None, dropout: float, use_rslora: bool, init: str,
                  train_bias: bool) -> None:
        checked = LoRAConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)
        check_backend_support(checked)
        if not isinstance(train_bias, bool):
            raise ValueError(f"train_bias={train_bias!r} is invalid: use True or False.")
        self.r, self.alpha, self.dropout = checked.r, checked.alpha, checked.dropout
        self.use_rslora, self.init, self.train_bias = checked.use_rslora, checked.init, train_bias
        self.merged = False
        self._unmerged_weight = None
        self.seed_generator = keras.random.SeedGenerator() if checked.dropout else None

    @classmethod
    def adapt_in_place(cls, layer: keras.layers.Layer, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                       use_rslora: bool = False, init: str = "kaiming", train_bias: bool = False) -> None:
        """Turn a built `base_class` layer into this LoRA layer, keeping the object and its weights.

        Functional graphs, parents and optimisers keep pointing at the same layer, which is why
        `apply` converts in place instead of rebuilding the model.
        """
        cls.check_adaptable(layer, r)
        _switch_class(layer, cls)
        layer._tracker.unlock()
        try:
            layer._set_lora(r, alpha, dropout, use_rslora, init, train_bias)
            layer._build_lora()
        finally:
            layer._tracker.lock()

    @classmethod
    def check_adaptable(cls, layer: keras.layers.Layer, r: int | None = None) -> None:
        """Raise the reason `adapt_in_place` would refuse `layer` (with an adapter of rank `r`), before
        anything changes."""
        if type(layer) is not cls.base_class:
            raise TypeError(f"{cls.__name__} adapts a keras.layers.{cls.base_class.__name__}, not a "
                            f"{type(layer).__name__}.")
        if not layer.built:
            raise ValueError(f"layer {layer.name!r} is not built: build the model (model.build(input_shape) "
                             "or call it on a batch) before adding LoRA.")
        if getattr(layer, "lora_enabled", False):
            raise ValueError(f"layer {layer.name!r} has Keras's own LoRA enabled: rebuild it without "
                             "enable_lora/lora_rank before adding lora_spec's adapter.")
        if layer.quantization_mode is not None:
            raise ValueError(f"layer {layer.name!r} is quantized ({layer.quantization_mode}): add LoRA "
                             "to the float model.")

    def unload(self) -> keras.layers.Layer:
        """Drop the adapter and turn back, in place, into a plain `base_class` layer with the base weights."""
        self.unmerge()
        return self._to_base_class()

    def merge_and_unload(self) -> keras.layers.Layer:
        """Merge the adapter for good and turn back, in place, into a plain `base_class` layer."""
        self.merge()
        self._unmerged_weight, self.merged = None, False
        return self._to_base_class()

    def _to_base_class(self) -> keras.layers.Layer:
        del self.lora_a, self.lora_b
        if self.seed_generator is not None:
            self._tracker.untrack(self.seed_generator)
        for name in ("r", "alpha", "dropout", "use_rslora", "init", "train_bias", "merged", "_unmerged_weight",
                     "seed_generator"):
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
        cls.check_adaptable(layer, config.rank_for(layer.name))
        base_config = {k: v for k, v in layer.get_config().items() if k not in _KERAS_LORA_ARGUMENTS}
        adapted = cls.from_config({**base_config, **lora_arguments(config, layer.name)})
        adapted.build_from_config(layer.get_build_config())
        source = {variable.name: variable for variable in layer.weights}
        for variable in adapted.weights:
            if variable.name in source:
                variable.assign(source[variable.name])
        return adapted

    def build(self, input_shape=None) -> None:
        super().build(input_shape)
        self._build_lora()

    def _build_lora(self) -> None:
        a_shape, b_shape = self._lora_shapes()
        # A maps everything but its last axis (the rank) to the rank: that is its fan-in.
        fan_in = math.prod(a_shape[:-1])
        # At least float32 whatever the policy: half-precision updates of A and B would underflow.
        dtype = "float64" if self.variable_dtype == "float64" else "float32"
        self.lora_a = self.add_weight(name="lora_a", shape=a_shape, dtype=dtype,
                                      initializer=self._lora_a_initializer(fan_in))
        self.lora_b = self.add_weight(name="lora_b", shape=b_shape, dtype=dtype,
                                      initializer=self._lora_b_initializer())
        self._freeze_base()

    def _freeze_base(self) -> None:
        self._base_weight.trainable = False
        bias = getattr(self, "bias", None)
        if bias is not None:
            bias.trainable = self.trainable and self.train_bias

    def _lora_a_initializer(self, fan_in: int) -> keras.initializers.Initializer:
        if self.init == "gaussian":
            return keras.initializers.RandomNormal(stddev=1.0 / self.r)
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
        # The adapter trains; the base weight never does (and the bias only with train_bias).
        keras.layers.Layer.trainable.fset(self, value)
        if getattr(self, "lora_b", None) is not None:
            self._freeze_base()

    @property
    def scaling(self) -> float:
        """`alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
        return scaling(self.alpha, self.r, self.use_rslora)

    def lora_config(self) -> dict[str, Any]:
        """The LoRA arguments of the constructor."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "use_rslora": self.use_rslora,
                "init": self.init, "train_bias": self.train_bias}

    def get_config(self) -> dict[str, Any]:
        config = {k: v for k, v in super().get_config().items() if k not in _KERAS_LORA_ARGUMENTS}
        return {**config, **self.lora_config()}

    def _own_weights(self) -> dict[str, keras.Variable]:
        return {variable.name: variable for variable in self._trainable_variables + self._non_trainable_variables}

    def save_own_variables(self, store) -> None:
        """Saves the unmerged base weight and the adapter separately, with the merge state."""
        if not self.built:
            return
        for name, variable in self._own_weights().items():
            merged_base = self.merged and variable is self._base_weight
            store[name] = self._unmerged_weight if merged_base else _snapshot(variable)
        store[_MERGED_KEY] = np.array(int(self.merged))

    def load_own_variables(self, store) -> None:
        if not self.built:
            return
        weights = self._own_weights()
        stored = sorted(set(store.keys()) - {_MERGED_KEY})
        if not stored:
            # Keras keys a weights file by layer class, so a LoRA layer finds nothing in a file
            # saved before LoRA was added.
            raise ValueError(f"the file has no weights for LoRA layer {self.name!r}: it was saved without LoRA; "
                             "load base weights before lora_spec.keras.apply, and adapters with load_adapter.")
        if stored != sorted(weights):
            raise ValueError(f"layer {self.name!r} holds variables {sorted(weights)} but the file has {stored}: "
                             "load the file into the model that saved it.")
        for name, variable in weights.items():
            variable.assign(store[name])
        self.merged, self._unmerged_weight = False, None
        if _MERGED_KEY in store and int(np.asarray(store[_MERGED_KEY])):
            self.merge()

    # -- the adapter in the reference layout ----------------------------------------------------

    def lora_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """`(A, B)` in the reference layout (`A (r, in)`, `B (out, r)`; a conv's are 4-D), as NumPy arrays."""
        lora_a, lora_b = self._factors_to_reference(_snapshot(self.lora_a), _snapshot(self.lora_b))
        # Contiguous, so NumPy's products sum in the same order as on arrays built in this layout.
        return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)

    def set_lora_weights(self, lora_a: np.ndarray, lora_b: np.ndarray) -> None:
        """Assign `A` and `B` given in the reference layout (`A (r, in)`, `B (out, r)`; a conv's are 4-D)."""
        for half, value, expected in zip("AB", (lora_a, lora_b), self.reference_shapes(self, self.r)):
            if tuple(np.shape(value)) != expected:
                raise ValueError(f"LoRA {half} for layer {self.name!r} has shape {tuple(np.shape(value))}, but the "
                                 f"layer needs {expected}: the adapter was trained for another rank or shape.")
        lora_a, lora_b = self._factors_from_reference(np.asarray(lora_a), np.asarray(lora_b))
        self.lora_a.assign(lora_a.astype(self.lora_a.dtype))
        self.lora_b.assign(lora_b.astype(self.lora_b.dtype))

    def base_weight(self) -> np.ndarray:
        """The unmerged base weight in the reference layout (`W (out, in)`; an embedding's table)."""
        value = self._unmerged_weight.copy() if self.merged else _snapshot(self._base_weight)
        return self._to_reference(value)

    def merge(self) -> None:
        """Add `delta_W` to the base weight (no-op if merged); the call then skips the low-rank path.

        A model traced before merging (`tf.function`, `model.predict`) must be traced again:
        `lora_spec.keras.merge(model)` resets the model's compiled functions.
        """
        if self.merged:
            return
        unmerged = _snapshot(self._base_weight)
        lora_a, lora_b = self.lora_weights()
        weight = np.ascontiguousarray(self._to_reference(unmerged))
        with np.errstate(invalid="ignore", over="ignore"):  # a diverged adapter is reported just below
            merged = reference.merge(weight, lora_a, lora_b, self.scaling, self.lora_kind)
        if not np.all(np.isfinite(merged)):
            raise ValueError("the merged weight would hold NaN or inf: the adapter diverged; nothing was merged.")
        self._base_weight.assign(self._from_reference(merged, unmerged.shape))
        self._unmerged_weight, self.merged = unmerged, True

    def unmerge(self) -> None:
        """Restore the base weight saved by `merge`, bit for bit (no-op if not merged)."""
        if not self.merged:
            return
        self._base_weight.assign(self._unmerged_weight)
        self._unmerged_weight, self.merged = None, False

    # -- forward ------------------------------------------------------------------------------

    def _activate(self, outputs, training):
        activation = activation_of(self, training)
        return outputs if activation is None else activation(outputs)

    def _lora_inputs(self, inputs, training, dropout_mask):
        """The input of the low-rank path and the factor on its output, which takes the dropout scaling
        (`1 / keep probability`) so that no pass over the inputs is spent on it: masked explicitly, by a
        drawn dropout mask when training, or as is."""
        if dropout_mask is not None:
            return inputs * ops.cast(dropout_mask, inputs.dtype), 1.0
        if training and self.dropout:
            kept = ops.where(self._keep(inputs), inputs, ops.zeros((), inputs.dtype))
            return kept, 1 / keep_probability(self.dropout)
        return inputs, 1.0

    def _keep(self, inputs):
        """Which inputs dropout keeps, from 16-bit draws (`lora_spec.dropout`), two per 32-bit word:
        drawing half as many random numbers as exact Bernoulli dropout is what makes it cheap."""
        *leading, features = ops.shape(inputs)
        words = keras.random.randint((*leading, (features + 1) // 2), -(1 << 31), (1 << 31) - 1, dtype="int32",
                                     seed=self.seed_generator)
        halves = ops.view(words, "int16")
        if not isinstance(features, int) or features % 2:  # only an odd width drew one half too many
            halves = halves[..., :features]
        return ops.greater_equal(halves, keep_threshold(self.dropout))

    def _compute(self, variable):
        return ops.cast(variable, self.compute_dtype)

    # -- per layer ----------------------------------------------------------------------------

    @property
    def _base_weight(self) -> keras.Variable:
        return self._kernel

    def _lora_dims(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Input and output dimensions of the update: `lora_a` is `(*input, r)`, `lora_b` `(r, *output)`."""
        raise NotImplementedError

    @classmethod
    def reference_shapes(cls, layer: keras.layers.Layer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of `A` and `B` (reference layout) of a rank-`r` adapter on `layer`, a layer of
        `base_class` or of this class."""
        input_dims, output_dims = cls._lora_dims(layer)
        return (r, math.prod(input_dims)), (math.prod(output_dims), r)

    def _lora_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of the `lora_a` and `lora_b` variables."""
        input_dims, output_dims = self._lora_dims()
        return (*input_dims, self.r), (self.r, *output_dims)

    def _factors_to_reference(self, lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return lora_a.reshape(-1, self.r).T, lora_b.reshape(self.r, -1).T

    def _factors_from_reference(self, lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return lora_a.T.reshape(self.lora_a.shape), lora_b.T.reshape(self.lora_b.shape)

    def _to_reference(self, value: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _from_reference(self, weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError


def lora_arguments(config: LoRAConfig, module_path: str, train_bias: bool = False) -> dict[str, Any]:
    """The LoRA layer arguments for the module at `module_path` under `config` (after its patterns)."""
    return {"r": config.rank_for(module_path), "alpha": config.alpha_for(module_path), "dropout": config.dropout,
            "use_rslora": config.use_rslora, "init": config.init, "train_bias": train_bias}


@keras.saving.register_keras_serializable(package=PACKAGE)
class LoRADense(LoRALayer, keras.layers.Dense):
    """`keras.layers.Dense` with a LoRA adapter: `y = activation(x @ kernel + bias + s * ((x @ lora_a) @ lora_b))`.

    Args:
        units: as `Dense`.
        r, alpha, dropout, use_rslora, init: as `lora_spec.LoRAConfig`.
        train_bias: whether the bias trains with the adapter (PEFT's `bias="lora_only"`).
        **dense_kwargs: every other `Dense` argument (activation, use_bias, initializers, regularizers,
            constraints, dtype, name...).

    `call(inputs, training=None, dropout_mask=None)`: `dropout_mask` (0 or `1/(1-p)` per input
    element) replaces random dropout, to compare with the reference element for element.
    """

    base_class = keras.layers.Dense

    def __init__(self, units: int, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", train_bias: bool = False, **dense_kwargs: Any):
        _refuse_keras_lora(dense_kwargs, "LoRADense")
        super().__init__(units, **dense_kwargs)
        self._set_lora(r, alpha, dropout, use_rslora, init, train_bias)

    @classmethod
    def from_dense(cls, dense: keras.layers.Dense, config: LoRAConfig | None = None) -> LoRADense:
        """A `LoRADense` with `dense`'s arguments and weights and a fresh adapter from `config`."""
        return cls.from_layer(dense, config)

    def call(self, inputs, training=None, dropout_mask=None):
        outputs = ops.matmul(inputs, self._kernel)
        if self.merged:
            if self.bias is not None:
                outputs = ops.add(outputs, self.bias)
        else:
            lora_inputs, factor = self._lora_inputs(inputs, training, dropout_mask)
            hidden = ops.matmul(lora_inputs, self._compute(self.lora_a))
            low_rank = ops.matmul(hidden, self._compute(self.lora_b) * (self.scaling * factor))
            if self.bias is not None:
                low_rank = ops.add(low_rank, self.bias)
            outputs = ops.add(outputs, low_rank)
        return self._activate(outputs, training)

    def _lora_dims(self):
        return (self._kernel.shape[0],), (self.units,)

    def _to_reference(self, value):
        return value.T

    def _from_reference(self, weight, shape):
        return weight.T


@keras.saving.register_keras_serializable(package=PACKAGE)
class LoRAEinsumDense(LoRALayer, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` with a LoRA adapter, for equations that are a linear map.

    `lora_a` is `(*input axes, r)` and `lora_b` `(r, *output axes)` in the kernel's axis order;
    flattened, they are the reference's `A.T` and `B.T` (see `lora_spec.backends.keras_einsum`).
    """

    base_class = keras.layers.EinsumDense

    def __init__(self, equation: str, output_shape, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", train_bias: bool = False, **einsum_kwargs: Any):
        _refuse_keras_lora(einsum_kwargs, "LoRAEinsumDense")
        if keras_einsum.plan(equation) is None:
            raise ValueError(f"equation {equation!r} is not a linear map LoRA can adapt: every kernel axis must "
                             "be contracted with the input or appear only in the output.")
        super().__init__(equation, output_shape, **einsum_kwargs)
        self._set_lora(r, alpha, dropout, use_rslora, init, train_bias)

    @property
    def _plan(self) -> keras_einsum.EinsumPlan:
        return keras_einsum.plan(self.equation)

    def call(self, inputs, training=None, dropout_mask=None):
        outputs = ops.einsum(self.equation, inputs, self._kernel)
        if not self.merged:
            plan = self._plan
            lora_inputs, factor = self._lora_inputs(inputs, training, dropout_mask)
            hidden = ops.einsum(plan.to_hidden, lora_inputs, self._compute(self.lora_a))
            low_rank = ops.einsum(plan.from_hidden, hidden * (self.scaling * factor), self._compute(self.lora_b))
            outputs = ops.add(outputs, low_rank)
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        return self._activate(outputs, training)

    def _lora_dims(self):
        return keras_einsum.plan(self.equation).dims(tuple(self._kernel.shape))

    def _to_reference(self, value):
        return self._plan.to_reference(value)

    def _from_reference(self, weight, shape):
        return self._plan.from_reference(weight, shape)


@keras.saving.register_keras_serializable(package=PACKAGE)
class LoRAEmbedding(LoRALayer, keras.layers.Embedding):
    """`keras.layers.Embedding` with a LoRA adapter: `y = embeddings[ids] + s * lora_a[ids] @ lora_b`.

    As in PEFT, `lora_a (input_dim, r)` starts at zero and `lora_b (r, output_dim)` normal, and
    there is no dropout (`dropout` is accepted for a shared config and ignored).
    """

    base_class = keras.layers.Embedding
    lora_kind = "embedding"

    def __init__(self, input_dim: int, output_dim: int, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", train_bias: bool = False, **embedding_kwargs: Any):
        _refuse_keras_lora(embedding_kwargs, "LoRAEmbedding")
        super().__init__(input_dim, output_dim, **embedding_kwargs)
        self._set_lora(r, alpha, dropout, use_rslora, init, train_bias)

    @property
    def _base_weight(self) -> keras.Variable:
        return self._embeddings

    def call(self, inputs):
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        outputs = ops.take(self._embeddings, inputs, axis=0)
        if not self.merged:
            hidden = ops.take(self.lora_a, inputs, axis=0) * self.scaling
            outputs = ops.add(outputs, ops.cast(ops.matmul(hidden, self.lora_b), outputs.dtype))
        return ops.cast(outputs, self.compute_dtype)

    def _lora_a_initializer(self, fan_in):
        return keras.initializers.Zeros()

    def _lora_b_initializer(self):
        return keras.initializers.RandomNormal(stddev=1.0)

    def _lora_dims(self):
        return (self.input_dim,), (self.output_dim,)

    def _to_reference(self, value):
        return value

    def _from_reference(self, weight, shape):
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

    def __init__(self, filters: int, kernel_size, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", train_bias: bool = False, **conv_kwargs: Any):
        _refuse_keras_lora(conv_kwargs, "LoRAConv2D")
        super().__init__(filters, kernel_size, **conv_kwargs)
        _check_groups(self, r)
        self._set_lora(r, alpha, dropout, use_rslora, init, train_bias)

    @classmethod
    def check_adaptable(cls, layer: keras.layers.Layer, r: int | None = None) -> None:
        super().check_adaptable(layer, r)
        if r is not None:
            _check_groups(layer, r)

    def call(self, inputs, training=None, dropout_mask=None):
        outputs = self.convolution_op(inputs, self._kernel)
        if not self.merged:
            lora_inputs, factor = self._lora_inputs(inputs, training, dropout_mask)
            hidden = self.convolution_op(lora_inputs, self._compute(self.lora_a))
            low_rank = ops.conv(hidden, self._compute(self.lora_b) * (self.scaling * factor),
                                data_format=self.data_format)
            outputs = ops.add(outputs, low_rank)
        if self.use_bias:
            channels_last = self.data_format == "channels_last"
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)))
        return self._activate(outputs, training)

    @classmethod
    def reference_shapes(cls, layer, r):
        height, width, in_per_group, out = layer._kernel.shape
        return (r, in_per_group, height, width), (out, r // layer.groups, 1, 1)

    def _lora_shapes(self):
        height, width, in_per_group, out = self._kernel.shape
        return (height, width, in_per_group, self.r), (1, 1, self.r // self.groups, out)

    def _factors_to_reference(self, lora_a, lora_b):
        return lora_a.transpose(3, 2, 0, 1), lora_b.transpose(3, 2, 0, 1)

    def _factors_from_reference(self, lora_a, lora_b):
        return lora_a.transpose(2, 3, 1, 0), lora_b.transpose(2, 3, 1, 0)

    def _to_reference(self, value):
        return value.transpose(3, 2, 0, 1)

    def _from_reference(self, weight, shape):
        return weight.transpose(2, 3, 1, 0)


def _check_groups(layer: keras.layers.Layer, r: int) -> None:
    if isinstance(r, int) and r % layer.groups:
        raise ValueError(f"rank {r} is not a multiple of groups={layer.groups} of layer {layer.name!r}: choose r "
                         f"divisible by {layer.groups}, or set a rank_pattern for this layer.")


def reference_shapes(layer: keras.layers.Layer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of `A` and `B` (reference layout) that an adapter of rank `r` has on `layer`,
    whether or not `layer` has LoRA yet."""
    lora_class = layer.__class__ if isinstance(layer, LoRALayer) else LORA_LAYERS[type(layer)]
    return lora_class.reference_shapes(layer, r)


LORA_LAYERS: dict[type[keras.layers.Layer], type[LoRALayer]] = {
    layer.base_class: layer for layer in (LoRADense, LoRAEinsumDense, LoRAEmbedding, LoRAConv2D)}
