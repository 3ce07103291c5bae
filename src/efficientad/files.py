"""Writing what a run produces: files that appear whole or not at all, and the JSON record of each run."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__


def versions() -> dict[str, str]:
    """The versions that decide a result: this package, torch, torchvision, numpy and Python."""
    import numpy
    import torch
    import torchvision

    return {
        "efficientad": __version__,
        "torch": str(torch.__version__),  # TorchVersion would not load with weights_only=True
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, then rename it: no partial file on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        # mkstemp creates owner-only files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` without ever leaving a partial file at ``path``."""
    import torch

    return atomic_write(path, lambda temporary: torch.save(obj, temporary))


def write_run_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON, adding the command line, a UTC timestamp and package versions."""
    content = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **record,
    }
    text = json.dumps(content, indent=2, default=str) + "\n"
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text))


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove that files can be written in it, before any long work.

    Raises :class:`EfficientADError` naming the folder when it is a file, lies under a file, or is not writable.
    """
    from .errors import EfficientADError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise EfficientADError(f"output folder {folder} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise EfficientADError(f"cannot write to output folder {folder}: {error.strerror or error}") from None
    return folder
