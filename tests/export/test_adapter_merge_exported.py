"""Adapter files merged into graphs from the real exporters equal the framework's merged model.

Each base model is exported once per exporter (TorchScript `dynamo=False`, `dynamo=True`, Keras
`model.export(format="onnx")`); adapters are made with PEFT, `lora_spec.torch` and
`lora_spec.keras` with non-zero B, and the merged graph runs in onnxruntime.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from lora_spec import reference
from lora_spec.adapter_io import load_adapter_dir
from tests.numerics import assert_close

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lora_spec.export.adapter_merge import AdapterMergeError, plan_adapter_merge
from tests.export.onnx_graphs import apply_plan, initializer_reader, run
from tests.export.torch_models import (
    EXPORTERS,
    Classifier,
    convolutions,
    export,
    feeds,
    peft_adapter,
    randomize,
    tiny_bert,
    token_inputs,
)


def merged_output(path: Path, adapters, feeds: dict) -> np.ndarray:
    """Plan on the graph alone, as `lora-export` loads it, reading tensors from the complete model."""
    complete = onnx.load(str(path))
    plan = plan_adapter_merge(onnx.load(str(path), load_external_data=False), initializer_reader(complete), adapters)
    assert plan.unmatched == []
    return run(apply_plan(complete, plan), **feeds)


# --- an MLP: Gemm (2-D) and MatMul with anonymous weights (3-D) --------------------------------------------


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    )


@pytest.fixture(scope="module")
def mlp_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    base = mlp()
    merged = peft_adapter(
        base,
        folder / "peft",
        r=2,
        lora_alpha=3,
        target_modules=["0", "2"],
        rank_pattern={"2": 3},
        alpha_pattern={"0": 5},
        use_rslora=True,
        modules_to_save=["4"],
        bias="lora_only",
    )
    inputs = {"2d": torch.randn(3, 4), "3d": torch.randn(2, 3, 4)}
    graphs = {
        (exporter, rank): export(base, (x,), folder / f"{exporter}_{rank}.onnx", dynamo, ["x"])
        for exporter, dynamo in EXPORTERS.items()
        for rank, x in inputs.items()
    }
    return folder, merged, inputs, graphs


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("rank", ["2d", "3d"])
def test_peft_adapter_with_patterns_head_and_biases_merges_into_exported_mlp(mlp_case, exporter, rank):
    folder, merged, inputs, graphs = mlp_case
    x = inputs[rank]
    actual = merged_output(graphs[exporter, rank], [(folder / "peft", 1.0)], {"x": x.numpy()})
    assert_close(actual, merged(x).detach().numpy(), np.float32, factor=4)


@pytest.fixture(scope="module")
def twin_graphs(tmp_path_factory):
    """An MLP whose layers `0` and `2` have equal weights, which exporters store once."""
    folder = tmp_path_factory.mktemp("twins")
    base = mlp()
    base[2] = torch.nn.Linear(4, 4)
    base[0] = torch.nn.Linear(4, 4)
    base[2].load_state_dict(base[0].state_dict())
    base[4] = torch.nn.Linear(4, 3)
    inputs = {"2d": torch.randn(3, 4), "3d": torch.randn(2, 3, 4)}
    graphs = {
        (exporter, rank): export(base, (x,), folder / f"{exporter}_{rank}.onnx", dynamo, ["x"])
        for exporter, dynamo in EXPORTERS.items()
        for rank, x in inputs.items()
    }
    return base, inputs, graphs


@pytest.mark.parametrize(
    "config",
    [dict(target_modules=["0"]), dict(target_modules=["4"], modules_to_save=["2"])],
    ids=["lora_on_first_twin", "second_twin_saved"],
)
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("rank", ["2d", "3d"])
def test_layers_with_equal_base_weights_are_merged_separately(twin_graphs, tmp_path, config, exporter, rank):
    base, inputs, graphs = twin_graphs
    merged = peft_adapter(base, tmp_path / "peft", r=2, lora_alpha=2, **config)
    actual = merged_output(graphs[exporter, rank], [(tmp_path / "peft", 1.0)], {"x": inputs[rank].numpy()})
    assert_close(actual, merged(inputs[rank]).detach().numpy(), np.float32, factor=4)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_peft_conv2d_adapter_merges_into_exported_convolutions(tmp_path, exporter):
    base, x = convolutions(batch_norm=False), torch.randn(2, 3, 6, 6)
    path = export(base, (x,), tmp_path / "conv.onnx", EXPORTERS[exporter], ["x"])
    merged = peft_adapter(base, tmp_path / "peft", r=2, lora_alpha=3, target_modules=["0", "2"])
    assert_close(
        merged_output(path, [(tmp_path / "peft", 1.0)], {"x": x.numpy()}),
        merged(x).detach().numpy(),
        np.float32,
        factor=4,
    )


@pytest.mark.parametrize(
    "exporter, message",
    [
        (
            "torchscript",
            r"targets node '/0/Conv', whose weight onnx::Conv_\d+ the exporter folded.*do_constant_folding",
        ),
        (
            "dynamo",
            "matched no weight of the graph: 0 \\(0.weight is read by node '.*' of module 1: the exporter fused",
        ),
    ],
)
def test_a_conv_with_a_batch_norm_folded_into_it_is_never_merged(tmp_path, exporter, message):
    base, x = convolutions(batch_norm=True), torch.randn(2, 3, 6, 6)
    path = export(base, (x,), tmp_path / "conv.onnx", EXPORTERS[exporter], ["x"])
    peft_adapter(base, tmp_path / "peft", r=2, lora_alpha=3, target_modules=["0"])
    with pytest.raises(AdapterMergeError, match=message):
        merged_output(path, [(tmp_path / "peft", 1.0)], {"x": x.numpy()})


# --- a tiny BERT classifier: embeddings, attention, kept and anonymous weights --------------------------------


def tiny_gpt2() -> Classifier:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=30, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return Classifier(transformers.GPT2Model(config)).eval()


@pytest.fixture(scope="module")
def transformer_graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformers")
    models = {"bert": tiny_bert(), "gpt2": tiny_gpt2()}
    graphs = {
        (name, exporter): export(
            model, token_inputs(), folder / f"{name}_{exporter}.onnx", dynamo, ["input_ids", "attention_mask"]
        )
        for name, model in models.items()
        for exporter, dynamo in EXPORTERS.items()
    }
    return folder, models, graphs


PEFT_CONFIGS = {
    "bert": dict(
        r=2,
        lora_alpha=4,
        target_modules=["query", "value", "word_embeddings", "intermediate.dense"],
        modules_to_save=["classifier", "LayerNorm"],
    ),
    "gpt2": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True),
}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_peft_adapter_merges_into_exported_transformer_like_merge_and_unload(
    transformer_graphs, tmp_path, name, exporter
):
    _folder, models, graphs = transformer_graphs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note that GPT-2's Conv1D needs fan_in_fan_out
        merged = peft_adapter(models[name], tmp_path / "peft", **PEFT_CONFIGS[name])
    actual = merged_output(graphs[name, exporter], [(tmp_path / "peft", 1.0)], feeds())
    assert_close(actual, merged(*token_inputs()).detach().numpy(), np.float32, factor=10)


@pytest.fixture(scope="module")
def lora_spec_bert_adapters(transformer_graphs, tmp_path_factory):
    """Two `lora_spec.torch` adapters of the tiny BERT (different targets and ranks)."""
    lora = pytest.importorskip("lora_spec.torch")
    folder = tmp_path_factory.mktemp("lora_spec")
    _, models, _ = transformer_graphs
    directories = []
    for number, targets in enumerate([["query", "value"], ["key", "output.dense", "classifier"]]):
        model = lora.apply(copy.deepcopy(models["bert"]), r=number + 2, alpha=3.0, target_modules=targets)
        randomize(model, ("lora_B",), seed=number)
        lora.save_adapter(model, folder / str(number))
        directories.append(folder / str(number))
    return directories


LORA_SPEC_TARGETS = {"bert": ["query", "value", "word_embeddings"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_lora_spec_torch_adapter_merges_like_its_merge_and_unload(transformer_graphs, tmp_path, name, exporter):
    """Our backend's files: linear, embedding and GPT-2 Conv1D (`fan_in_fan_out`) adapters."""
    lora = pytest.importorskip("lora_spec.torch")
    _, models, graphs = transformer_graphs
    model = lora.apply(copy.deepcopy(models[name]), r=2, alpha=3.0, target_modules=LORA_SPEC_TARGETS[name])
    randomize(model, ("lora_A", "lora_B"), seed=3)
    lora.save_adapter(model, tmp_path / "adapter")
    expected = lora.merge_and_unload(model).eval()(*token_inputs()).detach().numpy()
    actual = merged_output(graphs[name, exporter], [(tmp_path / "adapter", 1.0)], feeds())
    assert_close(actual, expected, np.float32, factor=10)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_weighted_adapters_merge_like_numpy_sum_of_their_deltas(transformer_graphs, lora_spec_bert_adapters, exporter):
    """`W + 0.7 * delta_1 - 0.4 * delta_2`, written into the PyTorch model from the files with NumPy."""
    _, models, graphs = transformer_graphs
    weights = (0.7, -0.4)
    expected_model = copy.deepcopy(models["bert"])
    parameters = dict(expected_model.named_parameters())
    with torch.no_grad():
        for directory, weight in zip(lora_spec_bert_adapters, weights, strict=True):
            config, _, tensors = load_adapter_dir(directory)
            for path, (lora_a, lora_b) in tensors.lora.items():
                delta = weight * reference.delta_weight(lora_a, lora_b, config.scaling_for(path))
                parameters[f"{path}.weight"] += torch.from_numpy(delta.astype(np.float32))
    actual = merged_output(graphs["bert", exporter], list(zip(lora_spec_bert_adapters, weights, strict=True)), feeds())
    assert_close(actual, expected_model(*token_inputs()).detach().numpy(), np.float32, factor=10)


def test_a_cat_combination_exported_and_folded_equals_merging_the_weighted_adapter_files(
    transformer_graphs, lora_spec_bert_adapters, tmp_path
):
    """`add_weighted_adapter(..., "cat")`, exported with its branches and folded by `lora-export --merge`,
    is `lora-export --merge base.onnx --adapter A:w1 --adapter B:w2`."""
    lora = pytest.importorskip("lora_spec.torch")
    from lora_spec.export import merge_onnx

    _, models, graphs = transformer_graphs
    weights = (0.7, -0.4)
    model = copy.deepcopy(models["bert"])
    for name, directory in zip(("first", "second"), lora_spec_bert_adapters, strict=True):
        lora.load_adapter(model, directory, adapter_name=name)
    lora.add_weighted_adapter(model, ["first", "second"], list(weights), "mixed", combination_type="cat")
    lora.set_adapter(model, "mixed")
    export(model, token_inputs(), tmp_path / "mixed.onnx", dynamo=False, names=["input_ids", "attention_mask"])
    folded = merge_onnx(tmp_path / "mixed.onnx", verify="full", progress=False).output
    from_files = merge_onnx(
        graphs["bert", "torchscript"],
        tmp_path / "files.onnx",
        verify="off",
        progress=False,
        adapters=list(zip(lora_spec_bert_adapters, weights, strict=True)),
    ).output
    assert_close(
        run(onnx.load(str(folded)), **feeds()), run(onnx.load(str(from_files)), **feeds()), np.float32, factor=10
    )


# --- Keras: layer scopes with TensorFlow's uniquifier -----------------------------------------------------------

KERAS_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import numpy as np, keras
    import lora_spec.keras as lora

    folder = sys.argv[1]
    keras.utils.set_random_seed(0)
    ids = keras.Input((5,), dtype="int32", name="ids")
    hidden = keras.layers.Embedding(12, 4, name="embed")(ids)
    hidden = keras.Sequential([keras.layers.Dense(6, name="hidden"), keras.layers.Dense(5, name="proj")],
                              name="block")(hidden)
    hidden = keras.layers.Dense(5)(hidden)   # auto-named "dense": exported as "dense_1"
    hidden = keras.layers.Dense(4)(hidden)   # auto-named "dense_1": exported as "dense_1_2"
    hidden = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, name="attention")(hidden, hidden)
    model = keras.Model(ids, keras.layers.Dense(3, name="head")(hidden))
    x = np.random.default_rng(0).integers(0, 12, (2, 5)).astype("int32")
    model(x)
    model.export(os.path.join(folder, "base.onnx"), format="onnx", verbose=False)
    lora.apply(model, r=2, alpha=3.0, target_modules=["embed", "hidden", "dense", "dense_1", "query", "value"])
    rng = np.random.default_rng(1)
    for path, layer in lora.lora_layers(model):
        lora_a, lora_b = layer.lora_weights()
        layer.set_lora_weights(rng.standard_normal(lora_a.shape), rng.standard_normal(lora_b.shape) * 0.5)
    lora.save_adapter(model, os.path.join(folder, "adapter"))
    np.save(os.path.join(folder, "x.npy"), x)
    np.save(os.path.join(folder, "expected.npy"), np.asarray(lora.merge_and_unload(model)(x)))
""")


@pytest.fixture(scope="module")
def keras_case(tmp_path_factory):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    folder = tmp_path_factory.mktemp("keras")
    done = subprocess.run(
        [sys.executable, "-c", KERAS_SCRIPT, str(folder)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_keras_adapter_merges_into_keras_exported_graph_like_merge_and_unload(keras_case):
    graph = onnx.load(str(keras_case / "base.onnx"))
    plan = plan_adapter_merge(graph, initializer_reader(graph), [(keras_case / "adapter", 1.0)])
    assert sorted(path for path, _ in plan.matched) == [
        "attention.query",
        "attention.value",
        "block.hidden",
        "dense",
        "dense_1",
        "embed",
    ]
    actual = run(apply_plan(graph, plan), **{graph.graph.input[0].name: np.load(keras_case / "x.npy")})
    assert_close(actual, np.load(keras_case / "expected.npy"), np.float32, factor=10)
