"""Autograd for one (layer, direction) on the Triton kernels.

:func:`triton_sequence` is the Triton implementation of the sequence function
that :mod:`triton_rnn.functional` calls (same signature as
:func:`triton_rnn.functional.reference_sequence`).

Forward: the input projection for all timesteps is one matrix product
(``x @ W_ih^T`` plus every bias that can be fused), then the persistent
recurrent kernel runs the time loop. Backward: the reverse-time kernel produces
the gate gradients; ``dx``, ``dW_ih``, ``dW_hh`` and the bias gradients are
large matrix products over them (deterministic, no atomics).

Memory kept for the backward, per token and (layer, direction), besides the
input and output: ``4 * S * H`` bytes of fp32 activations (``S`` = 4 for LSTM
and GRU, 1 for RNN), plus ``4 * H`` bytes of fp32 cell state for LSTM, and with
``proj_size`` ``H`` elements of ``m_t`` in the storage dtype. When no gradient is
needed (inference), the activations are not written at all.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .kernels import launch
from .kernels.cells import CELL_SPECS
from .kernels.config import KernelConfig

__all__ = ["triton_sequence", "triton_directions", "RecurrenceFunction"]


def _fused_bias(cell: str, b_ih: Optional[Tensor], b_hh: Optional[Tensor], H: int):
    """Bias added to the input projection, and the GRU's separate ``b_hn``."""
    if b_ih is None:
        return None, None
    if CELL_SPECS[cell].separate_bhn:
        fused = torch.cat([b_ih[:-H] + b_hh[:-H], b_ih[-H:]])
        return fused, b_hh[-H:].contiguous()
    return b_ih + b_hh, None


def _first_step(T: int, B: int, lengths: Optional[Tensor], reverse: bool, device) -> Tensor:
    """Time index of each row's first forward step (where ``h_prev`` is ``h0``)."""
    if not reverse:
        return torch.zeros(B, dtype=torch.long, device=device)
    if lengths is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    return (lengths.to(device) - 1).long()


def _last_step(T: int, B: int, lengths: Optional[Tensor], reverse: bool, device) -> Tensor:
    """Time index of each row's last forward step (where ``h_n``/``c_n`` are taken)."""
    return _first_step(T, B, lengths, not reverse, device)


def _rows_at(t_index: Tensor):
    """``(t_index, arange(B))``: index one step per row of a ``[T, B, ...]`` tensor."""
    return t_index, torch.arange(t_index.numel(), device=t_index.device)


class RecurrenceFunction(torch.autograd.Function):
    """One (layer, direction) of a cell; see the module docstring.

    LSTM projections (``w_hr``, ``h_t = W_hr m_t`` with ``m_t = o * tanh(c_t)``)
    run inside the kernel as a second phase of every step, with ``W_hr`` on-chip
    beside ``W_hh`` (``[4H, P]``): ``4H x P + P x H`` multiply-adds per step and
    row, and a second grid barrier when the hidden size is split. The kernel
    keeps every ``m_t`` and, in the backward, every ``dh_t`` for ``dW_hr``.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, meta):
        cell, reverse, lengths, bsz, cfg_f, cfg_b, mode, needs_grad, pairs = meta
        T, B, I = x.shape
        H = w_hh.shape[0] // CELL_SPECS[cell].gates
        fused, b_hn = _fused_bias(cell, b_ih, b_hh, H)
        x2 = x.reshape(T * B, I)
        xg = (torch.addmm(fused, x2, w_ih.t()) if fused is not None else x2 @ w_ih.t())
        xg = xg.view(T, B, -1)
        w_hr_k = w_hr.contiguous() if w_hr is not None else None
        hbuf, hst, cseq, saved, mbuf = ops.recurrence_forward(
            cell, xg, w_hh.contiguous(), b_hn, h0.contiguous(),
            c0.contiguous() if c0 is not None else None, w_hr_k, lengths, bsz, reverse=reverse,
            mode=mode, config=cfg_f, backward_config=cfg_b, save=needs_grad,
            pair=pairs and pairs[0])
        out = launch.output_view(hbuf, reverse)
        last = _rows_at(_last_step(T, B, lengths, reverse, x.device))
        # With a projection, h_n is each row's last output (the kernel keeps m, not h, in fp32).
        h_n = hst.to(x.dtype) if w_hr is None else out[last]
        c_n = None
        if cseq is not None:
            c_n = cseq[last].to(x.dtype)
        ctx.meta = meta
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_hh, w_hr, hbuf, cseq, saved, mbuf)
        if c_n is None:
            return out, h_n
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n=None):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "triton_rnn: double backward (create_graph=True) through the Triton RNN kernels "
                "is not supported; use backend='torch' for higher-order gradients.")
        with torch.no_grad():
            return RecurrenceFunction._backward(ctx, dout, dh_n, dc_n)

    @staticmethod
    def _backward(ctx, dout, dh_n, dc_n):
        cell, reverse, lengths, bsz, _, cfg_b, mode, _, pairs = ctx.meta
        x, h0, c0, w_ih, w_hh, b_hh, w_hr, hbuf, cseq, saved, mbuf = ctx.saved_tensors
        spec = CELL_SPECS[cell]
        T, B, I = x.shape
        H = w_hh.shape[0] // spec.gates
        R = w_hh.shape[1]  # the recurrent width: H, or the projection size
        dev = x.device
        dout = torch.zeros(T, B, R, dtype=x.dtype, device=dev) if dout is None else dout
        dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
        if spec.has_c:
            dc_n = torch.zeros_like(c0) if dc_n is None else dc_n.contiguous()
        dgh, dxn, dhst, dcst, dhseq = ops.recurrence_backward(
            cell, dout.contiguous(), dh_n.contiguous(), dc_n, w_hh.contiguous(), hbuf,
            h0.contiguous(), c0.contiguous() if c0 is not None else None, cseq, saved,
            w_hr.contiguous() if w_hr is not None else None, bsz, reverse=reverse, mode=mode,
            config=cfg_b, pair=pairs and pairs[1])
        dgx = dgh if dxn is None else torch.cat([dgh[..., :-H], dxn], dim=-1)
        dgh2, dgx2, x2 = dgh.reshape(T * B, -1), dgx.reshape(T * B, -1), x.reshape(T * B, I)
        first = _rows_at(_first_step(T, B, lengths, reverse, dev))
        dg_first = dgh[first]

        need = ctx.needs_input_grad
        dx = (dgx2 @ w_ih).view(T, B, I) if need[0] else None
        dw_ih = dgx2.t() @ x2 if need[3] else None
        # Bias gradients accumulate in fp32 without an fp32 copy of the gate gradients;
        # without GRU's split n gate, db_ih and db_hh are the same sum.
        db_ih = dgx2.sum(0, dtype=torch.float32).to(x.dtype) if need[5] else None
        db_hh = None
        if need[6]:
            db_hh = db_ih.clone() if db_ih is not None and dxn is None else \
                dgh2.sum(0, dtype=torch.float32).to(x.dtype)
        dw_hh = dw_hr = None
        if need[4]:
            # The hidden state before every step; packed reverse rows start at their own
            # last step, where it is h0.
            prev = launch.hidden_before_view(hbuf, reverse)
            if reverse and lengths is not None:
                prev = prev.clone()
                prev[first] = h0
            dw_hh = dgh2.t() @ prev.reshape(T * B, R)
        if need[7]:
            dw_hr = dhseq.reshape(T * B, R).t() @ mbuf.reshape(T * B, H)
        dh0 = dc0 = None
        if need[1]:
            dh0 = dg_first @ w_hh
            dh0 = dh0 if w_hr is not None else (dhst + dh0.float()).to(x.dtype)
        if spec.has_c and need[2]:
            dc0 = dcst.to(x.dtype)
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, None


def triton_sequence(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor,
                    w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                    w_hr: Optional[Tensor], *, reverse: bool = False,
                    lengths: Optional[Tensor] = None, mode: str = "auto",
                    config: Optional[KernelConfig] = None,
                    backward_config: Optional[KernelConfig] = None,
                    pairs: Optional[tuple] = None):
    """One (layer, direction) on the Triton kernels; see :func:`triton_rnn.functional.reference_sequence`.

    ``mode`` is ``"auto"``/``"persistent"`` or ``"stepwise"``; ``config`` and
    ``backward_config`` force tile configs (default: tuned cache, then heuristic).
    ``pairs`` (forward and backward :class:`~triton_rnn.kernels.launch.DirectionPair`)
    is set by :func:`triton_directions` when the other direction runs on another stream.
    Under ``torch.compile`` the kernels are custom ops (:mod:`triton_rnn.ops`).
    """
    T, B, _ = x.shape
    if B == 0:
        # torch returns empty outputs for an empty batch, and zero (not None) gradients
        # for every parameter: keep them all in the autograd graph.
        zero = 0 * sum(t.sum() for t in (x, w_ih, w_hh, b_ih, b_hh, w_hr) if t is not None)
        out = x.new_zeros(T, 0, h0.shape[-1]) + zero
        return out, h0 + zero, (c0 + zero) if c0 is not None else None
    bsz = None
    if lengths is not None:
        steps = torch.arange(T)
        bsz = (lengths.view(1, -1) > steps.view(-1, 1)).sum(1).to(torch.int32).to(x.device)
    # Inference (no gradient needed) skips writing the activations the backward reads.
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    meta = (cell, reverse, lengths, bsz, config, backward_config, mode, needs_grad, pairs)
    res = RecurrenceFunction.apply(x.contiguous(), h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, meta)
    if c0 is None:
        return res[0], res[1], None
    return res


#: One side stream per CUDA device for the reverse direction of bidirectional layers.
_side_streams: dict = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def _view_leaves(*tensors):
    """Each leaf that requires a gradient as a view of itself (made on the current stream)."""
    return [t.view_as(t) if t is not None and t.is_leaf and t.requires_grad else t
            for t in tensors]


def _overlaps(x: Tensor, n_directions: int, overlap_directions: bool) -> bool:
    """Whether :func:`triton_directions` runs the two directions on two streams (eagerly)."""
    return (n_directions == 2 and bool(overlap_directions) and x.device.type == "cuda"
            and x.shape[1] > 0 and not torch.compiler.is_compiling())


def triton_directions(cell: str, x: Tensor, directions: list, *,
                      lengths: Optional[Tensor] = None, overlap_directions: bool = True,
                      **options) -> list:
    """Every direction of one layer; a list of ``(out, h_n, c_n)``, one per direction.

    ``directions`` holds ``(h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)`` per direction
    (the second one runs in reverse time); ``options`` go to :func:`triton_sequence`.
    The two directions of a layer are independent, so on a GPU the reverse one
    runs on a side stream and the two overlap, forward and backward: one
    direction's grid often leaves most SMs idle at small batch sizes. Two
    barrier grids that cannot be resident together run one after the other
    (:class:`~triton_rnn.kernels.launch.DirectionPair`).
    ``overlap_directions=False``, or tracing by ``torch.compile``, runs them one
    after the other on the current stream.
    """
    x = x.contiguous()  # once for both directions (batch-first input is a transposed view)

    def run(d, x_d, args, pairs=None):
        return triton_sequence(cell, x_d, *args, reverse=(d == 1), lengths=lengths,
                               pairs=pairs, **options)

    if not _overlaps(x, len(directions), overlap_directions):
        return [run(d, x, args) for d, args in enumerate(directions)]
    pairs = (launch.DirectionPair(), launch.DirectionPair())
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    # A leaf's gradient is accumulated on the stream its AccumulateGrad node was created
    # on (main: at an earlier use, or by DDP at set-up). The reverse direction produces
    # its gradients on the side stream, so it reads leaves through views made here, on
    # main: their backward, on main, hands the gradient over. (Otherwise torch warns of
    # a stream mismatch, and a CUDA graph capture can break.)
    x_rev, *rev = _view_leaves(x, *directions[1])
    side.wait_stream(main)  # the input and states are ready
    first = run(0, x, directions[0], pairs)
    with torch.cuda.stream(side):
        second = run(1, x_rev, rev, pairs)
    main.wait_stream(side)
    # The caching allocator reuses a freed block on the stream that allocated it. The
    # side stream reads tensors from the main one (the input, saved for the backward,
    # which also runs on the side stream) and returns tensors allocated on it.
    for t in (x_rev, *rev):
        if t is not None:
            t.record_stream(side)
    for t in second:
        if t is not None:
            t.record_stream(main)
    return [first, second]
