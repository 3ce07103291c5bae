"""What every command writes next to its outputs: what was run, with which versions, and the result."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .model import versions


def write_run_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON, adding the command line, a UTC timestamp and package versions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **record,
    }
    path.write_text(json.dumps(content, indent=2, default=str) + "\n")
    return path
