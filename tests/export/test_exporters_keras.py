"""End to end from Keras: a model with lora_spec.keras LoRADense layers, `model.export(format="onnx")`, merge.

The merged graph reproduces the Keras model in onnxruntime and has the compute nodes of the base
model exported without LoRA, for 2-D inputs, for 3-D ones (tf2onnx's Reshape/MatMul/Reshape), for
attention, whose `EinsumDense` projections reshape both sides of the LoRA sum into heads, and for
`Conv2D` layers; with plain LoRA and with DoRA (whose per-feature factors tf2onnx folds into
constants, laid along the heads for attention projections).
"""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")

from lora_spec.export import merge_onnx  # noqa: E402
from lora_spec.export.verify import session  # noqa: E402
from tests.export.onnx_roundtrip import (  # noqa: E402
    INPUT_SHAPES,
    assert_folds_to_the_base_compute_nodes,
    assert_merge_reproduces,
)
from tests.numerics import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras's ONNX export needs TensorFlow")


def mlp(dims: int) -> keras.Model:
    inputs = keras.Input(INPUT_SHAPES[dims][1:])
    hidden = keras.layers.Dense(6, activation="gelu", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def attention(dims: int) -> keras.Model:
    inputs = keras.Input(INPUT_SHAPES[dims][1:])
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, name="attention")(inputs, inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(attended))


def cnn(dims: int) -> keras.Model:
    images = keras.Input(INPUT_SHAPES[dims][1:])
    hidden = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv1")(images)
    hidden = keras.layers.Conv2D(5, 3, dilation_rate=2, padding="same", name="conv2")(hidden)
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(hidden))


CASES = {"2d": (mlp, 2, ["hidden", "head"]), "3d": (mlp, 3, ["hidden", "head"]),
         "attention": (attention, 3, ["query", "key", "value", "attention_output"]),
         "cnn": (cnn, 4, ["conv1", "conv2"])}


@pytest.fixture(scope="module", params=sorted(CASES))
def base_export(request, tmp_path_factory):
    """`(case, the base model, its input, the folder holding its export base.onnx)`.

    Biases are not zero (tf2onnx drops a zero bias), so folding must keep them after DoRA's rescaled sum,
    and where TensorFlow's graph optimizer moves them onto the low-rank side (`base + (pair + b)`). Not for
    the convolutions: tf2onnx fuses a bias into the base export's `Conv`, not into an adapted one's, whose
    merged graph then keeps one bias `Add` per convolution (plain LoRA and DoRA alike).
    """
    build, dims, _ = CASES[request.param]
    keras.utils.set_random_seed(0)
    base = build(dims)
    x = np.random.default_rng(1).standard_normal(INPUT_SHAPES[dims]).astype(np.float32)
    base(x)
    rng = np.random.default_rng(3)
    for variable in base.weights:
        if variable.name == "bias" and request.param != "cnn":
            variable.assign(rng.standard_normal(variable.shape).astype(np.float32))
    folder = tmp_path_factory.mktemp("keras")
    base.export(str(folder / "base.onnx"), format="onnx", verbose=False)
    return request.param, base, x, folder


def _adapted_export(base_export, folder, **options):
    """Export a copy of the base model with adapters on the case's targets, trained (random `lora_b`, and DoRA
    magnitudes off their initial norms), and save its adapter; `(folder, feeds, expected output, targets)`."""
    import lora_spec.keras as lora

    case, base, x, base_folder = base_export
    _, _, targets = CASES[case]
    (folder / "base.onnx").symlink_to(base_folder / "base.onnx")
    model = keras.models.clone_model(base)
    model.set_weights(base.get_weights())
    lora.apply(model, r=2, alpha=6, target_modules=targets, **options)
    rng = np.random.default_rng(2)
    for variable in model.weights:
        if "lora_b" in variable.path:
            variable.assign(rng.standard_normal(variable.shape).astype(np.float32))
        if "lora_magnitude_vector" in variable.path:
            variable.assign(variable.numpy() * rng.uniform(0.5, 2.0, variable.shape).astype(np.float32))
    expected = np.asarray(model(x))
    model.export(str(folder / "model.onnx"), format="onnx", verbose=False)
    lora.save_adapter(model, folder / "adapter")
    input_name = onnx.load(folder / "model.onnx").graph.input[0].name
    return folder, {input_name: x}, expected, len(targets)


@pytest.fixture(scope="module", params=["lora", "dora"])
def keras_export(request, base_export, tmp_path_factory):
    return _adapted_export(base_export, tmp_path_factory.mktemp(request.param), use_dora=request.param == "dora")


def test_merged_keras_export_reproduces_the_adapted_model(keras_export):
    folder, feeds, expected, _ = keras_export
    assert_merge_reproduces(folder / "model.onnx", feeds, [expected])


def test_merged_keras_export_has_the_compute_nodes_of_the_base_export(keras_export):
    assert_folds_to_the_base_compute_nodes(keras_export[0], folds=keras_export[3])


def test_keras_adapter_file_merges_into_the_base_export_like_the_adapted_model(keras_export):
    """The other way to deploy: the base model's export plus `--adapter`, matched by module path."""
    folder, feeds, expected, targets = keras_export
    result = merge_onnx(folder / "base.onnx", folder / "base.merged.onnx", adapters=[(folder / "adapter", 1.0)],
                        verify="layers", progress=False)
    assert len(result.adapter_matches) == targets
    assert_close(session(result.output).run(None, feeds)[0], expected, np.float32, factor=10)


def test_an_erfc_from_gelu_is_mended_and_the_merge_verified_in_onnxruntime(keras_export):
    """tf2onnx leaves TensorFlow's exact-GELU Erfc (the MLPs have one), which ONNX lacks: the merged model runs."""
    folder, feeds, expected, _ = keras_export
    erfc_nodes = sum(node.op_type == "Erfc" for node in onnx.load(folder / "model.onnx").graph.node)
    result = merge_onnx(folder / "model.onnx", folder / "checked.onnx", verify="auto", progress=False)
    mended_line = f"{erfc_nodes} Erfc node(s) as 1 - Erf: ONNX has no Erfc (tf2onnx leaves TensorFlow's, from its exact GELU)"
    assert result.mended == ([mended_line] if erfc_nodes else [])
    assert result.verification.mode == "full" and result.verification.passed
    assert not any(node.op_type == "Erfc" for node in onnx.load(result.output).graph.node)
    assert_close(session(result.output).run(None, feeds)[0], expected, np.float32, factor=10)
