"""Adapter directories: PEFT's key names, atomic writes and clear errors."""

import json

import numpy as np
import pytest

from lora_spec import AdapterWeights, LoRAConfig, load_adapter_dir, save_adapter_dir
from lora_spec.adapter_io import CONFIG_NAME, WEIGHTS_NAME


def _weights():
    rng = np.random.default_rng(0)
    return AdapterWeights(
        lora={"encoder.query": (rng.standard_normal((2, 4)), rng.standard_normal((3, 2))),
              "embeddings.word": (rng.standard_normal((2, 10)), rng.standard_normal((4, 2)))},
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
    with pytest.raises(ValueError, match="adapter has no lora_B for module 'm.q'"):
        AdapterWeights.from_peft_tensors({"base_model.model.m.q.lora_A.weight": np.zeros((1, 1))})


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), f"has no {CONFIG_NAME}"),
    (lambda d: (d.mkdir(), (d / CONFIG_NAME).write_text("{}"), (d / "adapter_model.bin").write_bytes(b"x")),
     "adapter_model.bin is pickle, which lora_spec never loads"),
    (lambda d: (d.mkdir(), (d / CONFIG_NAME).write_text("{not json"), (d / WEIGHTS_NAME).write_bytes(b"")),
     "is not valid JSON"),
    (lambda d: (d.mkdir(), (d / CONFIG_NAME).write_text(json.dumps({"use_dora": True})),
                (d / WEIGHTS_NAME).write_bytes(b"\x02" + b"\x00" * 7 + b"{}")), "use_dora"),
])
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
