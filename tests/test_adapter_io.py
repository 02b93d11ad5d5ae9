"""Adapter directories: PEFT's key names, atomic writes and clear errors."""

import json

import numpy as np
import pytest

from lora_spec import AdapterWeights, LoRAConfig, load_adapter_dir, save_adapter_dir
from lora_spec.adapter_io import CONFIG_NAME, WEIGHTS_NAME


def _weights():
    rng = np.random.default_rng(0)
    return AdapterWeights(
        lora={
            "encoder.query": (rng.standard_normal((2, 4)), rng.standard_normal((3, 2))),
            "embeddings.word": (rng.standard_normal((2, 10)), rng.standard_normal((4, 2))),
        },
        embeddings={"embeddings.word"},
        extra={"classifier.weight": rng.standard_normal((2, 3))},
    )


def test_keys_follow_peft_naming():
    assert sorted(_weights().to_peft_tensors()) == [
        "base_model.model.classifier.weight",
        "base_model.model.embeddings.word.lora_embedding_A",
        "base_model.model.embeddings.word.lora_embedding_B",
        "base_model.model.encoder.query.lora_A.weight",
        "base_model.model.encoder.query.lora_B.weight",
    ]


def test_save_then_load_round_trips_config_and_tensors(tmp_path):
    config = LoRAConfig(r=2, alpha=4, target_modules=("query", "word"), modules_to_save=("classifier",))
    save_adapter_dir(tmp_path / "adapter", config.to_peft_dict(), _weights())
    loaded_config, raw, weights = load_adapter_dir(tmp_path / "adapter")
    assert loaded_config == config and raw["peft_type"] == "LORA"
    assert weights.embeddings == {"embeddings.word"}
    for path, (lora_a, lora_b) in _weights().lora.items():
        np.testing.assert_array_equal(weights.lora[path][0], lora_a)
        np.testing.assert_array_equal(weights.lora[path][1], lora_b)
    np.testing.assert_array_equal(weights.extra["classifier.weight"], _weights().extra["classifier.weight"])


def test_saving_nan_writes_nothing(tmp_path):
    weights = _weights()
    weights.lora["encoder.query"][0][0, 0] = np.nan
    with pytest.raises(ValueError, match="holds NaN or inf"):
        save_adapter_dir(tmp_path / "adapter", LoRAConfig().to_peft_dict(), weights)
    assert not (tmp_path / "adapter" / WEIGHTS_NAME).exists()


def test_a_pair_missing_its_b_half_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"adapter has no lora_B for module 'm\.q'"):
        AdapterWeights.from_peft_tensors({"base_model.model.m.q.lora_A.weight": np.zeros((1, 1))})


def _dora_weights():
    weights = _weights()
    rng = np.random.default_rng(1)
    weights.lora["features.conv"] = (rng.standard_normal((2, 3, 3, 3)), rng.standard_normal((5, 2, 1, 1)))
    weights.magnitudes = {
        "encoder.query": rng.random(3),
        "embeddings.word": rng.random(4),
        "features.conv": rng.random((1, 5, 1, 1)),
    }
    return weights


def test_dora_magnitudes_round_trip_under_pefts_keys(tmp_path):
    config = LoRAConfig(r=2, use_dora=True, target_modules=("query", "word", "conv"), modules_to_save=("classifier",))
    save_adapter_dir(tmp_path / "adapter", config.to_peft_dict(), _dora_weights())
    assert {key for key in _dora_weights().to_peft_tensors() if "magnitude" in key} == {
        "base_model.model.encoder.query.lora_magnitude_vector",
        "base_model.model.embeddings.word.lora_magnitude_vector",
        "base_model.model.features.conv.lora_magnitude_vector",
    }
    loaded_config, raw, weights = load_adapter_dir(tmp_path / "adapter")
    assert loaded_config.use_dora and raw["use_dora"] is True
    for path, magnitude in _dora_weights().magnitudes.items():
        np.testing.assert_array_equal(weights.magnitudes[path], magnitude)
    assert weights.layer("features.conv") == "conv2d" and weights.layer("embeddings.word") == "embedding"


def test_a_dora_adapter_saved_by_peft_loads_with_pefts_magnitude_shapes(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(11, 4), "proj": torch.nn.Linear(4, 6), "conv": torch.nn.Conv2d(3, 5, 3)}
    )
    peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["embed", "proj", "conv"], use_dora=True)
    ).save_pretrained(tmp_path)
    config, _, weights = load_adapter_dir(tmp_path)
    assert config.use_dora
    assert {path: value.shape for path, value in weights.magnitudes.items()} == {
        "embed": (4,),
        "proj": (6,),
        "conv": (1, 5, 1, 1),
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.update({"base_model.model.encoder.query.lora_magnitude_vector": np.ones(4)}),
            r"encoder.query.lora_magnitude_vector has shape \(4,\), but the module's lora_B makes 3 output "
            r"features, so PEFT's shape is \(3,\)",
        ),
        (
            lambda t: t.update({"base_model.model.features.conv.lora_magnitude_vector": np.ones(5)}),
            r"PEFT's shape is \(1, 5, 1, 1\)",
        ),
        (
            lambda t: t.update({"base_model.model.other.lora_magnitude_vector": np.ones(3)}),
            "DoRA magnitude for module 'other' but no lora_A/lora_B",
        ),
        (
            lambda t: t.pop("base_model.model.embeddings.word.lora_magnitude_vector"),
            "DoRA adapter \\(use_dora=true\\) without a lora_magnitude_vector for module 'embeddings.word'",
        ),
    ],
)
def test_dora_files_whose_magnitudes_do_not_fit_are_refused_in_one_line(tmp_path, change, message):
    from lora_spec import safetensors_io

    save_adapter_dir(tmp_path, LoRAConfig(use_dora=True).to_peft_dict(), _dora_weights())
    tensors, _ = safetensors_io.load(tmp_path / WEIGHTS_NAME)
    change(tensors)
    safetensors_io.save(tmp_path / WEIGHTS_NAME, tensors)
    with pytest.raises(ValueError, match=message) as error:
        load_adapter_dir(tmp_path)
    assert "\n" not in str(error.value)


def test_magnitudes_with_use_dora_false_are_refused(tmp_path):
    save_adapter_dir(tmp_path, LoRAConfig().to_peft_dict(), _dora_weights())
    with pytest.raises(ValueError, match=r"holds DoRA magnitudes .* but its config has use_dora=false"):
        load_adapter_dir(tmp_path)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), f"has no {CONFIG_NAME}"),
        (
            lambda d: (d.mkdir(), (d / CONFIG_NAME).write_text("{}"), (d / "adapter_model.bin").write_bytes(b"x")),
            "adapter_model.bin is pickle, which lora_spec never loads",
        ),
        (
            lambda d: (d.mkdir(), (d / CONFIG_NAME).write_text("{not json"), (d / WEIGHTS_NAME).write_bytes(b"")),
            "is not valid JSON",
        ),
        (
            lambda d: (
                d.mkdir(),
                (d / CONFIG_NAME).write_text(json.dumps({"use_dora": True, "lora_bias": True})),
                (d / WEIGHTS_NAME).write_bytes(b"\x02" + b"\x00" * 7 + b"{}"),
            ),
            "lora_bias=true with use_dora=true",
        ),
    ],
)
def test_bad_adapter_directories_raise_one_line_errors(tmp_path, setup, message):
    setup(tmp_path / "adapter")
    with pytest.raises(ValueError, match=message) as error:
        load_adapter_dir(tmp_path / "adapter")
    assert "\n" not in str(error.value)


def test_written_files_get_the_permissions_open_would_give_them(tmp_path):
    import os

    save_adapter_dir(tmp_path / "adapter", LoRAConfig().to_peft_dict(), _weights())
    mask = os.umask(0)
    os.umask(mask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / "adapter" / name).stat().st_mode & 0o777 == 0o666 & ~mask
