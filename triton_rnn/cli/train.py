"""``triton-rnn train``: train the reference seq2seq model (dates task by default).

Run under ``torchrun --nproc_per_node N`` for multi-process (DDP) training.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import CLIError, positive_int

ATTENTION = ("dot", "general", "concat")
#: Where the parsed arguments record the schedule options given on the command line.
EXPLICIT = "explicit_options"


class _Explicit(argparse.Action):
    """Store the value and note that the option was given (a resumed run takes the
    schedule options that were not given from its checkpoint)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, EXPLICIT, set(getattr(namespace, EXPLICIT, None) or ()) | {self.dest})


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train the reference seq2seq-with-attention model",
        description="Train the reference encoder-decoder with attention. Without --data it "
                    "learns to turn human-written dates into ISO 8601 (no download). "
                    "Writes best.pt, last.pt and attention.png into --out. Run it under "
                    "torchrun for multi-process training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="TSV", help="source<TAB>target file instead of the dates task")
    d.add_argument("--tokenize", choices=("char", "word"), default="char")
    d.add_argument("--train-size", type=int, default=6000, help="dates task: training pairs")
    d.add_argument("--val-size", type=int, default=None,
                   help="validation size (dates: 500; TSV: 5%% of distinct sources)")
    d.add_argument("--test-size", type=int, default=None,
                   help="test size (dates: 1000; TSV: 5%% of distinct sources)")
    m = p.add_argument_group("model")
    m.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    m.add_argument("--attention", choices=ATTENTION, default="general")
    m.add_argument("--input-feeding", action="store_true",
                   help="Luong input feeding (decoder runs step by step; slower)")
    m.add_argument("--hidden", type=int, default=128, help="decoder size; each encoder direction has half")
    m.add_argument("--emb", type=int, default=32, help="embedding size")
    m.add_argument("--layers", type=int, default=1)
    m.add_argument("--dropout", type=float, default=0.1)
    m.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="RNN implementation (auto: Triton on CUDA, torch on CPU)")
    t = p.add_argument_group(
        "training", "With --resume, the schedule options (--epochs/--steps, --batch-size, --lr, "
        "--warmup, --clip, --label-smoothing, --weight-decay) default to the checkpoint's.")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=None, action=_Explicit,
                        help="epochs (default 8)")
    length.add_argument("--steps", type=positive_int, default=None, action=_Explicit,
                        help="optimizer steps instead of epochs")
    t.add_argument("--batch-size", type=int, default=64, action=_Explicit,
                   help="global batch (split across processes)")
    t.add_argument("--lr", type=float, default=3e-3, action=_Explicit,
                   help="Adam peak learning rate")
    t.add_argument("--warmup", type=int, default=100, action=_Explicit,
                   help="warm-up steps before cosine decay")
    t.add_argument("--clip", type=float, default=1.0, action=_Explicit,
                   help="gradient-norm clipping (0: off)")
    t.add_argument("--label-smoothing", type=float, default=0.1, action=_Explicit)
    t.add_argument("--weight-decay", type=float, default=0.0, action=_Explicit,
                   help="Adam weight decay (an L2 term added to the gradient)")
    t.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: each epoch)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    t.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (0: auto, cores / processes / 2, 1 to 4)")
    t.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="runs/seq2seq", metavar="DIR")
    o.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume from CKPT (default DIR/last.pt) with its data, model and "
                        "schedule; schedule options given here override the schedule")
    o.add_argument("--beam", type=int, default=1, help="beam size for the final test (1: greedy)")
    o.add_argument("--samples", type=int, default=5, help="sample translations to print")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.batch_size < 1 or args.beam < 1 or args.hidden < 2 or args.hidden % 2:
        raise CLIError("--batch-size and --beam must be >= 1 and --hidden even and >= 2")
    if args.data is None and args.train_size < 1:
        raise CLIError("--train-size must be >= 1")
    from ..models.training import DEFAULTS, SCHEDULE_OPTIONS, RankFailed, train

    opts = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    if args.resume:
        # train() takes the schedule options that it is not passed from the checkpoint.
        given = getattr(args, EXPLICIT, None) or ()
        for k in SCHEDULE_OPTIONS:
            if k not in given:
                opts.pop(k, None)
    default_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        # triton_rnn's own warnings (a resume that cannot be exact, say): one line.
        if f"{os.sep}triton_rnn{os.sep}" in filename:
            print(f"triton-rnn train: warning: {message}", file=sys.stderr, flush=True)
        else:
            default_show(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            train(opts)
    except (ValueError, OSError, RankFailed) as e:  # OSError: FileNotFoundError, a directory...
        raise CLIError(str(e)) from None
    return 0
