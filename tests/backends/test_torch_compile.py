"""Compilers and tracers see the plain LoRA branch, and give the eager results."""

import pytest

torch = pytest.importorskip("torch")

import lora_spec.torch as lora


def small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    lora.apply(model, r=2, alpha=4, target_modules=["0", "2"])
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
    return model


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_forward_and_backward_under_torch_compile_match_eager():
    eager, compiled_model = small_model().train(), small_model().train()
    x = torch.randn(5, 8)
    eager(x).square().sum().backward()
    compiled = torch.compile(compiled_model, fullgraph=True)
    compiled(x).square().sum().backward()
    expected, actual = gradients(eager), gradients(compiled_model)
    assert actual.keys() == expected.keys() == {f"{i}.adapters.default.lora_{half}" for i in (0, 2) for half in "AB"}
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)


def test_tracing_in_training_mode_records_plain_ops_not_the_fused_function():
    model = small_model().train()
    x = torch.randn(5, 8, requires_grad=True)
    traced = torch.jit.trace(model, x)
    graph = str(traced.inlined_graph)
    assert "LinearLoRAFunction" not in graph and "PythonOp" not in graph
    assert graph.count("aten::linear") == 6  # base, A and B of each adapted layer
    torch.testing.assert_close(traced(x), model(x))


def test_export_in_training_mode_gives_the_standard_lora_branch():
    model = small_model().train()
    exported = torch.export.export(model, (torch.randn(5, 8),))
    operations = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    branch = ["aten.linear.default", "aten.linear.default", "aten.linear.default", "aten.mul.Tensor", "aten.add.Tensor"]
    assert operations == [*branch, "aten.gelu.default", *branch]
