"""triton-rnn: persistent Triton kernels for LSTM, GRU and RNN.

``triton_rnn.GRU``, ``LSTM`` and ``RNN`` are drop-in replacements for their
``torch.nn`` twins; see :mod:`triton_rnn.modules`.
"""

__version__ = "0.1.0"

from .modules import GRU, LSTM, RNN  # noqa: E402

__all__ = ["GRU", "LSTM", "RNN", "__version__"]
