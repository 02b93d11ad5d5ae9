"""The output folder of a run: built in a hidden folder beside the target and swapped in at the end.

An interrupted or failed run (Ctrl-C included) removes its hidden folder and leaves the
previous outputs as they were. A folder that holds other files is never replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lora_spec._files import default_mode

# Written last into every run's folder: its presence marks a folder that a later run may replace.
MARKER = "metrics.json"


def check_output_dir(output: str | os.PathLike) -> Path:
    """The output path, once it is known that a run can be built beside it and swapped in.

    Raises `ValueError` when the path is a file, a folder with files that are not a previous
    run's, or a place where no folder can be created (missing permission, read-only disk).
    """
    output = Path(output).absolute()
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} is a file: pass --output a folder path.")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise ValueError(
            f"output folder {output} holds files that are not a lora-spec run: pass another --output or empty it."
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{output.name}.check-", dir=output.parent)
    except OSError as error:
        raise ValueError(
            f"output folder {output} cannot be written ({error.strerror or error}): "
            "pass --output a folder you can write to."
        ) from None
    os.rmdir(probe)
    return output


@contextlib.contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside `output`; on success it replaces `output`, else it is removed."""
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    staging.chmod(default_mode(directory=True))
    try:
        yield staging
        previous = None
        if output.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.previous-", dir=output.parent))
            os.replace(output, previous / output.name)
        os.replace(staging, output)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
