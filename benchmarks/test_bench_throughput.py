"""pytest-benchmark suites: throughput of forward and forward+backward.

Every implementation runs on the same inputs and weights in one process:
``triton`` (persistent kernels), ``triton_stepwise`` (one launch per step),
``torch`` (cuDNN on a GPU) and ``flashrnn`` (when ``import flashrnn`` works
and a GPU is present; skipped otherwise). ``benchmark.extra_info`` carries the
shape, tokens/s and achieved TFLOP/s.

On a GPU (sizes from ``TRITON_RNN_BENCH_T``/``_B``/``_H``/``_DTYPE``)::

    pytest benchmarks --benchmark-json=bench.json --benchmark-group-by=group

Without one they run at T=4, B=2, H=8 in fp32 through Triton's interpreter,
one round each, as smoke tests (``--benchmark-disable`` is fine too).
"""

from __future__ import annotations

import os

import pytest
import torch

from triton_rnn import bench as B

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    T = int(os.environ.get("TRITON_RNN_BENCH_T", 512))
    BATCH = int(os.environ.get("TRITON_RNN_BENCH_B", 32))
    H = int(os.environ.get("TRITON_RNN_BENCH_H", 1024))
    DTYPE = os.environ.get("TRITON_RNN_BENCH_DTYPE", "bf16")
    ROUNDS, WARMUP = 20, 3
else:
    T, BATCH, H, DTYPE = 4, 2, 8, "fp32"
    ROUNDS, WARMUP = 1, 0


@pytest.fixture(scope="module")
def cases():
    """One :class:`triton_rnn.bench.Case` per (cell, pass), shared by all implementations."""
    built: dict = {}

    def get(cell: str, pass_: str) -> B.Case:
        shape = B.Shape(cell, H, BATCH, T, DTYPE, pass_)
        if shape not in built:
            impls = list(B.IMPLS) if CUDA and B.flashrnn_available() else [
                n for n in B.IMPLS if n != "flashrnn"]
            built[shape] = B.Case(shape, DEVICE, impls, n_sets=3 if CUDA else 2)
        return built[shape]

    yield get
    built.clear()
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("impl", B.IMPLS)
@pytest.mark.parametrize("pass_", B.PASSES)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_throughput(benchmark, cases, cell, pass_, impl):
    if impl == "flashrnn" and not (CUDA and B.flashrnn_available()):
        pytest.skip("FlashRNN needs a CUDA device and `import flashrnn`")
    if impl.startswith("triton") and os.environ.get("TRITON_RNN_BENCH_NO_INTERPRETER"):
        pytest.skip("the kernels were imported before TRITON_INTERPRET=1 could be set")
    case = cases(cell, pass_)
    shape = case.shape
    fn = case.fns[impl]
    counts = B.model_counts(shape)
    benchmark.group = f"{cell} {pass_} {DTYPE} T={T} B={BATCH} H={H}"
    benchmark.extra_info.update(shape.to_dict())
    benchmark.extra_info.update(impl=impl, flops=counts["flops"], bytes=counts["bytes"],
                                device=str(DEVICE))
    outs = []

    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        outs.append(out)

    def setup():
        outs.clear()
        case.reset_grads()

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)

    out = outs[-1].detach()
    assert out.numel() == T * BATCH * H
    assert torch.isfinite(out.float()).all()
    if pass_ == "fwdbwd" and impl != "flashrnn":
        gx = case.sets[(case._i - 1) % len(case.sets)]["x"].grad
        assert gx is not None and gx.shape == (T, BATCH, H)
    stats = getattr(benchmark, "stats", None)
    median_s = getattr(getattr(stats, "stats", None), "median", None)
    if median_s:
        benchmark.extra_info["tokens_per_s"] = shape.tokens / median_s
        benchmark.extra_info["tflops"] = counts["flops"] / median_s / 1e12
