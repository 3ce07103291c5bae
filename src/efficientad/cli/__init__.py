"""The ``efficientad`` command: one sub-command per module of this package.

Each sub-command module defines ``register(subparsers)``, which adds its parser and sets
``handler`` to a function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import EfficientADError

# Module names; a module may name its sub-command otherwise (train_many registers `train-many`).
COMMANDS = ("demo", "train", "train_many", "predict", "pretrain", "eval", "serve", "benchmark", "export", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efficientad",
        description="EfficientAD visual anomaly detection: train on good images, find defects in milliseconds.",
    )
    parser.add_argument("--version", action="version", version=f"efficientad {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except EfficientADError as error:
        print(f"efficientad {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a vanished folder, a permission: the path and the reason, one line
        where = f": {error.filename}" if error.filename else ""
        print(f"efficientad {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"efficientad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
