"""``triton-rnn tune``: pick the fastest tile for one shape and cache it.

Without a GPU, ``--static-only`` compiles every candidate for ``sm_<arch>``
and lists what the static pruning keeps (``--verbose``: and why it dropped
the others). With a GPU it then times the survivors, prints the chosen tile
and its speedup over the heuristic default, and stores the result in the
cache (``triton-rnn cache path``).

``--proj P`` tunes an LSTM with a projection (``proj_size=P``, LSTMP): its
tiles are cached under their own key (``lstm:forward:bfloat16:h1024p256:...``),
which only LSTM modules with that projection size use.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import CLIError, dtype_name, non_negative_int, parse_arch, positive_int

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
CONFIG_METAVAR = "BH,BB,WARPS[,STAGES[,BLOCK_K[,RESIDENT_K[,SPLIT_K]]]]"


def _config(text: str):
    from ..kernels.config import KernelConfig
    parts = text.split(",")
    names = ("block_h", "block_b", "num_warps", "num_stages", "block_k", "resident_k", "split_k")
    if not 3 <= len(parts) <= len(names):
        raise argparse.ArgumentTypeError(
            f"expected {CONFIG_METAVAR}, got {text!r}")
    try:
        return KernelConfig.from_dict(dict(zip(names, (int(p) for p in parts))))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad config {text!r}: {e}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="tune the kernel tile for one shape and cache it",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", choices=CELLS, required=True, help="recurrent cell")
    p.add_argument("--hidden", type=positive_int, required=True, help="hidden size (exact key)")
    p.add_argument("--proj", type=non_negative_int, default=0, metavar="P",
                   help="LSTM projection size (proj_size, 0 < P < hidden; exact key). "
                        "Default 0: no projection")
    p.add_argument("--batch", type=positive_int, default=32,
                   help="batch size; the entry covers its power-of-two bucket (default 32)")
    p.add_argument("--seq-len", type=positive_int, default=64,
                   help="time steps used for timing (default 64; not part of the key)")
    p.add_argument("--dtype", type=dtype_name, default="bfloat16",
                   help="bf16 (default), fp16 or fp32 (torch's names work too)")
    p.add_argument("--direction", choices=("uni", "bi"), default="uni",
                   help="direction of the timed layer (default uni; not part of the key)")
    p.add_argument("--backward", action="store_true",
                   help="also tune the backward kernel (times forward+backward)")
    p.add_argument("--arch", type=parse_arch, default=None,
                   help="CUDA architecture, e.g. sm_90 or 90 (default: the GPU's, else sm_90)")
    p.add_argument("--config", type=_config, action="append", metavar=CONFIG_METAVAR,
                   help="try this tile (repeatable) instead of the built-in candidates; on a "
                        "GPU the heuristic default is timed too, as the baseline of the "
                        "speedup, and is kept if none of these beats it")
    p.add_argument("--static-only", action="store_true",
                   help="compile and prune only (no GPU needed); stores nothing")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="say why each dropped config was dropped")
    p.set_defaults(func=run)
    return p


def _fmt_report(r: dict) -> str:
    return (f"regs={r.get('registers', '?'):>3} smem={r.get('shared_bytes', '?'):>7} "
            f"spill={r.get('local_bytes', '?')} grid={r.get('grid', '?')} "
            f"blocks/SM={r.get('blocks_per_sm', '?')}"
            + ("" if r.get("tensor_cores", True) else " no-tensor-cores")
            + (f" streams-W_hh({r.get('weights_on_chip', 0):.0%}-on-chip)"
               if r.get("weights_loaded_in_loop") else ""))


def _static_report_or_error():
    from ..autotune.tuner import get_static_report
    try:
        return get_static_report()
    except RuntimeError as e:
        raise CLIError(str(e)) from None


def _check_proj(args) -> None:
    if args.proj and args.cell != "lstm":
        raise CLIError(f"--proj is for --cell lstm only (torch.nn.LSTM's proj_size), "
                       f"not {args.cell}")
    if args.proj >= args.hidden:
        raise CLIError(f"--proj must be smaller than --hidden ({args.hidden}), got {args.proj}")


def run(args) -> int:
    _check_proj(args)
    import torch
    have_gpu = torch.cuda.is_available()
    if not have_gpu and not args.static_only:
        raise CLIError("no CUDA GPU is available; use --static-only to run the static pruning "
                       "on the CPU")
    if not args.static_only and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise CLIError("TRITON_INTERPRET is set: unset it to time the real kernels on the GPU")

    from ..autotune.space import KernelKey, candidate_configs, heuristic_config
    from ..autotune.tuner import prune

    gpu = cap = None
    if have_gpu and not args.static_only:
        gpu = torch.cuda.get_device_name()
        cap = tuple(torch.cuda.get_device_capability())
        dev_arch = cap[0] * 10 + cap[1]
        if args.arch is not None and args.arch != dev_arch:
            raise CLIError(f"--arch {args.arch} does not match this GPU ({gpu}, sm_{dev_arch}); "
                           "use --static-only to check another arch")
        arch = dev_arch
    else:
        arch = args.arch or 90

    passes = ["forward", "backward"] if args.backward else ["forward"]
    try:
        keys = [KernelKey.for_shape(args.cell, p, args.dtype, args.hidden, args.batch, arch,
                                    proj=args.proj) for p in passes]
    except ValueError as e:
        raise CLIError(str(e)) from None
    _static_report_or_error()
    report_fn = None  # the tuner's default: static_report (batched when interpreting)
    log = print if args.verbose else None

    if args.static_only:
        rc = 0
        for key in keys:
            default = heuristic_config(key)
            configs = args.config or candidate_configs(key, default)
            print(f"{key}: {len(configs)} candidates (batch {args.batch} -> bucket "
                  f"{key.batch_bucket}, checked at batch {key.batch_bucket})")
            # The candidates compile together in worker processes (no progress bar): say
            # what the wait is for.
            print(f"compiling {len(configs)} candidates for sm_{key.arch} ...", file=sys.stderr,
                  flush=True)
            try:
                res = prune(key, configs, report_fn=report_fn, progress=sys.stderr.isatty())
            except RuntimeError as e:
                raise CLIError(str(e).strip().splitlines()[0]) from None
            print(f"kept {len(res.kept)}:")
            for cfg, rep in res.kept:
                mark = "  (default)" if cfg == default else ""
                print(f"  {cfg}  {_fmt_report(rep)}{mark}")
            if args.verbose:
                print(f"dropped {len(res.dropped)}" + (":" if res.dropped else ""))
                for cfg, reasons in res.dropped:
                    print(f"  {cfg}: {'; '.join(reasons)}")
            else:
                print(f"dropped {len(res.dropped)}" + (" (--verbose says why)" if res.dropped
                                                       else ""))
            if not res.kept:
                rc = 1
                print(f"error: nothing survives for {key}", file=sys.stderr)
            elif default in configs and default not in res.kept_configs:
                fallback = res.kept_configs[0] if res.kept else None
                print(f"note: the heuristic default ({default}) was dropped; the default "
                      f"falls back to {fallback}")
        return rc

    from ..autotune.cache import cache_path
    from ..autotune.tuner import tune_and_store
    from ..kernels.config import KernelConfig
    fwd = None
    for key in keys:
        try:
            result = tune_and_store(
                key, gpu=gpu, capability=cap, batch=args.batch, seq_len=args.seq_len,
                direction=args.direction, report_fn=report_fn, forward_config=fwd,
                configs=args.config,
                progress=True, log=log)
        except RuntimeError as e:
            raise CLIError(str(e).splitlines()[0]) from None
        if key.pass_ == "forward":
            fwd = result.best
        n_ok = sum(1 for t in result.timings if "ms" in t)
        print(f"{key}: timed {n_ok}/{len(result.timings)} configs, dropped "
              f"{len(result.dropped)} statically")
        if args.verbose:
            for t in sorted(result.timings, key=lambda t: t.get("ms", float("inf"))):
                what = f"{t['ms']:.4f} ms" if "ms" in t else f"failed: {t['error']}"
                print(f"  {t['config']}: {what}")
        speed = (f"{result.speedup:.2f}x over the default ({result.default}, "
                 f"{result.default_ms:.4f} ms)" if result.speedup else
                 f"the default ({result.default}) could not be timed")
        if result.confirm is not None and not result.confirm["accepted"]:
            c = result.confirm
            print(f"  the fastest first timing ({KernelConfig.from_dict(c['challenger'])}) did "
                  f"not beat the default by {c['min_gain']:.0%} when timed again: default kept")
        print(f"chosen: {result.best}  {result.best_ms:.4f} ms (median), {speed}")
    print(f"stored in {cache_path()}")
    return 0
