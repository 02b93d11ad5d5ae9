"""The project's promise: one random layer, adapter and input give the same numbers everywhere.

Each example drives the same linear layer, or the same grouped 2-D convolution, through the NumPy
reference, the PyTorch backend, the Keras backend and onnxruntime (the PyTorch model exported with
its LoRA branch, then folded by `merge_onnx`), and asserts that all four agree: outputs, and
gradients for the two training backends. Everything runs in float32, the precision the frameworks
train in.
"""

import numpy as np
import pytest
from hypothesis import assume, given, settings

from lora_spec import reference
from tests import strategies
from tests.numerics import assert_close

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
onnxruntime = pytest.importorskip("onnxruntime")
lora_torch = pytest.importorskip("lora_spec.torch")
lora_keras = pytest.importorskip("lora_spec.keras")
export = pytest.importorskip("lora_spec.export")

from tests.backends.keras_cases import (
    dense_output_and_gradients,
    keras_can_run,
    lora_conv2d,
    lora_dense,
    nhwc,
)

# float32 products of up to MAX_FEATURES terms, compared across different summation orders
FACTOR = 50


def _lora_settings(case):
    rank = case.A.shape[0]
    return dict(r=rank, alpha=case.s * rank)


def _torch_layer(case):
    out_features, in_features = case.W.shape
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(in_features, out_features, bias=case.b is not None))
    with torch.no_grad():
        model.proj.weight.copy_(torch.from_numpy(case.W))
        if case.b is not None:
            model.proj.bias.copy_(torch.from_numpy(case.b))
    lora_torch.apply(model, target_modules=["proj"], bias="all", **_lora_settings(case))
    with torch.no_grad():
        model.proj.lora_A.copy_(torch.from_numpy(case.A))
        model.proj.lora_B.copy_(torch.from_numpy(case.B))
    return model


def _torch_run(case, grad_y):
    model = _torch_layer(case)
    x = torch.from_numpy(case.x).requires_grad_()
    mask = (
        None
        if case.dropout_mask is None
        else lora_torch.DropoutMask.from_reference(torch.from_numpy(case.dropout_mask))
    )
    y = model.proj(x, dropout_mask=mask)
    y.backward(torch.from_numpy(grad_y))
    grads = {
        "dx": x.grad,
        "dA": model.proj.lora_A.grad,
        "dB": model.proj.lora_B.grad,
        "db": None if case.b is None else model.proj.base_layer.bias.grad,
    }
    return y.detach().numpy(), {k: None if v is None else v.numpy() for k, v in grads.items()}


def _keras_run(case, grad_y):
    return dense_output_and_gradients(lora_dense(case, train_bias=True), case, grad_y)


def _onnx_merged_run(case, tmp_path):
    model = _torch_layer(case).eval()
    path = tmp_path / "layer.onnx"
    torch.onnx.export(
        model, (torch.from_numpy(case.x),), str(path), input_names=["x"], output_names=["y"], dynamo=False
    )
    result = export.merge_onnx(path, tmp_path / "merged.onnx", verify="off", progress=False)
    session = onnxruntime.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": case.x})[0]


@settings(max_examples=15)
@given(strategies.linear_cases(dtype=np.float32), strategies.seeds)
def test_numpy_torch_keras_and_merged_onnx_agree(tmp_path_factory, case, seed):
    grad_y = np.random.default_rng(seed).standard_normal((*case.x.shape[:-1], case.W.shape[0])).astype(np.float32)
    expected_y = reference.forward(case.x, case.W, case.b, case.A, case.B, case.s, case.dropout_mask)
    expected = reference.backward(case.x, case.W, case.A, case.B, case.s, grad_y, case.dropout_mask)._asdict()
    if case.b is None:
        expected["db"] = None

    for backend, run in (("torch", _torch_run), ("keras", _keras_run)):
        y, grads = run(case, grad_y)
        assert_close(y, expected_y, np.float32, factor=FACTOR), backend
        for name, value in expected.items():
            if value is None:
                assert grads[name] is None, (backend, name)
            else:
                assert_close(grads[name], value, np.float32, factor=FACTOR)

    no_dropout_y = reference.forward(case.x, case.W, case.b, case.A, case.B, case.s)
    assert_close(_onnx_merged_run(case, tmp_path_factory.mktemp("onnx")), no_dropout_y, np.float32, factor=FACTOR)


def _torch_conv(case):
    out_channels, _, height, width = case.W.shape
    model = torch.nn.Sequential()
    model.add_module(
        "conv",
        torch.nn.Conv2d(
            case.x.shape[1],
            out_channels,
            (height, width),
            stride=case.stride,
            padding=case.padding,
            dilation=case.dilation,
            groups=case.groups,
            bias=case.b is not None,
        ),
    )
    with torch.no_grad():
        model.conv.weight.copy_(torch.from_numpy(case.W))
        if case.b is not None:
            model.conv.bias.copy_(torch.from_numpy(case.b))
    lora_torch.apply(model, target_modules=["conv"], **_lora_settings(case))
    with torch.no_grad():
        model.conv.lora_A.copy_(torch.from_numpy(case.A))
        model.conv.lora_B.copy_(torch.from_numpy(case.B))
    return model


def _keras_conv_run(case, grad_y):
    import tensorflow as tf

    layer, x, _ = lora_conv2d(case)
    with tf.GradientTape() as tape:
        y = layer(x)
        loss = tf.reduce_sum(y * nhwc(grad_y))
    d_lora_a, d_lora_b = tape.gradient(loss, [layer.lora_a, layer.lora_b])
    return (
        y.numpy().transpose(0, 3, 1, 2),
        d_lora_a.numpy().transpose(3, 2, 0, 1),
        d_lora_b.numpy().transpose(3, 2, 0, 1),
    )


@settings(max_examples=10)
@given(strategies.conv2d_cases(dtype=np.float32, dropout=False), strategies.seeds)
def test_conv2d_numpy_torch_keras_and_merged_onnx_agree(tmp_path_factory, case, seed):
    assume(keras_can_run(case))
    expected_y = reference.conv2d_forward(case.x, case.W, case.b, case.A, case.B, case.s, **case.geometry)
    grad_y = np.random.default_rng(seed).standard_normal(expected_y.shape).astype(np.float32)
    expected = reference.conv2d_backward(case.x, case.W, case.A, case.B, case.s, grad_y, **case.geometry)

    model = _torch_conv(case)
    y = model.conv(torch.from_numpy(case.x))
    y.backward(torch.from_numpy(grad_y))
    outputs = {
        "torch": (y.detach().numpy(), model.conv.lora_A.grad.numpy(), model.conv.lora_B.grad.numpy()),
        "keras": _keras_conv_run(case, grad_y),
    }
    for backend, (y, d_a, d_b) in outputs.items():
        assert_close(y, expected_y, np.float32, factor=FACTOR), backend
        assert_close(d_a, expected.dA, np.float32, factor=FACTOR), backend
        assert_close(d_b, expected.dB, np.float32, factor=FACTOR), backend

    folder = tmp_path_factory.mktemp("onnx")
    torch.onnx.export(
        model.eval(),
        (torch.from_numpy(case.x),),
        str(folder / "conv.onnx"),
        input_names=["x"],
        output_names=["y"],
        dynamo=False,
    )
    result = export.merge_onnx(folder / "conv.onnx", folder / "merged.onnx", verify="off", progress=False)
    session = onnxruntime.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    assert_close(session.run(None, {"x": case.x})[0], expected_y, np.float32, factor=FACTOR)
