"""Per-cell gate math, written once as small Triton functions.

Every cell is a pair of ``@triton.jit`` functions with fixed signatures that the
kernel skeleton in :mod:`triton_rnn.kernels.recurrent` calls once per step and
batch tile. This is the extension point for new cells: write the two
functions, describe them with a :class:`CellSpec` and register it in
:data:`CELL_SPECS`.

Forward::

    h, c, s0, s1, s2, s3 = fwd(x0, x1, x2, x3, a0, a1, a2, a3, b_hn, h_prev, c_prev)

``x_g`` is the input projection of gate ``g`` (with every bias that can be
fused), ``a_g = h_{t-1} @ W_hh_g^T`` the recurrent pre-activation (fp32),
``b_hn`` the GRU's recurrent ``n``-gate bias (kept apart because it sits inside
the reset product), ``h_prev``/``c_prev`` the cell's own previous state in
fp32. ``s0..s3`` are what the backward needs (``num_saved`` of them are stored).

Backward::

    dx0..dx3, da0..da3, dh_prev, dc_prev = bwd(dh, dc, s0, s1, s2, s3, h_prev, c_prev, c_new)

``dx_g`` is the gradient of the input-side pre-activation, ``da_g`` that of the
recurrent pre-activation ``W_hh_g h + b_hh_g`` (they differ only for the GRU's
``n`` gate), ``dh_prev`` the elementwise part of the gradient of ``h_{t-1}``
(the ``W_hh`` part is added by the skeleton) and ``dc_prev`` that of ``c_{t-1}``.
Unused gate slots of cells with fewer than four gates are ignored.

Activations are overflow-safe: no ``exp`` of a large positive argument is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    """Logistic function, safe for any finite ``x`` (``exp`` only of ``-|x|``)."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def tanh(x):
    """Hyperbolic tangent, safe for any finite ``x``."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


# ----------------------------------------------------------------------------- LSTM
@triton.jit
def lstm_fwd(x0, x1, x2, x3, a0, a1, a2, a3, b_hn, h_prev, c_prev):
    i = sigmoid(x0 + a0)
    f = sigmoid(x1 + a1)
    g = tanh(x2 + a2)
    o = sigmoid(x3 + a3)
    c = f * c_prev + i * g
    h = o * tanh(c)
    return h, c, i, f, g, o


@triton.jit
def lstm_bwd(dh, dc, i, f, g, o, h_prev, c_prev, c_new):
    tc = tanh(c_new)
    dc = dc + dh * o * (1.0 - tc * tc)
    di = dc * g * i * (1.0 - i)
    df = dc * c_prev * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)
    do = dh * tc * o * (1.0 - o)
    return di, df, dg, do, di, df, dg, do, dh * 0.0, dc * f


# ----------------------------------------------------------------------------- GRU
@triton.jit
def gru_fwd(x0, x1, x2, x3, a0, a1, a2, a3, b_hn, h_prev, c_prev):
    # torch's equations: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)).
    r = sigmoid(x0 + a0)
    z = sigmoid(x1 + a1)
    hn = a2 + b_hn
    n = tanh(x2 + r * hn)
    h = (1.0 - z) * n + z * h_prev
    return h, c_prev, r, z, n, hn


@triton.jit
def gru_bwd(dh, dc, r, z, n, hn, h_prev, c_prev, c_new):
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h_prev - n) * z * (1.0 - z)
    dr = dn * hn * r * (1.0 - r)
    dhn = dn * r
    return dr, dz, dn, dn, dr, dz, dhn, dhn, dh * z, dc


# ----------------------------------------------------------------------------- Elman RNN
@triton.jit
def rnn_tanh_fwd(x0, x1, x2, x3, a0, a1, a2, a3, b_hn, h_prev, c_prev):
    h = tanh(x0 + a0)
    return h, c_prev, h, h, h, h


@triton.jit
def rnn_tanh_bwd(dh, dc, h, s1, s2, s3, h_prev, c_prev, c_new):
    d = dh * (1.0 - h * h)
    return d, d, d, d, d, d, d, d, dh * 0.0, dc


@triton.jit
def rnn_relu_fwd(x0, x1, x2, x3, a0, a1, a2, a3, b_hn, h_prev, c_prev):
    h = tl.maximum(x0 + a0, 0.0)
    return h, c_prev, h, h, h, h


@triton.jit
def rnn_relu_bwd(dh, dc, h, s1, s2, s3, h_prev, c_prev, c_new):
    d = tl.where(h > 0.0, dh, 0.0)
    return d, d, d, d, d, d, d, d, dh * 0.0, dc


@dataclass(frozen=True)
class CellSpec:
    """What the skeleton needs to know about a cell.

    ``gates``: gate blocks in ``W_ih``/``W_hh`` (torch's order);
    ``saved``: activations stored per step for the backward (fp32);
    ``has_c``: carries a cell state; ``separate_bhn``: ``b_hh`` of the last
    gate is applied inside the cell (GRU) instead of fused into the input
    projection; ``split_x_grad``: ``dx`` and ``da`` differ for the last gate.
    """

    name: str
    fwd: object
    bwd: object
    gates: int
    saved: int
    has_c: bool = False
    separate_bhn: bool = False
    split_x_grad: bool = False


CELL_SPECS = {
    "lstm": CellSpec("lstm", lstm_fwd, lstm_bwd, gates=4, saved=4, has_c=True),
    "gru": CellSpec("gru", gru_fwd, gru_bwd, gates=3, saved=4, separate_bhn=True,
                    split_x_grad=True),
    "rnn_tanh": CellSpec("rnn_tanh", rnn_tanh_fwd, rnn_tanh_bwd, gates=1, saved=1),
    "rnn_relu": CellSpec("rnn_relu", rnn_relu_fwd, rnn_relu_bwd, gates=1, saved=1),
}
