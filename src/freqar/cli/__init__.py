"""The ``freqar`` command: one thin module per subcommand, all logic in the library.

Library errors (``FreqarError``) and bad arguments print one line ``freqar: error: ...`` and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import FreqarError

# Each module exposes ``register(subparsers)`` which adds its parser with ``func`` set.
SUBCOMMANDS = ("generate", "models", "conformance", "data", "train", "eval", "bench", "serve")
SUBCOMMANDS += ("calibrate", "study")  # SparseVAR probe-block calibration, ablation study


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too; keep it short)
        self.exit(2, f"freqar: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="freqar", description="Frequency-aware autoregressive image generation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FreqarError as e:
        if args.debug:
            raise
        print(f"freqar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("freqar: interrupted", file=sys.stderr)
        return 130
