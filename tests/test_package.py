"""Packaging promises: the core imports NumPy only, and a missing framework names its extra."""

import subprocess
import sys

import pytest

from lora_spec._lazy import require


def test_importing_lora_spec_imports_no_framework():
    code = ("import sys, lora_spec; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'tensorflow', 'keras', 'onnx', 'onnxruntime', 'jax')); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_missing_framework_names_the_extra_to_install():
    with pytest.raises(ImportError, match=r'install it with pip install "lora-spec\[torch\]"'):
        require("a_framework_that_is_not_installed", "torch")
