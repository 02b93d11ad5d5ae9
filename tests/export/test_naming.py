"""Module paths as exporters record them on nodes: dynamo metadata, TorchScript scope names, Keras scopes."""

import pytest

onnx = pytest.importorskip("onnx")

from lora_spec.export.naming import layer_module, node_module


def _node(name: str, **metadata) -> onnx.NodeProto:
    node = onnx.helper.make_node("Add", ["a", "b"], ["c"], name=name)
    for key, value in metadata.items():
        node.metadata_props.add(key=key.replace("__", "."), value=value)
    return node


@pytest.mark.parametrize(
    "name, module",
    [
        ("/encoder/layer.0/attention/self/query/MatMul", "encoder.layer.0.attention.self.query"),
        ("/mlp/mlp.0/base_layer/Gemm", "mlp.0.base_layer"),
        ("/mlp/mlp.0_1/MatMul", "mlp.0_1"),
        ("/blocks/blocks.1/layers.2/fc/MatMul", "blocks.1.layers.2.fc"),
        ("/mlp/MatMul", "mlp"),
    ],
    ids=["nested", "sequential-child", "second-call", "module-list-in-sequential", "top"],
)
def test_torchscript_names_give_the_module_path_without_repeating_a_sequential_parent(name, module):
    assert node_module(_node(name)) == module


@pytest.mark.parametrize(
    "node, module",
    [
        (
            _node(
                "node_add", pkg__torch__onnx__name_scopes="['', 'base_model.model', 'base_model.model.mlp.0', 'add']"
            ),
            "mlp.0",
        ),
        (_node("/model/mlp/mlp.0/base_layer/Gemm"), "model.mlp.0"),
        (_node("functional_1/block_1/hidden_1/Add"), "block.hidden"),
        (_node("functional_3_1/dense_1_2/Add"), "dense_1"),
        (_node("StatefulPartitionedCall/functional_1/attention_1/query_1/Add"), "attention.query"),
        (_node("lora_add"), None),
    ],
    ids=[
        "dynamo-peft",
        "torchscript-peft-base-layer",
        "keras-nested",
        "keras-uniquified",
        "keras-call-scope",
        "unrecorded",
    ],
)
def test_the_layer_running_a_node_is_named_as_peft_and_lora_spec_name_modules(node, module):
    assert layer_module(node) == module
