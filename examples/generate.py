"""Character-level language model with a ``triton_rnn.LSTM``, sampled with a temperature.

Shows: training on truncated windows, carrying ``(h, c)`` across chunks to score a long
validation stream, and step-by-step sampling that feeds the state back in. The text is
the docstrings of a fixed list of standard-library modules, collected with ``inspect``
from the running Python (no download; the exact text, hence the numbers, varies a
little between Python versions). Reports validation bits per character next to a
unigram baseline (character frequencies of the training split).

    python examples/generate.py                       # defaults: about 2 minutes on a 2-core CPU
    python examples/generate.py --temperature 0.5     # more conservative samples
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

import triton_rnn

MODULES = [
    "abc", "argparse", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools",
    "heapq", "itertools", "json", "logging", "os", "pathlib", "pprint", "queue", "random",
    "re", "shutil", "statistics", "string", "subprocess", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "zipfile",
]


def stdlib_docs() -> list[str]:
    """Module docstrings, then each public member's, in a fixed order, without repeats."""
    seen: set[str] = set()
    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None) or [a for a in dir(module) if a[0] != "_"]
        objects = [module] + [getattr(module, a, None) for a in sorted(public)]
        for obj in objects:
            if obj is not module and getattr(obj, "__module__", None) != module.__name__:
                continue  # re-exported from elsewhere
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                parts.append(doc)
    return ["".join(c if c.isascii() else "?" for c in doc) for doc in parts]


class CharLM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, backend: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = triton_rnn.LSTM(embed, hidden, num_layers=layers, batch_first=True,
                                    backend=backend)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        output, state = self.lstm(self.embed(x), state)
        return self.out(output), state


@torch.no_grad()
def bits_per_char(model, data: torch.Tensor, seq_len: int, streams: int = 16) -> float:
    """Score ``data`` as ``streams`` parallel streams, carrying the LSTM state across chunks.

    Short texts use fewer streams (each needs at least one character to predict).
    """
    if len(data) < 2:
        raise ValueError(f"need at least 2 characters to score, got {len(data)}")
    model.eval()
    streams = min(streams, len(data) - 1)
    n = (len(data) - 1) // streams
    x = data[: n * streams].view(streams, n)
    y = data[1: n * streams + 1].view(streams, n)
    total, state = 0.0, None
    for i in range(0, n, seq_len):
        logits, state = model(x[:, i:i + seq_len], state)
        total += nn.functional.cross_entropy(logits.flatten(0, 1), y[:, i:i + seq_len].flatten(),
                                             reduction="sum").item()
    return total / (n * streams) / math.log(2)


def unigram_bpc(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train, minlength=vocab).double() + 1  # add-one smoothing
    log_p = (counts / counts.sum()).log2()
    return -log_p[val].mean().item()


@torch.no_grad()
def sample(model, prime: str, length: int, temperature: float, stoi, itos, device, gen) -> str:
    unknown = sorted(set(prime) - set(stoi))
    if not prime or unknown:
        raise ValueError(f"the prime must be non-empty and use only characters of the "
                         f"training text; unknown: {''.join(unknown)!r}")
    model.eval()
    x = torch.tensor([[stoi[c] for c in prime]], device=device)
    logits, state = model(x)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
        idx = torch.multinomial(probs, 1, generator=gen).item()
        out.append(itos[idx])
        logits, state = model(torch.tensor([[idx]], device=device), state)
    return prime + "".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-chars", type=int, default=0, help="truncate the corpus (0: all)")
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--sample-len", type=int, default=400)
    p.add_argument("--prime", default="Return the ")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch; these small per-step matmuls rarely gain from more")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    docs = stdlib_docs()
    # Every 10th docstring is held out, so validation text is new but of the same kind.
    train_text = "\n\n".join(d for i, d in enumerate(docs) if i % 10 != 9)
    val_text = "\n\n".join(d for i, d in enumerate(docs) if i % 10 == 9)
    if args.max_chars:
        train_text, val_text = train_text[: args.max_chars], val_text[: args.max_chars // 9]
    itos = sorted(set(train_text + val_text))
    stoi = {c: i for i, c in enumerate(itos)}
    if len(train_text) < args.seq_len + 2 or len(val_text) < 2:
        p.error(f"--max-chars {args.max_chars} leaves {len(train_text)} training and "
                f"{len(val_text)} validation characters; need at least --seq-len + 2 = "
                f"{args.seq_len + 2} and 2")
    unknown = sorted(set(args.prime) - set(stoi))
    prime = "".join(c for c in args.prime if c in stoi)
    if unknown:
        print(f"warning: --prime characters not in the text are left out: "
              f"{' '.join(map(repr, unknown))}", file=sys.stderr)
    if not prime:
        p.error(f"--prime {args.prime!r} has no character of the text to start from")
    train = torch.tensor([stoi[c] for c in train_text], device=args.device)
    val = torch.tensor([stoi[c] for c in val_text], device=args.device)
    print(f"{len(docs)} stdlib docstrings ({len(MODULES)} modules), {len(itos)} distinct "
          f"characters; train {len(train):,} / validation {len(val):,} characters")

    model = CharLM(len(itos), args.embed, args.hidden, args.layers, args.backend).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1)
    for _ in (bar := tqdm(range(args.steps), desc="char LSTM")):
        model.train()
        starts = torch.randint(len(train) - args.seq_len - 1, (args.batch_size, 1), generator=gen)
        window = train[(starts + offsets).to(args.device)]  # (batch, seq_len + 1)
        logits, _ = model(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(bpc=f"{loss.item() / math.log(2):.2f}")

    print(f"sample (temperature {args.temperature}):")
    print(sample(model, prime, args.sample_len, args.temperature, stoi, itos, args.device, gen))
    bpc = bits_per_char(model, val, args.seq_len)
    base = unigram_bpc(train, val, len(itos))
    print(f"validation bits/char: LSTM {bpc:.3f}, unigram baseline {base:.3f} "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"final: val_bpc={bpc:.4f} unigram_bpc={base:.4f}")
    return bpc, base


if __name__ == "__main__":
    main()
