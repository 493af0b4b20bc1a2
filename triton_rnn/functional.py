"""Multi-layer recurrent networks as functions.

This module is the one place that loops over layers and directions, applies
inter-layer dropout, unpacks and repacks ``PackedSequence`` data and splits the
initial states. Each (layer, direction) pair runs a *sequence function* with the
signature of :func:`reference_sequence`:

    out, h_n, c_n = seq_fn(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                           reverse=..., lengths=..., **kernel_options)

The directions of one layer are handed over together, so that an implementation
may run them at once (the Triton one overlaps them on two CUDA streams).

``x`` is time-major ``[T, B, I]``; ``lengths`` is ``None`` for dense input or a
CPU ``int64`` tensor of per-row lengths sorted in decreasing order (the order
of ``PackedSequence``). Rows stop at their own length: their final state is the
state at their last valid step and their output is zero past it.

Two implementations exist: :func:`reference_sequence`, a readable PyTorch loop
that is numerically the torch.nn recurrence, and the persistent Triton kernels
in :mod:`triton_rnn.kernels`, reached through :mod:`triton_rnn.autograd`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

__all__ = [
    "CELLS",
    "GATES",
    "rnn",
    "reference_sequence",
    "resolve_backend",
    "cell_name",
]

#: Cells the library implements, with the number of gates in their weights.
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
CELLS = tuple(GATES)

#: Backends a module accepts. ``"auto"`` picks ``"triton"`` for CUDA tensors.
MODULE_BACKENDS = ("auto", "triton", "torch")


def cell_name(mode: str) -> str:
    """Map a ``torch.nn.RNNBase.mode`` (``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``...) to a cell name."""
    name = mode.lower()
    if name not in GATES:
        raise ValueError(f"Unrecognized RNN mode: {mode}")
    return name


def _exporting() -> bool:
    """Whether ``torch.export`` is tracing (not ``torch.compile``)."""
    # torch.compiler.is_exporting() returns this flag, but Dynamo in torch 2.11 folds the
    # call to True in every trace, torch.compile's included; the flag itself it reads as is.
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        return flag
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def check_backend(backend: Optional[str]) -> str:
    """``backend`` (``None``: ``$TRITON_RNN_BACKEND``, default ``"auto"``), lower-cased and checked."""
    where = ""
    if backend is None:
        backend = os.environ.get("TRITON_RNN_BACKEND", "auto") or "auto"
        where = " ($TRITON_RNN_BACKEND)"
    if not isinstance(backend, str) or backend.lower() not in MODULE_BACKENDS:
        raise ValueError(f"backend must be one of {MODULE_BACKENDS}, got {backend!r}{where}")
    return backend.lower()


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Turn a module's ``backend`` argument into ``"triton"`` or ``"torch"``.

    ``None`` reads ``$TRITON_RNN_BACKEND`` (default ``"auto"``). ``"auto"`` is
    ``"triton"`` for CUDA tensors and ``"torch"`` otherwise. Meta tensors,
    ``torch.jit.trace`` and ``torch.export`` always get ``"torch"``.
    """
    backend = check_backend(backend)
    if device.type == "meta" or torch.jit.is_tracing() or _exporting():
        # Shapes only, or a graph for TorchScript/ONNX/torch.export: torch's own RNN op
        # is what those understand (the kernels are opaque host code to them).
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


# --------------------------------------------------------------------------
# The reference recurrence: one readable PyTorch step per timestep.
# --------------------------------------------------------------------------


def _cell_step(cell: str, xg: Tensor, h: Tensor, c: Optional[Tensor], w_hh: Tensor,
               b_hh: Optional[Tensor], w_hr: Optional[Tensor]):
    """One step of ``cell`` given the precomputed input projection ``xg`` (with ``b_ih``)."""
    hg = h @ w_hh.t()
    if b_hh is not None:
        hg = hg + b_hh
    if cell == "lstm":
        i, f, g, o = (xg + hg).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = h @ w_hr.t()
        return h, c
    if cell == "gru":
        xr, xz, xn = xg.chunk(3, dim=-1)
        hr, hz, hn = hg.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    if cell == "rnn_tanh":
        return torch.tanh(xg + hg), None
    if cell == "rnn_relu":
        return torch.relu(xg + hg), None
    raise ValueError(f"unknown cell {cell!r}")


def reference_sequence(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor,
                       w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                       w_hr: Optional[Tensor], *, reverse: bool = False,
                       lengths: Optional[Tensor] = None, **_unused):
    """Run one (layer, direction) of ``cell`` over ``x [T, B, I]`` with PyTorch ops.

    Returns ``(out [T, B, H_out], h_n [B, H_out], c_n [B, H] or None)``.
    This is the readable reference that the Triton kernels are tested against.
    """
    T = x.shape[0]
    xg = x @ w_ih.t()
    if b_ih is not None:
        xg = xg + b_ih
    h, c = h0, c0
    outs = [None] * T
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        h_new, c_new = _cell_step(cell, xg[t], h, c, w_hh, b_hh, w_hr)
        if lengths is None:
            h, c = h_new, c_new
            outs[t] = h_new
        else:
            # Rows whose sequence has ended keep their state and output zeros.
            live = (t < lengths).to(x.device).unsqueeze(1)
            h = torch.where(live, h_new, h)
            if c is not None:
                c = torch.where(live, c_new, c)
            outs[t] = h_new * live.to(h_new.dtype)
    return torch.stack(outs, 0), h, c


# --------------------------------------------------------------------------
# The multi-layer driver.
# --------------------------------------------------------------------------


def _scalar_type(dtype: torch.dtype) -> str:
    """ATen's name of a dtype (``Float``, ``Half``, ``BFloat16``), as its RNN errors print it."""
    return torch.empty((), dtype=dtype).type().rsplit(".", 1)[-1][: -len("Tensor")]


def _check_state_args(input: Tensor, states: Sequence[Tensor], weights: Sequence[Tensor]) -> None:
    """Raise torch-style errors (ATen's ``check_attributes``) for dtype or device mismatches."""
    for s in states:
        if s.device != input.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {s.device}")
        if s.dtype != input.dtype:
            raise RuntimeError(
                "Input and hidden tensors are not the same dtype, found input tensor with "
                f"{_scalar_type(input.dtype)} and hidden tensor with {_scalar_type(s.dtype)}")
    for w in weights:
        if w.device != input.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor at "
                f"{input.device} and parameter tensor at {w.device}")
        if w.dtype != input.dtype:
            raise RuntimeError(
                "Input and parameter tensors are not the same dtype, found input tensor with "
                f"{_scalar_type(input.dtype)} and parameter tensor with {_scalar_type(w.dtype)}")


def _directions_fn(backend: str) -> Callable:
    """``fn(cell, x, directions, *, lengths, **options)``: every direction of one layer."""
    if backend == "triton":
        from .autograd import triton_directions  # imported lazily: it imports triton

        return triton_directions
    if backend != "reference":
        raise ValueError(f"functional backend must be 'reference' or 'triton', got {backend!r}")

    def one_after_another(cell, x, directions, *, lengths=None, overlap_directions=None,
                          **options):
        return [reference_sequence(cell, x, *args, reverse=(d == 1), lengths=lengths, **options)
                for d, args in enumerate(directions)]

    return one_after_another


def rnn(cell: str, input: Tensor, hx, weights: Sequence[Tensor], *, has_bias: bool,
        num_layers: int, dropout: float, training: bool, bidirectional: bool,
        batch_first: bool, batch_sizes: Optional[Tensor] = None, proj_size: int = 0,
        backend: str = "reference", kernel_options: Optional[dict] = None):
    """Multi-layer, optionally bidirectional ``cell`` over ``input``.

    The arguments follow ``torch._VF.gru``/``lstm``/``rnn_*``: ``weights`` is the
    module's ``_flat_weights`` list (per layer and direction: ``w_ih, w_hh``,
    then ``b_ih, b_hh`` if ``has_bias``, then ``w_hr`` if ``proj_size``);
    ``input`` is ``[T, B, I]`` (``[B, T, I]`` if ``batch_first``) or, when
    ``batch_sizes`` is given, the data of a ``PackedSequence`` in sorted order.
    ``hx`` is ``h0`` or ``(h0, c0)`` for LSTM, shaped ``[L * D, B, H]``.

    ``backend`` selects the per-(layer, direction) sequence function:
    ``"reference"`` (PyTorch loop) or ``"triton"`` (persistent kernels);
    ``kernel_options`` are passed through to it (for example ``mode`` or
    ``config``). Returns ``(output, h_n)`` or ``(output, (h_n, c_n))``.
    """
    if cell not in GATES:
        raise ValueError(f"unknown cell {cell!r}")
    is_lstm = cell == "lstm"
    h0, c0 = (hx if is_lstm else (hx, None))
    _check_state_args(input, [h0] + ([c0] if is_lstm else []), weights)
    directions_fn = _directions_fn(backend)
    kernel_options = kernel_options or {}

    lengths = None
    if batch_sizes is not None:
        x, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
    else:
        x = input.transpose(0, 1) if batch_first else input
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

    num_dir = 2 if bidirectional else 1
    per_dir = 2 + (2 if has_bias else 0) + (1 if proj_size > 0 else 0)
    h_n, c_n = [], []
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            x = F.dropout(x, p=dropout, training=True)
        directions = []
        for d in range(num_dir):
            k = layer * num_dir + d
            w = list(weights[k * per_dir:(k + 1) * per_dir])
            b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
            w_hr = w[-1] if proj_size > 0 else None
            directions.append((h0[k], c0[k] if is_lstm else None, w[0], w[1], b_ih, b_hh, w_hr))
        results = directions_fn(cell, x, directions, lengths=lengths, **kernel_options)
        outs = [out for out, _, _ in results]
        h_n += [h for _, h, _ in results]
        c_n += [c for _, _, c in results]
        x = outs[0] if num_dir == 1 else torch.cat(outs, dim=-1)

    if lengths is not None:
        output = pack_padded_sequence(x, lengths, enforce_sorted=True).data
    else:
        output = x.transpose(0, 1) if batch_first else x
    h_n = torch.stack(h_n, 0)
    if is_lstm:
        return output, (h_n, torch.stack(c_n, 0))
    return output, h_n
