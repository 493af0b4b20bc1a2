"""``triton-rnn bench``: throughput of the Triton kernels against cuDNN (and FlashRNN).

Times ``triton_rnn`` (persistent kernels), ``triton_rnn`` stepwise (one launch
per timestep), ``torch.nn`` (cuDNN on a GPU) and FlashRNN (when ``import
flashrnn`` works) on the same inputs, shape by shape, and prints a table with
the speedup over cuDNN. Writes a JSON file (versions, device, git commit, every
timing, the tile configs) after every shape, and a PNG of speedup against batch
size at the end. A shape that fails is recorded as an error and the run goes on.

Grids: ``--quick`` (a few minutes on one GPU), the full grid (default), and
``--tiny`` (a CPU smoke test through Triton's interpreter; the default when no
CUDA device is present). ``--cells``, ``--hidden``... narrow any grid;
``--proj`` adds LSTM shapes with a projection (``proj_size``, LSTMP), e.g.
``--cells lstm --hidden 1024 --proj 256``.
``--floors FILE`` (from ``python -m benchmarks.floors``) adds the analytic
floor of every shape and the achieved fraction of it.

``--cuda-graphs`` also times CUDA-graph replays of every implementation. It is
off by default: capture costs time and memory per shape, most RNN users run
eagerly, and the persistent kernels make one launch per pass anyway, so the
eager numbers are the ones users see.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from . import CLIError, dtype_name, non_negative_int, positive_int

#: torch's dtype names to the short ones of the bench grid and its JSON.
_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _csv(kind):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        try:
            return [kind(t) for t in items]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {e}") from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad list: {text!r}") from None
    return parse


def _bench_dtype(text: str) -> str:
    return _SHORT_DTYPE[dtype_name(text)]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="throughput against cuDNN (and FlashRNN): table, JSON and plot",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the quick grid (a few minutes on a GPU)")
    g.add_argument("--tiny", action="store_true",
                   help="tiny shapes (T=4, B=1/2, H=8, fp32): a smoke test, also on the CPU")
    p.add_argument("--cells", type=_csv(str.lower), help="comma list: gru,lstm")
    p.add_argument("--hidden", type=_csv(positive_int), help="comma list of hidden sizes")
    p.add_argument("--batch", type=_csv(positive_int), help="comma list of batch sizes")
    p.add_argument("--seq-len", type=_csv(positive_int), help="comma list of sequence lengths")
    p.add_argument("--dtypes", type=_csv(_bench_dtype),
                   help="comma list: bf16,fp16,fp32 (torch's names work too)")
    p.add_argument("--passes", type=_csv(str), help="comma list: fwd,fwdbwd")
    p.add_argument("--directions", type=_csv(int),
                   help="comma list: 1 (one direction, the default), 2 (a bidirectional layer)")
    p.add_argument("--proj", type=_csv(non_negative_int),
                   help="comma list of LSTM projection sizes (proj_size), 0 for none (the "
                        "default); each below every --hidden; GRU shapes are not multiplied")
    p.add_argument("--impls", type=_csv(str),
                   help="comma list of triton,triton_stepwise,torch,flashrnn (default: all; "
                        "flashrnn only when importable), or triton_one_stream (bidirectional "
                        "shapes with the two directions one after the other)")
    p.add_argument("--no-flashrnn", action="store_true", help="leave FlashRNN out")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--floors", metavar="FILE", help="ceilings JSON from python -m benchmarks.floors")
    p.add_argument("--out", metavar="JSON", default=None,
                   help="result file (default runs/bench/bench-<grid>-<time>.json; "
                        "required with --resume)")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="plot file (default: the JSON's name with .png)")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--markdown", metavar="MD", default=None,
                   help="also write the table as markdown ('-' for stdout)")
    p.add_argument("--from-json", metavar="JSON", default=None,
                   help="measure nothing: print the table of a result file (and write "
                        "--plot/--markdown)")
    p.add_argument("--resume", action="store_true",
                   help="keep the shapes already in --out and measure the rest")
    p.add_argument("--time-budget", type=_positive_float, default=None, metavar="S",
                   help="start no new shape after S seconds (the rest is recorded as skipped)")
    p.add_argument("--warmup-ms", type=_positive_float, default=None,
                   help="do_bench warm-up (default 25)")
    p.add_argument("--rep-ms", type=_positive_float, default=None,
                   help="do_bench repetition time (default 100)")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="alternating rounds per implementation (default 3; 1 when tiny)")
    p.add_argument("--sets", type=positive_int, default=None,
                   help="rotated input sets (default 3; 2 when tiny)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time CUDA-graph replays (off by default, see the description)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the output comparison against torch on the first call")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _ensure_interpreter() -> None:
    """On a CPU the kernels need Triton's interpreter, set before they are defined."""
    if _interpreter_on():
        return
    os.environ["TRITON_INTERPRET"] = "1"
    defined = [m for m in sys.modules if m.startswith(("triton_rnn.kernels", "triton_rnn.autograd"))]
    if defined and sys.argv[1:2] == ["bench"]:
        # The kernels were already decorated without the interpreter: start again with it.
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "triton_rnn.cli"] + sys.argv[1:])
    if defined:
        print("triton-rnn bench: warning: the kernels were imported before TRITON_INTERPRET=1 was "
              "set; the Triton rows will fail on the CPU", file=sys.stderr)


def _grid(args, B) -> tuple:
    if args.tiny:
        name, grid = "tiny", dict(B.TINY_GRID)
    elif args.quick:
        name, grid = "quick", dict(B.QUICK_GRID)
    else:
        name, grid = "full", dict(B.FULL_GRID)
    for opt, key in (("cells", "cells"), ("hidden", "hidden"), ("batch", "batch"),
                     ("seq_len", "seq_len"), ("dtypes", "dtypes"), ("passes", "passes")):
        v = getattr(args, opt)
        if v:
            grid[key] = v
    if args.directions:
        grid["directions"] = args.directions
    if args.proj:
        grid["proj"] = args.proj
    for d in grid.get("directions", [1]):
        if d not in (1, 2):
            raise CLIError(f"--directions takes 1 and 2, got {d}")
    for c in grid["cells"]:
        if c not in B.GATES:
            raise CLIError(f"unknown cell {c!r}; choose from {sorted(B.GATES)}")
    for p in grid.get("proj", [0]):
        if p < 0 or (p and p >= min(grid["hidden"])):
            raise CLIError(f"--proj takes 0 or sizes below every hidden size "
                           f"({min(grid['hidden'])} here), got {p}")
    if any(grid.get("proj", [0])) and "lstm" not in grid["cells"]:
        raise CLIError("--proj applies to LSTM shapes only: add lstm to --cells")
    for d in grid["dtypes"]:
        if d not in B.DTYPES:
            raise CLIError(f"unknown dtype {d!r}; choose from {sorted(B.DTYPES)}")
    for s in grid["passes"]:
        if s not in B.PASSES:
            raise CLIError(f"unknown pass {s!r}; choose from {list(B.PASSES)}")
    return name, grid


def _write_reports(doc: dict, args, out_json, B) -> int:
    # With ``--markdown -`` the markdown is the last thing on stdout, the rest goes to stderr.
    info = sys.stderr if args.markdown == "-" else sys.stdout
    print(B.format_table(doc), file=info, flush=True)
    if args.markdown and args.markdown != "-":
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(B.markdown_report(doc))
        print(f"markdown: {args.markdown}", file=info)
    rc = 0
    if not args.no_plot and (args.plot or out_json is not None):
        png = Path(args.plot) if args.plot else Path(out_json).with_suffix(".png")
        try:
            B.plot(doc, png)
            print(f"plot: {png}", file=info)
        except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
            print(f"triton-rnn bench: plot failed: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
    if args.markdown == "-":
        print(B.markdown_report(doc), flush=True)
    return rc


def _read_result(path: str, B) -> dict:
    """A bench result file (``--from-json``), or a one-line error."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != B.SCHEMA or not isinstance(doc.get("results"), list):
        raise CLIError(f"{path} is not a triton-rnn bench result (schema {schema!r}, "
                       f"expected {B.SCHEMA!r})")
    return doc


def _check_writable(path, what: str) -> None:
    """Fail before measuring, not after, when ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{what} {path} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot write {what} {path}: cannot create its folder "
                       f"({e.strerror or e})") from None
    try:  # a scratch file beside it: the results are written as a temporary file, renamed
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise CLIError(f"cannot write {what} {path}: {e.strerror or e}") from None


def _device(text, torch):
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise CLIError(f"--device takes cuda, cuda:N or cpu, got {text!r}") from None
    if dev.type not in ("cuda", "cpu"):
        raise CLIError(f"--device takes cuda, cuda:N or cpu, got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text} but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def run(args) -> int:
    from .. import bench as B

    if args.from_json:
        doc = _read_result(args.from_json, B)
        if args.markdown and args.markdown != "-":
            _check_writable(args.markdown, "markdown file")
        return _write_reports(doc, args, None, B)
    if args.resume and not args.out:
        raise CLIError("--resume needs --out: the result file to resume")
    for path, what in ((args.out, "result file"), (args.plot, "plot file"),
                       (None if args.markdown == "-" else args.markdown, "markdown file")):
        if path:
            _check_writable(path, what)

    import torch

    if args.device is not None:
        dev = _device(args.device, torch)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        _ensure_interpreter()
        if not args.tiny:
            grid = "--quick" if args.quick else "the full grid"
            print(f"triton-rnn bench: no CUDA device: running the tiny grid instead of {grid}, "
                  "through Triton's interpreter (a smoke test; the times mean nothing)",
                  flush=True)
        args.tiny = True
        args.quick = False
    elif _interpreter_on():
        raise CLIError("TRITON_INTERPRET is set: unset it to time the kernels on the GPU")
    name, grid = _grid(args, B)

    impls = list(args.impls or B.IMPLS)
    known = list(B.IMPLS + B.EXTRA_IMPLS)
    for n in impls:
        if n not in known:
            raise CLIError(f"unknown implementation {n!r}; choose from {known}")
    if B.REFERENCE not in impls:
        impls.append(B.REFERENCE)
    if "flashrnn" in impls and (args.no_flashrnn or dev.type != "cuda" or not B.flashrnn_available()):
        if args.impls and "flashrnn" in args.impls and not args.no_flashrnn:
            print("triton-rnn bench: flashrnn left out (needs CUDA and `import flashrnn`)",
                  file=sys.stderr)
        impls.remove("flashrnn")

    floors = None
    if args.floors:
        try:
            floors = B.load_floors(args.floors)
        except (OSError, ValueError) as e:
            print(f"triton-rnn bench: cannot read floors {args.floors}: {e}; no floors",
                  file=sys.stderr)

    tiny = name == "tiny"
    settings = {
        "grid": name, "grid_lists": grid, "device": str(dev),
        "warmup_ms": args.warmup_ms if args.warmup_ms is not None else 25.0,
        "rep_ms": args.rep_ms if args.rep_ms is not None else 100.0,
        "rounds": args.rounds if args.rounds is not None else (1 if tiny else 3),
        "n_sets": args.sets if args.sets is not None else (2 if tiny else 3),
        "host_reps": 1 if tiny else 5,
        "cuda_graphs": bool(args.cuda_graphs),
        "check": not args.no_check,
        "seed": args.seed,
        "timer": "triton.testing.do_bench median (CUDA events)" if dev.type == "cuda"
                 else "host clock (interpreter smoke test)",
        "fwd": "inference forward: eval mode, under torch.no_grad",
        "fwdbwd": "forward + backward with a random output gradient, input gradient included",
    }
    out_json = Path(args.out) if args.out else Path("runs") / "bench" / (
        f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    shapes = B.grid_shapes(grid)
    print(f"triton-rnn bench: {len(shapes)} shapes, impls {impls}, device {dev}, "
          f"grid {name} -> {out_json}", flush=True)
    rc = 0
    try:
        doc = B.run_grid(shapes, dev, impls, out_json, settings=settings, floors=floors,
                         floors_file=args.floors, time_budget_s=args.time_budget,
                         resume=args.resume, log=lambda s: print(s, flush=True))
    except B.ContextLost as e:
        print(f"triton-rnn bench: stopped: {e}", file=sys.stderr)
        with open(out_json) as f:
            doc = json.load(f)
        rc = 3
    print(f"results: {out_json}")
    rc = max(rc, _write_reports(doc, args, out_json, B))
    failed = [r["key"] for r in doc.get("results", []) if r.get("status") in ("error", "partial")]
    if failed:
        print(f"triton-rnn bench: {len(failed)} of {len(doc['results'])} shapes failed in "
              f"part or whole ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); "
              "their errors are in the table and the JSON", file=sys.stderr)
        rc = max(rc, 1)
    return rc
