"""Fixtures of the pytest-benchmark suites in this folder.

Without CUDA the suites are smoke tests through Triton's interpreter:
``TRITON_INTERPRET=1`` is set here, before any kernel is defined. Sizes (GPU
only) come from the environment: ``TRITON_RNN_BENCH_T``, ``_B``, ``_H`` and
``_DTYPE`` (defaults 512, 32, 1024, bf16).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    if any(m.startswith(("triton_rnn.kernels", "triton_rnn.autograd")) for m in sys.modules):
        # Too late for this process: the kernels were defined for a GPU.
        os.environ["TRITON_RNN_BENCH_NO_INTERPRETER"] = "1"
    else:
        os.environ["TRITON_INTERPRET"] = "1"


def _have_pytest_benchmark() -> bool:
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        return False
    return True


if not _have_pytest_benchmark():
    class _OneShot:
        """Stand-in for pytest-benchmark's fixture: runs the function once, times nothing."""

        def __init__(self):
            self.extra_info: dict = {}
            self.group = None
            self.stats = None

        def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, iterations=1,
                     warmup_rounds=0):
            if setup is not None:
                setup()
            return target(*args, **(kwargs or {}))

        def __call__(self, target, *args, **kwargs):
            return target(*args, **kwargs)

    @pytest.fixture
    def benchmark():
        return _OneShot()
