"""Writing what a run produces: files that appear whole or not at all, and the JSON record of each run."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__

try:
    import fcntl
except ImportError:  # Windows: there a file open in another process cannot be deleted, which guards it instead
    fcntl = None


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


# What mkstemp makes for atomic_path: ".NAME." + 8 random characters + ".tmp", and nothing else.
TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file name beside ``path`` to write; renamed to ``path`` when the block ends without error.

    The temporary file is locked (``flock``) while it is written: the kernel drops the lock when its
    process dies, even by ``kill -9``, which is how :func:`remove_temporary_files` tells an orphan
    from a file that another run is still writing into the same folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    if fcntl is None:  # Windows renames no file that is open
        os.close(handle)
        handle = None
    try:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield temporary
        # mkstemp creates owner-only files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if handle is not None:
            os.close(handle)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, then rename it: no partial file on failure."""
    with atomic_path(path) as temporary:
        write(temporary)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def remove_temporary_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` that killed runs left in ``folder``; returns them.

    Only names of exactly that pattern go, and only files no live process holds locked, so a run
    writing into the same folder at the same time keeps its file.
    """
    removed = []
    for candidate in Path(folder).glob("**/.*.tmp" if recursive else ".*.tmp"):
        if not TEMPORARY_NAME.fullmatch(candidate.name) or candidate.is_symlink() or not candidate.is_file():
            continue
        try:
            handle = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(candidate)
            removed.append(candidate)
        except OSError:  # locked by its writer, or gone meanwhile (renamed into place)
            pass
        finally:
            os.close(handle)
    return removed


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
    return atomic_write_text(path, json.dumps(content, indent=2, default=str) + "\n")


def check_output_folder(folder: str | os.PathLike, subfolders: Sequence[str] = ()) -> Path:
    """Create ``folder`` if needed and prove that files can be written in it, before any long work.

    Also removes the temporary files that an interrupted earlier run left there (and anywhere below
    ``subfolders``, the folders the command writes into), saying so in one line on stderr.
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
    removed = remove_temporary_files(folder)
    for name in subfolders:
        removed += remove_temporary_files(folder / name, recursive=True)
    if removed:
        names = ", ".join(str(path.relative_to(folder)) for path in removed)
        print(f"removed {len(removed)} temporary file(s) that an interrupted run left in {folder}: {names}", file=sys.stderr)
    return folder
