"""The recurrent kernels as ``torch.library`` custom ops, for ``torch.compile``.

:func:`recurrence_forward` and :func:`recurrence_backward` run one (layer,
direction) of the launcher (:func:`triton_rnn.kernels.launch.forward` and
``backward``) with the tile config the launcher would pick: the forced one,
else the tuned cache entry, else the default. Called eagerly they are plain
calls into the launcher. While ``torch.compile`` traces, they go through the
custom ops ``triton_rnn::recurrence_forward`` and
``triton_rnn::recurrence_backward``: opaque nodes of the graph with shape-only
fake implementations, so the graph does not break around the recurrence, and
the input projection and weight gradients around them are ordinary matrix
products that the compiler sees. (Dynamo itself does not trace into
``torch.nn.RNN``/``GRU``/``LSTM`` modules, this library's included, unless
``torch._dynamo.config.allow_rnn`` is set; :func:`triton_rnn.functional.rnn`
it traces as it is.)

The ops return empty tensors where the launcher returns ``None``; the wrappers
here turn them back into ``None``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .kernels import launch
from .kernels.cells import CELL_SPECS
from .kernels.config import KernelConfig

__all__ = ["recurrence_forward", "recurrence_backward"]


def _proj(w_hr: Optional[Tensor]) -> int:
    return w_hr.shape[0] if w_hr is not None else 0


def _run_forward(cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes, reverse, mode,
                 config: Optional[KernelConfig], backward_config: Optional[KernelConfig], save,
                 pair=None):
    T, B, GH = xg.shape
    H, proj = GH // CELL_SPECS[cell].gates, _proj(w_hr)
    cfg = launch.select_config(cell, "forward", xg.dtype, H, B, xg.device, config, proj)
    if save:
        # The backward's tile is settled here, where TRITON_RNN_AUTOTUNE=1 may tune it,
        # rather than inside the backward pass (its lookup then hits the memo).
        launch.select_config(cell, "backward", xg.dtype, H, B, xg.device, backward_config, proj)
    return launch.forward(cell, xg, w_hh, b_hn, h0, c0, lengths, batch_sizes, reverse, cfg,
                          mode, save=save, pair=pair, w_hr=w_hr)


def _run_backward(cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr, batch_sizes,
                  reverse, mode, config: Optional[KernelConfig], pair=None):
    H = w_hh.shape[0] // CELL_SPECS[cell].gates
    cfg = launch.select_config(cell, "backward", hbuf.dtype, H, dout.shape[1], dout.device,
                               config, _proj(w_hr))
    return launch.backward(cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, batch_sizes,
                           reverse, cfg, mode, pair=pair, w_hr=w_hr)


def _config(fields: Optional[List[int]]) -> Optional[KernelConfig]:
    return KernelConfig(*fields) if fields is not None else None


def _fields(config: Optional[KernelConfig]) -> Optional[List[int]]:
    # Not dataclasses.astuple: it deep-copies, which Dynamo in torch 2.11 cannot trace.
    return [getattr(config, f.name) for f in fields(config)] if config is not None else None


def _filled(outs: tuple, like: Tensor) -> Tuple[Tensor, ...]:
    """A custom op returns tensors: an empty one for each ``None``."""
    return tuple(like.new_empty(0) if t is None else t for t in outs)


def _nones(outs: tuple, present: tuple) -> tuple:
    """Back from :func:`_filled`: ``None`` where ``present`` says the launcher gives none."""
    return tuple(t if p else None for t, p in zip(outs, present))


@torch.library.custom_op("triton_rnn::recurrence_forward", mutates_args=())
def _forward_op(cell: str, xg: Tensor, w_hh: Tensor, b_hn: Optional[Tensor], h0: Tensor,
                c0: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
                batch_sizes: Optional[Tensor], reverse: bool, mode: str,
                config: Optional[List[int]], backward_config: Optional[List[int]], save: bool
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _filled(_run_forward(cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes,
                                reverse, mode, _config(config), _config(backward_config), save),
                   xg)


@_forward_op.register_fake
def _forward_fake(cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes, reverse, mode,
                  config, backward_config, save):
    return _filled(launch.forward_buffers(cell, xg, w_hh, batch_sizes is not None, save, w_hr),
                   xg)


@torch.library.custom_op("triton_rnn::recurrence_backward", mutates_args=())
def _backward_op(cell: str, dout: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], w_hh: Tensor,
                 hbuf: Tensor, h0: Tensor, c0: Optional[Tensor], cseq: Optional[Tensor],
                 saved: Tensor, w_hr: Optional[Tensor], batch_sizes: Optional[Tensor],
                 reverse: bool, mode: str, config: Optional[List[int]]
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _filled(_run_backward(cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr,
                                 batch_sizes, reverse, mode, _config(config)), dout)


@_backward_op.register_fake
def _backward_fake(cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr, batch_sizes,
                   reverse, mode, config):
    return _filled(launch.backward_buffers(cell, dout, w_hh, hbuf.dtype, batch_sizes is not None,
                                           w_hr), dout)


def recurrence_forward(cell: str, xg: Tensor, w_hh: Tensor, b_hn: Optional[Tensor], h0: Tensor,
                       c0: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
                       batch_sizes: Optional[Tensor], *, reverse: bool, mode: str = "auto",
                       config: Optional[KernelConfig] = None,
                       backward_config: Optional[KernelConfig] = None, save: bool = True,
                       pair: Optional[launch.DirectionPair] = None) -> tuple:
    """:func:`triton_rnn.kernels.launch.forward` with the launcher's config choice
    (``config`` forces one); a custom op under ``torch.compile``.

    With ``save`` (a backward will follow) it also settles the backward's tile
    (``backward_config`` forces it), so that ``TRITON_RNN_AUTOTUNE=1`` tunes both
    passes here, before the forward runs. Returns ``(hbuf, h_state, cseq, saved,
    mbuf)`` as the launcher does. ``pair`` (streams of a bidirectional layer) only
    applies eagerly.
    """
    if torch.compiler.is_compiling():
        outs = torch.ops.triton_rnn.recurrence_forward(
            cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes, reverse, mode,
            _fields(config), _fields(backward_config), save)
        return _nones(outs, (True, True, CELL_SPECS[cell].has_c, save, w_hr is not None))
    return _run_forward(cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, batch_sizes, reverse, mode,
                        config, backward_config, save, pair)


def recurrence_backward(cell: str, dout: Tensor, dh_n: Tensor, dc_n: Optional[Tensor],
                        w_hh: Tensor, hbuf: Tensor, h0: Tensor, c0: Optional[Tensor],
                        cseq: Optional[Tensor], saved: Tensor, w_hr: Optional[Tensor],
                        batch_sizes: Optional[Tensor], *, reverse: bool, mode: str = "auto",
                        config: Optional[KernelConfig] = None,
                        pair: Optional[launch.DirectionPair] = None) -> tuple:
    """:func:`triton_rnn.kernels.launch.backward` with the launcher's config choice
    (``config`` forces one); a custom op under ``torch.compile``.

    Returns ``(dgh, dxn, dh_state, dc_state, dhseq)`` as the launcher does.
    """
    if torch.compiler.is_compiling():
        spec = CELL_SPECS[cell]
        outs = torch.ops.triton_rnn.recurrence_backward(
            cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr, batch_sizes,
            reverse, mode, _fields(config))
        return _nones(outs, (True, spec.split_x_grad, True, spec.has_c, w_hr is not None))
    return _run_backward(cell, dout, dh_n, dc_n, w_hh, hbuf, h0, c0, cseq, saved, w_hr,
                         batch_sizes, reverse, mode, config, pair)
