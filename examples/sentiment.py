"""Sentiment classification (many-to-one) with a bidirectional, 2-layer ``triton_rnn.LSTM``.

Shows: packed variable-length batches (``pack_padded_sequence(enforce_sorted=False)``),
reading the last layer's final forward and backward states from ``h_n``, and why word
order matters. The embedded data set is a seeded generator of short reviews whose label
hinges on negation and contrast ("not good", "good but boring", "boring but good",
"not bad at all"); no test review appears, word for word, in the training set. A
bag-of-words baseline (mean of word embeddings + linear layer) is trained on the same
data: it cannot tell "good but boring" from "boring but good", so it lands far below
the LSTM.

    python examples/sentiment.py                 # defaults: under a minute on a 2-core CPU
    python examples/sentiment.py --backend torch # force torch's LSTM
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence
from tqdm import tqdm

import triton_rnn

# ---------------------------------------------------------------------------
# Embedded data: a seeded review generator. Label = polarity of the last clause.
# ---------------------------------------------------------------------------
POSITIVE = ["good", "great", "fun", "charming", "brilliant", "lovely", "clever", "moving"]
NEGATIVE = ["bad", "boring", "dull", "awful", "terrible", "bland", "silly", "messy"]
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the story", "it", "the ending"]
VERBS = ["was", "is", "seemed", "felt"]
INTENSIFIERS = ["", "", "very", "really", "quite", "so"]


def clause(rng: random.Random, positive: bool, p_not: float) -> list[str]:
    """A clause of the given polarity: an adjective, negated with probability ``p_not``."""
    negated = rng.random() < p_not
    adjectives = POSITIVE if positive != negated else NEGATIVE
    words = ["not"] if negated else []
    words += rng.choice(INTENSIFIERS).split()
    words.append(rng.choice(adjectives))
    if negated and rng.random() < 0.3:
        words += ["at", "all"]
    return words


def review(rng: random.Random) -> tuple[list[str], int]:
    label = rng.random() < 0.5
    words = (rng.choice(SUBJECTS) + " " + rng.choice(VERBS)).split()
    if rng.random() < 0.5:  # one clause: "the plot was great", "it was not bad at all"
        words += clause(rng, label, p_not=0.4)
    else:  # contrast: the clause after "but" decides, the first one says the opposite
        words += clause(rng, not label, p_not=0.5) + ["but"]
        if rng.random() < 0.5:
            words += ["it", rng.choice(VERBS)]
        words += clause(rng, label, p_not=0.5)
    return words, int(label)


def make_data(n: int, seed: int, exclude: frozenset = frozenset()) -> list[tuple[list[str], int]]:
    """``n`` seeded reviews, none of whose texts is in ``exclude``."""
    rng = random.Random(seed)
    out: list[tuple[list[str], int]] = []
    for _ in range(1000 * n + 1000):
        if len(out) == n:
            return out
        words, label = review(rng)
        if tuple(words) not in exclude:
            out.append((words, label))
    raise SystemExit(f"could not draw {n} reviews outside the training set")


def make_splits(train_size: int, test_size: int, seed: int):
    """Train and test reviews, disjoint by text: no test review was seen in training.

    The generator repeats short reviews often, so a test set drawn independently
    would share about a fifth of its reviews with training; those are redrawn.
    """
    train = make_data(train_size, seed)
    test = make_data(test_size, seed + 1, exclude=frozenset(tuple(w) for w, _ in train))
    return train, test


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, backend: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=0)
        self.lstm = triton_rnn.LSTM(embed, hidden, num_layers=layers, bidirectional=True,
                                    batch_first=True, backend=backend)
        self.out = nn.Linear(2 * hidden, 2)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n: (layers * 2, batch, hidden)
        last_fwd, last_bwd = h_n[-2], h_n[-1]  # final layer, both directions
        return self.out(torch.cat([last_fwd, last_bwd], dim=1))


class BagOfWords(nn.Module):
    """Order-blind baseline: mean of word embeddings, then a linear layer."""

    def __init__(self, vocab: int, embed: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=0)
        self.out = nn.Linear(embed, 2)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        summed = self.embed(tokens).sum(dim=1)  # padding embeds to zero
        return self.out(summed / lengths.unsqueeze(1).to(summed.dtype))


# ---------------------------------------------------------------------------
def encode(data, vocab: dict[str, int], device):
    seqs = [torch.tensor([vocab.get(w, 1) for w in words]) for words, _ in data]
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = pad_sequence(seqs, batch_first=True, padding_value=0)
    labels = torch.tensor([y for _, y in data])
    return tokens.to(device), lengths.to(device), labels.to(device)


def train(model, train_set, epochs, batch_size, lr, desc, seed):
    tokens, lengths, labels = train_set
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(labels) + batch_size - 1) // batch_size)
    model.train()
    with tqdm(total=steps, desc=desc) as bar:
        for _ in range(epochs):
            for idx in torch.randperm(len(labels), generator=gen).split(batch_size):
                idx = idx.to(tokens.device)
                loss = nn.functional.cross_entropy(model(tokens[idx], lengths[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def correct(model, data_set) -> torch.Tensor:
    """Per-review 0/1 correctness on a whole encoded split."""
    tokens, lengths, labels = data_set
    model.eval()
    return (model(tokens, lengths).argmax(1) == labels).float().cpu()


def kind(words: list[str]) -> str:
    if "but" in words:
        return "contrast"
    return "negated" if "not" in words else "plain"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch; these small per-step matmuls rarely gain from more")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train_data, test_data = make_splits(args.train_size, args.test_size, args.seed)
    words = sorted({w for ws, _ in train_data for w in ws})
    vocab = {w: i + 2 for i, w in enumerate(words)}  # 0 = padding, 1 = unknown word
    print(f"{len(train_data)} train / {len(test_data)} test reviews, vocabulary {len(vocab)}; "
          f"e.g. {' '.join(train_data[0][0])!r} -> {'pos' if train_data[0][1] else 'neg'}")
    train_set = encode(train_data, vocab, args.device)
    test_set = encode(test_data, vocab, args.device)

    lstm = LSTMClassifier(len(vocab) + 2, args.embed, args.hidden, args.layers,
                          args.backend).to(args.device)
    train(lstm, train_set, args.epochs, args.batch_size, args.lr, "BiLSTM", args.seed)
    bow = BagOfWords(len(vocab) + 2, args.embed).to(args.device)
    train(bow, train_set, args.epochs, args.batch_size, args.lr, "bag-of-words", args.seed)

    hits = {"BiLSTM": correct(lstm, test_set), "bag-of-words": correct(bow, test_set)}
    kinds = [kind(words) for words, _ in test_data]
    for k in ("plain", "negated", "contrast"):
        mask = torch.tensor([x == k for x in kinds])
        print(f"  {k:>8} reviews ({int(mask.sum()):4d}): " + ", ".join(
            f"{name} {h[mask].mean().item():.1%}" for name, h in hits.items()))
    lstm_acc, bow_acc = (h.mean().item() for h in hits.values())
    print(f"test accuracy: BiLSTM {lstm_acc:.1%}, bag-of-words {bow_acc:.1%} "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"final: lstm_acc={lstm_acc:.4f} bow_acc={bow_acc:.4f}")
    return lstm_acc, bow_acc


if __name__ == "__main__":
    main()
