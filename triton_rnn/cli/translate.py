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


_TORCH_LOAD_BOILERPLATE = ("Weights only load failed", "In PyTorch", "Re-running",
                           "Please file an issue", "Check the documentation")


def _reason(e, limit: int = 200) -> str:
    """One short line saying why ``e`` happened (torch's long explanations trimmed)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(_TORCH_LOAD_BOILERPLATE)]
    if keep and keep[0].startswith("Error(s) in loading state_dict"):
        # load_state_dict: the first mismatch is enough
        return "its weights do not match its config: " + _reason(" ".join(keep[1:2]), limit)
    text = (keep or lines or [""])[0]
    if isinstance(e, KeyError):
        text = f"missing entry {text}"
    elif ". " in text:
        text = text[:text.index(". ") + 1]  # first sentence
    text = text or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _device(name: str):
    """``torch.device(name)``, checked to exist here, or a :class:`CLIError`."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"invalid --device {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                           f"device(s) here")
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # e.g. mps/xpu without the hardware
        raise CLIError(f"--device {name} is not usable here: {_reason(e)}") from None
    return dev


def _load_model(path: str, backend: str, device):
    """``(model, src_vocab, tgt_vocab, mode)`` from ``path``; any problem is a :class:`CLIError`.

    The file is read with ``torch.load(weights_only=True)`` only (through
    :func:`load_checkpoint`), so nothing in it is executed; anything it holds that
    is not a consistent triton-rnn checkpoint is reported in one line.
    """
    import os
    import pickle

    from ..models.data import TOKENIZERS
    from ..models.training import load_checkpoint, model_from_checkpoint

    if not os.path.exists(path):
        raise CLIError(f"no such checkpoint: {path}")
    try:
        ckpt = load_checkpoint(path, map_location=device)
    except ValueError as e:  # readable, but not a triton-rnn seq2seq checkpoint
        raise CLIError(str(e)) from None
    except OSError as e:
        raise CLIError(f"cannot read checkpoint {path}: {e.strerror or _reason(e)}") from None
    except EOFError:
        raise CLIError(f"cannot load checkpoint {path}: the file is empty or truncated") from None
    except pickle.UnpicklingError as e:
        raise CLIError(f"cannot load checkpoint {path}: not a weights-only torch file "
                       f"({_reason(e)})") from None
    except Exception as e:  # corrupt zip archive, ...
        raise CLIError(f"cannot load checkpoint {path}: corrupt or not a torch file "
                       f"({_reason(e)})") from None
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
