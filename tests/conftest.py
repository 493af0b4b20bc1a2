"""Test set-up shared by every test file.

Without a GPU the Triton kernels run in Triton's interpreter, which must be
switched on before ``triton`` defines any kernel, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

#: Tolerances against the float64 torch.nn reference, per storage dtype.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}
#: Gradients sum over time and batch: a little more room.
GRAD_TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=1e-1),
    torch.float64: dict(atol=1e-9, rtol=1e-9),
}


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty`` return NaN-filled (or max-int) tensors, so unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return empty


@pytest.fixture
def one_thread():
    """One intra-op thread: much faster for tiny models on a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped, loudly, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
