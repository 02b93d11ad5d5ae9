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

from lora_spec.export import merge_onnx
from lora_spec.export.verify import session
from tests.export.keras_models import CASES, adapted, with_biases
from tests.export.onnx_roundtrip import (
    INPUT_SHAPES,
    assert_folds_to_the_base_compute_nodes,
    assert_merge_reproduces,
)
from tests.numerics import assert_close

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras's ONNX export needs TensorFlow")


@pytest.fixture(
    scope="module",
    params=[(variant, case) for variant in ("lora", "dora") for case in sorted(CASES)],
    ids=lambda param: "-".join(param),
)
def keras_export(request, tmp_path_factory):
    """Export a base model and a copy with adapters on the case's targets (`adapted`), and save its adapter;
    `(folder, feeds, expected output, targets)`.

    The base models have biases that are not zero (tf2onnx drops a zero bias), so folding must keep them:
    for DoRA after the rescaled sum, where TensorFlow's graph optimizer moves them onto the low-rank side
    (`f * base + (pair + b)`); for the convolutions, tf2onnx fuses a bias into the base export's `Conv` but
    not into an adapted one's, whose bias `Add` the merge moves into the folded `Conv`.
    """
    import lora_spec.keras as lora

    variant, case = request.param
    build, dims, targets = CASES[case]
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(1).standard_normal(INPUT_SHAPES[dims]).astype(np.float32)
    base = with_biases(build(dims), x)
    folder = tmp_path_factory.mktemp(variant)
    base.export(str(folder / "base.onnx"), format="onnx", verbose=False)
    model = adapted(base, targets, use_dora=variant == "dora")
    expected = np.asarray(model(x))
    model.export(str(folder / "model.onnx"), format="onnx", verbose=False)
    lora.save_adapter(model, folder / "adapter")
    input_name = onnx.load(folder / "model.onnx").graph.input[0].name
    return folder, {input_name: x}, expected, len(targets)


def test_merged_keras_export_reproduces_the_adapted_model(keras_export):
    folder, feeds, expected, _ = keras_export
    assert_merge_reproduces(folder / "model.onnx", feeds, [expected])


def test_merged_keras_export_has_the_compute_nodes_of_the_base_export(keras_export):
    assert_folds_to_the_base_compute_nodes(keras_export[0], folds=keras_export[3])


def test_keras_adapter_file_merges_into_the_base_export_like_the_adapted_model(keras_export):
    """The other way to deploy: the base model's export plus `--adapter`, matched by module path."""
    folder, feeds, expected, targets = keras_export
    result = merge_onnx(
        folder / "base.onnx",
        folder / "base.merged.onnx",
        adapters=[(folder / "adapter", 1.0)],
        verify="layers",
        progress=False,
    )
    assert len(result.adapter_matches) == targets
    assert_close(session(result.output).run(None, feeds)[0], expected, np.float32, factor=10)


def test_an_erfc_from_gelu_is_mended_and_the_merge_verified_in_onnxruntime(keras_export):
    """tf2onnx leaves TensorFlow's exact-GELU Erfc (the MLPs have one), which ONNX lacks: the merged model runs."""
    folder, feeds, expected, _ = keras_export
    erfc_nodes = sum(node.op_type == "Erfc" for node in onnx.load(folder / "model.onnx").graph.node)
    result = merge_onnx(folder / "model.onnx", folder / "checked.onnx", verify="auto", progress=False)
    mended_line = (
        f"{erfc_nodes} Erfc node(s) as 1 - Erf: ONNX has no Erfc (tf2onnx leaves TensorFlow's, from its exact GELU)"
    )
    assert result.mended == ([mended_line] if erfc_nodes else [])
    assert result.verification.mode == "full" and result.verification.passed
    assert not any(node.op_type == "Erfc" for node in onnx.load(result.output).graph.node)
    assert_close(session(result.output).run(None, feeds)[0], expected, np.float32, factor=10)
