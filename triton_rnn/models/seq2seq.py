"""The reference model: an attentional encoder-decoder built on ``triton_rnn`` modules.

* **Encoder**: embedding, then a multi-layer bidirectional :class:`triton_rnn.GRU`
  (or :class:`triton_rnn.LSTM`) over the packed, variable-length source batch
  (``pack_padded_sequence(..., enforce_sorted=False)``). Each direction has
  ``hidden // 2`` units so the memory has ``hidden`` features.
* **Bridge**: the final forward and backward states of every layer are
  concatenated and mapped by a linear layer (``tanh`` for ``h``) to the
  decoder's initial state.
* **Attention** (:class:`Attention`): Luong global attention with ``"dot"`` or
  ``"general"`` scores, or Bahdanau's additive ``"concat"`` score. Padded source
  positions get exactly zero weight.
* **Decoder**: by default Luong-style attention *after* the RNN, without input
  feeding. Teacher-forced training then runs the decoder RNN over the whole
  target in one call, so on a GPU the persistent Triton kernels run the whole
  recurrence in one launch per layer instead of one launch per token. The
  attentional state is ``tanh(W_c [context; h_t])``, followed by dropout and
  the output projection.
* **Input feeding** (``input_feeding=True``, Luong et al. 2015, section 3.3):
  the previous attentional state is concatenated to the next input embedding,
  which forces a step-by-step loop (one RNN call per target token) in training
  too. Measured on the dates task (hidden 128, batch 64, 11 target tokens,
  forward + backward + Adam step, torch backend, one thread of a 2-core CPU
  shared with other jobs): 95 ms per step without input feeding, 118-132 ms
  with it (1.25-1.4x slower). On the CPU torch's own RNN also steps through
  time, so the gap there is only the per-step call overhead; on a GPU it is
  larger because each target token becomes a separate recurrent-kernel launch
  plus attention launches. The dates task does not need input feeding.

Inference: :meth:`Seq2Seq.greedy` (batched) and :meth:`Seq2Seq.beam_search`
(batched, length-normalised). ``beam_search(beam=1)`` returns exactly what
``greedy`` returns.

The model is configured by a plain ``dict`` (:func:`default_config`) so that it
can be saved in a checkpoint and loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..modules import GRU, LSTM

__all__ = ["Attention", "Encoder", "Decoder", "Seq2Seq", "default_config", "ATTENTION_TYPES"]

ATTENTION_TYPES = ("dot", "general", "concat")
CELLS = ("gru", "lstm")


def default_config(src_vocab: int, tgt_vocab: int, **overrides) -> dict:
    """The model configuration (plain values only) with defaults for the dates task."""
    cfg = {
        "src_vocab": int(src_vocab), "tgt_vocab": int(tgt_vocab),
        "emb": 32, "hidden": 128, "layers": 1, "cell": "gru", "attention": "general",
        "input_feeding": False, "dropout": 0.1, "backend": "auto",
        "pad_id": 0, "bos_id": 2, "eos_id": 3,
    }
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown model options: {sorted(unknown)}")
    cfg.update(overrides)
    return cfg


def _rnn_class(cell: str):
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    return GRU if cell == "gru" else LSTM


class Attention(nn.Module):
    """Global attention of decoder states over the encoder memory.

    Scores between a query ``h_t`` and a memory vector ``h_s``:

    * ``"dot"``: ``h_t . h_s`` (needs equal sizes);
    * ``"general"``: ``h_t . (W h_s)``;
    * ``"concat"`` (Bahdanau): ``v . tanh(W_q h_t + W_k h_s)``.

    ``forward(query [B, Tq, Hq], memory [B, Ts, Hm], mask [B, Ts] bool)``
    returns ``(context [B, Tq, Hm], weights [B, Tq, Ts])``. Positions where
    ``mask`` is False get weight exactly 0; a row with no valid position gets
    all-zero weights (and a zero context) rather than NaN.
    """

    def __init__(self, kind: str, query_size: int, memory_size: int,
                 attn_size: Optional[int] = None):
        super().__init__()
        if kind not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {kind!r}")
        self.kind = kind
        if kind == "dot" and query_size != memory_size:
            raise ValueError(f"dot attention needs equal sizes, got {query_size} and {memory_size}")
        if kind == "general":
            self.w = nn.Linear(memory_size, query_size, bias=False)
        elif kind == "concat":
            attn_size = attn_size or query_size
            self.w_k = nn.Linear(memory_size, attn_size, bias=False)
            self.w_q = nn.Linear(query_size, attn_size, bias=True)
            self.v = nn.Linear(attn_size, 1, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        """The query-independent part of the score, computed once per source batch."""
        if self.kind == "dot":
            return memory
        if self.kind == "general":
            return self.w(memory)
        return self.w_k(memory)

    def forward(self, query: Tensor, memory: Tensor, mask: Tensor,
                keys: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if keys is None:
            keys = self.keys(memory)
        if self.kind == "concat":
            scores = self.v(torch.tanh(self.w_q(query).unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)
        else:
            scores = torch.bmm(query, keys.transpose(1, 2))
        valid = mask.unsqueeze(1)
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        # Exact zeros on padding, and zeros (not NaN) for a fully masked row.
        weights = weights.masked_fill(~valid, 0.0)
        return torch.bmm(weights, memory), weights


class Encoder(nn.Module):
    """Embedding + multi-layer bidirectional RNN over packed variable-length input."""

    def __init__(self, cfg: dict):
        super().__init__()
        if cfg["hidden"] % 2:
            raise ValueError("hidden must be even (each encoder direction has hidden // 2 units)")
        self.embed = nn.Embedding(cfg["src_vocab"], cfg["emb"], padding_idx=cfg["pad_id"])
        self.rnn = _rnn_class(cfg["cell"])(
            cfg["emb"], cfg["hidden"] // 2, num_layers=cfg["layers"], bidirectional=True,
            batch_first=True, dropout=cfg["dropout"] if cfg["layers"] > 1 else 0.0,
            backend=cfg["backend"])
        self.dropout = nn.Dropout(cfg["dropout"])

    def forward(self, src: Tensor, lengths: Tensor):
        x = self.dropout(self.embed(src))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        return out, state


class Decoder(nn.Module):
    """Unidirectional RNN decoder with attention after the RNN (Luong)."""

    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden"]
        self.hidden = h
        self.input_feeding = bool(cfg["input_feeding"])
        self.embed = nn.Embedding(cfg["tgt_vocab"], cfg["emb"], padding_idx=cfg["pad_id"])
        self.rnn = _rnn_class(cfg["cell"])(
            cfg["emb"] + (h if self.input_feeding else 0), h, num_layers=cfg["layers"],
            batch_first=True, dropout=cfg["dropout"] if cfg["layers"] > 1 else 0.0,
            backend=cfg["backend"])
        self.attention = Attention(cfg["attention"], h, h)
        self.combine = nn.Linear(2 * h, h, bias=False)
        self.out = nn.Linear(h, cfg["tgt_vocab"])
        self.dropout = nn.Dropout(cfg["dropout"])

    def _attend(self, h: Tensor, memory: Tensor, mask: Tensor, keys: Tensor):
        context, weights = self.attention(h, memory, mask, keys)
        attentional = torch.tanh(self.combine(torch.cat([context, h], dim=-1)))
        return attentional, weights

    def forward(self, tgt_in: Tensor, state, memory: Tensor, mask: Tensor, keys: Tensor):
        """Teacher-forced pass: ``(logits [B, T, V], attention [B, T, Ts])``."""
        emb = self.dropout(self.embed(tgt_in))
        if not self.input_feeding:
            h, _ = self.rnn(emb, state)                      # one call for the whole target
            attentional, weights = self._attend(h, memory, mask, keys)
            return self.out(self.dropout(attentional)), weights
        feed = emb.new_zeros(emb.size(0), 1, self.hidden)
        outs, attn = [], []
        for t in range(emb.size(1)):
            h, state = self.rnn(torch.cat([emb[:, t:t + 1], feed], dim=-1), state)
            feed, weights = self._attend(h, memory, mask, keys)
            outs.append(feed)
            attn.append(weights)
        attentional = torch.cat(outs, dim=1)
        return self.out(self.dropout(attentional)), torch.cat(attn, dim=1)

    def step(self, tokens: Tensor, state, feed: Optional[Tensor], memory: Tensor, mask: Tensor,
             keys: Tensor):
        """One decoding step for ``tokens [B]``: ``(logits [B, V], state, feed, weights [B, Ts])``."""
        x = self.embed(tokens).unsqueeze(1)
        if self.input_feeding:
            x = torch.cat([x, feed], dim=-1)
        h, state = self.rnn(x, state)
        attentional, weights = self._attend(h, memory, mask, keys)
        return self.out(attentional).squeeze(1), state, attentional, weights.squeeze(1)


def _map_state(state, fn):
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


class Seq2Seq(nn.Module):
    """Attentional encoder-decoder; see the module docstring. Built from :func:`default_config`."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = default_config(config["src_vocab"], config["tgt_vocab"],
                             **{k: v for k, v in config.items() if k not in ("src_vocab", "tgt_vocab")})
        self.config = cfg
        self.pad_id, self.bos_id, self.eos_id = cfg["pad_id"], cfg["bos_id"], cfg["eos_id"]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        h, layers = cfg["hidden"], cfg["layers"]
        self.bridge_h = nn.Linear(h, h)
        self.bridge_c = nn.Linear(h, h) if cfg["cell"] == "lstm" else None
        self._layers = layers

    def set_backend(self, backend: str) -> None:
        """Switch the encoder and decoder RNNs to ``"auto"``, ``"triton"`` or ``"torch"``."""
        self.encoder.rnn.backend = backend
        self.decoder.rnn.backend = backend
        self.config["backend"] = backend

    # ------------------------------------------------------------------
    def _bridge(self, state):
        def join(s):  # [L * 2, B, H/2] -> [L, B, H]: forward and backward side by side
            s = s.view(self._layers, 2, s.size(1), s.size(2))
            return torch.cat([s[:, 0], s[:, 1]], dim=-1)

        if isinstance(state, tuple):
            h, c = state
            return torch.tanh(self.bridge_h(join(h))), self.bridge_c(join(c))
        return torch.tanh(self.bridge_h(join(state)))

    def encode(self, src: Tensor, src_len: Tensor):
        """``(memory [B, Ts, H], mask [B, Ts], keys, decoder initial state)``."""
        memory, state = self.encoder(src, src_len)
        mask = torch.arange(src.size(1), device=src.device)[None, :] < src_len.to(src.device)[:, None]
        keys = self.decoder.attention.keys(memory)
        return memory, mask, keys, self._bridge(state)

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor,
                return_attention: bool = False):
        """Teacher-forced logits ``[B, T, V]`` for ``tgt_in`` (BOS + target)."""
        memory, mask, keys, state = self.encode(src, src_len)
        logits, attn = self.decoder(tgt_in, state, memory, mask, keys)
        return (logits, attn) if return_attention else logits

    def loss(self, logits: Tensor, tgt_out: Tensor, label_smoothing: float = 0.0,
             reduction: str = "mean") -> Tensor:
        """Label-smoothed cross-entropy that ignores padding."""
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt_out.reshape(-1),
                               ignore_index=self.pad_id, label_smoothing=label_smoothing,
                               reduction=reduction)

    # ------------------------------------------------------------------
    def _initial_feed(self, n: int, like: Tensor) -> Optional[Tensor]:
        return like.new_zeros(n, 1, self.config["hidden"]) if self.decoder.input_feeding else None

    def _log_probs(self, logits: Tensor) -> Tensor:
        """Log-probabilities for decoding; PAD and BOS are never generated."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp[:, self.pad_id] = float("-inf")
        logp[:, self.bos_id] = float("-inf")
        return logp

    @torch.no_grad()
    def greedy(self, src: Tensor, src_len: Tensor, max_len: int = 32,
               return_attention: bool = False):
        """Batched greedy decoding.

        Returns ``tokens [B, T]`` (padded with PAD after each row's EOS, EOS
        included) and, with ``return_attention``, the weights ``[B, T, Ts]``.
        """
        memory, mask, keys, state = self.encode(src, src_len)
        B = src.size(0)
        tokens = torch.full((B,), self.bos_id, dtype=torch.long, device=src.device)
        feed = self._initial_feed(B, memory)
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)
        out, attn = [], []
        for _ in range(max_len):
            logits, state, feed, weights = self.decoder.step(tokens, state, feed, memory, mask, keys)
            tokens = self._log_probs(logits).argmax(dim=-1)
            tokens = tokens.masked_fill(finished, self.pad_id)
            out.append(tokens)
            attn.append(weights)
            finished = finished | (tokens == self.eos_id)
            if bool(finished.all()):
                break
        result = torch.stack(out, dim=1)
        return (result, torch.stack(attn, dim=1)) if return_attention else result

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_len: Tensor, beam: int = 4, max_len: int = 32,
                    length_penalty: float = 1.0, return_scores: bool = False):
        """Batched beam search.

        Keeps ``beam`` hypotheses per sentence. A hypothesis that emits EOS is
        finished: it keeps its score and is only extended by PAD at no cost.
        The search stops when every hypothesis is finished or after ``max_len``
        tokens. The best hypothesis maximises ``log p / length ** length_penalty``
        (``length`` counts the EOS; ``length_penalty=0`` disables the
        normalisation). Returns ``tokens [B, T]`` in the format of
        :meth:`greedy`, and with ``return_scores`` the normalised scores ``[B]``.
        """
        if beam < 1:
            raise ValueError("beam must be >= 1")
        memory, mask, keys, state = self.encode(src, src_len)
        B, K, dev = src.size(0), beam, src.device
        V = self.config["tgt_vocab"]
        if K > V - 2:
            raise ValueError(f"beam {K} is larger than the target vocabulary less PAD and BOS "
                             f"({V - 2})")

        def expand(t, dim=0):
            return t.repeat_interleave(K, dim=dim)

        memory, mask, keys = expand(memory), expand(mask), expand(keys)
        state = _map_state(state, lambda s: expand(s, 1))
        feed = self._initial_feed(B * K, memory)
        scores = torch.zeros(B, K, device=dev)
        scores[:, 1:] = float("-inf")
        tokens = torch.full((B * K,), self.bos_id, dtype=torch.long, device=dev)
        finished = torch.zeros(B * K, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B * K, dtype=torch.long, device=dev)
        seqs = torch.empty(B * K, 0, dtype=torch.long, device=dev)
        done_row = torch.full((V,), float("-inf"), device=dev)
        done_row[self.pad_id] = 0.0
        base = (torch.arange(B, device=dev) * K).unsqueeze(1)
        for _ in range(max_len):
            logits, state, feed, _w = self.decoder.step(tokens, state, feed, memory, mask, keys)
            logp = torch.where(finished.unsqueeze(1), done_row, self._log_probs(logits))
            cand = (scores.view(-1, 1) + logp).view(B, K * V)
            scores, idx = cand.topk(K, dim=1)
            rows = (base + torch.div(idx, V, rounding_mode="floor")).view(-1)
            tokens = (idx % V).view(-1)
            seqs = torch.cat([seqs[rows], tokens.unsqueeze(1)], dim=1)
            was_finished = finished[rows]
            lengths = lengths[rows] + (~was_finished).long()
            finished = was_finished | (tokens == self.eos_id)
            state = _map_state(state, lambda s: s[:, rows])
            if feed is not None:
                feed = feed[rows]
            if bool(finished.all()):
                break
        norm = scores / lengths.view(B, K).clamp(min=1).float() ** length_penalty
        best = norm.argmax(dim=1)
        pick = (torch.arange(B, device=dev) * K + best)
        result = seqs[pick]
        return (result, norm.gather(1, best.unsqueeze(1)).squeeze(1)) if return_scores else result

    @torch.no_grad()
    def translate_ids(self, src: Tensor, src_len: Tensor, beam: int = 1,
                      max_len: int = 32) -> List[List[int]]:
        """Decoded id lists (EOS and padding removed), greedy for ``beam=1``."""
        out = (self.greedy(src, src_len, max_len) if beam == 1
               else self.beam_search(src, src_len, beam, max_len))
        result = []
        for row in out.tolist():
            ids = []
            for i in row:
                if i == self.eos_id or i == self.pad_id:
                    break
                ids.append(i)
            result.append(ids)
        return result
