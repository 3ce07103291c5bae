"""Where the frozen teacher comes from: the official weights, a local file, or (with a warning) nowhere.

Accepted files, all read with ``torch.load(weights_only=True)``:

- the reference reproduction's ``teacher_small.pth`` / ``teacher_medium.pth`` (a plain
  ``nn.Sequential`` state_dict, keys ``0.weight``, ``3.weight``, ...);
- anomalib's renamed copies of the same weights (keys ``conv1.weight`` ... ``conv6.weight``);
- this project's ``efficientad pretrain`` output (a dict with ``format: efficientad-teacher``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..errors import EfficientADError, first_line
from ..networks import TEACHER_CHANNELS, pdn


@dataclass(frozen=True)
class OfficialTeacher:
    model_size: str
    url: str
    sha256: str
    filename: str


# The reference reproduction's files; anomalib ships the same weights renamed, in a larger zip.
OFFICIAL_TEACHERS = {
    "small": OfficialTeacher(
        "s",
        "https://github.com/nelson1425/EfficientAD/raw/main/models/teacher_small.pth",
        "b98a6a139087a0d743783ee59f367f0284af6003eb1a5fed0ce92bd9c0acd337",
        "teacher_small.pth",
    ),
    "medium": OfficialTeacher(
        "m",
        "https://github.com/nelson1425/EfficientAD/raw/main/models/teacher_medium.pth",
        "a66e1513cbc252e7907531ef4536155e338a48e8edf3a5e6a66498f661414b9c",
        "teacher_medium.pth",
    ),
}
OFFICIAL_BY_SIZE = {teacher.model_size: name for name, teacher in OFFICIAL_TEACHERS.items()}
RANDOM_TEACHER_WARNING = (
    "using a randomly initialised teacher: no pretrained features, so accuracy will be clearly lower "
    "than the paper's. Use teacher 'small'/'medium' (download) or a teacher file for real use."
)


class Teacher(NamedTuple):
    """A loaded frozen teacher and where it came from (``official:small``, ``random`` or a file's path).

    What :func:`resolve_teacher` returns; :meth:`EfficientAD.fit <efficientad.EfficientAD.fit>` takes
    one already loaded, so that many trainings can share a single load (``efficientad train-many``).
    """

    network: nn.Sequential
    source: str


def cache_dir() -> Path:
    """``$EFFICIENTAD_CACHE``, else ``$XDG_CACHE_HOME/efficientad``, else ``~/.cache/efficientad``."""
    if os.environ.get("EFFICIENTAD_CACHE"):
        return Path(os.environ["EFFICIENTAD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "efficientad"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_official(name: str, progress: bool = True, timeout: float = 30.0) -> Path:
    """Path of an official teacher in the user cache, downloading and verifying it if needed."""
    from tqdm import tqdm

    teacher = OFFICIAL_TEACHERS[name]
    target = cache_dir() / teacher.filename
    if target.is_file() and sha256_of(target) == teacher.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file, urllib.request.urlopen(teacher.url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {teacher.filename}", disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    file.write(block)
                    bar.update(len(block))
        digest = sha256_of(Path(partial))
        if digest != teacher.sha256:
            raise EfficientADError(
                f"downloaded {teacher.url} but its SHA-256 is {digest}, expected {teacher.sha256}; "
                "not using it"
            )
        os.replace(partial, target)
    except (urllib.error.URLError, OSError) as error:
        raise EfficientADError(
            f"could not download the official {name} teacher ({error}). Offline? Fetch {teacher.url} "
            f"elsewhere and pass its path as the teacher, or place it at {target}"
        ) from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Checkpoints saved from wrappers carry their attribute names in front of the layer keys.
    for prefix in ("module.", "teacher.", "model.", "pdn."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _sequential_keys(state_dict: dict[str, torch.Tensor], model_size: str) -> dict[str, torch.Tensor]:
    """Rename anomalib's ``convN`` layers to the ``nn.Sequential`` indices of our PDN."""
    named = [key for key in state_dict if re.fullmatch(r"conv\d+\.(weight|bias)", key)]
    if not named:
        return state_dict
    conv_indices = [i for i, layer in enumerate(pdn(model_size)) if isinstance(layer, nn.Conv2d)]
    renamed = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"conv(\d+)\.(weight|bias)", key)
        if match is None or not 1 <= int(match[1]) <= len(conv_indices):
            renamed[key] = value
        else:
            renamed[f"{conv_indices[int(match[1]) - 1]}.{match[2]}"] = value
    return renamed


def _guess_model_size(state_dict: dict[str, torch.Tensor]) -> str | None:
    first = state_dict.get("0.weight")
    if first is None or first.ndim != 4:
        return None
    return {128: "s", 256: "m"}.get(first.shape[0])


def load_teacher_file(path: str | os.PathLike, model_size: str) -> nn.Sequential:
    """Load a teacher PDN from any accepted file; refuses files that do not fit ``model_size``."""
    path = Path(path)
    if not path.is_file():
        raise EfficientADError(f"teacher file not found: {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or pickled-code files
        raise EfficientADError(f"cannot read teacher file {path}: {first_line(error)}") from None
    if isinstance(content, dict) and content.get("format") == "efficientad-teacher":
        if content.get("model_size") not in (None, model_size):
            raise EfficientADError(
                f"teacher file {path} holds a PDN-{content['model_size']}, but the model size is {model_size!r}"
            )
        content = content.get("state_dict")
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise EfficientADError(f"teacher file {path} is not a PDN state_dict")
    state_dict = _sequential_keys(_strip_prefixes(content), model_size)
    guessed = _guess_model_size(state_dict)
    if guessed is not None and guessed != model_size:
        raise EfficientADError(f"teacher file {path} holds a PDN-{guessed}, but the model size is {model_size!r}")
    teacher = pdn(model_size, TEACHER_CHANNELS)
    try:
        teacher.load_state_dict(state_dict)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise EfficientADError(f"teacher file {path} does not fit a PDN-{model_size}: {detail}") from None
    return teacher


def resolve_teacher(spec: str | os.PathLike | None, model_size: str, progress: bool = True) -> Teacher:
    """Build the frozen teacher from ``spec`` and say where it came from.

    ``spec`` is ``"small"``/``"medium"`` (official weights, downloaded once into :func:`cache_dir`),
    ``None``/``"official"`` (the official teacher of ``model_size``), ``"random"`` (warns), or a path.
    """
    if spec is None or spec == "official":
        spec = OFFICIAL_BY_SIZE[model_size]
    if spec == "random":
        warnings.warn(RANDOM_TEACHER_WARNING, stacklevel=2)
        torch.manual_seed(0)
        return Teacher(pdn(model_size, TEACHER_CHANNELS), "random")
    if spec in OFFICIAL_TEACHERS:
        official = OFFICIAL_TEACHERS[str(spec)]
        if official.model_size != model_size:
            raise EfficientADError(
                f"teacher {spec!r} is a PDN-{official.model_size}; use model size {official.model_size!r} "
                f"or teacher {OFFICIAL_BY_SIZE[model_size]!r}"
            )
        path = fetch_official(str(spec), progress=progress)
        return Teacher(load_teacher_file(path, model_size), f"official:{spec}")
    return Teacher(load_teacher_file(spec, model_size), str(Path(spec).resolve()))


def official_teacher_available(model_size: str) -> bool:
    """Whether the official teacher of ``model_size`` is already in the cache (no download)."""
    teacher = OFFICIAL_TEACHERS[OFFICIAL_BY_SIZE[model_size]]
    target = cache_dir() / teacher.filename
    return target.is_file() and sha256_of(target) == teacher.sha256

