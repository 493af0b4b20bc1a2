"""Autograd for the directions of one layer on the Triton kernels.

:func:`triton_directions` is the Triton implementation of the per-layer
function that :mod:`triton_rnn.functional` calls; :func:`triton_sequence` runs
one (layer, direction), with the signature of
:func:`triton_rnn.functional.reference_sequence`.

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


#: Tensors per direction that :class:`RecurrenceFunction` takes, in this order.
_PER_DIRECTION = ("h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
#: Kernel buffers per direction that the forward returns for the backward
#: (``hbuf, cseq, saved, mbuf``), after the user-facing outputs.
_KEPT_PER_DIRECTION = 4
#: Saved for the backward per direction (after the input, which the directions share):
#: ``h0, c0, w_ih, w_hh, b_hh, w_hr`` and the kept buffers.
_SAVED_PER_DIRECTION = 6 + _KEPT_PER_DIRECTION


class RecurrenceFunction(torch.autograd.Function):
    """The directions of one layer that run together: one, or (under ``torch.compile``)
    both of a bidirectional layer, as one pair of kernel ops; see the module docstring.

    ``apply(x, meta, *tensors)`` with :data:`_PER_DIRECTION` tensors per direction;
    returns ``out, h_n`` (and ``c_n`` for LSTM) per direction, flat.

    LSTM projections (``w_hr``, ``h_t = W_hr m_t`` with ``m_t = o * tanh(c_t)``)
    run inside the kernel as a second phase of every step, with ``W_hr`` on-chip
    beside ``W_hh`` (``[4H, P]``): ``4H x P + P x H`` multiply-adds per step and
    row, and a second grid barrier when the hidden size is split. The kernel
    keeps every ``m_t`` and, in the backward, every ``dh_t`` for ``dW_hr``.

    ``forward`` and ``setup_context`` are apart, and the kernel buffers the backward
    reads are returned as non-differentiable outputs, so ``torch.func`` transforms
    work: ``grad``/``vjp`` directly, ``vmap`` through the kernel ops' vmap rules.
    """

    #: torch.vmap runs forward and backward on vmapped tensors; the kernel ops have vmap rules.
    generate_vmap_rule = True

    @staticmethod
    def forward(x, meta, *tensors):
        cell, reverses, lengths, bsz, cfg_f, cfg_b, mode, needs_grad, pairs, overlap = meta
        spec = CELL_SPECS[cell]
        T, B, I = x.shape
        x2 = x.reshape(T * B, I)
        n = len(_PER_DIRECTION)
        dirs = [tensors[d * n:(d + 1) * n] for d in range(len(reverses))]
        xgs, b_hns = [], []
        for h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr in dirs:
            fused, b_hn = _fused_bias(cell, b_ih, b_hh, w_hh.shape[0] // spec.gates)
            xg = torch.addmm(fused, x2, w_ih.t()) if fused is not None else x2 @ w_ih.t()
            xgs.append(xg.view(T, B, -1))
            b_hns.append(b_hn)
        runs = ops.recurrence_forward(
            cell, xgs, [d[3].contiguous() for d in dirs], b_hns,
            [d[0].contiguous() for d in dirs], [_contiguous(d[1]) for d in dirs],
            [_contiguous(d[6]) for d in dirs], lengths, bsz, reverse=list(reverses), mode=mode,
            config=cfg_f, backward_config=cfg_b, save=needs_grad, overlap=overlap,
            pair=pairs and pairs[0])
        outputs, kept = [], []
        for (h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), reverse, run in zip(dirs, reverses, runs):
            hbuf, hst, cseq, saved, mbuf = run
            out = launch.output_view(hbuf, reverse)
            last = _rows_at(_last_step(T, B, lengths, reverse, x.device))
            # With a projection, h_n is each row's last output (the kernel keeps m, not h,
            # in fp32).
            outputs += [out, hst.to(x.dtype) if w_hr is None else out[last]]
            if cseq is not None:
                outputs.append(cseq[last].to(x.dtype))
            kept += [hbuf, cseq, saved, mbuf]
        # What the backward reads is returned too (not differentiable), rather than saved
        # here: torch.func transforms need forward and setup_context apart.
        return (*outputs, *kept)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, meta, *tensors = inputs
        kept = output[len(output) - _KEPT_PER_DIRECTION * len(meta[1]):]
        if not torch.compiler.is_compiling():
            # (Dynamo in torch 2.11 fails on this with dynamic shapes; the compiled graph
            # drops these outputs anyway.)
            ctx.mark_non_differentiable(*(t for t in kept if t is not None))
        # The buffers get no gradient; neither do unused outputs: None, not zeros.
        ctx.set_materialize_grads(False)
        n = len(_PER_DIRECTION)
        to_save = [x]
        for d in range(len(meta[1])):
            h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = tensors[d * n:(d + 1) * n]
            to_save += [h0, c0, w_ih, w_hh, b_hh, w_hr,
                        *kept[d * _KEPT_PER_DIRECTION:(d + 1) * _KEPT_PER_DIRECTION]]
        ctx.meta = meta
        ctx.save_for_backward(*to_save)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors  # unpacked once: each access makes the tensors anew
        if _backward_differentiated(ctx, saved, grads):
            raise RuntimeError(
                "triton_rnn: higher-order gradients through the Triton RNN kernels (double "
                "backward with create_graph=True, or nested torch.func grad/vjp) are not "
                "supported; use backend='torch' for them.")
        with torch.no_grad():
            return RecurrenceFunction._backward(ctx, saved, grads)

    @staticmethod
    def _backward(ctx, saved_tensors, grads):
        cell, reverses, lengths, bsz, _, cfg_b, mode, _, pairs, overlap = ctx.meta
        x, *rest = saved_tensors
        spec = CELL_SPECS[cell]
        T, B, I = x.shape
        dev = x.device
        n_out = 3 if spec.has_c else 2
        dirs = [rest[d * _SAVED_PER_DIRECTION:(d + 1) * _SAVED_PER_DIRECTION]
                for d in range(len(reverses))]
        douts, dh_ns, dc_ns = [], [], []
        for d, (h0, c0, w_ih, w_hh, b_hh, w_hr, hbuf, cseq, saved, mbuf) in enumerate(dirs):
            dout, dh_n, *dc = grads[d * n_out:(d + 1) * n_out]
            R = w_hh.shape[1]  # the recurrent width: H, or the projection size
            douts.append(torch.zeros(T, B, R, dtype=x.dtype, device=dev) if dout is None
                         else dout.contiguous())
            dh_ns.append(h0.new_zeros(h0.shape) if dh_n is None else dh_n.contiguous())
            dc_ns.append(None if not spec.has_c else
                         c0.new_zeros(c0.shape) if dc[0] is None else dc[0].contiguous())
        runs = ops.recurrence_backward(
            cell, douts, dh_ns, dc_ns, [d[3].contiguous() for d in dirs], [d[6] for d in dirs],
            [d[0].contiguous() for d in dirs], [_contiguous(d[1]) for d in dirs],
            [d[7] for d in dirs], [d[8] for d in dirs], [_contiguous(d[5]) for d in dirs], bsz,
            reverse=list(reverses), mode=mode, config=cfg_b, overlap=overlap,
            pair=pairs and pairs[1])
        dx, out = None, []
        n = len(_PER_DIRECTION)
        for d, (saved_d, reverse, run) in enumerate(zip(dirs, reverses, runs)):
            need = ctx.needs_input_grad[2 + d * n:2 + (d + 1) * n]
            dx_d, *grads_d = _direction_grads(cell, x, saved_d, run, reverse, lengths,
                                              ctx.needs_input_grad[0], need)
            dx = dx_d if dx is None else dx + dx_d
            out += grads_d
        return (dx, None, *out)


def _grad_levels(t: Tensor) -> list:
    """The levels of the ``torch.func`` gradient wrappers around ``t``, outermost first,
    looking through vmap's (-2 for one whose transform has ended)."""
    F = torch._C._functorch
    levels = []
    while F.is_functorch_wrapped_tensor(t):
        if F.is_gradtrackingtensor(t):
            levels.append(F.maybe_get_level(t))
        t = F.get_unwrapped(t)
    return levels


def _requires_grad(t: Tensor) -> bool:
    """``t.requires_grad``, looking through ``torch.func`` wrappers: a vmapped tensor
    says False even when the tensor it maps over requires a gradient."""
    F = torch._C._functorch
    while not t.requires_grad and F.is_functorch_wrapped_tensor(t):
        t = F.get_unwrapped(t)
    return t.requires_grad


def _backward_differentiated(ctx, saved, grads) -> bool:
    """Whether something will differentiate the backward being run (which the kernels
    cannot support): ``create_graph=True`` eagerly, or a ``torch.func`` gradient
    transform outside the one that recorded it. ``torch.func`` itself runs every
    backward with ``create_graph``, so that alone says nothing under its transforms."""
    if torch.compiler.is_compiling():  # Dynamo traces the backward: no functorch state
        return torch.is_grad_enabled()
    F = torch._C._functorch
    kinds = (F.TransformType.Grad, F.TransformType.Jvp)
    active = [ci.level() for ci in (F.get_interpreter_stack() or ()) if ci.key() in kinds]
    # The gradient transform that recorded this node: each saved tensor's outermost
    # gradient wrapper (-2 once that transform has ended).
    recorded = [lv[0] for lv in map(_grad_levels, (t for t in saved if t is not None)) if lv]
    if recorded and -2 not in recorded:  # grad(f), still running: outer levels differentiate
        return any(level < max(recorded) for level in active)
    if recorded or active:  # the function of a vjp that has ended, called later
        return bool(active)
    needs_grad = ctx.meta[7]  # some input required a gradient
    return torch.is_grad_enabled() and (
        needs_grad or any(g is not None and _requires_grad(g) for g in grads))


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


def _direction_grads(cell: str, x: Tensor, saved_d: tuple, run: tuple, reverse: bool,
                     lengths: Optional[Tensor], need_x: bool, need: tuple) -> tuple:
    """One direction's ``dx`` and the gradients of its :data:`_PER_DIRECTION` tensors, from
    the backward kernel's outputs ``run`` (``need``: which of those are wanted)."""
    h0, c0, w_ih, w_hh, b_hh, w_hr, hbuf, cseq, saved, mbuf = saved_d
    dgh, dxn, dhst, dcst, dhseq = run
    spec = CELL_SPECS[cell]
    T, B, I = x.shape
    H = w_hh.shape[0] // spec.gates
    R = w_hh.shape[1]
    dgx = dgh if dxn is None else torch.cat([dgh[..., :-H], dxn], dim=-1)
    dgh2, dgx2, x2 = dgh.reshape(T * B, -1), dgx.reshape(T * B, -1), x.reshape(T * B, I)
    first = _rows_at(_first_step(T, B, lengths, reverse, x.device))

    dx = (dgx2 @ w_ih).view(T, B, I) if need_x else None
    dw_ih = dgx2.t() @ x2 if need[2] else None
    # Bias gradients accumulate in fp32 without an fp32 copy of the gate gradients;
    # without GRU's split n gate, db_ih and db_hh are the same sum.
    db_ih = dgx2.sum(0, dtype=torch.float32).to(x.dtype) if need[4] else None
    db_hh = None
    if need[5]:
        db_hh = db_ih.clone() if db_ih is not None and dxn is None else \
            dgh2.sum(0, dtype=torch.float32).to(x.dtype)
    dw_hh = dw_hr = None
    if need[3]:
        # The hidden state before every step; packed reverse rows start at their own
        # last step, where it is h0.
        prev = launch.hidden_before_view(hbuf, reverse)
        if reverse and lengths is not None:
            prev = prev.clone()
            prev[first] = h0
        dw_hh = dgh2.t() @ prev.reshape(T * B, R)
    if need[6]:
        dw_hr = dhseq.reshape(T * B, R).t() @ mbuf.reshape(T * B, H)
    dh0 = dc0 = None
    if need[0]:
        dh0 = dgh[first] @ w_hh
        dh0 = dh0 if w_hr is not None else (dhst + dh0.float()).to(x.dtype)
    if spec.has_c and need[1]:
        dc0 = dcst.to(x.dtype)
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr


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
    return _layer(cell, x, [(h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)], [reverse], lengths, mode,
                  config, backward_config, pairs, overlap=False)[0]


def _layer(cell: str, x: Tensor, directions: list, reverses: list, lengths: Optional[Tensor],
           mode: str = "auto", config: Optional[KernelConfig] = None,
           backward_config: Optional[KernelConfig] = None, pairs: Optional[tuple] = None,
           overlap: bool = True) -> list:
    """The given directions of one layer in one :class:`RecurrenceFunction`; a list of
    ``(out, h_n, c_n)``. Two directions overlap on a GPU unless ``overlap`` is false."""
    T, B, _ = x.shape
    if B == 0:
        # torch returns empty outputs for an empty batch, and zero (not None) gradients
        # for every parameter: keep them all in the autograd graph.
        results = []
        for h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr in directions:
            zero = 0 * sum(t.sum() for t in (x, w_ih, w_hh, b_ih, b_hh, w_hr) if t is not None)
            out = x.new_zeros(T, 0, h0.shape[-1]) + zero
            results.append((out, h0 + zero, (c0 + zero) if c0 is not None else None))
        return results
    bsz = None
    if lengths is not None:
        steps = torch.arange(T)
        bsz = (lengths.view(1, -1) > steps.view(-1, 1)).sum(1).to(torch.int32).to(x.device)
    tensors = [t for d in directions for t in d]
    # Inference (no gradient needed) skips writing the activations the backward reads.
    compiling = torch.compiler.is_compiling()  # (Dynamo cannot trace functorch's checks)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and (t.requires_grad if compiling else _requires_grad(t))
        for t in (x, *tensors))
    meta = (cell, tuple(reverses), lengths, bsz, config, backward_config, mode, needs_grad,
            pairs, overlap)
    # Dynamo, under no_grad, calls a forward that has ``*tensors`` and a separate
    # setup_context with a ctx anyway; and without a gradient no autograd node is needed.
    run = RecurrenceFunction.forward if compiling and not needs_grad else \
        RecurrenceFunction.apply
    res = run(x.contiguous(), meta, *tensors)  # then the buffers kept for the backward
    if not CELL_SPECS[cell].has_c:
        return [(res[2 * d], res[2 * d + 1], None) for d in range(len(directions))]
    return [tuple(res[3 * d:3 * d + 3]) for d in range(len(directions))]


def _view_leaves(*tensors):
    """Each leaf that requires a gradient as a view of itself (made on the current stream)."""
    return [t.view_as(t) if t is not None and t.is_leaf and t.requires_grad else t
            for t in tensors]


def _overlaps(x: Tensor, directions: list, overlap_directions: bool) -> bool:
    """Whether :func:`triton_directions` runs the two directions on two streams, eagerly
    (not under ``torch.func``: vmapped tensors cannot be recorded on a stream)."""
    return (len(directions) == 2 and bool(overlap_directions) and x.device.type == "cuda"
            and x.shape[1] > 0 and not ops.transformed(x, *directions))


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
    ``overlap_directions=False`` runs them one after the other on the current stream.
    Eagerly each direction is its own autograd node, and the autograd engine runs
    the reverse one's backward on the side stream too; under ``torch.compile`` both
    are one node whose kernel ops overlap them (:mod:`triton_rnn.ops`).
    """
    x = x.contiguous()  # once for both directions (batch-first input is a transposed view)
    if torch.compiler.is_compiling() and len(directions) == 2:
        return _layer(cell, x, directions, [False, True], lengths,
                      overlap=bool(overlap_directions), **options)

    def run(d, x_d, args, pairs=None):
        return triton_sequence(cell, x_d, *args, reverse=(d == 1), lengths=lengths,
                               pairs=pairs, **options)

    if not _overlaps(x, directions, overlap_directions):
        return [run(d, x, args) for d, args in enumerate(directions)]
    pairs = (launch.DirectionPair(), launch.DirectionPair())
    # A leaf's gradient is accumulated on the stream its AccumulateGrad node was created
    # on (main: at an earlier use, or by DDP at set-up). The reverse direction produces
    # its gradients on the side stream, so it reads leaves through views made here, on
    # main: their backward, on main, hands the gradient over. (Otherwise torch warns of
    # a stream mismatch, and a CUDA graph capture can break.) The side stream also keeps
    # the input, saved for the backward, which runs there too.
    x_rev, *rev = _view_leaves(x, *directions[1])
    return list(ops.on_two_streams(x.device, lambda: run(0, x, directions[0], pairs),
                                   lambda: run(1, x_rev, rev, pairs), (x_rev, *rev)))
