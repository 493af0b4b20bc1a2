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
and GRU, 1 for RNN), plus ``4 * H`` bytes of fp32 cell state for LSTM.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .kernels import launch
from .kernels.cells import CELL_SPECS
from .kernels.config import KernelConfig

__all__ = ["triton_sequence", "RecurrenceFunction"]


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


class RecurrenceFunction(torch.autograd.Function):
    """One (layer, direction) of a cell; see the module docstring."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, meta):
        cell, reverse, lengths, bsz, cfg_f, cfg_b, mode = meta
        T, B, I = x.shape
        H = w_hh.shape[1]
        fused, b_hn = _fused_bias(cell, b_ih, b_hh, H)
        x2 = x.reshape(T * B, I)
        xg = (torch.addmm(fused, x2, w_ih.t()) if fused is not None else x2 @ w_ih.t())
        xg = xg.view(T, B, -1)
        hbuf, hst, cseq, saved = launch.forward(cell, xg, w_hh.contiguous(), b_hn,
                                                h0.contiguous(),
                                                c0.contiguous() if c0 is not None else None,
                                                lengths, bsz, reverse, cfg_f, mode)
        out = launch.output_view(hbuf, reverse)
        h_n = hst.to(x.dtype)
        c_n = None
        if cseq is not None:
            last = _last_step(T, B, lengths, reverse, x.device)
            c_n = cseq[last, torch.arange(B, device=x.device)].to(x.dtype)
        ctx.meta = meta
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_hh, hbuf, cseq, saved)
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
        cell, reverse, lengths, bsz, cfg_f, cfg_b, mode = ctx.meta
        x, h0, c0, w_ih, w_hh, b_hh, hbuf, cseq, saved = ctx.saved_tensors
        spec = CELL_SPECS[cell]
        T, B, I = x.shape
        H = w_hh.shape[1]
        dev = x.device
        dout = (torch.zeros_like(launch.output_view(hbuf, reverse)) if dout is None
                else dout.contiguous())
        dh_n = torch.zeros_like(h0) if dh_n is None else dh_n.contiguous()
        if spec.has_c:
            dc_n = torch.zeros_like(c0) if dc_n is None else dc_n.contiguous()
        dgh, dxn, dhst, dcst = launch.backward(cell, dout, dh_n, dc_n, w_hh.contiguous(), hbuf,
                                               h0.contiguous(),
                                               c0.contiguous() if c0 is not None else None,
                                               cseq, saved, bsz, reverse, cfg_b, mode)
        dgx = dgh if dxn is None else torch.cat([dgh[..., :-H], dxn], dim=-1)
        dgh2, dgx2, x2 = dgh.reshape(T * B, -1), dgx.reshape(T * B, -1), x.reshape(T * B, I)

        need = ctx.needs_input_grad
        dx = (dgx2 @ w_ih).view(T, B, I) if need[0] else None
        dw_ih = dgx2.t() @ x2 if need[3] else None
        dw_hh = db_ih = db_hh = None
        if need[4]:
            # h_{t-1} for every step; packed reverse rows start at their own last step.
            h_prev = launch.hidden_before_view(hbuf, reverse)
            if reverse and lengths is not None:
                h_prev = h_prev.clone()
                h_prev[_first_step(T, B, lengths, True, dev), torch.arange(B, device=dev)] = h0
            dw_hh = dgh2.t() @ h_prev.reshape(T * B, H)
        if need[5]:
            db_ih = dgx2.float().sum(0).to(x.dtype)
        if need[6]:
            db_hh = dgh2.float().sum(0).to(x.dtype)
        dh0 = dc0 = None
        if need[1]:
            first = _first_step(T, B, lengths, reverse, dev)
            dg_first = dgh[first, torch.arange(B, device=dev)]
            dh0 = (dhst + (dg_first @ w_hh).float()).to(x.dtype)
        if spec.has_c and need[2]:
            dc0 = dcst.to(x.dtype)
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None


_proj_warned = False


def triton_sequence(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor,
                    w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                    w_hr: Optional[Tensor], *, reverse: bool = False,
                    lengths: Optional[Tensor] = None, mode: str = "auto",
                    config: Optional[KernelConfig] = None,
                    backward_config: Optional[KernelConfig] = None):
    """One (layer, direction) on the Triton kernels; see :func:`triton_rnn.functional.reference_sequence`.

    ``mode`` is ``"auto"``/``"persistent"`` or ``"stepwise"``; ``config`` and
    ``backward_config`` force tile configs (default: tuned cache, then heuristic).
    """
    if w_hr is not None:
        # LSTM projections are not in the kernels yet: documented fallback.
        global _proj_warned
        if not _proj_warned:
            _proj_warned = True
            warnings.warn("triton_rnn: LSTM proj_size is not implemented in the Triton kernels "
                          "yet; using the PyTorch reference recurrence for it.", RuntimeWarning,
                          stacklevel=2)
        from .functional import reference_sequence

        return reference_sequence(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                  reverse=reverse, lengths=lengths)
    T, B, _ = x.shape
    H = w_hh.shape[1]
    if B == 0:
        # torch returns empty outputs for an empty batch; keep the autograd graph.
        out = x.new_zeros(T, 0, H) + 0 * x.sum()
        return out, h0 + 0 * x.sum(), (c0 + 0 * x.sum()) if c0 is not None else None
    bsz = None
    if lengths is not None:
        steps = torch.arange(T)
        bsz = (lengths.view(1, -1) > steps.view(-1, 1)).sum(1).to(torch.int32).to(x.device)
    dname = launch.dtype_name(x.dtype)
    cfg_f = launch.select_config(cell, "forward", dname, H, B, x.device, config)
    cfg_b = launch.select_config(cell, "backward", dname, H, B, x.device, backward_config)
    meta = (cell, reverse, lengths, bsz, cfg_f, cfg_b, mode)
    res = RecurrenceFunction.apply(x.contiguous(), h0, c0, w_ih, w_hh, b_ih, b_hh, meta)
    if c0 is None:
        return res[0], res[1], None
    return res
