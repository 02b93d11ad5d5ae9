"""The output folder: checked before training, replaced only by a finished run, never half-written."""

from __future__ import annotations

import pytest

from lora_spec.finetune import outputs


def _previous_run(folder):
    folder.mkdir()
    (folder / outputs.MARKER).write_text("{}")
    (folder / "model.onnx").write_text("previous")
    return folder


def test_a_finished_run_replaces_the_previous_one_and_leaves_no_hidden_folders(tmp_path):
    output = _previous_run(tmp_path / "run")
    with outputs.staged_output(output) as staging:
        (staging / "model.onnx").write_text("new")
    assert (output / "model.onnx").read_text() == "new"
    assert not (output / outputs.MARKER).exists()
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_run_leaves_the_previous_outputs_intact(tmp_path, interruption):
    output = _previous_run(tmp_path / "run")
    with pytest.raises(interruption), outputs.staged_output(output) as staging:
        (staging / "model.onnx").write_text("half")
        raise interruption()
    assert (output / "model.onnx").read_text() == "previous"
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


def test_the_output_folder_gets_the_permissions_mkdir_would_give_it(tmp_path):
    (tmp_path / "plain").mkdir()
    output = tmp_path / "run"
    with outputs.staged_output(output):
        pass
    assert output.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_new_output_folder_and_its_parents_are_created(tmp_path):
    output = outputs.check_output_dir(tmp_path / "a" / "b" / "run")
    with outputs.staged_output(output) as staging:
        (staging / "summary.md").write_text("done")
    assert (tmp_path / "a" / "b" / "run" / "summary.md").read_text() == "done"


def test_a_folder_with_other_files_is_never_replaced(tmp_path):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("precious")
    with pytest.raises(ValueError, match=r"holds files that are not a lora-spec run: pass another --output"):
        outputs.check_output_dir(tmp_path / "thesis")


def test_an_empty_folder_or_a_previous_run_is_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    assert outputs.check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    assert outputs.check_output_dir(_previous_run(tmp_path / "run")) == tmp_path / "run"


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(ValueError, match=r"is a file: pass --output a folder path"):
        outputs.check_output_dir(tmp_path / "run")


def test_an_output_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"cannot be written .*: pass --output a folder you can write to"):
        outputs.check_output_dir(tmp_path / "file" / "run")
    assert [path.name for path in tmp_path.iterdir()] == ["file"]
