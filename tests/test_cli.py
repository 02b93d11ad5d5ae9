"""`lora-spec`: --help, and every bad input stopping with one line before any training."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lora_spec import cli
from lora_spec.finetune import train
from tests.finetune.tiny import write_csv, write_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture
def no_training(monkeypatch):
    """Make any training attempt fail the test: bad input must stop before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(train, "train", refuse)


@pytest.mark.parametrize(
    "command, options",
    [
        (
            "finetune",
            (
                "--rank",
                "--alpha",
                "--dropout",
                "--targets",
                "--epochs",
                "--batch-size",
                "--lr",
                "--output",
                "--seed",
                "--max-examples",
                "--model",
                "--data",
                "--threads",
            ),
        ),
        ("compare", ("--seeds", "--rank", "--alpha", "--dropout", "--targets", "--epochs", "--batch-size", "--lr")),
    ],
)
def test_help_lists_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text


def test_console_script_help_runs_without_importing_torch():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from lora_spec import cli\n"
            "try: cli.main(['finetune', '--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def _fails_with_one_line(argv, capsys, message):
    status = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == cli.EXIT_BAD_INPUT
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"lora-spec {argv[0]}: error:")
    assert message in lines[0], lines[0]
    assert captured.out == ""


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--epochs", "0", "--epochs 0 is invalid"),
        ("--rank", "0", "--r 0 is invalid"),
        ("--lr", "-1", "--learning-rate -1.0 is invalid"),
        ("--dropout", "1.0", "--dropout 1.0 is invalid"),
        ("--validation-fraction", "1", "--validation-fraction 1.0 is invalid"),
        ("--max-examples", "2", "--max-examples 2 is invalid"),
        ("--threads", "0", "--threads 0 is invalid"),
    ],
)
def test_out_of_range_option_fails_with_one_line(tmp_path, capsys, no_training, option, value, message):
    _fails_with_one_line(["finetune", "--output", str(tmp_path / "run"), option, value], capsys, message)
    assert list(tmp_path.iterdir()) == []


def test_missing_model_folder_fails_before_training(tmp_path, capsys, no_training):
    data = write_csv(tmp_path / "rows.csv")
    _fails_with_one_line(
        ["finetune", "--model", str(tmp_path / "nowhere"), "--data", str(data), "--output", str(tmp_path / "run")],
        capsys,
        "nowhere does not exist: pass --model DIR",
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rows.csv"]


def test_model_folder_without_config_fails_before_training(tmp_path, capsys, no_training):
    (tmp_path / "model").mkdir()
    data = write_csv(tmp_path / "rows.csv")
    _fails_with_one_line(
        ["finetune", "--model", str(tmp_path / "model"), "--data", str(data), "--output", str(tmp_path / "run")],
        capsys,
        "has no config.json",
    )


def test_data_file_with_wrong_columns_fails_before_training(tmp_path, tiny_bert, capsys, no_training):
    data = write_csv(tmp_path / "rows.csv", [("good", "positive"), ("bad", "negative")], header=("sentence", "label"))
    _fails_with_one_line(
        ["finetune", "--model", str(tiny_bert), "--data", str(data), "--output", str(tmp_path / "run")],
        capsys,
        "but no 'text'",
    )
    assert not (tmp_path / "run").exists()


def test_data_file_with_an_unknown_label_fails_before_training(tmp_path, tiny_bert, capsys, no_training):
    data = write_csv(tmp_path / "rows.csv", [("good", "positive"), ("bad", "negative"), ("sad", "negtive")])
    _fails_with_one_line(
        [
            "finetune",
            "--model",
            str(tiny_bert),
            "--data",
            str(data),
            "--labels",
            "negative,positive",
            "--output",
            str(tmp_path / "run"),
        ],
        capsys,
        "rows.csv:4 has label 'negtive'",
    )


def test_label_with_a_single_example_fails_before_training(tmp_path, tiny_bert, capsys, no_training):
    data = write_csv(tmp_path / "rows.csv", [("good", "positive"), ("great", "positive"), ("bad", "negative")])
    _fails_with_one_line(
        ["finetune", "--model", str(tiny_bert), "--data", str(data), "--output", str(tmp_path / "run")],
        capsys,
        "label 'negative' has 1 example",
    )


def test_unwritable_output_fails_before_training(tmp_path, tiny_bert, capsys, no_training):
    (tmp_path / "a_file").write_text("")
    data = write_csv(tmp_path / "rows.csv")
    _fails_with_one_line(
        ["finetune", "--model", str(tiny_bert), "--data", str(data), "--output", str(tmp_path / "a_file" / "run")],
        capsys,
        "cannot be written",
    )


def test_output_folder_holding_other_files_is_left_alone(tmp_path, tiny_bert, capsys, no_training):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    data = write_csv(tmp_path / "rows.csv")
    _fails_with_one_line(
        ["finetune", "--model", str(tiny_bert), "--data", str(data), "--output", str(tmp_path / "notes")],
        capsys,
        "holds files that are not a lora-spec run",
    )
    assert [path.name for path in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def test_compare_needs_two_different_seeds(capsys, no_training):
    _fails_with_one_line(["compare", "--seeds", "3", "3"], capsys, "give at least two different seeds")


def test_targets_that_match_nothing_fail_before_training(tmp_path, tiny_bert, capsys, no_training):
    pytest.importorskip("lora_spec.torch")
    data = write_csv(tmp_path / "rows.csv")
    _fails_with_one_line(
        [
            "finetune",
            "--model",
            str(tiny_bert),
            "--data",
            str(data),
            "--targets",
            "q_proj",
            "--output",
            str(tmp_path / "run"),
        ],
        capsys,
        "q_proj",
    )


def test_a_missing_deployment_package_is_named_before_training(tmp_path, capsys, no_training, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    _fails_with_one_line(
        ["finetune", "--data", str(write_csv(tmp_path / "rows.csv")), "--output", str(tmp_path / "run")],
        capsys,
        'pip install "lora-spec[demo]"',
    )
    assert not (tmp_path / "run").exists()
