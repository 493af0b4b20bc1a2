"""The ``triton-rnn`` command line.

Each subcommand lives in its own module under :mod:`triton_rnn.cli` and exposes
``add_parser(subparsers)``, which registers it and sets ``func`` on its parser.
Modules are imported lazily by :data:`SUBCOMMANDS` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .. import __version__

#: subcommand name -> module that implements it.
SUBCOMMANDS = {
    "train": "triton_rnn.cli.train",
    "translate": "triton_rnn.cli.translate",
    "inspect": "triton_rnn.cli.inspect",
    "tune": "triton_rnn.cli.tune",
    "cache": "triton_rnn.cli.cache",
    "bench": "triton_rnn.cli.bench",
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _int_at_least(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts and sizes: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse ``type=`` for sizes where 0 means none (``--proj``): an integer >= 0."""
    return _int_at_least(text, 0)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is reported in one line (no usage dump)."""

    def error(self, message):  # noqa: D401 - argparse hook
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="triton-rnn",
        description="Persistent Triton kernels for LSTM, GRU and RNN: tools.")
    parser.add_argument("--version", action="version", version=f"triton-rnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in SUBCOMMANDS.values():
        importlib.import_module(modname).add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except CLIError as e:
        print(f"triton-rnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
