"""Drop-in ``torch.nn`` recurrent modules backed by the Triton kernels.

``triton_rnn.GRU``, ``LSTM`` and ``RNN`` subclass their ``torch.nn`` twins:
parameters, ``state_dict`` keys, ``repr``, pickling and every argument are the
same. They add one keyword, ``backend``:

* ``"auto"`` (default): the Triton kernels for CUDA tensors, torch otherwise;
* ``"torch"``: always torch's own implementation (cuDNN on a GPU);
* ``"triton"``: always the Triton kernels. On CPU tensors they need Triton's
  interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported).

``$TRITON_RNN_BACKEND`` sets the default for modules that don't pass one.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import functional as Fn

__all__ = ["GRU", "LSTM", "RNN", "KERNEL_DTYPES"]

#: Storage dtypes the Triton kernels take (other dtypes run on torch's implementation).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned: set = set()


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _TritonRNNMixin:
    """Shared forward for the three modules; the parent class does the rest."""

    _backend: Optional[str] = None
    #: Which sequence function the non-torch path uses. Tests set ``"reference"``
    #: to run the whole module path (validation, packing, states) on the PyTorch
    #: reference loop of :mod:`triton_rnn.functional`.
    _sequence_backend: str = "triton"

    def _init_backend(self, backend: Optional[str]) -> None:
        self.backend = backend
        #: Extra options for the Triton path (``mode``, ``config``, ``backward_config``,
        #: ``overlap_directions``), mainly for tests and benchmarks; empty means "let the
        #: library choose".
        self.kernel_options: dict = {}

    @property
    def backend(self) -> str:
        """The backend this module was asked for (``"auto"`` unless set)."""
        return self._backend or os.environ.get("TRITON_RNN_BACKEND", "auto") or "auto"

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        # None defers to $TRITON_RNN_BACKEND at each call; a bad value there fails now too.
        checked = Fn.check_backend(value)
        self._backend = None if value is None else checked

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self._backend is not None:
            s += f", backend={self._backend!r}"
        return s

    def __setstate__(self, d):
        super().__setstate__(d)
        self.__dict__.setdefault("_backend", None)
        self.__dict__.setdefault("kernel_options", {})

    #: cuDNN's flat weight buffer overflows at 2 GiB (``Storage size calculation
    #: overflowed``): larger layers keep their separate weights.
    CUDNN_FLAT_WEIGHT_LIMIT_BYTES = 2**31

    def flatten_parameters(self) -> None:
        """``torch.nn``'s cuDNN weight flattening, skipped where cuDNN cannot hold the buffer.

        torch.nn raises at construction for such layers (a GRU of hidden 32768, say);
        the Triton kernels read the weights where they are, and torch's path, if used,
        copies them per call as it does for any non-flat weights.
        """
        ws = [w for w in getattr(self, "_flat_weights", ()) if isinstance(w, torch.Tensor)]
        if sum(w.numel() * w.element_size() for w in ws) >= self.CUDNN_FLAT_WEIGHT_LIMIT_BYTES:
            return
        super().flatten_parameters()

    def _current_weights(self) -> list:
        """The weights this call uses (``functional_call``'s too), without flattening them.

        torch.nn's ``_update_flat_weights`` would call ``flatten_parameters``, which reads
        ``data_ptr()``: under ``torch.func.vmap`` on CUDA the weights are batched tensors
        without storage, and that raises.
        """
        return [getattr(self, n) if hasattr(self, n) else None for n in self._flat_weights_names]

    # ------------------------------------------------------------------
    def forward(self, input, hx=None):  # noqa: D401 - same contract as torch.nn
        data = input.data if isinstance(input, PackedSequence) else input
        if Fn.resolve_backend(self._backend, data.device) == "torch":
            return super().forward(input, hx)
        if self._sequence_backend == "triton" and data.dtype not in KERNEL_DTYPES:
            # The kernels store fp16, bf16 or fp32; torch serves the rest (float64). No
            # warning when the weights' dtype differs: torch raises its own error then.
            if (data.is_floating_point() and ("dtype", data.dtype) not in _warned
                    and all(w.dtype == data.dtype for w in self._current_weights())):
                _warned.add(("dtype", data.dtype))
                # stacklevel 4: past Module._call_impl and _wrapped_call_impl, at the caller.
                warnings.warn(f"triton_rnn: the Triton kernels take {KERNEL_DTYPES}; running "
                              f"{data.dtype} with torch's implementation.", RuntimeWarning,
                              stacklevel=4)
            return super().forward(input, hx)
        if (self._sequence_backend == "triton" and data.device.type != "cuda"
                and not _interpreter_requested()):
            raise RuntimeError(
                f"{type(self).__name__}(backend='triton') got a tensor on {data.device}: the "
                "Triton kernels need a CUDA tensor, or Triton's interpreter "
                "(set TRITON_INTERPRET=1 before importing triton) for CPU tensors. "
                "Use backend='torch' or 'auto' to run on the CPU with torch.")
        return self._triton_forward(input, hx)

    def _zeros_state(self, batch: int, size: int, like: torch.Tensor) -> torch.Tensor:
        num_dir = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * num_dir, batch, size, dtype=like.dtype,
                           device=like.device)

    def _triton_forward(self, input, hx):
        is_lstm = self.mode == "LSTM"
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        batch_sizes = sorted_indices = unsorted_indices = None
        is_batched = True
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                # torch.nn's own wording, which differs slightly between its classes.
                noun = " tensor" if self.mode.startswith("RNN") else ""
                raise ValueError(f"{self.mode.split('_')[0]}: Expected input to be 2D or 3D, "
                                 f"got {input.dim()}D{noun} instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            batch = input.size(batch_dim)
            if hx is not None:
                want = 3 if is_batched else 2
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                if is_lstm:
                    if hx[0].dim() != want or hx[1].dim() != want:
                        raise RuntimeError(
                            f"For {kind} input, hx and cx should also be {want}-D but got "
                            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    if not is_batched:
                        hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                else:
                    if hx.dim() != want:
                        raise RuntimeError(
                            f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
                    if not is_batched:
                        hx = hx.unsqueeze(1)
        if hx is None:
            h0 = self._zeros_state(batch, out_size, input)
            hx = (h0, self._zeros_state(batch, self.hidden_size, input)) if is_lstm else h0
            self.check_forward_args(input, hx, batch_sizes)
        else:
            self.check_forward_args(input, hx, batch_sizes)
            if is_lstm and len(hx) != 2:
                raise RuntimeError("lstm expects two hidden states")  # ATen's check
            hx = self.permute_hidden(hx, sorted_indices)

        # torch.autocast: run in the autocast dtype, as torch's RNNs do on CUDA.
        weights = self._current_weights()
        dev = input.device.type
        if torch.is_autocast_enabled(dev) and input.is_floating_point():
            dt = torch.get_autocast_dtype(dev)
            input = input.to(dt)
            weights = [w.to(dt) for w in weights]
            hx = tuple(h.to(dt) for h in hx) if is_lstm else hx.to(dt)
        with torch.autocast(dev, enabled=False):
            output, hidden = Fn.rnn(
                Fn.cell_name(self.mode), input, hx, weights, has_bias=self.bias,
                num_layers=self.num_layers, dropout=float(self.dropout), training=self.training,
                bidirectional=self.bidirectional, batch_first=self.batch_first,
                batch_sizes=batch_sizes, proj_size=self.proj_size, backend=self._sequence_backend,
                kernel_options=self.kernel_options)

        if packed:
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if is_lstm else hidden.squeeze(1)
        return output, self.permute_hidden(hidden, unsorted_indices)


class RNN(_TritonRNNMixin, nn.RNN):
    """Elman RNN (``tanh`` or ``relu``); ``torch.nn.RNN`` plus ``backend=``."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_backend(backend)


class GRU(_TritonRNNMixin, nn.GRU):
    """Gated recurrent unit; ``torch.nn.GRU`` plus ``backend=``."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_backend(backend)


class LSTM(_TritonRNNMixin, nn.LSTM):
    """Long short-term memory, with optional ``proj_size``; ``torch.nn.LSTM`` plus ``backend=``."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_backend(backend)
