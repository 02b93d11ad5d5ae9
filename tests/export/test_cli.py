"""`lora-export`: every flag documented, one-line errors with distinct exit codes, nothing left on disk."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lora_spec import reference
from lora_spec.export import cli, merge
from lora_spec.export.verify import session
from tests import strategies
from tests.export.onnx_graphs import write_adapter

RNG = np.random.default_rng(0)
W, BIAS, A, B = (RNG.standard_normal(shape).astype(np.float32) for shape in [(5, 4), (5,), (2, 4), (5, 2)])
X = RNG.standard_normal((3, 4)).astype(np.float32)


def _save(folder, lora: bool = True, external: bool = False, name: str = "model.onnx"):
    model = strategies.lora_graph(X, [(W, BIAS, A, B, 0.5)], strategies.PLAIN_LORA_LAYOUT, lora=lora)
    path = folder / name
    onnx.save(
        model,
        path,
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{name}.data",
        size_threshold=0,
    )
    return path


def _snapshot(folder) -> dict:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in folder.rglob("*")
        if path.is_file()
    }


def _run(capsys, *argv):
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
    assert "exit status" in text


def test_merge_writes_model_merged_onnx_beside_the_input_and_reports_the_check(tmp_path, capsys):
    model = _save(tmp_path)
    before = _snapshot(tmp_path)
    status, out, _err = _run(capsys, "--merge", model, "-q")
    assert (status, out) == (0, "")
    assert _snapshot(tmp_path)["model.onnx"] == before["model.onnx"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.merged.onnx", "model.onnx"]
    status, out, _ = _run(capsys, "--merge", model, "-o", tmp_path / "again.onnx")
    assert status == 0 and "verified original vs merged in onnxruntime" in out and "again.onnx" in out


def test_dry_run_lists_the_folds_and_writes_nothing(tmp_path, capsys):
    model = _save(tmp_path)
    before = _snapshot(tmp_path)
    status, out, _ = _run(capsys, "--merge", model, "--dry-run")
    assert status == 0
    assert "fold layer0.base" in out and "layer0.lora_A.weight" in out
    assert _snapshot(tmp_path) == before


def _corrupt(folder):
    path = folder / "model.onnx"
    path.write_text("this is a text file, not a model\n")
    return path


def _truncated(folder):
    path = _save(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _missing_data(folder):
    path = _save(folder, external=True)
    (folder / "model.onnx.data").unlink()
    return path


def _point_data_to(path, location: str) -> None:
    """Make every external tensor of the model at `path` read from `location` (relative to its folder)."""
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)


def _data_outside(folder):
    inner = folder / "inner"
    inner.mkdir()
    path = _save(inner, external=True)
    _point_data_to(path, "../model.onnx.data")
    (inner / "model.onnx.data").rename(folder / "model.onnx.data")
    return path


def _short_data(folder):
    path = _save(folder, external=True)
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-8])
    return path


@pytest.mark.parametrize(
    "make_model, message",
    [
        (_corrupt, "is not a readable ONNX model"),
        (_truncated, "is not a readable ONNX model"),
        (_missing_data, "is missing"),
        (_data_outside, "outside the model's folder"),
        (_short_data, "truncated"),
    ],
    ids=["not-onnx", "truncated", "external-data-missing", "external-data-outside-folder", "external-data-short"],
)
def test_bad_model_files_fail_with_one_line_and_leave_nothing(tmp_path, capsys, make_model, message):
    model = make_model(tmp_path)
    before = _snapshot(tmp_path)
    status, out, err = _run(capsys, "--merge", model)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-o", "{folder}/model.onnx"], "is the input model"),
        (["-o", "{folder}/missing/out.onnx"], "does not exist"),
        (["--tolerance", "-1"], "tolerance must be a positive number"),
        (["--input-shape", "nothere=1,4"], "not an input of the model"),
        (["--input-shape", "x=1,2,4"], "does not fit"),
        (["--merge", "{folder}/absent.onnx"], "does not exist"),
    ],
    ids=[
        "output-is-input",
        "output-folder-missing",
        "negative-tolerance",
        "unknown-input",
        "wrong-rank",
        "model-missing",
    ],
)
def test_bad_arguments_fail_with_one_line_and_leave_nothing(tmp_path, capsys, extra, message):
    model = _save(tmp_path)
    before = _snapshot(tmp_path)
    status, _, err = _run(capsys, "--merge", model, *[item.format(folder=tmp_path) for item in extra])
    assert status == 1
    assert err.count("\n") == 1 and message in err
    assert _snapshot(tmp_path) == before


def test_output_beside_the_input_data_is_refused(tmp_path, capsys):
    model = _save(tmp_path, external=True, name="model.onnx")
    _point_data_to(model, "other.onnx.data")
    (tmp_path / "model.onnx.data").replace(tmp_path / "other.onnx.data")
    status, _, err = _run(capsys, "--merge", model, "-o", tmp_path / "other.onnx")
    assert status == 1 and "is the input's external data" in err


def test_output_onto_the_input_data_is_refused(tmp_path, capsys):
    model = _save(tmp_path, external=True)
    before = _snapshot(tmp_path)
    status, _, err = _run(capsys, "--merge", model, "-o", tmp_path / "model.onnx.data")
    assert status == 1 and "is the input's external data" in err and _snapshot(tmp_path) == before


def test_a_graph_without_lora_exits_with_its_own_status(tmp_path, capsys):
    model = _save(tmp_path, lora=False)
    status, _, err = _run(capsys, "--merge", model)
    assert status == 3 and "no LoRA branch found" in err and err.count("\n") == 1
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]


def test_failed_verification_exits_4_and_writes_nothing(tmp_path, capsys, monkeypatch):
    model = _save(tmp_path)
    monkeypatch.setattr(merge.checks, "compare_models", lambda *args: 0.5)
    status, _, err = _run(capsys, "--merge", model)
    assert status == 4 and "above the tolerance" in err and err.count("\n") == 1
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]


def test_malformed_input_shape_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--merge", str(_save(tmp_path)), "--input-shape", "x:3"])
    assert exit_info.value.code == 2 and "NAME=DIMS" in capsys.readouterr().err


def test_console_script_runs_without_a_traceback(tmp_path):
    model = _save(tmp_path, lora=False)
    completed = subprocess.run(
        [sys.executable, "-m", "lora_spec.export.cli", "--merge", str(model)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 3 and "Traceback" not in completed.stderr


def test_a_model_onnxruntime_cannot_run_fails_with_one_line_and_verifies_by_layers_instead(tmp_path, capsys):
    """tf2onnx leaves ops onnxruntime lacks in some graphs (Keras's XLA grouped convs become PartitionedCall)."""
    model = onnx.load(_save(tmp_path))
    output = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("PartitionedCall", [output], ["after"], domain="tf"))
    model.graph.output[0].name = "after"
    model.opset_import.append(onnx.helper.make_opsetid("tf", 1))
    onnx.save(model, tmp_path / "model.onnx")
    before = _snapshot(tmp_path)
    status, _, err = _run(capsys, "--merge", tmp_path / "model.onnx")
    assert status == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "onnxruntime cannot run the input model" in err and "--verify layers" in err
    assert _snapshot(tmp_path) == before
    status, out, _ = _run(capsys, "--merge", tmp_path / "model.onnx", "--verify", "layers")
    assert status == 0 and "verified each folded layer in NumPy" in out


@pytest.mark.parametrize("external", [False, True])
def test_an_erfc_model_is_mended_reported_and_verified_against_the_mended_original(tmp_path, capsys, external):
    """tf2onnx leaves TensorFlow's Erfc (exact GELU), which ONNX lacks; the merge mends it and runs both models."""
    model = onnx.load(_save(tmp_path))
    output = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Erfc", [output], ["after"], name="gelu/Erfc"))
    model.graph.output[0].name = "after"
    (tmp_path / "model.onnx").unlink()
    onnx.save(
        model,
        tmp_path / "model.onnx",
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    before = _snapshot(tmp_path)
    status, out, _ = _run(capsys, "--merge", tmp_path / "model.onnx", "--verify", "full")
    assert status == 0, out
    assert out.splitlines()[0].startswith("mended 1 Erfc node(s) as 1 - Erf")
    assert "verified original vs merged in onnxruntime" in out
    after = _snapshot(tmp_path)
    assert {name: digest for name, digest in after.items() if name in before} == before
    assert sorted(set(after) - set(before)) == ["model.merged.onnx"] + (["model.merged.onnx.data"] if external else [])
    expected = [math.erfc(value) for value in (X @ reference.merge(W, A, B, 0.5).T + BIAS).ravel()]
    merged = session(tmp_path / "model.merged.onnx").run(None, {"x": X})[0]
    np.testing.assert_allclose(merged.ravel(), expected, rtol=0, atol=1e-6)


# --- --switchable and --pack ------------------------------------------------------------------------------------


def _served_folder(folder):
    """A plain two-layer model, and adapter folders: `one` (rank 2 on `first`), `headed` (rank 1 on `second`
    and a trained `second.weight`), `twin` (the same), `wide` (for another model), `stray` (no such module),
    `dora`; `base.switchable.onnx` made from `one` and `headed`."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "first.weight"], ["h"], name="/first/MatMul"),
        onnx.helper.make_node("MatMul", ["h", "second.weight"], ["y"], name="/second/MatMul"),
    ]
    weights = [
        onnx.numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)
        for name, shape in [("first.weight", (4, 5)), ("second.weight", (5, 3))]
    ]
    graph = onnx.helper.make_graph(nodes, "g", [x], [onnx.helper.make_tensor_value_info("y", 1, None)], weights)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), folder / "base.onnx")
    head = RNG.standard_normal((5, 3)).astype(np.float32)
    write_adapter(folder / "one", {"first": (RNG.standard_normal((2, 4)), RNG.standard_normal((5, 2)))})
    for name in ("headed", "twin"):
        write_adapter(folder / name, {"second": (np.ones((1, 5)), np.ones((3, 1)))}, extra={"second.weight": head})
    write_adapter(folder / "wide", {"first": (np.ones((2, 7)), np.ones((5, 2)))})
    write_adapter(folder / "stray", {"third": (np.ones((2, 4)), np.ones((5, 2)))})
    dora = write_adapter(folder / "dora", {"first": (np.ones((2, 4)), np.ones((5, 2)))}) / "adapter_config.json"
    dora.write_text(json.dumps({**json.loads(dora.read_text()), "use_dora": True}))
    assert (
        cli.main(
            [
                "--switchable",
                str(folder / "base.onnx"),
                "--adapter",
                str(folder / "one"),
                "--adapter",
                str(folder / "headed"),
                "-q",
            ]
        )
        == 0
    )
    return folder / "base.switchable.onnx"


def test_switchable_then_pack_then_switch_per_run_from_the_command_line(tmp_path, capsys):
    served = _served_folder(tmp_path)
    capsys.readouterr()
    status, out, _ = _run(
        capsys,
        "--pack",
        served,
        "--adapter",
        f"{tmp_path / 'one'}:0.5",
        "--adapter",
        tmp_path / "headed",
        "-o",
        tmp_path / "mix.onnx_adapter",
    )
    assert status == 0 and "verified switchable model with the adapter file" in out
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'mix.onnx_adapter'}"
    merged_status = cli.main(
        [
            "--merge",
            str(tmp_path / "base.onnx"),
            "--adapter",
            f"{tmp_path / 'one'}:0.5",
            "--adapter",
            str(tmp_path / "headed"),
            "-o",
            str(tmp_path / "merged.onnx"),
            "-q",
        ]
    )
    from lora_spec.export.pack import active_adapter

    options, _adapter = active_adapter(tmp_path / "mix.onnx_adapter")
    assert merged_status == 0
    np.testing.assert_allclose(
        session(served).run(None, {"x": X[:, :4]}, options)[0],
        session(tmp_path / "merged.onnx").run(None, {"x": X[:, :4]})[0],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--merge", "{model}", "--pack", "{served}"], "not allowed with argument"),
        ([], "one of the arguments --merge --switchable --pack is required"),
        (["--merge", "{model}", "--keep-default"], "--keep-default applies to --switchable only"),
        (["--switchable", "{model}", "--verify", "layers"], "--verify layers applies to --merge only"),
        (["--pack", "{served}", "--adapter", "{folder}/one"], "--pack needs -o NAME.onnx_adapter"),
        (["--pack", "{served}", "-o", "{folder}/a.onnx_adapter"], "--pack needs at least one --adapter"),
    ],
    ids=[
        "two-modes",
        "no-mode",
        "keep-default-with-merge",
        "layers-with-switchable",
        "pack-without-output",
        "pack-without-adapter",
    ],
)
def test_flags_that_do_not_fit_the_mode_are_argument_errors(tmp_path, capsys, argv, message):
    served = _served_folder(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([item.format(model=tmp_path / "base.onnx", served=served, folder=tmp_path) for item in argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["--switchable", "{model}"], 3, "no LoRA branch found"),
        (
            ["--switchable", "{model}", "--adapter", "{folder}/wide"],
            1,
            "module first has lora_A (2, 7) and lora_B (5, 2), which do not fit the weight (5, 4)",
        ),
        (["--switchable", "{model}", "--adapter", "{folder}/one:0.5"], 1, "has a weight (0.5)"),
        (["--switchable", "{model}", "--adapter", "{folder}/dora"], 1, "is a DoRA adapter (use_dora)"),
        (["--pack", "{model}", "--adapter", "{folder}/one", "-o", "{folder}/a.onnx_adapter"], 1, "is not switchable"),
        (
            ["--pack", "{served}", "--adapter", "{folder}/wide", "-o", "{folder}/a.onnx_adapter"],
            1,
            "module first has lora_A (2, 7)",
        ),
        (
            ["--pack", "{served}", "--adapter", "{folder}/stray", "-o", "{folder}/a.onnx_adapter"],
            1,
            "1 of 1 adapter keys matched no weight of the graph: third",
        ),
        (
            [
                "--pack",
                "{served}",
                "--adapter",
                "{folder}/one",
                "--adapter",
                "{folder}/stray",
                "-o",
                "{folder}/a.onnx_adapter",
            ],
            1,
            "or pass allow_partial=True (--allow-partial) to pack the keys that match",
        ),
        (
            [
                "--pack",
                "{served}",
                "--adapter",
                "{folder}/headed",
                "--adapter",
                "{folder}/twin",
                "-o",
                "{folder}/a.onnx_adapter",
            ],
            1,
            "two adapters carry the full tensor second.weight",
        ),
        (["--pack", "{served}", "--adapter", "{folder}/missing", "-o", "{folder}/a.onnx_adapter"], 1, "does not exist"),
        (
            ["--pack", "{served}", "--adapter", "{folder}/corrupt", "-o", "{folder}/a.onnx_adapter"],
            1,
            "is not valid JSON",
        ),
        (
            ["--pack", "{served}", "--adapter", "{folder}/dora", "-o", "{folder}/a.onnx_adapter"],
            1,
            "is a DoRA adapter (use_dora): DoRA rescales each column of the adapted weight, "
            "which is not an additive low-rank input",
        ),
        (["--pack", "{served}", "--adapter", "{folder}/one", "-o", "{served}"], 1, "is the input model"),
    ],
    ids=[
        "switchable-nothing",
        "switchable-other-base",
        "switchable-weight",
        "switchable-dora",
        "pack-not-switchable",
        "pack-other-base",
        "pack-unmatched",
        "pack-partly-unmatched",
        "pack-two-full-tensors",
        "pack-missing-adapter",
        "pack-corrupt-adapter",
        "pack-dora",
        "pack-onto-the-model",
    ],
)
def test_bad_switchable_and_pack_inputs_fail_with_one_line_and_write_nothing(tmp_path, capsys, argv, status, message):
    served = _served_folder(tmp_path)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text("{not json")
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"")
    before = _snapshot(tmp_path)
    capsys.readouterr()
    got, out, err = _run(
        capsys, *[item.format(model=tmp_path / "base.onnx", served=served, folder=tmp_path) for item in argv]
    )
    assert (got, out) == (status, "") and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before


def test_allow_partial_packs_what_matches_and_lists_the_rest(tmp_path, capsys):
    served = _served_folder(tmp_path)
    capsys.readouterr()
    status, out, _ = _run(
        capsys,
        "--pack",
        served,
        "--adapter",
        tmp_path / "one",
        "--adapter",
        tmp_path / "stray",
        "--allow-partial",
        "-o",
        tmp_path / "a.onnx_adapter",
    )
    assert status == 0 and "not packed: third" in out and (tmp_path / "a.onnx_adapter").is_file()


@pytest.mark.parametrize("mode", ["switchable", "pack"])
def test_a_failed_switchable_or_pack_check_exits_4_and_writes_nothing(tmp_path, capsys, monkeypatch, mode):
    from lora_spec.export import verify

    served = _served_folder(tmp_path)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(verify, "compare_outputs", lambda actual, expected: 0.5)
    argv = (
        ["--switchable", tmp_path / "base.onnx", "--adapter", tmp_path / "one", "-o", tmp_path / "again.onnx"]
        if mode == "switchable"
        else ["--pack", served, "--adapter", tmp_path / "one", "-o", tmp_path / "a.onnx_adapter"]
    )
    capsys.readouterr()
    status, _, err = _run(capsys, *argv)
    assert status == 4 and "above the tolerance" in err and err.count("\n") == 1
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("mode", ["switchable", "pack"])
def test_above_the_auto_limit_the_output_is_written_and_said_not_verified(tmp_path, capsys, monkeypatch, mode):
    from lora_spec.export import options

    served = _served_folder(tmp_path)
    monkeypatch.setattr(options, "FULL_VERIFY_LIMIT", 0)
    argv = (
        ["--switchable", tmp_path / "base.onnx", "--adapter", tmp_path / "one", "-o", tmp_path / "again.onnx"]
        if mode == "switchable"
        else ["--pack", served, "--adapter", tmp_path / "one", "-o", tmp_path / "a.onnx_adapter"]
    )
    capsys.readouterr()
    status, out, _ = _run(capsys, *argv)
    assert status == 0 and out.splitlines()[-2].startswith("not verified: the weights are above what --verify auto")
    assert Path(str(argv[-1])).is_file()
