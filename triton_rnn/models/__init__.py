"""Reference models built on the ``triton_rnn`` modules.

* :mod:`triton_rnn.models.seq2seq`: attentional encoder-decoder, greedy and beam search;
* :mod:`triton_rnn.models.data`: the embedded dates task, TSV loading, vocabularies;
* :mod:`triton_rnn.models.training`: training loop (one process or DDP), evaluation,
  checkpoints; what ``triton-rnn train`` and ``triton-rnn translate`` run.
"""

from .data import Vocab, date_splits, load_tsv, split_pairs
from .seq2seq import Attention, Seq2Seq, default_config

__all__ = ["Attention", "Seq2Seq", "Vocab", "date_splits", "default_config", "load_tsv",
           "split_pairs"]
