"""The ``triton-rnn`` command line.

Each subcommand lives in its own module under :mod:`triton_rnn.cli` and exposes
``add_parser(subparsers)``, which registers it and sets ``func`` on its parser.
Modules are imported lazily by :data:`SUBCOMMANDS` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
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


#: CUDA architectures ``--arch`` takes (``sm_XX``): those Triton's NVIDIA backend
#: compiles for.
ARCHS = (75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)


def parse_arch(arch: str) -> int:
    """``"sm_90"``, ``"sm90"`` or ``"90"`` -> 90 (an argparse ``type``); one of :data:`ARCHS`."""
    a = str(arch).lower().removeprefix("sm_").removeprefix("sm")
    if not a.isdigit():
        raise argparse.ArgumentTypeError(f"must look like sm_90, got {arch!r}")
    if int(a) not in ARCHS:
        raise argparse.ArgumentTypeError(
            f"sm_{int(a)} is not a CUDA architecture Triton compiles for; choose from "
            + ", ".join(f"sm_{x}" for x in ARCHS))
    return int(a)


#: Every spelling of the kernels' storage dtypes the commands take, to torch's name.
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "half": "float16",
               "float32": "float32", "fp32": "float32", "float": "float32"}


def dtype_name(text: str) -> str:
    """argparse ``type=`` for a storage dtype: ``bf16``/``bfloat16``, ``fp16``/``float16``/
    ``half``, ``fp32``/``float32``/``float`` -> torch's name (``"bfloat16"``...)."""
    name = DTYPE_NAMES.get(str(text).strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}; choose from bf16, fp16, fp32 (or torch's names)")
    return name


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` for the CLI: the message on one line, no source excerpt."""
    text = " ".join(str(message).split())
    print(f"triton-rnn: warning: {text}", file=file or sys.stderr)


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
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            rc = args.func(args)
        except CLIError as e:
            print(f"triton-rnn {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader went away (``... | head``): stop quietly, as Unix tools do.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            return 141
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
