"""``triton-rnn inspect``: the static kernel report, compiled for a GPU target without one."""

from __future__ import annotations

import argparse
import json

from . import CLIError

CELLS = ("gru", "lstm", "rnn_tanh", "rnn_relu")
DTYPES = ("bfloat16", "float16", "float32")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="compile a kernel for sm_XX on the CPU and report its resources (JSON)",
        description="Compile one recurrent kernel for a CUDA architecture (no GPU needed) and "
                    "print JSON: registers, shared and local (spill) memory, whether W_hh is "
                    "loaded inside the time loop (PTX), tensor-core use (SASS), occupancy.")
    p.add_argument("--cell", choices=CELLS, default="gru")
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--proj", type=int, default=0,
                   help="LSTM projection size (proj_size; 0: none)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--direction", choices=("forward", "reverse"), default="forward",
                   help="time direction (same kernel resources either way)")
    p.add_argument("--backward", action="store_true", help="the backward kernel")
    p.add_argument("--arch", type=parse_arch, default=90,
                   help="CUDA architecture, e.g. sm_90 (default)")
    p.add_argument("--block-h", type=int, help="force a tile config (with --block-b)")
    p.add_argument("--block-b", type=int)
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=1)
    p.add_argument("--block-k", type=int, default=0, help="stream W_hh in K chunks (0: on-chip)")
    p.add_argument("--resident-k", type=int, default=0,
                   help="with --block-k: inputs of the slice kept on-chip (0: stream it all)")
    p.set_defaults(func=run)


def parse_arch(arch: str) -> int:
    """``"sm_90"``, ``"sm90"`` or ``"90"`` -> 90 (an argparse ``type``)."""
    a = str(arch).lower().removeprefix("sm_").removeprefix("sm")
    if not a.isdigit() or int(a) < 1:
        raise argparse.ArgumentTypeError(f"must look like sm_90, got {arch!r}")
    return int(a)


def run(args: argparse.Namespace) -> int:
    from ..kernels.config import KernelConfig
    from ..kernels.inspect import static_report

    if args.hidden < 1 or args.batch < 1:
        raise CLIError("--hidden and --batch must be positive")
    if args.proj and (args.cell != "lstm" or not 0 < args.proj < args.hidden):
        raise CLIError("--proj needs --cell lstm and 0 < proj < hidden, as torch.nn.LSTM's "
                       "proj_size")
    config = None
    if args.block_h is not None or args.block_b is not None:
        if args.block_h is None or args.block_b is None:
            raise CLIError("--block-h and --block-b go together")
        try:
            config = KernelConfig.from_dict(dict(
                block_h=args.block_h, block_b=args.block_b, num_warps=args.num_warps,
                num_stages=args.num_stages, block_k=args.block_k, resident_k=args.resident_k))
        except ValueError as e:
            raise CLIError(str(e)) from None
    try:
        report = static_report(args.cell, "backward" if args.backward else "forward", args.dtype,
                               args.hidden, args.batch, config, args.arch, args.proj)
    except (RuntimeError, FileNotFoundError) as e:
        raise CLIError(str(e).splitlines()[-1] if str(e) else type(e).__name__) from None
    report["direction"] = args.direction
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0
