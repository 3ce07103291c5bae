"""The manifest of ``efficientad train-many``: one row per model, every row checked before any trains.

A manifest is a CSV file with a header, or a YAML list of mappings. Columns: ``name`` (the output
sub-folder), ``data`` (dataset root), ``category``, ``format`` (a dataset layout, default ``mvtec``)
and, optionally, any :class:`~efficientad.config.TrainConfig` field, read by that field's type. Empty
cells keep the run's defaults. Relative paths are relative to the manifest's folder, so that a
manifest and its data can move together; they are made absolute, since Ray workers start elsewhere.
"""

from __future__ import annotations

import csv
import os
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from ..config import TrainConfig, make_config
from ..data.datasets import load_split
from ..errors import EfficientADError

REQUIRED = ("name", "data", "category")
COLUMNS = (*REQUIRED, "format", *(field.name for field in fields(TrainConfig)))
FIELD_TYPES = get_type_hints(TrainConfig)
DEFAULT_FORMAT = "mvtec"
# Files the run writes beside the row folders, which a row's name must not take.
RESERVED_NAMES = ("results.csv", "results.md", "train_many.json")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# TrainConfig's path-valued fields; a teacher may instead be one of the names resolve_teacher knows.
PATH_FIELDS = ("teacher", "penalty_images")
TEACHER_NAMES = ("small", "medium", "official", "random")
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


@dataclass(frozen=True)
class Row:
    """One model to train: its manifest row number (from 1), output name, data and whole config.

    ``evaluates``: the test split has good and defective images, so the row gets a metrics.json.
    """

    number: int
    name: str
    data: Path
    category: str
    format: str
    config: TrainConfig
    evaluates: bool

    def data_record(self) -> dict[str, str]:
        """The ``data`` entry of the row's train.json, as ``efficientad train`` writes it."""
        return {"root": str(self.data), "category": self.category, "format": self.format}


def read_manifest(manifest: str | os.PathLike | Sequence[Mapping[str, Any]], settings: Mapping[str, Any] | None = None) -> list[Row]:
    """The manifest's rows, each with ``settings`` (TrainConfig fields for every row) under its own cells.

    ``manifest`` is a ``.csv``/``.yaml``/``.yml`` file or the rows themselves (relative paths then
    relative to the working folder). Every problem of every row is raised together, in one
    :class:`EfficientADError` that names the rows by number.
    """
    if isinstance(manifest, (str, os.PathLike)):
        path = Path(manifest)
        records, base, where = _read_file(path), path.resolve().parent, f"manifest {path}"
    else:
        records, base, where = [dict(record) for record in manifest], Path.cwd(), "manifest"
    if not records:
        raise EfficientADError(f"{where} has no rows")
    defaults = make_config(TrainConfig, None, _absolute_paths(dict(settings or {}), Path.cwd()))
    problems = _unknown_columns(records)
    rows, first_row_of = [], {}
    for number, record in enumerate(records, start=1):
        name = str(next((value for key, value in record.items() if _column(key) == "name"), None) or "").strip()
        try:
            row = _row(number, record, base, defaults)
        except EfficientADError as problem:
            problems.append(f"row {number}{f' ({name})' if name else ''}: {problem}")
            row = None
        if name in first_row_of:
            problems.append(f"row {number}: name {name!r} is taken by row {first_row_of[name]}")
        elif name:
            first_row_of[name] = number
        if row is not None:
            rows.append(row)
    if problems:
        raise EfficientADError(f"{where}: {len(problems)} problem(s), nothing started: {'; '.join(problems)}")
    return rows


def _read_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise EfficientADError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets write a BOM
            records = list(csv.DictReader(handle))
        for number, record in enumerate(records, start=1):
            if None in record:  # csv puts cells beyond the header under None
                raise EfficientADError(f"manifest {path}: row {number} has more cells than the header has columns")
        return records
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise EfficientADError("YAML manifests need PyYAML (pip install pyyaml); or write the manifest as CSV") from None
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise EfficientADError(f"manifest {path} is not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(content, list) or not all(isinstance(item, dict) for item in content):
            raise EfficientADError(f"manifest {path} must be a YAML list of mappings, one per model")
        return content
    raise EfficientADError(f"manifest {path} must be a .csv, .yaml or .yml file")


def _column(key: Any) -> str:
    # Spreadsheet headers are often written like the CLI's options: "Model-Size" means model_size.
    return str(key).strip().lower().replace("-", "_")


def _unknown_columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    rows_of: dict[str, list[int]] = {}
    for number, record in enumerate(records, start=1):
        for key in record:
            if _column(key) not in COLUMNS:
                rows_of.setdefault(str(key), []).append(number)
    # A CSV header names its columns for every row; then the rows need no listing.
    return [
        f"unknown column {key!r}{'' if len(numbers) == len(records) else f' in row(s) {_numbers(numbers)}'}"
        f" (columns: {', '.join(COLUMNS)})"
        for key, numbers in rows_of.items()
    ]


def _numbers(numbers: Sequence[int]) -> str:
    if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return ", ".join(map(str, numbers))


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _row(number: int, record: Mapping[str, Any], base: Path, defaults: TrainConfig) -> Row:
    """The row, or an EfficientADError naming each of its problems (every setting, its paths, its data)."""
    cells = {_column(key): value for key, value in record.items() if not _blank(value) and _column(key) in COLUMNS}
    missing = [column for column in REQUIRED if column not in cells]
    if missing:
        raise EfficientADError(f"missing {', '.join(missing)}")
    name, category = str(cells.pop("name")).strip(), str(cells.pop("category")).strip()
    data, format = (base / str(cells.pop("data")).strip()).resolve(), str(cells.pop("format", DEFAULT_FORMAT)).strip()
    problems = []
    if not NAME.fullmatch(name) or name in RESERVED_NAMES:
        problems.append(
            f"name {name!r} must be a folder name of letters, digits, '.', '_' and '-' (not starting with"
            f" '.' or '-') other than {', '.join(RESERVED_NAMES)}"
        )
    overrides = {}
    for column, cell in cells.items():
        try:
            value = convert(cell, FIELD_TYPES[column])
        except ValueError as problem:
            problems.append(f"{column} {problem}")
            continue
        try:
            # One setting at a time first, so that every bad one is named, not only the first.
            make_config(TrainConfig, defaults, _absolute_paths({column: value}, base))
        except EfficientADError as problem:
            problems.append(str(problem))
            continue
        overrides[column] = value
    config = None
    if len(overrides) == len(cells):
        try:
            config = make_config(TrainConfig, defaults, _absolute_paths(overrides, base))
            _check_paths(config)
        except EfficientADError as problem:
            problems.append(str(problem))
    try:
        # The layout check lists the category's files (no image is decoded): quick even for VisA.
        evaluates = set(load_split(format, data, category).labels) == {0, 1}
    except EfficientADError as problem:
        problems.append(str(problem))
    if problems:
        raise EfficientADError("; ".join(dict.fromkeys(problems)))
    return Row(number, name, data, category, format, config, evaluates)


def _absolute_paths(settings: dict[str, Any], base: Path) -> dict[str, Any]:
    for key in PATH_FIELDS:
        value = settings.get(key)
        if value is not None and not (key == "teacher" and value in TEACHER_NAMES):
            settings[key] = str((base / os.fspath(value)).resolve())
    return settings


def _check_paths(config: TrainConfig) -> None:
    # Both are read once by the driver for all rows (see fleet.run): a bad one fails here.
    if config.teacher is not None and config.teacher not in TEACHER_NAMES and not Path(config.teacher).is_file():
        raise EfficientADError(f"teacher file not found: {config.teacher}")
    if config.penalty_images is not None and not Path(config.penalty_images).is_dir():
        raise EfficientADError(f"penalty_images folder not found: {config.penalty_images}")


def convert(value: Any, kind: Any) -> Any:
    """A cell (text from CSV, or a YAML value) as a value of the TrainConfig field type ``kind``.

    Raises ``ValueError`` saying what was expected. ``none``/``null`` is None where the field allows it.
    """
    options: Iterable[Any] = get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    text = str(value).strip()
    if type(None) in options and (value is None or text.lower() in ("none", "null")):
        return None
    kind = next(option for option in options if option is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ValueError(f"must be true or false, got {value!r}")
    if kind is int or kind is float:
        return _number(value, kind)
    if get_origin(kind) is tuple:  # image_size: N, HxW, "H W" or a YAML list
        parts = value if isinstance(value, (list, tuple)) else re.split(r"[\sx,]+", text.lower())
        sides = [_number(part, int) for part in parts]
        if len(sides) not in (1, 2):
            raise ValueError(f"must be N or HxW, got {value!r}")
        return sides[0] if len(sides) == 1 else tuple(sides)
    return text


def _number(value: Any, kind: type) -> int | float:
    name = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise ValueError(f"must be {name}, got {value!r}")
    try:
        number = float(str(value).strip()) if kind is float or isinstance(value, float) else int(str(value).strip())
    except ValueError:
        raise ValueError(f"must be {name}, got {value!r}") from None
    if kind is int and number != int(number):
        raise ValueError(f"must be {name}, got {value!r}")
    return kind(number)
