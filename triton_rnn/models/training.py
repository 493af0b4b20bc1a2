"""Training, evaluation and checkpoints for the reference seq2seq model.

:func:`train` is what ``triton-rnn train`` runs. It works in one process or
under ``torchrun`` (``torch.distributed``, gloo on CPU, NCCL on GPU, wrapped in
``DistributedDataParallel``). Each global batch of ``batch_size`` examples is
drawn from one seeded permutation that every rank computes; rank ``r`` takes
every ``world``-th example of it, so the per-rank batch is
``batch_size / world`` and the global batch is the same as in one process. The
loss is summed over each rank's target tokens and divided by the number of
target tokens in the *global* batch (one all-reduce of a scalar), so after
DDP's gradient averaging the update is the single-process update, up to
floating-point summation order and dropout masks. Only rank 0 prints,
evaluates and writes files; if it fails there, it tells the other ranks, which
raise instead of waiting for it. The logged loss is the mean over the global
batch's target tokens (summed over the ranks in the same all-reduce).

Random numbers: every rank seeds with ``seed`` before building the model, so
the initial weights are the same everywhere; under DDP rank ``r`` then reseeds
with ``seed + r`` so that the ranks draw different dropout masks (one process
keeps the stream it started with). Checkpoints hold every rank's CPU RNG state
(and CUDA RNG state on a GPU), so resuming with the same number of processes
repeats the uninterrupted run exactly; with another number of processes the
RNGs are reseeded deterministically from ``seed``, the rank and the step, with
a warning.

Resuming takes the data, tokenizer, seed and model from the checkpoint, and the
schedule (:data:`SCHEDULE_OPTIONS`: steps or epochs, batch size, learning rate,
warm-up, clipping, label smoothing, weight decay) from it too, except the
options that the caller passes explicitly (logged when they differ).

Checkpoints hold tensors and plain ``dict``/``list``/``str``/``int``/``float``
values only and are read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .data import (Vocab, date_splits, detokenize, load_tsv, source_key, split_pairs,
                   tokenize)
from .seq2seq import Seq2Seq, default_config

__all__ = [
    "CHECKPOINT_FORMAT", "Batch", "collate", "encode_pairs", "evaluate", "save_checkpoint",
    "load_checkpoint", "model_from_checkpoint", "resolve_device", "train", "attention_heatmap",
    "SCHEDULE_OPTIONS", "RankFailed",
]

CHECKPOINT_FORMAT = "triton-rnn-seq2seq/1"
Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------


def encode_pairs(pairs, src_vocab: Vocab, tgt_vocab: Vocab, mode: str):
    """``[(src ids, tgt ids)]``; a source is never empty (an UNK stands in)."""
    out = []
    for s, t in pairs:
        src = src_vocab.encode(tokenize(s, mode)) or [src_vocab.unk_id]
        out.append((src, tgt_vocab.encode(tokenize(t, mode))))
    return out


def collate(examples: Sequence[Tuple[List[int], List[int]]], pad: int = 0, bos: int = 2,
            eos: int = 3, device="cpu") -> Batch:
    """``(src [B, Ts], src_len [B] (CPU), tgt_in [B, T], tgt_out [B, T])``, right-padded."""
    B = len(examples)
    ts = max(len(s) for s, _ in examples)
    tt = max(len(t) for _, t in examples) + 1
    src = torch.full((B, ts), pad, dtype=torch.long)
    tgt_in = torch.full((B, tt), pad, dtype=torch.long)
    tgt_out = torch.full((B, tt), pad, dtype=torch.long)
    lens = torch.empty(B, dtype=torch.long)
    for i, (s, t) in enumerate(examples):
        src[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        lens[i] = len(s)
        tgt_in[i, :len(t) + 1] = torch.tensor([bos] + t, dtype=torch.long)
        tgt_out[i, :len(t) + 1] = torch.tensor(t + [eos], dtype=torch.long)
    return src.to(device), lens, tgt_in.to(device), tgt_out.to(device)


def _source_batch(texts: Sequence[str], vocab: Vocab, mode: str, device):
    ids = [vocab.encode(tokenize(t, mode)) or [vocab.unk_id] for t in texts]
    src, lens, _, _ = collate([(s, []) for s in ids], device=device)
    return src, lens


def translate(model: Seq2Seq, texts: Sequence[str], src_vocab: Vocab, tgt_vocab: Vocab,
              mode: str, beam: int = 1, max_len: int = 32, batch_size: int = 256,
              device="cpu") -> List[str]:
    """Translate raw strings; returns detokenized hypotheses in order."""
    model.eval()
    out: List[str] = []
    for i in range(0, len(texts), batch_size):
        src, lens = _source_batch(texts[i:i + batch_size], src_vocab, mode, device)
        for ids in model.translate_ids(src, lens, beam=beam, max_len=max_len):
            out.append(detokenize(tgt_vocab.decode(ids), mode))
    return out


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def evaluate(model: Seq2Seq, pairs, src_vocab: Vocab, tgt_vocab: Vocab, mode: str,
             beam: int = 1, max_len: int = 32, device="cpu", bleu: bool = True) -> Dict:
    """Free-running decoding of ``pairs``.

    * ``exact``: fraction of hypotheses equal to the reference token sequence;
    * ``token_acc``: fraction of reference tokens (EOS included) that the
      hypothesis has at the same position;
    * ``bleu``: ``sacrebleu.corpus_bleu`` over the tokens joined by spaces
      (``tokenize="none"``), i.e. character BLEU for the char tokenizer.
    """
    hyps = translate(model, [s for s, _ in pairs], src_vocab, tgt_vocab, mode, beam, max_len,
                     device=device)
    exact = correct = total = 0
    hyp_tok, ref_tok = [], []
    for h, (_, r) in zip(hyps, pairs):
        ht, rt = tokenize(h, mode) + ["</s>"], tokenize(r, mode) + ["</s>"]
        exact += ht == rt
        correct += sum(a == b for a, b in zip(ht, rt))
        total += len(rt)
        hyp_tok.append(" ".join(ht[:-1]))
        ref_tok.append(" ".join(rt[:-1]))
    n = max(1, len(pairs))
    res = {"exact": exact / n, "token_acc": correct / max(1, total), "hyps": hyps}
    if bleu:
        import sacrebleu

        # sacrebleu cannot score an empty corpus.
        res["bleu"] = (float(sacrebleu.corpus_bleu(hyp_tok, [ref_tok], tokenize="none").score)
                       if hyp_tok else 0.0)
    return res


def attention_heatmap(model: Seq2Seq, text: str, src_vocab: Vocab, tgt_vocab: Vocab, mode: str,
                      path: str, max_len: int = 32, device="cpu") -> str:
    """Greedy-decode ``text`` and save its attention weights as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    src, lens = _source_batch([text], src_vocab, mode, device)
    out, attn = model.greedy(src, lens, max_len, return_attention=True)
    ids = out[0].tolist()
    n = ids.index(model.eos_id) + 1 if model.eos_id in ids else len(ids)
    weights = attn[0, :n, :int(lens[0])].float().cpu().numpy()
    ylabels = [tgt_vocab.itos[i] for i in ids[:n]]
    # Spaces are tokens at character level: draw them as a middle dot.
    xlabels = ["\u00b7" if t == " " else repr(t)[1:-1] if t.isspace() else t
               for t in tokenize(text, mode)] or ["<unk>"]
    fig, ax = plt.subplots(figsize=(max(4, 0.32 * len(xlabels) + 1.5),
                                    max(3, 0.32 * len(ylabels) + 1.2)))
    im = ax.imshow(weights, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(xlabels)), labels=xlabels)
    ax.set_yticks(range(len(ylabels)), labels=ylabels)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    ax.set_title(f"{text.strip()} -> {detokenize(tgt_vocab.decode(ids), mode)}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def save_checkpoint(path: str, model: Seq2Seq, src_vocab: Vocab, tgt_vocab: Vocab, mode: str,
                    optimizer=None, step: int = 0, extra: Optional[dict] = None) -> None:
    """Write a checkpoint atomically (tensors and plain values only)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": dict(model.config),
        "src_vocab": src_vocab.to_list(),
        "tgt_vocab": tgt_vocab.to_list(),
        "tokenize": mode,
        "model": model.state_dict(),
        "step": int(step),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    ckpt.update(extra or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True`` and check its format.

    A file that is there but cannot be read as one (a directory, empty,
    truncated, corrupt, holding Python objects, another format) is a one-line
    ``ValueError`` naming it; a missing file is ``FileNotFoundError``.
    """
    if os.path.isdir(path):
        raise ValueError(f"cannot load checkpoint {path}: it is a directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    why = None
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        why = ("torch.load(weights_only=True) refuses it (corrupt, or it holds Python objects "
               "other than tensors and plain values)")
    except EOFError:
        why = "the file is empty or truncated"
    except OSError as e:
        why = e.strerror or _one_line(e)
    except RuntimeError:
        why = "not a readable PyTorch file (truncated or corrupt)"
    except Exception as e:  # anything else torch.load may raise on a damaged file
        why = f"{type(e).__name__}: {_one_line(e)}"
    if why is not None:
        raise ValueError(f"cannot load checkpoint {path}: {why}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a triton-rnn seq2seq checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict, backend: Optional[str] = None, device="cpu"):
    """``(model, src_vocab, tgt_vocab, tokenize mode)`` from a loaded checkpoint."""
    cfg = dict(ckpt["config"])
    if backend is not None:
        cfg["backend"] = backend
    model = Seq2Seq(cfg)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, Vocab(ckpt["src_vocab"]), Vocab(ckpt["tgt_vocab"]), ckpt["tokenize"]


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

#: Options of :func:`train` and their defaults (``triton-rnn train`` mirrors them).
DEFAULTS = {
    "data": None, "tokenize": "char", "train_size": 6000, "val_size": None, "test_size": None,
    "epochs": None, "steps": None, "batch_size": 64, "lr": 3e-3, "warmup": 100,
    "clip": 1.0, "label_smoothing": 0.1, "weight_decay": 0.0,
    "emb": 32, "hidden": 128, "layers": 1, "cell": "gru", "attention": "general",
    "input_feeding": False, "dropout": 0.1, "backend": "auto",
    "out": "runs/seq2seq", "resume": None, "seed": 0, "device": "auto", "threads": 0,
    "eval_every": 0, "beam": 1, "max_len": 0, "samples": 5, "progress": True,
}
DEFAULT_EPOCHS = 8
#: Options that make the optimisation schedule. On resume each comes from the
#: checkpoint unless the caller passes it (``steps`` and ``epochs`` go together).
SCHEDULE_OPTIONS = ("steps", "epochs", "batch_size", "lr", "warmup", "clip", "label_smoothing",
                    "weight_decay")
#: What resuming takes from the checkpoint's options, always.
_DATA_OPTIONS = ("data", "tokenize", "train_size", "val_size", "test_size", "seed")


def _log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, flush=True)


def _one_line(e: BaseException, limit: int = 240) -> str:
    """The first lines of an exception's message, joined into one line."""
    text = " ".join(line.strip() for line in str(e).splitlines()[:2] if line.strip())
    text = text or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_options(o: dict) -> None:
    for k in ("steps", "epochs"):
        v = o[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{k} (--{k}) must be >= 1, got {v!r}")
    if o["steps"] is not None and o["epochs"] is not None:
        raise ValueError("give steps (--steps) or epochs (--epochs), not both")
    if not isinstance(o["beam"], int) or o["beam"] < 1:
        raise ValueError(f"beam (--beam) must be >= 1, got {o['beam']!r}")


def resolve_device(device_opt: str) -> torch.device:
    """The device that ``--device`` names (``auto``: CUDA if there is one, else the CPU);
    a one-line ValueError if this machine has no such device, or cannot use it."""
    if device_opt == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_opt)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device_opt!r} (--device): use auto, cpu, cuda or "
                         f"cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device_opt!r} (--device): CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device_opt!r} (--device): this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(0, device=device)
    except Exception as e:  # noqa: BLE001 - e.g. mps/xpu without the hardware
        raise ValueError(f"device {device_opt!r} (--device) is not usable here: "
                         f"{_one_line(e)}") from None
    return device


def _setup_distributed(device_opt: str):
    """``(rank, world, local_rank, device, owned)``.

    Uses the caller's process group if there is one; otherwise, under torchrun
    (``WORLD_SIZE`` > 1), initialises one and ``owned`` is True: only then does
    :func:`train` destroy it.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank if world > 1 else 0)))
    device = resolve_device(device_opt)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owned = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owned = True
    return rank, world, local_rank, device, owned


def _load_data(o: dict):
    """``(train, val, test)`` pairs for the options ``o`` (same on every rank)."""
    if o["data"]:
        pairs = load_tsv(o["data"])
        n_src = len({source_key(s) for s, _ in pairs})  # what split_pairs counts
        val = o["val_size"] if o["val_size"] is not None else max(1, n_src // 20)
        test = o["test_size"] if o["test_size"] is not None else max(1, n_src // 20)
        return split_pairs(pairs, val, test, seed=o["seed"])
    val = o["val_size"] if o["val_size"] is not None else 500
    test = o["test_size"] if o["test_size"] is not None else 1000
    return date_splits(o["train_size"], val, test, seed=o["seed"])


def _lr_at(step: int, total: int, o: dict) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    warm = min(o["warmup"], max(1, total // 10))
    if step < warm:
        return o["lr"] * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return o["lr"] * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _plain(v):
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


# -- resuming -------------------------------------------------------------


def _read_checkpoint(path: str, map_location) -> dict:
    """:func:`load_checkpoint` for resuming: a file that cannot be resumed from is a
    one-line ``ValueError`` (``FileNotFoundError`` if there is none)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint to resume at {path}")
    ckpt = load_checkpoint(path, map_location=map_location)
    missing = [k for k in ("config", "model", "src_vocab", "tgt_vocab", "tokenize", "step")
               if k not in ckpt]
    if missing:
        raise ValueError(f"cannot resume from {path}: the checkpoint has no {', '.join(missing)}")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
        raise ValueError(f"cannot resume from {path}: malformed config or weights")
    if not isinstance(ckpt["step"], int) or ckpt["step"] < 0:
        raise ValueError(f"cannot resume from {path}: bad step {ckpt['step']!r}")
    return ckpt


def _length(d: dict) -> str:
    if d.get("steps") is not None:
        return f"steps {d['steps']}"
    return f"epochs {d.get('epochs') or DEFAULT_EPOCHS}"


def _resume_options(o: dict, saved: dict, given) -> List[str]:
    """Take the data and, unless ``given``, the schedule options from ``saved`` (a
    checkpoint's options) into ``o``; returns the given ones that differ from it."""
    for k in _DATA_OPTIONS:
        if k in saved:
            o[k] = saved[k]
    changed = []
    length_given = bool({"steps", "epochs"} & set(given))
    if "steps" in saved or "epochs" in saved:
        if length_given:
            if _length(o) != _length(saved):
                changed.append(f"{_length(o)} (checkpoint: {_length(saved)})")
        else:
            o["steps"], o["epochs"] = saved.get("steps"), saved.get("epochs")
    for k in SCHEDULE_OPTIONS:
        if k in ("steps", "epochs") or k not in saved:
            continue  # an older checkpoint without it: the call's value
        if k not in given:
            o[k] = saved[k]
        elif o[k] != saved[k]:
            changed.append(f"{k} {o[k]} (checkpoint: {saved[k]})")
    return changed


def _rng_states(world: int, device) -> List[dict]:
    """Every rank's RNG states ``[{"cpu": ByteTensor[, "cuda": ByteTensor]}]`` (a collective)."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return [mine]
    every: List = [None] * world
    dist.all_gather_object(every, mine)
    return every


def _reseed(seed: int, rank: int, step: int) -> int:
    """A seed for rank ``rank`` resuming at ``step`` when the saved RNG states don't fit."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2 ** 63)


def _restore_rng(ckpt: dict, seed: int, rank: int, world: int, device) -> None:
    step = int(ckpt["step"])
    cpu = ckpt.get("rng_ranks")
    if cpu is None and "rng" in ckpt and world == 1:
        cpu = [ckpt["rng"]]  # written by an older version: rank 0's state only
    notes = []
    if (isinstance(cpu, list) and len(cpu) == world
            and all(isinstance(t, torch.Tensor) for t in cpu)):
        torch.set_rng_state(cpu[rank].cpu())
        if device.type == "cuda":
            cuda = ckpt.get("cuda_rng_ranks")
            if (isinstance(cuda, list) and len(cuda) == world
                    and all(isinstance(t, torch.Tensor) for t in cuda)):
                torch.cuda.set_rng_state(cuda[rank].cpu(), device)
            else:
                torch.cuda.manual_seed(_reseed(seed, rank, step))
                notes.append("the checkpoint has no CUDA RNG states (it was not written on a "
                             "GPU): the CUDA RNG is reseeded from the seed, rank and step")
    else:
        torch.manual_seed(_reseed(seed, rank, step))  # the CUDA RNGs too
        if isinstance(cpu, list):
            n = len(cpu)
            written = f"was written by {n} process{'es' if n != 1 else ''}"
        else:
            written = "has no per-process RNG states (an older version wrote it)"
        notes.append(f"the checkpoint {written} and this run has {world} process"
                     f"{'es' if world != 1 else ''}: the RNGs (dropout) are reseeded from the "
                     f"seed, rank and step, so the run is repeatable but does not continue the "
                     f"original one exactly")
    if rank == 0:
        for note in notes:
            warnings.warn(f"resuming: {note}", RuntimeWarning, stacklevel=4)


class RankFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed (its own error says why)."""


def _on_rank0(fn, rank: int, world: int, device, what: str) -> None:
    """Run ``fn`` on rank 0 only. The other ranks wait for it, and raise if it failed,
    instead of waiting at their next collective until the process group times out."""
    error = None
    if rank == 0:
        try:
            fn()
        except BaseException as e:  # KeyboardInterrupt too: the others must not hang
            error = e
    if world > 1:
        flag = torch.tensor([0.0 if error is not None else 1.0], device=device)
        dist.broadcast(flag, src=0)
        if rank != 0 and flag.item() == 0.0:
            raise RankFailed(f"rank 0 failed {what}; see its error")
    if error is not None:
        raise error


# -- training -------------------------------------------------------------


def train(options: Optional[dict] = None, **kw) -> Dict:
    """Train (or resume) the reference model; returns the final test metrics on rank 0.

    ``options`` uses the keys of :data:`DEFAULTS`. Writes ``last.pt`` (resumable,
    after every validation), ``best.pt`` (best validation exact match) and
    ``attention.png`` into ``options["out"]``. With ``resume``, the options of
    :data:`SCHEDULE_OPTIONS` that are not passed (in ``options`` or ``kw``) come
    from the checkpoint. With an empty test set the test metrics are ``None``.

    Under torchrun it initialises (and at the end destroys) the process group;
    a process group that the caller initialised is used and left alone.
    """
    o = dict(DEFAULTS)
    given = set(options or {}) | set(kw)
    o.update(options or {})
    o.update(kw)
    unknown = set(o) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown training options: {sorted(unknown)}")
    _check_options(o)
    rank, world, local_rank, device, owned = _setup_distributed(o["device"])
    try:
        return _train(o, given, rank, world, local_rank, device)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _train(o: dict, given, rank: int, world: int, local_rank: int, device) -> Dict:
    threads = o["threads"]
    if threads <= 0 and device.type == "cpu":
        # The matrices are small: on a shared 2-core machine a second intra-op
        # thread made steps 9x slower (measured: 95 ms -> 840+ ms per step), so use
        # one thread per two cores, at most 4.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        threads = max(1, min(4, (os.cpu_count() or 1) // max(1, local_world) // 2))
    if threads > 0:
        torch.set_num_threads(threads)

    ckpt = None
    resume = o["resume"]
    if resume:
        path = os.path.join(o["out"], "last.pt") if resume == "auto" else resume
        ckpt = _read_checkpoint(path, map_location=device)
        saved = ckpt.get("options")
        changed = _resume_options(o, saved if isinstance(saved, dict) else {}, given)
        _check_options(o)
        _log(f"resuming from {path} at step {ckpt['step']}", rank)
        if changed:
            _log(f"resume: given options overriding the checkpoint's: {', '.join(changed)}", rank)

    # The same seed on every rank: the same data and initial weights everywhere.
    torch.manual_seed(o["seed"])
    train_pairs, val_pairs, test_pairs = _load_data(o)
    if ckpt is not None:
        try:
            mode = ckpt["tokenize"]
            tokenize("", mode)
            src_vocab, tgt_vocab = Vocab(ckpt["src_vocab"]), Vocab(ckpt["tgt_vocab"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"cannot resume from {path}: {_one_line(e)}") from None
        o["tokenize"] = mode
        cfg = dict(ckpt["config"])
        cfg["backend"] = o["backend"]
    else:
        mode = o["tokenize"]
        src_vocab = Vocab.build(tokenize(s, mode) for s, _ in train_pairs)
        tgt_vocab = Vocab.build(tokenize(t, mode) for _, t in train_pairs)
        cfg = default_config(len(src_vocab), len(tgt_vocab), emb=o["emb"], hidden=o["hidden"],
                             layers=o["layers"], cell=o["cell"], attention=o["attention"],
                             input_feeding=bool(o["input_feeding"]), dropout=o["dropout"],
                             backend=o["backend"])
    if o["beam"] > len(tgt_vocab) - 2:  # checked before training, not after it
        raise ValueError(f"beam {o['beam']} (--beam) exceeds the target vocabulary: at most "
                         f"{len(tgt_vocab) - 2} (its {len(tgt_vocab)} tokens less PAD and BOS)")
    train_data = encode_pairs(train_pairs, src_vocab, tgt_vocab, mode)
    max_len = o["max_len"] or (max(len(t) for _, t in train_data) + 10)

    if ckpt is not None:
        try:
            model = Seq2Seq(cfg).to(device)
            model.load_state_dict(ckpt["model"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"cannot resume from {path}: its weights do not fit its model "
                             f"config ({_one_line(e)})") from None
    else:
        model = Seq2Seq(cfg).to(device)
    if world > 1:
        # Different dropout masks on each rank (the weights are the same: DDP also
        # broadcasts rank 0's). One process keeps the stream it started with.
        torch.manual_seed(o["seed"] + rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
    if ckpt is not None and "optimizer" in ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"cannot resume from {path}: its optimizer state does not fit "
                             f"the model ({_one_line(e)})") from None
        for g in optimizer.param_groups:  # the loaded state carries the old value
            g["weight_decay"] = o["weight_decay"]

    n = len(train_data)
    bs = o["batch_size"]
    if bs < world:
        raise ValueError(f"batch size {bs} is smaller than the number of processes {world}")
    per_epoch = n // bs
    if per_epoch == 0:
        raise ValueError(f"{n} training examples are fewer than one batch of {bs}")
    total = o["steps"] if o["steps"] is not None else \
        per_epoch * (o["epochs"] if o["epochs"] is not None else DEFAULT_EPOCHS)
    eval_every = o["eval_every"] or per_epoch
    step = int(ckpt["step"]) if ckpt is not None else 0
    best = float(ckpt.get("best_val", -1.0)) if ckpt is not None else -1.0
    history = list(ckpt.get("history", [])) if ckpt is not None else []
    if ckpt is not None:
        _restore_rng(ckpt, o["seed"], rank, world, device)
    saved_opts = {k: _plain(v) for k, v in o.items()}
    out_dir = o["out"]

    def prepare():
        os.makedirs(out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        _log(f"data: {len(train_pairs)} train / {len(val_pairs)} val / {len(test_pairs)} test "
             f"pairs ({'dates' if not o['data'] else o['data']}, {mode} tokens); vocab "
             f"{len(src_vocab)} -> {len(tgt_vocab)}")
        _log(f"model: {cfg['cell']} hidden {cfg['hidden']} x{cfg['layers']}, {cfg['attention']} "
             f"attention{', input feeding' if cfg['input_feeding'] else ''}, {n_params} params; "
             f"device {device}, backend {cfg['backend']}, {world} process(es), "
             f"{torch.get_num_threads()} thread(s); {total} steps of batch {bs}")

    _on_rank0(prepare, rank, world, device, "creating the output directory")

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(path, best_val, rng):
        extra = {"options": saved_opts, "best_val": float(best_val), "history": history,
                 "rng": rng[0]["cpu"], "rng_ranks": [r["cpu"] for r in rng]}
        if device.type == "cuda":
            extra["cuda_rng_ranks"] = [r["cuda"] for r in rng]
        save_checkpoint(path, model, src_vocab, tgt_vocab, mode, optimizer, step, extra)

    pbar = None
    if rank == 0 and o["progress"] and step < total:
        from tqdm import tqdm

        pbar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
    t_start = time.perf_counter()
    tok_count = 0
    win_tokens, win_time = 0, time.perf_counter()
    rate = 0.0
    model.train()
    while step < total:
        epoch, k = divmod(step, per_epoch)
        order = _epoch_order(n, o["seed"], epoch)
        idx = order[k * bs:(k + 1) * bs][rank::world]
        src, lens, tgt_in, tgt_out = collate([train_data[i] for i in idx], device=device)
        for g in optimizer.param_groups:
            g["lr"] = _lr_at(step, total, o)
        logits = net(src, lens, tgt_in)
        ntok = (tgt_out != model.pad_id).sum()
        loss_sum = model.loss(logits, tgt_out, o["label_smoothing"], reduction="sum")
        # loss sum, target tokens, source tokens: summed over the ranks in one all-reduce.
        stats = torch.stack([loss_sum.detach().float(), ntok.detach().float(),
                             lens.sum().float().to(ntok.device)])
        if world > 1:
            dist.all_reduce(stats)
            loss = loss_sum * world / stats[1]
        else:
            loss = loss_sum / stats[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o["clip"] and o["clip"] > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip"]))
        else:
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
        optimizer.step()
        step += 1
        loss_total, tgt_tokens, src_tokens = stats.tolist()
        shown_loss = loss_total / max(1.0, tgt_tokens)  # the global batch's mean
        batch_tokens = int(tgt_tokens + src_tokens)
        tok_count += batch_tokens
        win_tokens += batch_tokens
        if pbar is not None:
            pbar.update(1)
            now = time.perf_counter()
            if now - win_time > 1.0:
                rate = win_tokens / (now - win_time)
                win_tokens, win_time = 0, now
            pbar.set_postfix(loss=f"{shown_loss:.3f}", tok_s=f"{rate:,.0f}",
                             gnorm=f"{gnorm:.2f}", refresh=False)
        if step % eval_every == 0 or step == total:
            rng = _rng_states(world, device)  # every rank's, for an exact resume

            def validate():
                nonlocal best
                res = evaluate(model, val_pairs, src_vocab, tgt_vocab, mode, max_len=max_len,
                               device=device, bleu=False)
                model.train()
                history.append({"step": step, "val_exact": res["exact"],
                                "val_token_acc": res["token_acc"], "loss": shown_loss})
                msg = (f"step {step}: loss {shown_loss:.3f}, val exact "
                       f"{res['exact']:.2%}, val token acc {res['token_acc']:.2%}")
                if pbar is not None:
                    pbar.write(msg)
                else:
                    _log(msg)
                if res["exact"] >= best:
                    best = res["exact"]
                    save(os.path.join(out_dir, "best.pt"), best, rng)
                save(os.path.join(out_dir, "last.pt"), best, rng)

            _on_rank0(validate, rank, world, device, f"in validation at step {step}")
    if pbar is not None:
        pbar.close()
    elapsed = time.perf_counter() - t_start

    if rank != 0:
        return {}
    best_path = os.path.join(out_dir, "best.pt")
    if os.path.exists(best_path):
        model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
    model.eval()
    tps = tok_count / elapsed if elapsed > 0 else 0.0
    _log(f"trained {tok_count} tokens in {elapsed:.1f} s ({tps:,.0f} tokens/s, source + target)")
    metrics = {"exact": None, "token_acc": None, "bleu": None}
    if test_pairs:
        t0 = time.perf_counter()
        res = evaluate(model, test_pairs, src_vocab, tgt_vocab, mode, beam=o["beam"],
                       max_len=max_len, device=device)
        t_eval = time.perf_counter() - t0
        _log(f"test ({len(test_pairs)} pairs, "
             f"{'greedy' if o['beam'] == 1 else 'beam %d' % o['beam']}, {t_eval:.1f} s): exact "
             f"match {res['exact']:.2%}, token accuracy {res['token_acc']:.2%}, BLEU "
             f"{res['bleu']:.2f}")
        for (s, r), h in list(zip(test_pairs, res["hyps"]))[:o["samples"]]:
            _log(f"  {s!r} -> {h!r} {'ok' if h == r else 'expected %r' % r}")
        metrics = {k: res[k] for k in metrics}
    else:
        _log("no test set (test size 0): test scores skipped")
    png = None
    shown = test_pairs or val_pairs or train_pairs
    if shown:
        # Prefer a sample with a month or weekday name: its attention is more telling.
        sample = next((s for s, _ in shown[:50] if any(c.isalpha() for c in s)), shown[0][0])
        png = attention_heatmap(model, sample, src_vocab, tgt_vocab, mode,
                                os.path.join(out_dir, "attention.png"), max_len, device)
        _log(f"attention heatmap: {png}; checkpoints: {best_path}, "
             f"{os.path.join(out_dir, 'last.pt')}")
    return {**metrics, "tokens_per_s": tps, "train_seconds": elapsed, "steps": step,
            "heatmap": png, "best_val": best}
