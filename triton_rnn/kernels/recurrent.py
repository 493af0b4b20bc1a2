"""The persistent recurrent kernel skeleton, forward and backward.

One program owns ``BLOCK_H`` hidden units (all gates of them) and a group of
batch tiles. Before the time loop it loads its slice of ``W_hh`` (``NUM_GATES``
tiles of ``[H, BLOCK_H]``, in ``NUM_KC`` chunks of ``KC`` inputs) once; the
slice stays on-chip for every step. A slice larger than a block's shared memory
keeps only its first ``NUM_RES`` chunks on-chip and streams the rest from global
memory (L2) at every step, ``BLOCK_K`` inputs at a time (``BLOCK_K = 0``: none
streams; ``NUM_RES = 0``: all of it streams).

Each step, for each of its batch tiles, a program

1. reads the full ``h_{t-1}`` (``[BLOCK_B, H]``, chunk by chunk) that all programs
   wrote to ``HBUF`` at the previous step (``h0`` sits in an extra slot of it),
2. computes its recurrent pre-activations with ``tl.dot`` against the on-chip
   weights, adds the precomputed input projection ``XG`` and runs the cell's
   gate function (:mod:`triton_rnn.kernels.cells`),
3. writes its slice of ``h_t`` to ``HBUF``, its fp32 state to ``HST``/``CSEQ``
   and the activations the backward needs to ``SAVED``.

A program's per-step product is small (a ``16 x 16`` output per gate at GRU
hidden 1024, one tensor-core tile wide), so the warps share it by K: each dot
is a batched ``tl.dot`` over ``SPLIT_K`` parts of the inputs, summed once per
step (split-K). With a plain 2-D dot every warp would multiply all of K.

When the hidden dimension is split across programs (``USE_BARRIER``), a grid
barrier separates the steps. The same code runs *stepwise*: one launch per
step (``n_steps=1``), where the launch boundary is the barrier. That is how the
interpreter runs split tilings and the fallback when the grid cannot be
co-resident.

The backward kernel mirrors this in reverse time: it reads the full gate
gradients of the later step, multiplies them by its on-chip columns of
``W_hh`` to get its slice of ``dh``, runs the cell's backward and writes its
slice of the gate gradients. Weight and input gradients are computed outside,
as large matrix products over the stored gate gradients.

An LSTM projection (``proj_size = P``, ``HAS_PROJ``) adds a phase to every
step, with its own barrier: the gates (``W_hh`` is ``[4H, P]``) write
``m_t = o * tanh(c_t)``, then each program projects ``h_t = m_t W_hr^T`` for its
``BLOCK_P`` of the ``P`` outputs from its on-chip rows of ``W_hr``. The
backward first forms its slice of ``dh_t`` (``P`` wide), then ``dm_t = dh_t W_hr``
and the cell's backward. Launches then count phases, not steps.

Offsets that scale with ``T * B * H`` are computed in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grid_barrier(counter_ptr, target):
    """Spin until ``*counter_ptr`` reaches ``target`` after adding this program's arrival.

    Release on arrival publishes this program's global stores; acquire on the
    wait makes the other programs' stores visible. Only safe when every program
    of the grid is resident (cooperative launch).
    """
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _load_gate_tiles(ptrs, mask, stride, NUM_GATES: tl.constexpr):
    """Load up to four gate tiles ``stride`` elements apart (unused slots alias tile 0):
    weights, input projections, saved activations."""
    w0 = tl.load(ptrs, mask=mask, other=0.0)
    w1 = w0
    w2 = w0
    w3 = w0
    if NUM_GATES > 1:
        w1 = tl.load(ptrs + stride, mask=mask, other=0.0)
    if NUM_GATES > 2:
        w2 = tl.load(ptrs + 2 * stride, mask=mask, other=0.0)
    if NUM_GATES > 3:
        w3 = tl.load(ptrs + 3 * stride, mask=mask, other=0.0)
    return w0, w1, w2, w3


@triton.jit
def _gate_stride(H, R):
    """``H * R`` in int64: elements between two gates' blocks of ``W_hh`` ``[G*H, R]``.

    Gate ``g`` starts ``g * H * R`` elements in, past 2**31 from hidden 26,755
    (LSTM) or 32,768 (GRU); in int32 the later gates would read before ``W``.
    """
    return tl.cast(H, tl.int64) * R


# Split-K layouts. With SPLIT_K > 1 a K range is ``[SPLIT_K, KS]`` (KS = K // SPLIT_K),
# a weight tile ``[SPLIT_K, KS, N]``, an activation tile ``[SPLIT_K, M, KS]`` and an
# accumulator ``[SPLIT_K, M, N]``; with SPLIT_K == 1 they are the plain 1-D range and 2-D
# tiles (not 3-D tiles with a batch of one, which Triton 3.6 lays out badly: all warps on
# the size-1 dimension). Each helper below branches once on SPLIT_K: under Triton's
# interpreter every @triton.jit call costs about a millisecond, so the layouts are not
# built from many one-line helpers.

@triton.jit
def _k_split(k0, KC: tl.constexpr, SPLIT_K: tl.constexpr):
    """Inputs ``k0 .. k0 + KC - 1`` as ``[SPLIT_K, KC // SPLIT_K]``: row ``s`` is the K range
    that the ``s``-th group of warps multiplies (split-K; see :func:`_forward_preacts`);
    the plain ``[KC]`` range when ``SPLIT_K == 1``."""
    if SPLIT_K == 1:
        return k0 + tl.arange(0, KC)
    else:
        KS: tl.constexpr = KC // SPLIT_K
        return k0 + tl.arange(0, SPLIT_K)[:, None] * KS + tl.arange(0, KS)[None, :]


@triton.jit
def _activation_tile(row, rows_ok, k, K, SPLIT_K: tl.constexpr):
    """Pointers and mask of an activation tile: rows ``row`` (``[M]`` pointers, valid where
    ``rows_ok``) at inputs ``k`` (:func:`_k_split`, valid below ``K``); ``[M, KC]`` or
    ``[SPLIT_K, M, KS]``."""
    if SPLIT_K == 1:
        return row[:, None] + k[None, :], rows_ok[:, None] & (k < K)[None, :]
    else:
        return row[None, :, None] + k[:, None, :], rows_ok[None, :, None] & (k < K)[:, None, :]


@triton.jit
def _weight_tile(W, k, K, offs_n, n_mask, ROW, BY_UNIT: tl.constexpr, SPLIT_K: tl.constexpr):
    """Pointers and mask of gate 0's weight tile at inputs ``k`` (:func:`_k_split`, valid
    below ``K``) and columns ``offs_n``, ``[KC, N]`` or ``[SPLIT_K, KS, N]``, of a
    row-major weight with rows of ``ROW`` elements: ``W[n, k]`` (``BY_UNIT``: the
    forward's ``W^T``) or ``W[k, n]`` (backward)."""
    if SPLIT_K == 1:
        kk = k[:, None]
        nn = offs_n[None, :]
        mask = (k < K)[:, None] & n_mask[None, :]
    else:
        kk = k[:, :, None]
        nn = offs_n[None, None, :]
        mask = (k < K)[:, :, None] & n_mask[None, None, :]
    if BY_UNIT:
        return W + nn.to(tl.int64) * ROW + kk, mask
    else:
        return W + kk.to(tl.int64) * ROW + nn, mask


@triton.jit
def _resident_weights(W, offs_n, n_mask, K, ROW, GSTRIDE, BY_UNIT: tl.constexpr,
                      NUM_GATES: tl.constexpr, KC: tl.constexpr, NUM_RES: tl.constexpr,
                      SPLIT_K: tl.constexpr):
    """The on-chip part of the program's weight slice (its ``N`` columns), loaded once
    before the loop: one tuple per gate of ``NUM_RES`` tiles ``[SPLIT_K, KC // SPLIT_K, N]``,
    the first ``NUM_RES * KC`` inputs (K in chunks, so each step's dots keep small register
    operands). The remaining inputs, if any, are streamed at every step.
    """
    w0 = ()
    w1 = ()
    w2 = ()
    w3 = ()
    for c in tl.static_range(NUM_RES):
        wp, wm = _weight_tile(W, _k_split(c * KC, KC, SPLIT_K), K, offs_n, n_mask, ROW,
                              BY_UNIT, SPLIT_K)
        t0, t1, t2, t3 = _load_gate_tiles(wp, wm, GSTRIDE, NUM_GATES)
        w0 = w0 + (t0,)
        w1 = w1 + (t1,)
        w2 = w2 + (t2,)
        w3 = w3 + (t3,)
    return w0, w1, w2, w3


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32. ``DOT_PRECISION`` is Triton's ``input_precision``, or
    ``"fp32_operands"``: both operands upcast to fp32 first (bf16 under Triton's
    interpreter, whose bf16 ``tl.dot`` multiplies the raw bits; never on a GPU)."""
    if DOT_PRECISION == "fp32_operands":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee",
                      out_dtype=tl.float32)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)


@triton.jit
def _split_sum(a0, a1, a2, a3, NUM_GATES: tl.constexpr, SPLIT_K: tl.constexpr):
    """Reduce split-K accumulators ``[SPLIT_K, M, N]`` to ``[M, N]`` (unused gates alias
    gate 0); un-split ones are already that."""
    if SPLIT_K == 1:
        return a0, a1, a2, a3
    else:
        r0 = tl.sum(a0, axis=0)
        r1 = r0
        r2 = r0
        r3 = r0
        if NUM_GATES > 1:
            r1 = tl.sum(a1, axis=0)
        if NUM_GATES > 2:
            r2 = tl.sum(a2, axis=0)
        if NUM_GATES > 3:
            r3 = tl.sum(a3, axis=0)
        return r0, r1, r2, r3


@triton.jit
def _forward_preacts(SRC, W, slot64, r64, rows_ok, offs_n, n_mask, w0, w1, w2, w3,
                     B, K, GSTRIDE, NUM_GATES: tl.constexpr, KC: tl.constexpr,
                     NUM_KC: tl.constexpr, NUM_RES: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``v @ W_g^T`` for the program's columns, ``v`` the ``[BLOCK_B, K]`` rows of ``SRC[slot]``.

    The recurrent pre-activations ``h_{t-1} @ W_hh_g^T`` (``SRC = HBUF``, where h0
    sits in an extra slot, so one load per chunk serves every row), and the LSTM
    projection ``m_t @ W_hr^T``. The first ``NUM_RES`` K chunks from the on-chip
    weights, the rest (``BLOCK_K > 0``) streamed in chunks of ``BLOCK_K`` inputs.

    Split-K: each chunk's K is cut into ``SPLIT_K`` parts, one batched ``tl.dot``
    ``[SPLIT_K, M, K/SPLIT_K] @ [SPLIT_K, K/SPLIT_K, N]`` whose batch dimension the
    warps share, then one sum over the parts per step. A program's output tile
    (``BLOCK_B x BLOCK_H``, 16 x 16) is a single tensor-core tile: as a plain 2-D
    dot every warp would multiply all of K, and extra warps would only repeat the
    same work (same instructions, same shared-memory reads of the weights).
    """
    if SPLIT_K == 1:
        a0 = tl.zeros([r64.shape[0], offs_n.shape[0]], dtype=tl.float32)
    else:
        a0 = tl.zeros([SPLIT_K, r64.shape[0], offs_n.shape[0]], dtype=tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    row = SRC + slot64 * B * K + r64 * K
    for c in tl.static_range(NUM_RES):
        hp, hm = _activation_tile(row, rows_ok, _k_split(c * KC, KC, SPLIT_K), K, SPLIT_K)
        h = tl.load(hp, mask=hm, other=0.0, cache_modifier=".cg")
        a0 = _dot(h, w0[c], a0, DOT_PRECISION)
        if NUM_GATES > 1:
            a1 = _dot(h, w1[c], a1, DOT_PRECISION)
        if NUM_GATES > 2:
            a2 = _dot(h, w2[c], a2, DOT_PRECISION)
        if NUM_GATES > 3:
            a3 = _dot(h, w3[c], a3, DOT_PRECISION)
    if BLOCK_K > 0:
        for k0 in range(NUM_RES * KC, NUM_KC * KC, BLOCK_K):
            offs_s = _k_split(k0, BLOCK_K, SPLIT_K)
            # (Names apart from the resident chunks': those tiles have another shape, and
            # a name assigned inside this loop is loop-carried.)
            sp, sm = _activation_tile(row, rows_ok, offs_s, K, SPLIT_K)
            hs = tl.load(sp, mask=sm, other=0.0, cache_modifier=".cg")
            wp, wm = _weight_tile(W, offs_s, K, offs_n, n_mask, K, True, SPLIT_K)
            v0, v1, v2, v3 = _load_gate_tiles(wp, wm, GSTRIDE, NUM_GATES)
            a0 = _dot(hs, v0, a0, DOT_PRECISION)
            if NUM_GATES > 1:
                a1 = _dot(hs, v1, a1, DOT_PRECISION)
            if NUM_GATES > 2:
                a2 = _dot(hs, v2, a2, DOT_PRECISION)
            if NUM_GATES > 3:
                a3 = _dot(hs, v3, a3, DOT_PRECISION)
    return _split_sum(a0, a1, a2, a3, NUM_GATES, SPLIT_K)


@triton.jit
def _backward_dh(SRC, W, slot64, r64, rows_ok, offs_n, n_mask, w0, w1, w2, w3, B, K, ROW,
                 GSTRIDE, NUM_GATES: tl.constexpr, KC: tl.constexpr, NUM_KC: tl.constexpr,
                 NUM_RES: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """``sum_g SRC_g[slot] @ W_g[:, columns]``, ``SRC`` rows of ``NUM_GATES * K``.

    The recurrent part of ``dh_t``: the later step's gate gradients times
    ``W_hh`` (``K = H``); with an LSTM projection also ``dm_t = dh_t @ W_hr``.
    K chunks and split-K as in :func:`_forward_preacts`.
    """
    if SPLIT_K == 1:
        acc = tl.zeros([r64.shape[0], offs_n.shape[0]], dtype=tl.float32)
    else:
        acc = tl.zeros([SPLIT_K, r64.shape[0], offs_n.shape[0]], dtype=tl.float32)
    row = SRC + (slot64 * B + r64) * (NUM_GATES * K)
    for c in tl.static_range(NUM_RES):
        dg, m = _activation_tile(row, rows_ok, _k_split(c * KC, KC, SPLIT_K), K, SPLIT_K)
        # One gate at a time keeps a single gradient tile live.
        acc = _dot(tl.load(dg, mask=m, other=0.0, cache_modifier=".cg"), w0[c], acc,
                   DOT_PRECISION)
        if NUM_GATES > 1:
            acc = _dot(tl.load(dg + K, mask=m, other=0.0, cache_modifier=".cg"), w1[c], acc,
                       DOT_PRECISION)
        if NUM_GATES > 2:
            acc = _dot(tl.load(dg + 2 * K, mask=m, other=0.0, cache_modifier=".cg"), w2[c],
                       acc, DOT_PRECISION)
        if NUM_GATES > 3:
            acc = _dot(tl.load(dg + 3 * K, mask=m, other=0.0, cache_modifier=".cg"), w3[c],
                       acc, DOT_PRECISION)
    if BLOCK_K > 0:
        for k0 in range(NUM_RES * KC, NUM_KC * KC, BLOCK_K):
            offs_s = _k_split(k0, BLOCK_K, SPLIT_K)
            dgs, ms = _activation_tile(row, rows_ok, offs_s, K, SPLIT_K)
            wp, wm = _weight_tile(W, offs_s, K, offs_n, n_mask, ROW, False, SPLIT_K)
            for g in tl.static_range(NUM_GATES):
                acc = _dot(tl.load(dgs + g * K, mask=ms, other=0.0,
                                   cache_modifier=".cg"),
                           tl.load(wp + g * GSTRIDE, mask=wm, other=0.0), acc,
                           DOT_PRECISION)
    if SPLIT_K == 1:
        return acc
    else:
        return tl.sum(acc, axis=0)


@triton.jit
def _slot(t, REVERSE: tl.constexpr):
    """Slot of ``h_t`` in ``HBUF`` (int64): ``t + 1`` forward, ``t`` in reverse."""
    if REVERSE:
        return t.to(tl.int64)
    else:
        return t.to(tl.int64) + 1


@triton.jit
def _step_index(step, T, REVERSE: tl.constexpr):
    """Time index of processing step ``step`` (0-based) for the direction."""
    if REVERSE:
        return T - 1 - step
    else:
        return step


@triton.jit
def _active_rows(BATCH_SIZES, t, valid, B, T, VARLEN: tl.constexpr):
    """Rows ``< n`` are live at time ``t`` (0 if ``valid`` is false)."""
    if VARLEN:
        tc = tl.minimum(tl.maximum(t, 0), T - 1)
        n = tl.load(BATCH_SIZES + tc, mask=valid, other=0)
    else:
        n = B
    return tl.where(valid, n, 0)


@triton.jit
def _forward_gates(XG, W, BHN, H0, C0, HBUF, MBUF, HST, CSEQ, SAVED, BATCH_SIZES,
                   w0, w1, w2, w3, b_hn, offs_n, n_mask, pid_b, n_prog_b, step, T, B, H, R,
                   CELL_FWD: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr,
                   HAS_C: tl.constexpr, HAS_PROJ: tl.constexpr, KC: tl.constexpr,
                   NUM_KC: tl.constexpr, NUM_RES: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, REVERSE: tl.constexpr,
                   VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One step's gates for the program's hidden units, every batch tile it owns."""
    GH = NUM_GATES * H
    SH = NUM_SAVED * H
    t = _step_index(step, T, REVERSE)
    t_prev = _step_index(step - 1, T, REVERSE)
    n_live = _active_rows(BATCH_SIZES, t, step >= 0, B, T, VARLEN)
    n_prev = _active_rows(BATCH_SIZES, t_prev, step > 0, B, T, VARLEN)
    t64 = t.to(tl.int64)
    tp64 = tl.maximum(tl.minimum(t_prev, T - 1), 0).to(tl.int64)
    for tile in range(pid_b, tl.cdiv(B, BLOCK_B), n_prog_b):
        if tile * BLOCK_B < n_live:
            rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
            r64 = rows.to(tl.int64)
            live = rows < n_live
            from_out = rows < n_prev
            # Full h_{t-1} @ W_hh^T (h0 at a row's first step: see HBUF).
            a0, a1, a2, a3 = _forward_preacts(HBUF, W, _slot(t_prev, REVERSE), r64, rows < B,
                                              offs_n, n_mask, w0, w1, w2, w3, B, R,
                                              _gate_stride(H, R), NUM_GATES, KC, NUM_KC,
                                              NUM_RES, BLOCK_K, SPLIT_K, DOT_PRECISION)

            own = r64[:, None] * H + offs_n[None, :]
            own_m = live[:, None] & n_mask[None, :]
            sel = from_out[:, None]
            h_prev = tl.zeros([BLOCK_B, offs_n.shape[0]], dtype=tl.float32)
            if not HAS_PROJ:  # the cell's own h_{t-1} (an LSTM's cell ignores it)
                h_prev = tl.where(sel, tl.load(HST + own, mask=own_m & sel, other=0.0),
                                  tl.load(H0 + own, mask=own_m & ~sel, other=0.0).to(tl.float32))
            c_prev = h_prev
            if HAS_C:
                c_prev = tl.where(
                    sel, tl.load(CSEQ + tp64 * B * H + own, mask=own_m & sel, other=0.0),
                    tl.load(C0 + own, mask=own_m & ~sel, other=0.0).to(tl.float32))

            xg = XG + (t64 * B + r64)[:, None] * GH + offs_n[None, :]
            x0, x1, x2, x3 = _load_gate_tiles(xg, own_m, H, NUM_GATES)
            h, c, s0, s1, s2, s3 = CELL_FWD(
                x0.to(tl.float32), x1.to(tl.float32), x2.to(tl.float32), x3.to(tl.float32),
                a0, a1, a2, a3, b_hn[None, :], h_prev, c_prev)

            if HAS_PROJ:  # m_t; the projection phase turns it into h_t
                tl.store(MBUF + t64 * B * H + own, h.to(MBUF.dtype.element_ty), mask=own_m)
            else:
                tl.store(HBUF + _slot(t, REVERSE) * B * H + own, h.to(HBUF.dtype.element_ty),
                         mask=own_m)
                tl.store(HST + own, h, mask=own_m)
            if HAS_C:
                tl.store(CSEQ + t64 * B * H + own, c, mask=own_m)
            # Activations for the backward (NUM_SAVED is 0 when no gradient is needed).
            sv = SAVED + (t64 * B + r64)[:, None] * SH + offs_n[None, :]
            if NUM_SAVED > 0:
                tl.store(sv, s0, mask=own_m)
            if NUM_SAVED > 1:
                tl.store(sv + H, s1, mask=own_m)
            if NUM_SAVED > 2:
                tl.store(sv + 2 * H, s2, mask=own_m)
            if NUM_SAVED > 3:
                tl.store(sv + 3 * H, s3, mask=own_m)


@triton.jit
def _forward_project(HBUF, MBUF, WR, wr, offs_p, p_mask, pid_b, n_prog_b, step, BATCH_SIZES,
                     T, B, H, R, KC2: tl.constexpr, NUM_KC2: tl.constexpr,
                     NUM_RES2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """LSTM projection of one step: ``h_t = m_t @ W_hr^T`` for the program's slice of ``h``."""
    t = _step_index(step, T, REVERSE)
    n_live = _active_rows(BATCH_SIZES, t, step >= 0, B, T, VARLEN)
    t64 = t.to(tl.int64)
    for tile in range(pid_b, tl.cdiv(B, BLOCK_B), n_prog_b):
        if tile * BLOCK_B < n_live:
            rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
            r64 = rows.to(tl.int64)
            live = rows < n_live
            h, _, _, _ = _forward_preacts(MBUF, WR, t64, r64, live, offs_p, p_mask, wr, wr, wr,
                                          wr, B, H, 0, 1, KC2, NUM_KC2, NUM_RES2, BLOCK_K, SPLIT_K,
                                          DOT_PRECISION)
            tl.store(HBUF + _slot(t, REVERSE) * B * R + r64[:, None] * R + offs_p[None, :],
                     h.to(HBUF.dtype.element_ty), mask=live[:, None] & p_mask[None, :])


@triton.jit(do_not_specialize=["T", "B", "t_begin", "n_steps"])
def rnn_forward_kernel(
    XG, W, WR, BHN, H0, C0, HBUF, MBUF, HST, CSEQ, SAVED, BATCH_SIZES, BAR,
    T, B, H, R, t_begin, n_steps,
    CELL_FWD: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr,
    HAS_C: tl.constexpr, HAS_BHN: tl.constexpr, HAS_PROJ: tl.constexpr,
    KC: tl.constexpr, NUM_KC: tl.constexpr, NUM_RES: tl.constexpr, KC2: tl.constexpr,
    NUM_KC2: tl.constexpr, NUM_RES2: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, REVERSE: tl.constexpr,
    VARLEN: tl.constexpr, USE_BARRIER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Steps ``t_begin .. t_begin + n_steps - 1`` of one (layer, direction).

    Shapes: ``XG [T, B, G*H]`` (input projection with fused biases), ``W [G*H, R]``
    (``W_hh``; ``R`` is the recurrent width: ``H``, or the LSTM projection size
    ``P``), ``BHN [H]``, ``H0 [B, R]``, ``C0 [B, H]``, ``HBUF [T + 1, B, R]``
    (storage dtype: ``h_t`` at slot :func:`_slot` ``(t)``, ``h0`` at the slot of
    ``t = -1`` or ``T``, and, for reverse packed rows, at the padding slot just
    past each row's end), ``HST [B, H]`` fp32 running hidden state, ``CSEQ
    [T, B, H]`` fp32 cell states, ``SAVED [T, B, NUM_SAVED*H]`` fp32,
    ``BATCH_SIZES [T]`` int32 (live rows per step, decreasing), ``BAR [grid_b]``
    int32 zeroed barrier counters.

    With ``HAS_PROJ`` (LSTM ``proj_size``) every step is two phases, each
    followed by the barrier: the gates write ``m_t = o * tanh(c_t)`` to ``MBUF
    [T, B, H]``, then ``h_t = m_t @ W_hr^T`` (``WR [P, H]``, ``BLOCK_P`` outputs
    per program, also on-chip) goes to ``HBUF``. ``t_begin`` and ``n_steps``
    then count phases.
    """
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_prog_b = tl.num_programs(0)
    n_prog_h = tl.num_programs(1)

    if not HAS_PROJ:
        R = H  # the same width: the compiler shares the address arithmetic
    offs_n = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    n_mask = offs_n < H
    # On-chip weights: tile g holds W[g*H + n, k] at (k, n), i.e. W_hh_g^T for our units.
    # Loaded once, before the time loop (the first NUM_RES K chunks; the rest streams).
    w0, w1, w2, w3 = _resident_weights(W, offs_n, n_mask, R, R, _gate_stride(H, R), True,
                                       NUM_GATES, KC, NUM_RES, SPLIT_K)
    offs_p = pid_h * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < R
    wr = ()
    if HAS_PROJ:  # W_hr^T for our outputs: WR[p, k] at (k, p)
        wr, _, _, _ = _resident_weights(WR, offs_p, p_mask, H, H, 0, True, 1, KC2, NUM_RES2,
                                        SPLIT_K)
    b_hn = tl.zeros([BLOCK_H], dtype=tl.float32)
    if HAS_BHN:
        b_hn = tl.load(BHN + offs_n, mask=n_mask, other=0.0).to(tl.float32)

    for s in range(n_steps):
        phase = t_begin + s
        if HAS_PROJ:
            if phase % 2 == 0:
                _forward_gates(XG, W, BHN, H0, C0, HBUF, MBUF, HST, CSEQ, SAVED, BATCH_SIZES,
                               w0, w1, w2, w3, b_hn, offs_n, n_mask, pid_b, n_prog_b, phase // 2,
                               T, B, H, R, CELL_FWD, NUM_GATES, NUM_SAVED, HAS_C, HAS_PROJ, KC,
                               NUM_KC, NUM_RES, BLOCK_B, BLOCK_K, SPLIT_K, REVERSE, VARLEN,
                               DOT_PRECISION)
            else:
                _forward_project(HBUF, MBUF, WR, wr, offs_p, p_mask, pid_b, n_prog_b,
                                 phase // 2, BATCH_SIZES, T, B, H, R, KC2, NUM_KC2, NUM_RES2,
                                 BLOCK_B, BLOCK_K, SPLIT_K, REVERSE, VARLEN, DOT_PRECISION)
        else:
            _forward_gates(XG, W, BHN, H0, C0, HBUF, MBUF, HST, CSEQ, SAVED, BATCH_SIZES,
                           w0, w1, w2, w3, b_hn, offs_n, n_mask, pid_b, n_prog_b, phase,
                           T, B, H, R, CELL_FWD, NUM_GATES, NUM_SAVED, HAS_C, HAS_PROJ, KC,
                           NUM_KC, NUM_RES, BLOCK_B, BLOCK_K, SPLIT_K, REVERSE, VARLEN,
                           DOT_PRECISION)
        tl.debug_barrier()
        if USE_BARRIER:
            grid_barrier(BAR + pid_b, (s + 1) * n_prog_h)


@triton.jit
def _backward_project(DOUT, DHN, W, DGH, DHSEQ, BATCH_SIZES, w0, w1, w2, w3, offs_p, p_mask,
                      pid_b, n_prog_b, bstep, T, B, H, R, NUM_GATES: tl.constexpr,
                      KC: tl.constexpr, NUM_KC: tl.constexpr, NUM_RES: tl.constexpr,
                      BLOCK_B: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, REVERSE: tl.constexpr,
                      VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """LSTM projection, backward: the program's slice of ``dh_t`` (``P`` wide) into ``DHSEQ``.

    ``dh_t = dout_t + dG(t+1) @ W_hh`` (or ``+ dh_n`` at a row's last step).
    """
    fstep = T - 1 - bstep
    t = _step_index(fstep, T, REVERSE)
    t_next = _step_index(fstep + 1, T, REVERSE)
    n_live = _active_rows(BATCH_SIZES, t, fstep >= 0, B, T, VARLEN)
    n_next = _active_rows(BATCH_SIZES, t_next, fstep + 1 < T, B, T, VARLEN)
    t64 = t.to(tl.int64)
    tn64 = tl.maximum(tl.minimum(t_next, T - 1), 0).to(tl.int64)
    for tile in range(pid_b, tl.cdiv(B, BLOCK_B), n_prog_b):
        if tile * BLOCK_B < n_live:
            rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
            r64 = rows.to(tl.int64)
            live = rows < n_live
            to_next = rows < n_next
            dh_rec = _backward_dh(DGH, W, tn64, r64, to_next, offs_p, p_mask, w0, w1, w2, w3, B,
                                  H, R, _gate_stride(H, R), NUM_GATES, KC, NUM_KC, NUM_RES,
                                  BLOCK_K, SPLIT_K, DOT_PRECISION)
            own = r64[:, None] * R + offs_p[None, :]
            own_m = live[:, None] & p_mask[None, :]
            nxt = to_next[:, None]
            dh = tl.where(nxt, dh_rec,
                          tl.load(DHN + own, mask=own_m & ~nxt, other=0.0).to(tl.float32))
            dh += tl.load(DOUT + t64 * B * R + own, mask=own_m, other=0.0).to(tl.float32)
            tl.store(DHSEQ + t64 * B * R + own, dh.to(DHSEQ.dtype.element_ty), mask=own_m)


@triton.jit
def _backward_gates(DOUT, DHN, DCN, W, WR, HBUF, H0, C0, CSEQ, SAVED, DGH, DXN, DHSEQ, DHST,
                    DCST, BATCH_SIZES, w0, w1, w2, w3, wr, offs_n, n_mask, pid_b, n_prog_b,
                    bstep, T, B, H, R, CELL_BWD: tl.constexpr, NUM_GATES: tl.constexpr,
                    NUM_SAVED: tl.constexpr, HAS_C: tl.constexpr, SPLIT_X_GRAD: tl.constexpr,
                    HAS_PROJ: tl.constexpr, KC: tl.constexpr, NUM_KC: tl.constexpr,
                    NUM_RES: tl.constexpr, KC2: tl.constexpr, NUM_KC2: tl.constexpr,
                    NUM_RES2: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, REVERSE: tl.constexpr,
                    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One backward step's gate gradients for the program's hidden units."""
    GH = NUM_GATES * H
    SH = NUM_SAVED * H
    fstep = T - 1 - bstep  # the forward's processing step
    t = _step_index(fstep, T, REVERSE)
    t_next = _step_index(fstep + 1, T, REVERSE)
    t_prev = _step_index(fstep - 1, T, REVERSE)
    n_live = _active_rows(BATCH_SIZES, t, fstep >= 0, B, T, VARLEN)
    n_next = _active_rows(BATCH_SIZES, t_next, fstep + 1 < T, B, T, VARLEN)
    n_prev = _active_rows(BATCH_SIZES, t_prev, fstep > 0, B, T, VARLEN)
    t64 = t.to(tl.int64)
    tn64 = tl.maximum(tl.minimum(t_next, T - 1), 0).to(tl.int64)
    tp64 = tl.maximum(tl.minimum(t_prev, T - 1), 0).to(tl.int64)
    for tile in range(pid_b, tl.cdiv(B, BLOCK_B), n_prog_b):
        if tile * BLOCK_B < n_live:
            rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
            r64 = rows.to(tl.int64)
            live = rows < n_live
            to_next = rows < n_next
            from_out = rows < n_prev
            own = r64[:, None] * H + offs_n[None, :]
            own_m = live[:, None] & n_mask[None, :]
            nxt = to_next[:, None]
            if HAS_PROJ:
                # dm_t = dh_t @ W_hr, from the slices of dh_t all programs just wrote.
                dh = _backward_dh(DHSEQ, WR, t64, r64, live, offs_n, n_mask, wr, wr, wr, wr, B,
                                  R, H, 0, 1, KC2, NUM_KC2, NUM_RES2, BLOCK_K, SPLIT_K,
                                  DOT_PRECISION)
            else:
                # Recurrent part of dh_t: the later step's gate gradients times W_hh.
                dh_rec = _backward_dh(DGH, W, tn64, r64, to_next, offs_n, n_mask, w0, w1, w2,
                                      w3, B, H, H, _gate_stride(H, H), NUM_GATES, KC, NUM_KC,
                                      NUM_RES, BLOCK_K, SPLIT_K, DOT_PRECISION)
                dh = tl.where(nxt, dh_rec + tl.load(DHST + own, mask=own_m & nxt, other=0.0),
                              tl.load(DHN + own, mask=own_m & ~nxt, other=0.0).to(tl.float32))
                dh += tl.load(DOUT + t64 * B * H + own, mask=own_m, other=0.0).to(tl.float32)
            dc = dh * 0.0
            if HAS_C:
                dc = tl.where(nxt, tl.load(DCST + own, mask=own_m & nxt, other=0.0),
                              tl.load(DCN + own, mask=own_m & ~nxt, other=0.0).to(tl.float32))

            sel = from_out[:, None]
            h_prev = dh * 0.0
            if not HAS_PROJ:  # the cell's own h_{t-1} (an LSTM's cell ignores it)
                h_prev = tl.where(
                    sel,
                    tl.load(HBUF + _slot(t_prev, REVERSE) * B * H + own, mask=own_m & sel,
                            other=0.0).to(tl.float32),
                    tl.load(H0 + own, mask=own_m & ~sel, other=0.0).to(tl.float32))
            c_prev = h_prev
            c_new = h_prev
            if HAS_C:
                c_prev = tl.where(
                    sel, tl.load(CSEQ + tp64 * B * H + own, mask=own_m & sel, other=0.0),
                    tl.load(C0 + own, mask=own_m & ~sel, other=0.0).to(tl.float32))
                c_new = tl.load(CSEQ + t64 * B * H + own, mask=own_m, other=0.0)
            sv = SAVED + (t64 * B + r64)[:, None] * SH + offs_n[None, :]
            s0, s1, s2, s3 = _load_gate_tiles(sv, own_m, H, NUM_SAVED)

            dx0, dx1, dx2, dx3, da0, da1, da2, da3, dh_prev, dc_prev = CELL_BWD(
                dh, dc, s0, s1, s2, s3, h_prev, c_prev, c_new)

            lv = live[:, None]
            out_m = (rows < B)[:, None] & n_mask[None, :]
            gp = DGH + (t64 * B + r64)[:, None] * GH + offs_n[None, :]
            ety = DGH.dtype.element_ty
            tl.store(gp, tl.where(lv, da0, 0.0).to(ety), mask=out_m)
            if NUM_GATES > 1:
                tl.store(gp + H, tl.where(lv, da1, 0.0).to(ety), mask=out_m)
            if NUM_GATES > 2:
                tl.store(gp + 2 * H, tl.where(lv, da2, 0.0).to(ety), mask=out_m)
            if NUM_GATES > 3:
                tl.store(gp + 3 * H, tl.where(lv, da3, 0.0).to(ety), mask=out_m)
            if SPLIT_X_GRAD:
                dxl = dx0
                if NUM_GATES == 2:
                    dxl = dx1
                if NUM_GATES == 3:
                    dxl = dx2
                if NUM_GATES == 4:
                    dxl = dx3
                tl.store(DXN + t64 * B * H + own, tl.where(lv, dxl, 0.0).to(ety), mask=out_m)
            if not HAS_PROJ:
                tl.store(DHST + own, dh_prev, mask=own_m)
            if HAS_C:
                tl.store(DCST + own, dc_prev, mask=own_m)


@triton.jit(do_not_specialize=["T", "B", "t_begin", "n_steps"])
def rnn_backward_kernel(
    DOUT, DHN, DCN, W, WR, HBUF, H0, C0, CSEQ, SAVED, DGH, DXN, DHSEQ, DHST, DCST, BATCH_SIZES,
    BAR, T, B, H, R, t_begin, n_steps,
    CELL_BWD: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr,
    HAS_C: tl.constexpr, SPLIT_X_GRAD: tl.constexpr, HAS_PROJ: tl.constexpr,
    KC: tl.constexpr, NUM_KC: tl.constexpr, NUM_RES: tl.constexpr, KC2: tl.constexpr,
    NUM_KC2: tl.constexpr, NUM_RES2: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, REVERSE: tl.constexpr,
    VARLEN: tl.constexpr, USE_BARRIER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Backward steps ``t_begin .. t_begin + n_steps - 1`` (0 = the forward's last step).

    Writes ``DGH [T, B, G*H]`` (gradients of the recurrent pre-activations,
    storage dtype; zero on padding), ``DXN [T, B, H]`` (GRU: gradient of the
    input-side ``n`` pre-activation), and leaves in ``DHST``/``DCST`` the
    elementwise part of ``dh_{-1}`` and ``dc_{-1}`` for each row. ``DOUT`` and
    ``DHN`` are ``R`` wide (see :func:`rnn_forward_kernel`). With ``HAS_PROJ``
    each step is two phases: ``dh_t`` (``R`` wide, ``BLOCK_P`` per program, into
    ``DHSEQ [T, B, R]``), barrier, then the gates (``dm_t = dh_t @ W_hr``).
    """
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_prog_b = tl.num_programs(0)
    n_prog_h = tl.num_programs(1)

    if not HAS_PROJ:
        R = H  # the same width: the compiler shares the address arithmetic
    offs_n = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    n_mask = offs_n < H
    offs_p = pid_h * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < R
    wr = ()
    if HAS_PROJ:
        # Columns of W_hh_g for our slice of h, and of W_hr for our units.
        w0, w1, w2, w3 = _resident_weights(W, offs_p, p_mask, H, R, _gate_stride(H, R), False,
                                           NUM_GATES, KC, NUM_RES, SPLIT_K)
        wr, _, _, _ = _resident_weights(WR, offs_n, n_mask, R, H, 0, False, 1, KC2, NUM_RES2,
                                        SPLIT_K)
    else:
        # Tile g holds W[g*H + k, n] at (k, n): columns of W_hh_g for our units.
        w0, w1, w2, w3 = _resident_weights(W, offs_n, n_mask, H, H, _gate_stride(H, H), False,
                                           NUM_GATES, KC, NUM_RES, SPLIT_K)

    for s in range(n_steps):
        phase = t_begin + s
        bstep = phase
        if HAS_PROJ:
            bstep = phase // 2
            if phase % 2 == 0:
                _backward_project(DOUT, DHN, W, DGH, DHSEQ, BATCH_SIZES, w0, w1, w2, w3, offs_p,
                                  p_mask, pid_b, n_prog_b, bstep, T, B, H, R, NUM_GATES, KC,
                                  NUM_KC, NUM_RES, BLOCK_B, BLOCK_K, SPLIT_K, REVERSE, VARLEN,
                                  DOT_PRECISION)
            else:
                _backward_gates(DOUT, DHN, DCN, W, WR, HBUF, H0, C0, CSEQ, SAVED, DGH, DXN,
                                DHSEQ, DHST, DCST, BATCH_SIZES, w0, w1, w2, w3, wr, offs_n,
                                n_mask, pid_b, n_prog_b, bstep, T, B, H, R, CELL_BWD, NUM_GATES,
                                NUM_SAVED, HAS_C, SPLIT_X_GRAD, HAS_PROJ, KC, NUM_KC, NUM_RES,
                                KC2, NUM_KC2, NUM_RES2, BLOCK_B, BLOCK_K, SPLIT_K, REVERSE, VARLEN,
                                DOT_PRECISION)
        else:
            _backward_gates(DOUT, DHN, DCN, W, WR, HBUF, H0, C0, CSEQ, SAVED, DGH, DXN, DHSEQ,
                            DHST, DCST, BATCH_SIZES, w0, w1, w2, w3, wr, offs_n, n_mask, pid_b,
                            n_prog_b, bstep, T, B, H, R, CELL_BWD, NUM_GATES, NUM_SAVED, HAS_C,
                            SPLIT_X_GRAD, HAS_PROJ, KC, NUM_KC, NUM_RES, KC2, NUM_KC2, NUM_RES2,
                            BLOCK_B, BLOCK_K, SPLIT_K, REVERSE, VARLEN, DOT_PRECISION)
        tl.debug_barrier()
        if USE_BARRIER:
            grid_barrier(BAR + pid_b, (s + 1) * n_prog_h)
