"""Data for the reference seq2seq model: the embedded dates task, TSV files, vocabularies.

The default task needs no download: :func:`date_splits` draws calendar days
between 1950-01-01 and 2049-12-31, writes each in one of many human formats
("Tuesday, March 3rd 2021", "03/03/21", "3 Mar 2021", "2021 March 3", ...) with
random noise in case and spacing, and asks for the ISO 8601 form
("2021-03-03"). Conventions that keep the task unambiguous:

* slashes are month first (US style), dots are day first (European style);
* two-digit years pivot at 50: ``50``-``99`` are 1950-1999, ``00``-``49`` are
  2000-2049.

Splits are disjoint by date: every calendar day belongs to at most one split,
so no test date appears in training under any format.

User data is a TSV file of ``source<TAB>target`` lines (:func:`load_tsv`; UTF-8,
with or without a byte-order mark), split disjointly by normalized source
(:func:`split_pairs`: sources that differ only in whitespace count as one). Text
is tokenized at character or whitespace level and the vocabularies, built from
the training split only, are plain lists of strings so that they can be stored
in a checkpoint that loads with ``torch.load(..., weights_only=True)``.

Data never produces a special id: a literal ``"<pad>"``, ``"<unk>"``, ``"<s>"``
or ``"</s>"`` word in word-level data is not in any vocabulary and encodes as
``<unk>`` (:meth:`Vocab.encode`), so it cannot end a target early or be ignored
by the loss as padding.
"""

from __future__ import annotations

import datetime as _dt
import random
from collections import Counter
from typing import Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "PAD", "UNK", "BOS", "EOS", "SPECIALS",
    "Vocab", "tokenize", "detokenize",
    "format_date", "date_splits", "load_tsv", "source_key", "split_pairs",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
#: Special tokens, always the first four ids in this order.
SPECIALS = (PAD, UNK, BOS, EOS)
TOKENIZERS = ("char", "word")

Pair = Tuple[str, str]


# --------------------------------------------------------------------------
# Tokenization and vocabulary
# --------------------------------------------------------------------------


def tokenize(text: str, mode: str = "char") -> List[str]:
    """Split ``text`` into characters (``"char"``) or whitespace-separated words (``"word"``)."""
    if mode == "char":
        return list(text)
    if mode == "word":
        return text.split()
    raise ValueError(f"tokenize must be one of {TOKENIZERS}, got {mode!r}")


def detokenize(tokens: Sequence[str], mode: str = "char") -> str:
    """Inverse of :func:`tokenize` (whitespace is normalised to one space for ``"word"``)."""
    return ("" if mode == "char" else " ").join(tokens)


class Vocab:
    """Token <-> id mapping with :data:`SPECIALS` at ids 0-3.

    The special ids are only ever added by the code (``bos``/``eos`` of
    :meth:`encode`, padding in batches): a data token that happens to be spelled
    like a special token (the word ``"</s>"`` in a text) encodes as ``<unk>``,
    like any other token outside the vocabulary, and :meth:`build` leaves such
    tokens out.
    """

    def __init__(self, tokens: Iterable[str]):
        itos = list(tokens)
        if tuple(itos[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        if len(set(itos)) != len(itos):
            raise ValueError("duplicate tokens in vocabulary")
        self.itos: List[str] = itos
        self.stoi = {t: i for i, t in enumerate(itos)}
        # what data tokens map to: everything but the special tokens
        self._data_ids = {t: i for i, t in enumerate(itos) if i >= len(SPECIALS)}

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    @classmethod
    def build(cls, sequences: Iterable[Sequence[str]], min_freq: int = 1,
              max_size: Optional[int] = None) -> "Vocab":
        """Vocabulary of the tokens in ``sequences``, most frequent first (ties alphabetical)."""
        counts = Counter(t for seq in sequences for t in seq)
        for s in SPECIALS:
            counts.pop(s, None)
        ranked = sorted((t for t, c in counts.items() if c >= min_freq),
                        key=lambda t: (-counts[t], t))
        if max_size is not None:
            ranked = ranked[:max(0, max_size - len(SPECIALS))]
        return cls(list(SPECIALS) + ranked)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def encode(self, tokens: Sequence[str], bos: bool = False, eos: bool = False) -> List[int]:
        """Ids of data ``tokens`` (unknown ones and literal special tokens: ``<unk>``),
        with BOS / EOS added if asked."""
        ids = [self._data_ids.get(t, self.unk_id) for t in tokens]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int], strip: bool = True) -> List[str]:
        """Tokens of ``ids``; with ``strip``, stop at EOS and drop PAD/BOS."""
        out = []
        for i in ids:
            i = int(i)
            if strip and i == self.eos_id:
                break
            if strip and i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return out

    def to_list(self) -> List[str]:
        """Plain list form, safe for ``torch.load(weights_only=True)``."""
        return list(self.itos)


# --------------------------------------------------------------------------
# The dates task
# --------------------------------------------------------------------------

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_DAY = _dt.date(1950, 1, 1)
LAST_DAY = _dt.date(2049, 12, 31)
NUM_DAYS = (LAST_DAY - FIRST_DAY).days + 1


def _ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _fields(d: _dt.date) -> dict:
    return {
        "yyyy": f"{d.year:04d}", "yy": f"{d.year % 100:02d}",
        "mm": f"{d.month:02d}", "m": str(d.month), "dd": f"{d.day:02d}", "d": str(d.day),
        "month": MONTHS[d.month - 1], "mon": MONTHS[d.month - 1][:3],
        "weekday": WEEKDAYS[d.weekday()], "wd": WEEKDAYS[d.weekday()][:3],
        "ord": _ordinal(d.day),
    }


#: The source formats, as ``str.format`` templates over :func:`_fields`.
DATE_FORMATS = (
    "{weekday}, {month} {ord} {yyyy}",   # Tuesday, March 3rd 2021
    "{mm}/{dd}/{yy}",                    # 03/03/21
    "{d} {mon} {yyyy}",                  # 3 Mar 2021
    "{yyyy} {month} {d}",                # 2021 March 3
    "{month} {d}, {yyyy}",               # March 3, 2021
    "{dd}.{mm}.{yyyy}",                  # 03.03.2021
    "{wd} {d} {month} {yyyy}",           # Wed 3 March 2021
    "{m}/{d}/{yyyy}",                    # 3/3/2021
    "the {ord} of {month} {yyyy}",       # the 3rd of March 2021
    "{d}-{mon}-{yy}",                    # 3-Mar-21
    "{mon} {d} '{yy}",                   # Mar 3 '21
    "{weekday} {ord} {month} {yyyy}",    # Tuesday 3rd March 2021
    "{yyyy}/{mm}/{dd}",                  # 2021/03/03
    "{mon}. {ord}, {yyyy}",              # Mar. 3rd, 2021
    "{d} {month} {yy}",                  # 3 March 21
)


def _noise(text: str, rng: random.Random) -> str:
    """Random case and spacing changes that keep the meaning."""
    r = rng.random()
    if r < 0.15:
        text = text.lower()
    elif r < 0.25:
        text = text.upper()
    elif r < 0.30:
        text = text.title()
    if " " in text and rng.random() < 0.2:          # doubled space somewhere
        spaces = [i for i, ch in enumerate(text) if ch == " "]
        i = rng.choice(spaces)
        text = text[:i] + " " + text[i:]
    if ", " in text and rng.random() < 0.2:         # "March 3,2021"
        text = text.replace(", ", ",", 1)
    if rng.random() < 0.1:
        text = " " * rng.randint(1, 2) + text
    if rng.random() < 0.1:
        text = text + " " * rng.randint(1, 2)
    return text


def format_date(d: _dt.date, rng: random.Random, noise: bool = True) -> str:
    """``d`` written in a random :data:`DATE_FORMATS` format, with optional noise."""
    text = rng.choice(DATE_FORMATS).format(**_fields(d))
    return _noise(text, rng) if noise else text


def date_splits(train_size: int = 6000, val_size: int = 500, test_size: int = 1000,
                seed: int = 0, noise: bool = True) -> Tuple[List[Pair], List[Pair], List[Pair]]:
    """``(train, val, test)`` lists of ``(human date, ISO date)`` pairs, disjoint by date."""
    sizes = (train_size, val_size, test_size)
    for name, n in zip(("train_size", "val_size", "test_size"), sizes):
        if n < 0:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 0, got {n}")
    if sum(sizes) > NUM_DAYS:
        raise ValueError(f"the dates task has {NUM_DAYS} distinct days; asked for {sum(sizes)}")
    rng = random.Random(seed)
    days = rng.sample(range(NUM_DAYS), sum(sizes))
    out, start = [], 0
    for n in sizes:
        split = []
        for k in days[start:start + n]:
            d = FIRST_DAY + _dt.timedelta(days=k)
            split.append((format_date(d, rng, noise), d.isoformat()))
        out.append(split)
        start += n
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------
# TSV files
# --------------------------------------------------------------------------


def load_tsv(path: str) -> List[Pair]:
    """``(source, target)`` pairs from a file of ``source<TAB>target`` lines (blank lines skipped).

    The file is read as UTF-8; a leading byte-order mark (as Notepad and Excel
    write) is dropped.
    """
    pairs = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'source<TAB>target', "
                                 f"found {len(parts)} tab-separated fields")
            src, tgt = parts
            if not src.strip() or not tgt.strip():
                raise ValueError(f"{path}:{lineno}: empty source or target")
            pairs.append((src, tgt))
    if not pairs:
        raise ValueError(f"{path}: no 'source<TAB>target' lines")
    return pairs


def source_key(source: str) -> str:
    """The form of ``source`` that :func:`split_pairs` keeps disjoint across splits.

    Whitespace is normalised (runs collapsed, ends stripped) and words spelled
    like special tokens become ``<unk>``: two sources with the same key give the
    same word-level model input. For the char tokenizer this is coarser than the
    model input (``"a b"`` and ``"a  b"`` share a key), which only makes the
    splits more cautious.
    """
    return " ".join(UNK if w in SPECIALS else w for w in source.split())


def split_pairs(pairs: Sequence[Pair], val_size: int, test_size: int,
                seed: int = 0) -> Tuple[List[Pair], List[Pair], List[Pair]]:
    """Split ``pairs`` into train/val/test, disjoint by normalized source (:func:`source_key`).

    All pairs whose sources have the same key go to the same split, so a test
    source never reappears in training with different spacing; ``val_size``
    and ``test_size`` count distinct keys (both must be >= 0). Data whose
    sources are already normalized splits exactly as it did by raw source string.
    """
    for name, n in (("val_size", val_size), ("test_size", test_size)):
        if n < 0:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 0, got {n}")
    groups: dict = {}
    for p in pairs:
        groups.setdefault(source_key(p[0]), []).append(p)
    sources = sorted(groups)
    random.Random(seed).shuffle(sources)
    if val_size + test_size >= len(sources):
        raise ValueError(f"{len(sources)} distinct sources cannot give {val_size} validation "
                         f"and {test_size} test sources and leave any for training")
    val = [p for s in sources[:val_size] for p in groups[s]]
    test = [p for s in sources[val_size:val_size + test_size] for p in groups[s]]
    train = [p for s in sources[val_size + test_size:] for p in groups[s]]
    return train, val, test
