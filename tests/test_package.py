"""Packaging promises: the core imports NumPy only, and a missing framework names its extra."""

import subprocess
import sys

import pytest

from lora_spec._lazy import require


def test_importing_lora_spec_imports_no_framework():
    code = (
        "import sys, lora_spec; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'tensorflow', 'keras', 'onnx', 'onnxruntime', 'jax')); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_missing_framework_names_the_extra_to_install():
    with pytest.raises(ImportError, match=r'install it with pip install "lora-spec\[torch\]"'):
        require("a_framework_that_is_not_installed", "torch")


# Blocks the frameworks, as on a machine with `pip install lora-spec` alone, then runs the commands.
_NUMPY_ONLY = (
    "import sys; [sys.modules.__setitem__(m, None) for m in ('onnx', 'onnxruntime', 'torch', "
    "'transformers', 'tensorflow', 'keras')]; "
)


@pytest.mark.parametrize(
    ("command", "arguments", "status"),
    [
        ("lora_spec.export.cli", ["--help"], 0),
        ("lora_spec.cli", ["--help"], 0),
        ("lora_spec.export.cli", ["--merge", "model.onnx"], 1),
    ],
)
def test_the_commands_run_with_numpy_only_and_name_the_extra_they_need(command, arguments, status):
    code = _NUMPY_ONLY + f"from {command} import main; sys.exit(main({arguments!r}))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == status, completed.stderr
    assert "Traceback" not in completed.stderr
    if status:
        assert completed.stderr.count("\n") == 1 and 'pip install "lora-spec[onnx]"' in completed.stderr
    else:
        assert "usage:" in completed.stdout
