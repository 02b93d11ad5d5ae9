"""Module paths as exporters record them on ONNX nodes.

- The dynamo exporter: node metadata `pkg.torch.onnx.name_scopes` (`['', 'mlp', 'mlp.0', 'linear']`),
  else `namespace`.
- The TorchScript exporter: node names, one component per called module
  (`/encoder/layer.0/attention/self/query/MatMul`). Each component is the module's path from its
  last non-numeric part on, so a `Sequential`'s child `mlp.0` under `mlp` repeats `mlp`.
- tf2onnx (Keras): TensorFlow scopes (`functional_1/block_1/hidden_1/MatMul`): the root model's scope,
  then each layer name with TensorFlow's `_N` uniquifier, then the op; a traced `tf.function`'s call
  scopes (`StatefulPartitionedCall/...`) come first.
"""

from __future__ import annotations

import ast
import re

import onnx

from lora_spec.adapter_io import PREFIX as PEFT_PREFIX

TF_UNIQUIFIER = r"(_\d+)?"
_TF_CALL_SCOPE = r"(Stateful)?PartitionedCall(_\d+)?"
_INDEX = re.compile(r"\d+(_\d+)?")  # a child's index, suffixed on a repeated call
# PEFT wraps an adapted layer and keeps the original under `<path>.base_layer`.
PEFT_WRAPPER = ".base_layer"


def node_module(node: onnx.NodeProto) -> str | None:
    """The module that ran `node` as the node records it: dynamo metadata or a TorchScript name."""
    metadata = {entry.key: entry.value for entry in node.metadata_props}
    scopes = _literal_list(metadata.get("pkg.torch.onnx.name_scopes"))
    if len(scopes) >= 2:
        return str(scopes[-2]) or None
    if "namespace" in metadata:
        modules = [part.split(": ")[0].strip() for part in metadata["namespace"].split("/")[:-1]]
        return modules[-1] if modules and modules[-1] else None
    if node.name.startswith("/"):
        return _torchscript_module(node.name.split("/")[1:-1])
    return None


def _torchscript_module(components: list[str]) -> str | None:
    """`['mlp', 'mlp.0', 'base_layer']` -> `mlp.0.base_layer`: a component that starts with its parent's
    last name and continues with indices (a `Sequential`'s or `ModuleList`'s child) adds only the indices.
    A module's second call has its scope suffixed (`mlp.0_1`), which stays."""
    parts: list[str] = []
    for component in components:
        atoms = component.split(".")
        named = [index for index, atom in enumerate(parts) if not _INDEX.fullmatch(atom)]
        tail = parts[named[-1] :] if named else []
        if (
            tail
            and atoms[: len(tail)] == tail
            and len(atoms) > len(tail)
            and all(_INDEX.fullmatch(atom) for atom in atoms[len(tail) :])
        ):
            atoms = atoms[len(tail) :]
        parts += atoms
    return ".".join(parts) or None


def _literal_list(text: str | None) -> list:
    try:
        value = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return value if isinstance(value, list) else []


def tf_scopes(*names: str) -> list[list[str]]:
    """TensorFlow scope components of tf2onnx names (`model_1/dense_1/MatMul`), without `:0` and call scopes."""
    scopes = []
    for name in names:
        if "/" in name and not name.startswith("/"):
            components = name.split(":")[0].split("/")
            while len(components) > 1 and re.fullmatch(_TF_CALL_SCOPE, components[0]):
                components = components[1:]
            scopes.append(components)
    return scopes


def _keras_module(name: str) -> str | None:
    """`functional_1/block_1/hidden_1/Add` -> `block.hidden`, for a node a layer itself runs (not a sub-op):
    the root model's scope and the op's name dropped, each layer's `_N` uniquifier removed."""
    scopes = tf_scopes(name)
    if not scopes or len(scopes[0]) < 3:
        return None
    return ".".join(re.sub(r"_\d+$", "", component) for component in scopes[0][1:-1])


def layer_module(node: onnx.NodeProto) -> str | None:
    """The module path of a node that a layer's own forward runs (LoRA's sum of base and branch), as
    PEFT and `lora_spec` name modules: without PEFT's `base_model.model.` prefix and `.base_layer`."""
    module = node_module(node) or _keras_module(node.name)
    return normalized(module) if module else None


def normalized(module: str) -> str:
    """A module path without PEFT's wrapping: `base_model.model.mlp.0.base_layer` -> `mlp.0`."""
    return module.removeprefix(PEFT_PREFIX).removesuffix(PEFT_WRAPPER)
