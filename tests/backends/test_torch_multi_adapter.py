"""Several named adapters on one PyTorch model: layers against the reference, switching, deleting, combining,
routed batches, hot-swapping and the folders they are saved in."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_spec import reference
from lora_spec.multi_adapter import BASE_MODEL, Routing, combine, routed_forward
from tests import strategies
from tests.numerics import assert_close

torch = pytest.importorskip("torch")
nn = torch.nn

import lora_spec.torch as lora
from lora_spec.backends.torch_layers import lora_layer_for
from tests.backends.test_torch_model import TinyModel

# --- one layer, several adapters, against the reference ---------------------------------------------------------


def _base_module(case):
    base = case.base
    if case.layer == "linear":
        module = nn.Linear(base.W.shape[1], base.W.shape[0], bias=base.b is not None)
    elif case.layer == "embedding":
        module = nn.Embedding(*base.W.shape)
    else:
        module = nn.Conv2d(
            base.W.shape[1] * base.groups,
            base.W.shape[0],
            base.W.shape[2:],
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=base.groups,
            bias=base.b is not None,
        )
    module.double().requires_grad_(False)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(base.W))
        if getattr(base, "b", None) is not None:
            module.bias.copy_(torch.from_numpy(base.b))
    return module


def lora_layer(case):
    """A LoRA layer holding the case's adapters as `a0`, `a1`, ... (only `a0` active)."""
    first = case.adapters[0]
    layer = lora_layer_for(_base_module(case))(_base_module(case), first.A.shape[0], 1.0, first.s, adapter_name="a0")
    for index, adapter in enumerate(case.adapters):
        name = f"a{index}"
        if name not in layer.adapters:
            layer.add_adapter(name, adapter.A.shape[0], 1.0, adapter.s)
        layer.adapters[name].assign(torch.from_numpy(adapter.A), torch.from_numpy(adapter.B))
    return layer


def _reference_forward(case, adapter, rows=slice(None)):
    base = case.base
    if case.layer == "linear":
        return reference.forward(base.x[rows], base.W, base.b, adapter.A, adapter.B, adapter.s)
    if case.layer == "embedding":
        return reference.embedding_forward(base.ids[rows], base.W, adapter.A, adapter.B, adapter.s)
    return reference.conv2d_forward(base.x[rows], base.W, base.b, adapter.A, adapter.B, adapter.s, **base.geometry)


def _layer_input(case):
    return torch.from_numpy(case.base.ids if case.layer == "embedding" else case.base.x)


@given(strategies.adapter_set_cases(), st.data(), st.booleans())
def test_active_adapters_add_up_and_merge_as_the_reference_sum(case, data, grad):
    """With gradients the updates are summed out of place; without, a linear adds them in place."""
    with torch.set_grad_enabled(grad):
        layer = lora_layer(case).eval()
        names = [f"a{index}" for index in range(len(case.adapters))]
        active = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
        layer.active_adapters = active
        zero = case.adapters[0]._replace(B=np.zeros_like(case.adapters[0].B))
        base_output = _reference_forward(case, zero)
        expected = base_output + sum(
            _reference_forward(case, case.adapters[names.index(name)]) - base_output for name in active
        )
        x = _layer_input(case)
        unmerged = layer(x).detach()
        assert_close(unmerged.numpy(), expected, factor=100)
        weight = layer.base_layer.weight.clone()
        layer.merge()
        assert layer.merged_adapters == active
        assert_close(layer(x).detach().numpy(), unmerged.numpy(), factor=100)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, weight)


@given(strategies.adapter_set_cases(), st.data(), st.booleans())
def test_routed_rows_equal_their_own_adapters_forward(case, data, grad):
    with torch.set_grad_enabled(grad):
        layer = lora_layer(case).eval()
        names = [f"a{index}" for index in range(len(case.adapters))]
        rows = _layer_input(case).shape[0]
        routes = data.draw(st.lists(st.sampled_from([*names, None, BASE_MODEL]), min_size=rows, max_size=rows))
        layer.route(Routing.of(routes))
        actual = layer(_layer_input(case)).detach().numpy()
        zero = case.adapters[0]._replace(B=np.zeros_like(case.adapters[0].B))
        for row, name in enumerate(routes):
            adapter = zero if name in (None, BASE_MODEL) else case.adapters[names.index(name)]
            assert_close(actual[row], _reference_forward(case, adapter, slice(row, row + 1))[0], factor=100)
        if case.layer == "linear":
            adapters = dict(zip(names, case.adapters, strict=True))
            assert_close(actual, routed_forward(case.base.x, case.W, case.base.b, adapters, routes), factor=100)


def test_a_layer_refuses_a_routing_list_that_does_not_fit_the_batch_and_routing_in_training():
    layer = lora_layer_for(nn.Linear(3, 2))(nn.Linear(3, 2), 2, 2.0, 1.0).eval()
    layer.route(Routing.of(["default", None]))
    with pytest.raises(ValueError, match="names 2 adapters, one per row, but this batch has 3 rows"):
        layer(torch.randn(3, 3))
    with pytest.raises(ValueError, match="for inference"):
        layer.train()(torch.randn(2, 3))


# --- whole models -----------------------------------------------------------------------------------------------


def _randomise(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def two_adapters(conv_groups=2):
    """A TinyModel with adapter "default" (q/v, r=2) and "other" (v/k/embed/conv, r=4, alpha=3, a head copy)."""
    torch.manual_seed(0)
    model = TinyModel()
    if conv_groups == 1:
        model.conv = nn.Conv2d(2, 4, 3, padding=1)
    lora.apply(model, r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    lora.apply(
        model,
        adapter_name="other",
        r=4,
        alpha=3,
        target_modules=["v_proj", "k_proj", "embed", "conv"],
        modules_to_save=["classifier"],
    )
    return _randomise(model, 1).eval()


def batch(rows=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (rows, 5), generator=generator), torch.randn(rows, 2, 6, 6, generator=generator)


def test_a_second_adapter_is_added_inactive_with_its_own_targets_rank_and_alpha():
    model = two_adapters()
    assert lora.adapter_names(model) == ["default", "other"] and lora.active_adapters(model) == ["default"]
    assert set(model.attention.v_proj.adapters) == {"default", "other"}
    assert set(model.attention.k_proj.adapters) == {"other"} and model.attention.k_proj.adapters["other"].r == 4
    assert model.attention.v_proj.adapters["other"].scaling == 0.75
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"attention.{p}_proj.adapters.default.lora_{h}" for p in "qv" for h in "AB"}


def test_set_adapter_switches_outputs_and_what_trains():
    model = two_adapters()
    default_output = model(*batch())
    lora.set_adapter(model, "other")
    other_output = model(*batch())
    assert not torch.allclose(default_output, other_output)
    model.train()
    model(*batch()).sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".adapters.other." in name or ".modules_to_save.other." in name for name in with_grad)
    assert with_grad == {name for name, p in model.named_parameters() if p.requires_grad}
    model.eval()
    lora.set_adapter(model, "default")
    torch.testing.assert_close(model(*batch()), default_output)


def test_two_active_adapters_add_up():
    model = two_adapters()
    with lora.disable_adapters(model):
        base_output = model(*batch())
    lora.set_adapter(model, "other")
    other = model(*batch()) - base_output
    lora.set_adapter(model, "default")
    default = model(*batch()) - base_output
    lora.set_adapter(model, ["default", "other"])
    # The head copy of "other" is not linear in the adapters' updates: compare layer outputs instead.
    layer = model.attention.v_proj
    x = torch.randn(3, 8)
    expected = layer.base_layer(x) + sum(layer.update(layer.adapters[name], x) for name in ("default", "other"))
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(default, other)


def test_set_adapter_on_a_merged_model_unmerges_first_with_a_warning():
    model = two_adapters()
    expected = model(*batch())
    lora.merge(model)
    with pytest.warns(UserWarning, match="unmerging"):
        lora.set_adapter(model, "other")
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, lora.LoRALayer))
    lora.set_adapter(model, "default")
    torch.testing.assert_close(model(*batch()), expected)


def test_unknown_names_are_refused_with_the_existing_ones():
    model = two_adapters()
    for call in (
        lambda: lora.set_adapter(model, "third"),
        lambda: lora.delete_adapter(model, "third"),
        lambda: lora.save_adapter(model, "unused", adapter_name="third"),
    ):
        with pytest.raises(ValueError, match="unknown adapter 'third': the model has adapters 'default', 'other'"):
            call()


def test_deleting_the_active_adapter_activates_the_first_remaining_and_deleting_the_last_leaves_the_base():
    model = two_adapters()
    with lora.disable_adapters(model):
        base_output = model(*batch())
    with pytest.warns(UserWarning, match="'default' was active and is deleted: 'other' is active now"):
        lora.delete_adapter(model, "default")
    assert lora.active_adapters(model) == ["other"] and type(model.attention.q_proj) is nn.Linear
    lora.delete_adapter(model, "other")
    assert not any(isinstance(m, (lora.LoRALayer, lora.ModulesToSave)) for m in model.modules())
    assert not hasattr(model, "lora_configs")
    torch.testing.assert_close(model(*batch()), base_output)


def test_modules_to_save_keep_one_copy_per_adapter_and_switch_with_it():
    model = two_adapters()
    lora.apply(model, adapter_name="third", target_modules=["q_proj"], modules_to_save=["classifier"])
    head = model.classifier
    assert set(head.modules_to_save) == {"other", "third"} and head.trained_module is None
    lora.set_adapter(model, "other")
    assert head.trained_module is head.modules_to_save["other"]
    with pytest.raises(ValueError, match="'other', 'third' each train their own 'classifier'"):
        lora.set_adapter(model, ["other", "third"])


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_add_weighted_adapter_combines_each_layer_by_the_reference(combination_type):
    model = two_adapters()
    lora.apply(
        model, adapter_name="third", r=4, alpha=2, use_rslora=True, target_modules=["v_proj", "o_proj", "embed", "conv"]
    )
    _randomise(model, 2)
    names, weights = (["other", "third"], [0.7, -1.3])
    lora.add_weighted_adapter(model, names, weights, "mixed", combination_type=combination_type, svd_rank=4)
    assert lora.active_adapters(model) == ["default"]
    for path in ("attention.v_proj", "attention.o_proj", "embed", "conv"):
        layer = model.get_submodule(path)
        present = [(layer.adapters[n], w) for n, w in zip(names, weights, strict=True) if n in layer.adapters]
        factors = [reference_factors(adapter) for adapter, _ in present]
        expected_a, expected_b = combine(factors, [w for _, w in present], combination_type, svd_rank=4)
        mixed = layer.adapters["mixed"]
        assert mixed.scaling == 1.0 and not mixed.lora_A.requires_grad
        torch.testing.assert_close(mixed.lora_A, torch.from_numpy(expected_a))
        torch.testing.assert_close(mixed.lora_B, torch.from_numpy(expected_b))
    assert "mixed" not in model.attention.q_proj.adapters
    assert set(model.classifier.modules_to_save) == {"other", "mixed"}


def reference_factors(adapter):
    from lora_spec.multi_adapter import Factors

    return Factors(adapter.lora_A.detach().numpy(), adapter.lora_B.detach().numpy(), float(adapter.scaling))


def test_cat_gives_the_weighted_sum_of_the_adapters_outputs():
    model = two_adapters()
    with lora.disable_adapters(model):
        base = model.attention.v_proj(torch.ones(1, 8))
    lora.add_weighted_adapter(model, ["default", "other"], [2.0, -0.5], "mixed", combination_type="cat")
    layer, x = model.attention.v_proj, torch.randn(3, 8)
    expected = (
        layer.base_layer(x)
        + 2.0 * layer.update(layer.adapters["default"], x)
        - 0.5 * layer.update(layer.adapters["other"], x)
    )
    lora.set_adapter(model, "mixed")
    torch.testing.assert_close(layer(x), expected)
    assert base.shape == (1, 8)


def test_add_weighted_adapter_refuses_bad_input_and_leaves_the_model_unchanged():
    model = two_adapters()
    lora.apply(model, adapter_name="third", r=3, target_modules=["v_proj"], modules_to_save=["classifier"])
    state = {name: p.clone() for name, p in model.state_dict().items()}
    for arguments, message in [
        ((["default", "other"], [1.0, 1.0], "mixed", "linear"), "module 'attention.v_proj'.*one rank"),
        ((["default", "other"], [1.0], "mixed", "cat"), "one weight per adapter"),
        ((["default", "other"], [1.0, 1.0], "other", "cat"), "already has an adapter 'other'"),
        ((["default", "nope"], [1.0, 1.0], "mixed", "cat"), "unknown adapter 'nope'"),
        ((["other", "third"], [1.0, 1.0], "mixed", "cat"), "each train their own 'classifier'"),
        ((["default", "other"], [1.0, 1.0], "mixed", "ties"), "combination_type='ties' is invalid"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            lora.add_weighted_adapter(model, *arguments)
        assert "\n" not in str(error.value)
    assert lora.adapter_names(model) == ["default", "other", "third"]
    assert state.keys() == model.state_dict().keys()


def test_routed_batches_equal_each_rows_own_adapter_and_base_rows_equal_the_base():
    model = two_adapters()
    routes = ["other", "default", BASE_MODEL, "other"]
    with lora.routed(model, routes):
        actual = model(*batch())
    ids, image = batch()
    for row, name in enumerate(routes):
        single = (ids[row : row + 1], image[row : row + 1])
        if name == BASE_MODEL:
            with lora.disable_adapters(model):
                expected = model(*single)
        else:
            lora.set_adapter(model, name)
            expected = model(*single)
        torch.testing.assert_close(actual[row : row + 1], expected)
    lora.set_adapter(model, "default")
    with lora.routed(model, routes), lora.disable_adapters(model):
        routed_base = model(*batch())
    with lora.disable_adapters(model):
        torch.testing.assert_close(routed_base, model(*batch()))


def test_routing_is_refused_in_training_on_merged_models_and_with_unknown_names():
    model = two_adapters()
    with pytest.raises(ValueError, match="unknown adapter 'x'"), lora.routed(model, ["x", None]):
        pass
    with pytest.raises(ValueError, match=r"call model\.eval"), lora.routed(model.train(), ["other", None]):
        pass
    lora.merge(model.eval())
    with pytest.raises(ValueError, match=r"merged.*unmerge"), lora.routed(model, ["other", None]):
        pass
    lora.unmerge(model)
    with (
        lora.routed(model, ["other", None, None]),
        pytest.raises(ValueError, match="one per row, but this batch has 4 rows"),
    ):
        model(*batch())


def test_inference_without_gradients_gives_the_same_outputs():
    model = two_adapters()
    lora.set_adapter(model, ["default", "other"])
    expected = model(*batch())
    with torch.inference_mode():
        torch.testing.assert_close(model(*batch()), expected)
        with lora.routed(model, ["other", "default", None, "other"]):
            routed = model(*batch())
    with lora.routed(model, ["other", "default", None, "other"]):
        torch.testing.assert_close(model(*batch()), routed)


def test_merge_and_unmerge_act_on_the_active_adapters():
    model = two_adapters()
    lora.set_adapter(model, ["default", "other"])
    expected = model(*batch())
    lora.merge(model)
    assert model.attention.v_proj.merged_adapters == ["default", "other"]
    torch.testing.assert_close(model(*batch()), expected, rtol=1e-5, atol=1e-5)
    plain = lora.merge_and_unload(model)
    torch.testing.assert_close(plain(*batch()), expected, rtol=1e-5, atol=1e-5)


def test_a_state_dict_saved_with_one_adapter_per_layer_still_loads():
    model = two_adapters()
    lora.delete_adapter(model, "other")
    old = {key.replace("adapters.default.", ""): value for key, value in model.state_dict().items()}
    assert "attention.q_proj.lora_A" in old
    fresh = lora.apply(TinyModel(), r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.eval()(*batch()), model(*batch()))
    head = lora.apply(TinyModel(), target_modules=["q_proj"], modules_to_save=["classifier"])
    renamed = {
        key.replace("modules_to_save.default.", "trained_module."): value for key, value in head.state_dict().items()
    }
    assert "classifier.trained_module.weight" in renamed
    head.load_state_dict(renamed)


# --- adapter folders ------------------------------------------------------------------------------------------------


def test_save_writes_peft_layout_and_load_reads_every_adapter_back(tmp_path):
    model = two_adapters()
    lora.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_model.safetensors").is_file()
    config = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["attention.k_proj", "attention.v_proj", "conv", "embed"]
    assert config["r"] == 4 and config["lora_alpha"] == 3 and config["modules_to_save"] == ["classifier"]
    loaded = lora.load_adapter(TinyModel(), tmp_path).eval()
    assert lora.adapter_names(loaded) == ["default", "other"] and lora.active_adapters(loaded) == ["default"]
    with torch.no_grad():
        loaded.load_state_dict(
            {k: v for k, v in model.state_dict().items() if ".lora_" not in k and ".modules_to_save." not in k},
            strict=True,
        )
    for name in ("default", "other"):
        lora.set_adapter(model, name)
        lora.set_adapter(loaded, name)
        torch.testing.assert_close(loaded(*batch()), model(*batch()))


def test_saving_one_adapter_and_loading_it_under_a_name_replaces_that_adapter(tmp_path):
    model = two_adapters()
    lora.save_adapter(model, tmp_path, adapter_name="other")
    assert not (tmp_path / "adapter_config.json").exists() and (tmp_path / "other" / "adapter_config.json").is_file()
    target = two_adapters()
    _randomise(target, 5)
    lora.load_adapter(target, tmp_path / "other", adapter_name="default")
    assert lora.active_adapters(target) == ["default"]
    assert set(target.attention.k_proj.adapters) == {"default", "other"} and type(target.attention.q_proj) is nn.Linear
    lora.set_adapter(model, "other")
    torch.testing.assert_close(target(*batch()), model(*batch()))


def test_a_model_without_the_names_folders_is_refused_with_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"has no adapter_config\.json, nor subfolders with one"):
        lora.load_adapter(TinyModel(), tmp_path)


# --- hot-swap under torch.compile -------------------------------------------------------------------------------


def _adapter_folder(tmp_path, name, seed, **options):
    torch.manual_seed(0)
    model = _randomise(lora.apply(TinyModel(), **options), seed).eval()
    lora.save_adapter(model, tmp_path / name)
    return model


def test_hotswap_in_a_compiled_model_gives_the_new_adapters_outputs_without_recompiling(tmp_path):
    first = _adapter_folder(tmp_path, "first", 1, r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    second = _adapter_folder(tmp_path, "second", 2, r=6, alpha=3, target_modules=["v_proj"])
    torch.manual_seed(0)
    model = lora.load_adapter(TinyModel(), tmp_path / "first").eval()
    lora.prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch.testing.assert_close(model(*batch()), first(*batch()))
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(*batch())
        torch._dynamo.config.error_on_recompile = True
        try:
            lora.hotswap_adapter(compiled, tmp_path / "second", "default")
            swapped = compiled(*batch())
            lora.hotswap_adapter(compiled, tmp_path / "first", "default")
            again = compiled(*batch())
        finally:
            torch._dynamo.config.error_on_recompile = False
    torch.testing.assert_close(swapped, second(*batch()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, first(*batch()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already compiled"):
        lora.prepare_model_for_compiled_hotswap(compiled)


def test_hotswap_refuses_new_targets_and_ranks_above_the_prepared_one(tmp_path):
    _adapter_folder(tmp_path, "first", 1, r=2, target_modules=["q_proj"])
    _adapter_folder(tmp_path, "wider", 2, r=2, target_modules=["q_proj", "k_proj"])
    _adapter_folder(tmp_path, "larger", 3, r=8, target_modules=["q_proj"])
    model = lora.load_adapter(TinyModel(), tmp_path / "first")
    lora.prepare_model_for_compiled_hotswap(model, target_rank=4)
    state = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"targets 'attention\.k_proj', which adapter 'default' does not"):
        lora.hotswap_adapter(model, tmp_path / "wider", "default")
    with pytest.raises(ValueError, match=r"rank 8 at 'attention.q_proj', above the 4 prepared.*target_rank=8"):
        lora.hotswap_adapter(model, tmp_path / "larger", "default")
    assert all(torch.equal(state[name], p) for name, p in model.state_dict().items())
