"""The recurrent kernels as ``torch.library`` custom ops, for ``torch.compile``.

:func:`recurrence_forward` and :func:`recurrence_backward` run the directions
of one layer that go together (one, or both of a bidirectional layer) through
the launcher (:func:`triton_rnn.kernels.launch.forward` and ``backward``), each
with the tile config the launcher would pick: the forced one, else the tuned
cache entry, else the default. Both directions of a layer on a GPU run on two
CUDA streams at once (:func:`on_two_streams`). Called eagerly these are plain
calls into the launcher. While ``torch.compile`` traces, they go through the
custom ops ``triton_rnn::recurrence_forward`` and
``triton_rnn::recurrence_backward``: opaque nodes of the graph with shape-only
fake implementations, so the graph does not break around the recurrence, and
the input projection and weight gradients around them are ordinary matrix
products that the compiler sees. (Dynamo itself does not trace into
``torch.nn.RNN``/``GRU``/``LSTM`` modules, this library's included, unless
``torch._dynamo.config.allow_rnn`` is set; :func:`triton_rnn.functional.rnn`
it traces as it is.)

Under ``torch.func`` transforms (``vmap``, ``grad``, ...) they also go through the
custom ops, whose vmap rules fold a vmapped dimension into the batch (or, for
vmapped weights, run one launch per index).

Arguments are lists with one entry per direction; the ops return the
launcher's five tensors per direction, flat, with an empty tensor where the
launcher returns ``None``; the wrappers here turn them back into ``None``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .kernels import launch
from .kernels.cells import CELL_SPECS
from .kernels.config import KernelConfig

__all__ = ["recurrence_forward", "recurrence_backward", "on_two_streams"]

#: One side stream per CUDA device for the reverse direction of bidirectional layers.
_side_streams: dict = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def on_two_streams(device: torch.device, first: Callable, second: Callable,
                   second_reads: Sequence[Optional[Tensor]]):
    """``(first(), second())``, the first on the current stream and the second on a side
    stream, at once; the current stream then waits for both.

    ``second_reads``: the tensors made on the current stream that ``second`` reads. The
    caching allocator reuses a freed block on the stream that allocated it, so these
    are recorded on the side stream, and what ``second`` returns (a tensor or a
    sequence of them, allocated on the side stream) on the current one.
    """
    main = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(main)  # the inputs are ready
    a = first()
    with torch.cuda.stream(side):
        b = second()
    main.wait_stream(side)
    for t in second_reads:
        if t is not None:
            t.record_stream(side)
    for t in ([b] if isinstance(b, Tensor) else b):
        if t is not None:
            t.record_stream(main)
    return a, b


def _streams_on(device: torch.device) -> bool:
    return device.type == "cuda"


def _each_direction(run: Callable, reads: Callable, n: int, device: torch.device,
                    overlap: bool, pair: Optional[launch.DirectionPair]) -> list:
    """``[run(d, pair) for d in range(n)]``; two directions on a GPU overlap on two streams,
    with a :class:`~triton_rnn.kernels.launch.DirectionPair` of their own (``pair`` is the
    eager path's, for a single direction whose partner is another call)."""
    if n == 2 and overlap and _streams_on(device):
        pair = launch.DirectionPair()
        return list(on_two_streams(device, lambda: run(0, pair), lambda: run(1, pair),
                                   reads(1)))
    return [run(d, pair) for d in range(n)]


def _proj(w_hr: Optional[Tensor]) -> int:
    return w_hr.shape[0] if w_hr is not None else 0


def _run_forward(cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes, reverse, mode,
                 config: Optional[KernelConfig], backward_config: Optional[KernelConfig], save,
                 overlap, pair=None) -> list:
    def run(d, pair):
        T, B, GH = xg[d].shape
        H, proj = GH // CELL_SPECS[cell].gates, _proj(w_hr[d])
        cfg = launch.select_config(cell, "forward", xg[d].dtype, H, B, xg[d].device, config,
                                   proj)
        if save:
            # The backward's tile is settled here, where TRITON_RNN_AUTOTUNE=1 may tune it,
            # rather than inside the backward pass (its lookup then hits the memo).
            launch.select_config(cell, "backward", xg[d].dtype, H, B, xg[d].device,
                                 backward_config, proj)
        return launch.forward(cell, xg[d], w_hh[d], b_hn[d], h0[d], c0[d], lengths,
                              batch_sizes, reverse[d], cfg, mode, save=save, pair=pair,
                              w_hr=w_hr[d])

    def reads(d):
        return (xg[d], w_hh[d], b_hn[d], h0[d], c0[d], w_hr[d], batch_sizes)

    return _each_direction(run, reads, len(xg), xg[0].device, overlap, pair)


def _run_backward(cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr, batch_sizes,
                  reverse, mode, config: Optional[KernelConfig], overlap, pair=None) -> list:
    def run(d, pair):
        H = w_hh[d].shape[0] // CELL_SPECS[cell].gates
        cfg = launch.select_config(cell, "backward", hbuf[d].dtype, H, dout[d].shape[1],
                                   dout[d].device, config, _proj(w_hr[d]))
        return launch.backward(cell, dout[d], dh_n[d], dc_n[d], w_hh[d], hbuf[d], h0[d], c0[d],
                               cseq[d], saved[d], batch_sizes, reverse[d], cfg, mode, pair=pair,
                               w_hr=w_hr[d])

    def reads(d):
        return (dout[d], dh_n[d], dc_n[d], w_hh[d], hbuf[d], h0[d], c0[d], cseq[d], saved[d],
                w_hr[d], batch_sizes)

    return _each_direction(run, reads, len(dout), dout[0].device, overlap, pair)


def _config(fields: Optional[List[int]]) -> Optional[KernelConfig]:
    return KernelConfig(*fields) if fields is not None else None


def _fields(config: Optional[KernelConfig]) -> Optional[List[int]]:
    # Not dataclasses.astuple: it deep-copies, which Dynamo in torch 2.11 cannot trace.
    return [getattr(config, f.name) for f in fields(config)] if config is not None else None


def _filled(runs: list, like: Tensor) -> List[Tensor]:
    """A custom op returns tensors: every direction's, flat, an empty one for each ``None``."""
    return [like.new_empty(0) if t is None else t for outs in runs for t in outs]


def _nones(flat: Sequence[Tensor], present: Callable) -> list:
    """Back from :func:`_filled`: five tensors per direction, ``None`` where
    ``present(d)`` says the launcher gives none."""
    return [tuple(t if p else None for t, p in zip(flat[5 * d:5 * d + 5], present(d)))
            for d in range(len(flat) // 5)]


def transformed(*groups) -> bool:
    """Whether a ``torch.func`` transform wraps any tensor in ``groups`` (each a tensor, a
    list of them or ``None``): the kernels then run through the custom ops, whose vmap
    rules below unwrap them."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and wrapped(t)
               for g in groups for t in (g if isinstance(g, (list, tuple)) else (g,)))


@torch.library.custom_op("triton_rnn::recurrence_forward", mutates_args=())
def _forward_op(cell: str, xg: List[Tensor], w_hh: List[Tensor], b_hn: List[Optional[Tensor]],
                h0: List[Tensor], c0: List[Optional[Tensor]], w_hr: List[Optional[Tensor]],
                lengths: Optional[Tensor], batch_sizes: Optional[Tensor], reverse: List[bool],
                mode: str, config: Optional[List[int]], backward_config: Optional[List[int]],
                save: bool, overlap: bool) -> List[Tensor]:
    return _filled(_run_forward(cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes,
                                reverse, mode, _config(config), _config(backward_config), save,
                                overlap), xg[0])


@_forward_op.register_fake
def _forward_fake(cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes, reverse, mode,
                  config, backward_config, save, overlap):
    return _filled([launch.forward_buffers(cell, xg[d], w_hh[d], batch_sizes is not None, save,
                                           w_hr[d]) for d in range(len(xg))], xg[0])


@torch.library.custom_op("triton_rnn::recurrence_backward", mutates_args=())
def _backward_op(cell: str, dout: List[Tensor], dh_n: List[Tensor], dc_n: List[Optional[Tensor]],
                 w_hh: List[Tensor], hbuf: List[Tensor], h0: List[Tensor],
                 c0: List[Optional[Tensor]], cseq: List[Optional[Tensor]], saved: List[Tensor],
                 w_hr: List[Optional[Tensor]], batch_sizes: Optional[Tensor],
                 reverse: List[bool], mode: str, config: Optional[List[int]],
                 overlap: bool) -> List[Tensor]:
    return _filled(_run_backward(cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr,
                                 batch_sizes, reverse, mode, _config(config), overlap), dout[0])


@_backward_op.register_fake
def _backward_fake(cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr, batch_sizes,
                   reverse, mode, config, overlap):
    return _filled([launch.backward_buffers(cell, dout[d], w_hh[d], hbuf[d].dtype,
                                            batch_sizes is not None, w_hr[d])
                    for d in range(len(dout))], dout[0])


# torch.vmap (and so per-sample gradients, vmap(grad(...))) over the kernels. The rows of
# every per-row argument lie along its batch dimension (1 in a [T, B, ...] tensor, 0 in a
# [B, ...] state), so a vmapped dimension folds into it: row b * V + v (packed rows
# too: each length repeats V times). With the weights shared (not vmapped) that is one
# launch on V times the batch. Vmapped weights (an ensemble over stacked parameters) or
# vmapped packing run one launch per vmapped index.

def _batch_dim(t: Tensor, vdim: Optional[int]) -> int:
    """The batch dimension of ``t``'s per-example shape: 1 for ``[T, B, X]``, 0 for ``[B, X]``."""
    return 1 if t.dim() - (vdim is not None) == 3 else 0


def _fold(t: Optional[Tensor], vdim: Optional[int], V: int) -> Optional[Tensor]:
    """``t`` with its vmapped dimension ``vdim`` (``None``: shared, so repeated) merged into
    its batch dimension, vmapped index innermost; contiguous."""
    if t is None:
        return None
    bd = _batch_dim(t, vdim)
    if vdim is None:
        t = t.unsqueeze(bd + 1).expand(*t.shape[:bd + 1], V, *t.shape[bd + 1:])
    else:
        t = t.movedim(vdim, bd + 1)
    # reshape keeps an expanded (stride 0) dimension as a view where it can.
    return t.reshape(*t.shape[:bd], -1, *t.shape[bd + 2:]).contiguous()


def _unfold(flat: Sequence[Tensor], V: int):
    """The op's outputs on the folded batch back to ``(outputs, out_dims)``; the empty
    placeholders (:func:`_filled`) are not vmapped."""
    outs, dims = [], []
    for t in flat:
        if t.numel() == 0 and t.dim() == 1:
            outs.append(t)
            dims.append(None)
            continue
        bd = 1 if t.dim() == 3 else 0
        outs.append(t.view(*t.shape[:bd], -1, V, *t.shape[bd + 1:]))
        dims.append(bd + 1)
    return outs, dims


def _select(arg, vdim, v: int):
    """Index ``v`` of an argument's vmapped dimension (lists element-wise)."""
    if isinstance(arg, (list, tuple)):
        return [_select(a, d, v) for a, d in zip(arg, vdim)]
    return arg.select(vdim, v) if vdim is not None else arg


def _vmapped(dims) -> bool:
    return any(d is not None for d in (dims if isinstance(dims, (list, tuple)) else (dims,)))


def _vmap_rule(op, per_row: Sequence[int], weights: Sequence[int], lengths_at: Optional[int],
               batch_sizes_at: int):
    """A ``register_vmap`` rule for ``op``, whose arguments at ``per_row`` are lists of
    per-row tensors, at ``weights`` lists of weights, and at ``lengths_at`` and
    ``batch_sizes_at`` the packing (``lengths_at`` ``None``: the op takes no lengths)."""
    packing = [i for i in (lengths_at, batch_sizes_at) if i is not None]

    def rule(info, in_dims, *args):
        V = info.batch_size
        if any(_vmapped(in_dims[i]) for i in (*weights, *packing)):
            runs = [op(*(_select(a, d, v) for a, d in zip(args, in_dims))) for v in range(V)]
            return [torch.stack(outs) for outs in zip(*runs)], [0] * len(runs[0])
        args = list(args)
        for i in per_row:
            args[i] = [_fold(t, d, V) for t, d in zip(args[i], in_dims[i])]
        if lengths_at is not None and args[lengths_at] is not None:
            args[lengths_at] = args[lengths_at].repeat_interleave(V)  # still decreasing
        if args[batch_sizes_at] is not None:
            args[batch_sizes_at] = args[batch_sizes_at] * V  # live rows per step
        return _unfold(op(*args), V)
    return rule


# (cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes, ...)
_forward_op.register_vmap(_vmap_rule(_forward_op, per_row=(1, 4, 5), weights=(2, 3, 6),
                                     lengths_at=7, batch_sizes_at=8))
# (cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr, batch_sizes, ...)
_backward_op.register_vmap(_vmap_rule(_backward_op, per_row=(1, 2, 3, 5, 6, 7, 8, 9),
                                      weights=(4, 10), lengths_at=None, batch_sizes_at=11))


def recurrence_forward(cell: str, xg: List[Tensor], w_hh: List[Tensor],
                       b_hn: List[Optional[Tensor]], h0: List[Tensor],
                       c0: List[Optional[Tensor]], w_hr: List[Optional[Tensor]],
                       lengths: Optional[Tensor], batch_sizes: Optional[Tensor], *,
                       reverse: List[bool], mode: str = "auto",
                       config: Optional[KernelConfig] = None,
                       backward_config: Optional[KernelConfig] = None, save: bool = True,
                       overlap: bool = True,
                       pair: Optional[launch.DirectionPair] = None) -> list:
    """:func:`triton_rnn.kernels.launch.forward` for each direction (a list entry each),
    with the launcher's config choice (``config`` forces one); a custom op under
    ``torch.compile``.

    With ``save`` (a backward will follow) it also settles the backward's tile
    (``backward_config`` forces it), so that ``TRITON_RNN_AUTOTUNE=1`` tunes both
    passes here, before the forward runs. Two directions on a GPU overlap unless
    ``overlap`` is false. Returns, per direction, ``(hbuf, h_state, cseq, saved,
    mbuf)`` as the launcher does. ``pair``: this single direction's partner runs on
    another stream (:class:`~triton_rnn.kernels.launch.DirectionPair`; eager only).
    """
    if torch.compiler.is_compiling() or transformed(xg, w_hh, b_hn, h0, c0, w_hr):
        flat = torch.ops.triton_rnn.recurrence_forward(
            cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes, reverse, mode,
            _fields(config), _fields(backward_config), save, overlap)
        return _nones(flat, lambda d: (True, True, CELL_SPECS[cell].has_c, save,
                                       w_hr[d] is not None))
    return _run_forward(cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes, reverse, mode,
                        config, backward_config, save, overlap, pair)


def recurrence_backward(cell: str, dout: List[Tensor], dh_n: List[Tensor],
                        dc_n: List[Optional[Tensor]], w_hh: List[Tensor], hbuf: List[Tensor],
                        h0: List[Tensor], c0: List[Optional[Tensor]],
                        cseq: List[Optional[Tensor]], saved: List[Tensor],
                        w_hr: List[Optional[Tensor]], batch_sizes: Optional[Tensor], *,
                        reverse: List[bool], mode: str = "auto",
                        config: Optional[KernelConfig] = None, overlap: bool = True,
                        pair: Optional[launch.DirectionPair] = None) -> list:
    """:func:`triton_rnn.kernels.launch.backward` for each direction, as
    :func:`recurrence_forward`; a custom op under ``torch.compile``.

    Returns, per direction, ``(dgh, dxn, dh_state, dc_state, dhseq)`` as the launcher does.
    """
    if torch.compiler.is_compiling() or transformed(dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq,
                                                     saved, w_hr):
        spec = CELL_SPECS[cell]
        flat = torch.ops.triton_rnn.recurrence_backward(
            cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr, batch_sizes,
            reverse, mode, _fields(config), overlap)
        return _nones(flat, lambda d: (True, spec.split_x_grad, True, spec.has_c,
                                       w_hr[d] is not None))
    return _run_backward(cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr,
                         batch_sizes, reverse, mode, config, overlap, pair)
