"""The Python examples of the README and the docs run as written.

Every ```python block of a page runs, in order, in one namespace per page (a page may build a model in
one block and use it in the next), in its own temporary folder. A block that cannot run here (it
downloads a model, or takes minutes) is preceded by an HTML comment `<!-- not run: the reason -->`, so
skipping one is always a stated choice.

The pages run one after the other in ONE fresh interpreter, started once for the module: the examples
never touch the test process's state, and torch, TensorFlow and onnxruntime are imported once rather
than once per page. A failure names the page and its line in the Markdown file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)
_NOT_RUN = re.compile(r"<!-- not run: .+ -->")

# Runs each page's blocks in a fresh namespace and folder; line numbers are those of the Markdown file.
_RUNNER = """
import json, os, sys, traceback
pages, results = json.loads(sys.argv[1]), {}
for index, (name, blocks) in enumerate(pages):
    folder = os.path.join(sys.argv[2], str(index))
    os.makedirs(folder)
    os.chdir(folder)
    namespace = {"__name__": "__main__"}
    try:
        for line, code in blocks:
            exec(compile("\\n" * line + code, name, "exec"), namespace)
        results[name] = None
    except BaseException:
        results[name] = traceback.format_exc()[-4000:]
    print(json.dumps({name: results[name]}), flush=True)
"""


def examples(page: Path) -> list[tuple[int, str]]:
    """The runnable Python blocks of `page`, in order, with the line before each block's first line."""
    text = "\n" + page.read_text()
    return [
        (text.count("\n", 0, match.start("code")) - 1, match["code"])
        for match in _BLOCK.finditer(text)
        if not _NOT_RUN.search(match["before"])
    ]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [page for page in PAGES if examples(page)]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str | None]:
    """Each runnable page's traceback, or None when all its blocks ran."""
    pages = [(_name(page), examples(page)) for page in RUNNABLE]
    completed = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(pages), str(tmp_path_factory.mktemp("examples"))],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    results: dict[str, str | None] = {}
    for line in completed.stdout.splitlines():
        if line.startswith("{"):
            results.update(json.loads(line))
    for name, _ in pages:
        results.setdefault(name, f"the interpreter stopped before this page:\n{completed.stderr[-4000:]}")
    return results


def test_every_skipped_block_gives_its_reason():
    for page in PAGES:
        for match in _BLOCK.finditer("\n" + page.read_text()):
            if "<!--" in match["before"]:
                assert _NOT_RUN.search(match["before"]), f"{_name(page)}: write <!-- not run: the reason -->"


def test_every_python_block_is_seen():
    # A block indented in a list item would escape both the runner and the skip check.
    for page in PAGES:
        text = "\n" + page.read_text()
        assert text.count("```python") == len(_BLOCK.findall(text)), f"{_name(page)}: a ```python block not at column 0"


@pytest.mark.parametrize("page", RUNNABLE, ids=_name)
def test_the_examples_of_a_page_run(page, outcomes):
    assert outcomes[_name(page)] is None, f"{_name(page)}:\n{outcomes[_name(page)]}"
