"""``triton-rnn translate``: decode with a checkpoint written by ``triton-rnn train``."""

from __future__ import annotations

import argparse
import sys

from . import CLIError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "translate", help="translate text with a trained seq2seq checkpoint",
        description="Translate sentences given as arguments or read from --file (one per "
                    "line; '-' for stdin). Prints one translation per line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("text", nargs="*", help="sentences to translate")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="best.pt or last.pt")
    p.add_argument("--file", metavar="F", help="translate every line of F ('-': stdin)")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    p.add_argument("--max-len", type=int, default=64, help="maximum output tokens")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--show-source", action="store_true", help="print 'source<TAB>translation'")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.beam < 1:
        raise CLIError("--beam must be >= 1")
    texts = list(args.text)
    if args.file:
        try:
            f = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        except OSError as e:
            raise CLIError(f"cannot read {args.file}: {e.strerror}") from None
        with f:
            texts += [line.rstrip("\r\n") for line in f if line.strip()]
    if not texts:
        raise CLIError("nothing to translate: give sentences or --file")
    import torch

    from ..models.training import load_checkpoint, model_from_checkpoint, translate

    try:
        ckpt = load_checkpoint(args.checkpoint, map_location=args.device)
    except FileNotFoundError:
        raise CLIError(f"no such checkpoint: {args.checkpoint}") from None
    except ValueError as e:
        raise CLIError(str(e)) from None
    model, src_vocab, tgt_vocab, mode = model_from_checkpoint(ckpt, args.backend, args.device)
    if args.beam > len(tgt_vocab) - 2:
        raise CLIError(f"--beam {args.beam} exceeds the target vocabulary "
                       f"({len(tgt_vocab) - 2} tokens)")
    with torch.no_grad():
        hyps = translate(model, texts, src_vocab, tgt_vocab, mode, beam=args.beam,
                         max_len=args.max_len, batch_size=args.batch_size, device=args.device)
    for s, h in zip(texts, hyps):
        print(f"{s}\t{h}" if args.show_source else h)
    return 0
