"""``triton-rnn translate``: decode with a checkpoint written by ``triton-rnn train``."""

from __future__ import annotations

import argparse
import sys

from . import CLIError, positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "translate", help="translate text with a trained seq2seq checkpoint",
        description="Translate sentences given as arguments or read from --file (one per "
                    "line; '-' for stdin). Prints one translation per input line, in order; "
                    "a blank input line gives an empty output line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("text", nargs="*", help="sentences to translate")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="best.pt or last.pt")
    p.add_argument("--file", metavar="F", help="translate every line of F ('-': stdin)")
    p.add_argument("--beam", type=positive_int, default=1, help="beam size (1: greedy)")
    p.add_argument("--max-len", type=positive_int, default=64, help="maximum output tokens")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--show-source", action="store_true", help="print 'source<TAB>translation'")
    p.set_defaults(func=run)
    return p


def _reason(e, limit: int = 200) -> str:
    """One short line saying why ``e`` happened (a model that does not fit its checkpoint)."""
    keep = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if keep and keep[0].startswith("Error(s) in loading state_dict"):
        # load_state_dict: the first mismatch is enough
        return "its weights do not match its config: " + _reason(" ".join(keep[1:2]), limit)
    text = (keep or [""])[0]
    if isinstance(e, KeyError):
        text = f"missing entry {text}"
    elif ". " in text:
        text = text[:text.index(". ") + 1]  # first sentence
    text = text or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _device(name: str):
    """:func:`~triton_rnn.models.training.resolve_device`, its errors as :class:`CLIError`."""
    from ..models.training import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _load_model(path: str, backend: str, device):
    """``(model, src_vocab, tgt_vocab, mode)`` from ``path``; any problem is a :class:`CLIError`.

    The file is read with ``torch.load(weights_only=True)`` only (through
    :func:`load_checkpoint`), so nothing in it is executed; anything it holds that
    is not a consistent triton-rnn checkpoint is reported in one line.
    """
    from ..models.data import TOKENIZERS
    from ..models.training import load_checkpoint, model_from_checkpoint

    try:
        ckpt = load_checkpoint(path, map_location=device)
    except FileNotFoundError:
        raise CLIError(f"no such checkpoint: {path}") from None
    except ValueError as e:  # unreadable, or not a triton-rnn seq2seq checkpoint
        raise CLIError(str(e)) from None
    try:
        model, src_vocab, tgt_vocab, mode = model_from_checkpoint(ckpt, backend, device)
        if mode not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {mode!r}")
        for side, vocab in (("src", src_vocab), ("tgt", tgt_vocab)):
            if len(vocab) != model.config[f"{side}_vocab"]:
                raise ValueError(f"{side}_vocab has {len(vocab)} tokens but the model "
                                 f"{model.config[f'{side}_vocab']}")
    except Exception as e:
        raise CLIError(f"bad checkpoint {path}: {_reason(e)}") from None
    return model, src_vocab, tgt_vocab, mode


def _read_lines(name: str) -> list:
    try:
        f = sys.stdin if name == "-" else open(name, encoding="utf-8-sig")
    except OSError as e:
        raise CLIError(f"cannot read {name}: {e.strerror}") from None
    try:
        with f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise CLIError(f"cannot read {name}: not UTF-8 text ({e.reason} at byte "
                       f"{e.start})") from None
    except OSError as e:  # e.g. a directory on some systems
        raise CLIError(f"cannot read {name}: {e.strerror}") from None


def run(args) -> int:
    texts = list(args.text)
    if args.file:
        texts += _read_lines(args.file)
    if not texts:
        raise CLIError("nothing to translate: give sentences or --file")
    import torch

    from ..models.training import translate

    device = _device(args.device)
    from ..modules import _interpreter_requested

    if args.backend == "triton" and device.type != "cuda" and not _interpreter_requested():
        raise CLIError(f"--backend triton needs a CUDA --device (or TRITON_INTERPRET=1 for "
                       f"Triton's slow interpreter); use --backend auto or torch on {device}")
    model, src_vocab, tgt_vocab, mode = _load_model(args.checkpoint, args.backend, device)
    if args.beam > len(tgt_vocab) - 2:
        raise CLIError(f"--beam {args.beam} exceeds the target vocabulary "
                       f"({len(tgt_vocab) - 2} tokens)")
    # One output line per input line: blank inputs are not translated, they give "".
    todo = [s for s in texts if s.strip()]
    hyps = iter([])
    if todo:
        with torch.no_grad():
            hyps = iter(translate(model, todo, src_vocab, tgt_vocab, mode, beam=args.beam,
                                  max_len=args.max_len, batch_size=args.batch_size,
                                  device=device))
    for s in texts:
        h = next(hyps) if s.strip() else ""
        print(f"{s}\t{h}" if args.show_source else h)
    return 0
