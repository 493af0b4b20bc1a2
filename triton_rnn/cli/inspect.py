"""``triton-rnn inspect``: the static kernel report, compiled for a GPU target without one."""

from __future__ import annotations

import argparse
import json
import subprocess

from . import CLIError, dtype_name, parse_arch

CELLS = ("gru", "lstm", "rnn_tanh", "rnn_relu")
#: The tile options besides --block-h/--block-b (KernelConfig's defaults when not given).
TILE_OPTIONS = ("num_warps", "num_stages", "block_k", "resident_k", "split_k")


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
    p.add_argument("--dtype", type=dtype_name, default="bfloat16",
                   help="bf16 (default), fp16 or fp32 (torch's names work too)")
    p.add_argument("--direction", choices=("forward", "reverse"), default="forward",
                   help="time direction (same kernel resources either way)")
    p.add_argument("--backward", action="store_true", help="the backward kernel")
    p.add_argument("--arch", type=parse_arch, default=90,
                   help="CUDA architecture, e.g. sm_90 (default)")
    p.add_argument("--block-h", type=int,
                   help="force a tile config (with --block-b; default: the library's choice)")
    p.add_argument("--block-b", type=int)
    p.add_argument("--num-warps", type=int, help="with a forced tile (default 4)")
    p.add_argument("--num-stages", type=int, help="with a forced tile (default 1)")
    p.add_argument("--block-k", type=int,
                   help="with a forced tile: stream W_hh in K chunks (default 0: on-chip)")
    p.add_argument("--resident-k", type=int,
                   help="with --block-k: inputs of the slice kept on-chip (default 0: stream "
                        "it all)")
    p.add_argument("--split-k", type=int,
                   help="with a forced tile: parts each step's dots split K into, one per "
                        "group of warps (default 0: as many as the warps the output tile "
                        "leaves idle; 1: none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..kernels.config import KernelConfig
    from ..kernels.inspect import static_report

    if args.hidden < 1 or args.batch < 1:
        raise CLIError("--hidden and --batch must be positive")
    if args.proj and (args.cell != "lstm" or not 0 < args.proj < args.hidden):
        raise CLIError("--proj needs --cell lstm and 0 < proj < hidden, as torch.nn.LSTM's "
                       "proj_size")
    config = None
    tile = {k: getattr(args, k) for k in TILE_OPTIONS if getattr(args, k) is not None}
    if args.block_h is not None or args.block_b is not None:
        if args.block_h is None or args.block_b is None:
            raise CLIError("--block-h and --block-b go together")
        try:
            config = KernelConfig.from_dict(dict(block_h=args.block_h, block_b=args.block_b,
                                                 **tile))
        except ValueError as e:
            raise CLIError(str(e)) from None
    elif tile:
        given = ", ".join("--" + k.replace("_", "-") for k in tile)
        raise CLIError(f"{given} need a forced tile: give --block-h and --block-b too")
    try:
        report = static_report(args.cell, "backward" if args.backward else "forward", args.dtype,
                               args.hidden, args.batch, config, args.arch, args.proj)
    except subprocess.CalledProcessError as e:
        tool = e.cmd[0] if isinstance(e.cmd, (list, tuple)) and e.cmd else e.cmd
        raise CLIError(f"{tool} failed on the sm_{args.arch} binary (exit {e.returncode})") \
            from None
    except (RuntimeError, FileNotFoundError) as e:
        raise CLIError(str(e).splitlines()[-1] if str(e) else type(e).__name__) from None
    report["direction"] = args.direction
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0
