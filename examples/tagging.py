"""Part-of-speech tagging (many-to-many) with a bidirectional ``triton_rnn.GRU``.

Shows: one prediction per time step from a bidirectional GRU over right-padded
batches. The batches are packed (``pack_padded_sequence(enforce_sorted=False)``), so
the backward direction starts at each sentence's own last word and a sentence gets the
same tags whatever else is in its batch; the padding is also masked out of the loss
and the metric. The embedded data set is a seeded toy grammar where many words change
tag with context: "book" is a NOUN in "the book" but a VERB in "we book a table",
"can" is AUX in "they can fly" and a NOUN in "a can", "light" is ADJ, NOUN or VERB...
No test sentence appears in the training set. A most-frequent-tag-per-word baseline
is scored on the same held-out sentences to show what context buys.

    python examples/tagging.py                 # defaults: under 20 s on a 2-core CPU
    python examples/tagging.py --backend torch # force torch's GRU
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter, defaultdict

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence
from tqdm import tqdm

import triton_rnn

# ---------------------------------------------------------------------------
# Embedded data: a seeded grammar. Ambiguous words sit in several word lists.
# ---------------------------------------------------------------------------
LEXICON = {
    "DET": ["the", "a", "this", "my", "every", "that"],
    "PRON": ["i", "you", "we", "they", "she", "he"],
    "AUX": ["can", "will", "must", "should", "may"],
    "ADP": ["on", "near", "in", "under", "with", "by"],
    "NOUN": ["book", "watch", "fly", "can", "duck", "light", "park", "plan", "play", "saw",
             "time", "fish", "dog", "girl", "room", "fire", "table", "river", "bird", "train"],
    "VERB": ["book", "watch", "fly", "duck", "light", "park", "plan", "play", "fish", "train",
             "like", "see", "need", "find", "want", "saw", "liked", "found", "watched"],
    "ADJ": ["light", "old", "small", "red", "fast", "quiet", "big", "dark"],
}
# Tag sequences the grammar produces ("VERB" alone at the start is an imperative).
NOUN_PHRASES = [["DET", "NOUN"], ["DET", "ADJ", "NOUN"], ["PRON"]]
SENTENCES = [
    ["NP", "VERB", "NP"],                      # she watched the fly
    ["NP", "AUX", "VERB", "NP"],               # they can book a room
    ["NP", "AUX", "VERB"],                     # the duck can fly
    ["NP", "VERB", "NP", "ADP", "NP"],         # i saw the saw on a table
    ["VERB", "NP"],                            # book the light train
    ["VERB", "NP", "ADP", "NP"],               # park the train near the river
    ["NP", "AUX", "VERB", "NP", "ADP", "NP"],  # we may fish with a fly
]


def sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    tags: list[str] = []
    for part in rng.choice(SENTENCES):
        if part == "NP":
            # objects are nouns or pronouns; "i saw he" is not great English, but fine here
            tags += rng.choice(NOUN_PHRASES)
        else:
            tags.append(part)
    words = [rng.choice(LEXICON[t]) for t in tags]
    return words, tags


def make_data(n: int, seed: int,
              exclude: frozenset = frozenset()) -> list[tuple[list[str], list[str]]]:
    """``n`` seeded sentences, none of whose word sequences is in ``exclude``."""
    rng = random.Random(seed)
    out: list[tuple[list[str], list[str]]] = []
    for _ in range(1000 * n + 1000):
        if len(out) == n:
            return out
        words, tags = sentence(rng)
        if tuple(words) not in exclude:
            out.append((words, tags))
    raise SystemExit(f"could not draw {n} sentences outside the training set")


def make_splits(train_size: int, test_size: int, seed: int):
    """Train and test sentences, disjoint by text: no test sentence was seen in training."""
    train = make_data(train_size, seed)
    test = make_data(test_size, seed + 1, exclude=frozenset(tuple(w) for w, _ in train))
    return train, test


# ---------------------------------------------------------------------------
class GRUTagger(nn.Module):
    def __init__(self, vocab: int, tags: int, embed: int, hidden: int, layers: int, backend: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=0)
        self.gru = triton_rnn.GRU(embed, hidden, num_layers=layers, bidirectional=True,
                                  batch_first=True, backend=backend)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tag logits ``(batch, time, tags)`` for right-padded ``tokens`` (0 = padding)."""
        lengths = (tokens != 0).sum(1).cpu()  # padding only ever comes after the words
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                      enforce_sorted=False)
        output, _ = self.gru(packed)
        output, _ = pad_packed_sequence(output, batch_first=True,
                                        total_length=tokens.size(1))  # zeros at padding
        return self.out(output)  # (batch, time, tags)


PAD = -100  # cross_entropy's default ignore_index


def encode(data, vocab, tag_ids, device):
    tokens = pad_sequence([torch.tensor([vocab.get(w, 1) for w in ws]) for ws, _ in data],
                          batch_first=True, padding_value=0)
    tags = pad_sequence([torch.tensor([tag_ids[t] for t in ts]) for _, ts in data],
                        batch_first=True, padding_value=PAD)
    return tokens.to(device), tags.to(device)


@torch.no_grad()
def token_accuracy(model, tokens, tags) -> float:
    model.eval()
    mask = tags != PAD
    pred = model(tokens).argmax(-1)
    return ((pred == tags) & mask).sum().item() / mask.sum().item()


def baseline_accuracy(train_data, test_data) -> float:
    """Tag every word with its most frequent training tag (unseen: the most common tag)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for words, tags in train_data:
        for w, t in zip(words, tags):
            counts[w][t] += 1
    overall = Counter(t for _, tags in train_data for t in tags).most_common(1)[0][0]
    best = {w: c.most_common(1)[0][0] for w, c in counts.items()}
    pairs = [(w, t) for words, tags in test_data for w, t in zip(words, tags)]
    return sum(best.get(w, overall) == t for w, t in pairs) / len(pairs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
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
    tag_names = sorted(LEXICON)
    tag_ids = {t: i for i, t in enumerate(tag_names)}
    ws, ts = train_data[0]
    print(f"{len(train_data)} train / {len(test_data)} test sentences, vocabulary {len(vocab)}; "
          f"e.g. {' '.join(f'{w}/{t}' for w, t in zip(ws, ts))}")
    tokens, tags = encode(train_data, vocab, tag_ids, args.device)
    test_tokens, test_tags = encode(test_data, vocab, tag_ids, args.device)

    model = GRUTagger(len(vocab) + 2, len(tag_names), args.embed, args.hidden, args.layers,
                      args.backend).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.epochs * ((len(tokens) + args.batch_size - 1) // args.batch_size)
    with tqdm(total=steps, desc="BiGRU tagger") as bar:
        for _ in range(args.epochs):
            model.train()
            for idx in torch.randperm(len(tokens), generator=gen).split(args.batch_size):
                idx = idx.to(args.device)
                logits = model(tokens[idx])
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), tags[idx].flatten(),
                                                   ignore_index=PAD)
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")

    # Show the model on a sentence full of ambiguous words.
    demo = "they can book the fly near my light watch".split()
    model.eval()
    with torch.no_grad():
        pred = model(torch.tensor([[vocab.get(w, 1) for w in demo]], device=args.device))
    print("example:", " ".join(f"{w}/{tag_names[i]}" for w, i in zip(demo, pred[0].argmax(-1))))

    acc = token_accuracy(model, test_tokens, test_tags)
    base = baseline_accuracy(train_data, test_data)
    print(f"test per-token accuracy: BiGRU {acc:.1%}, most-frequent-tag baseline {base:.1%} "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"final: gru_acc={acc:.4f} baseline_acc={base:.4f}")
    return acc, base


if __name__ == "__main__":
    main()
