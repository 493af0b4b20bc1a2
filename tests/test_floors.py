"""``benchmarks/floors.py``'s grid-barrier kernels: correct in the interpreter, and ordered
as a barrier must be in their sm_90 compile (the GPU measures their latency)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.floors import BARRIER_VARIANTS, measure_barrier

REPO = str(Path(__file__).resolve().parent.parent)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter smoke test")
def test_every_barrier_variant_counts_every_arrival():
    """One program through Triton's interpreter: each variant's counter must read 1 after
    one barrier (``measure_barrier`` checks it) and its loop of barriers must return."""
    res = measure_barrier(torch.device("cpu"), tiny=True)
    for name in BARRIER_VARIANTS:
        got = res if name == "library" else res["variants"][name]
        assert not got["errors"], (name, got["errors"])
        assert set(got["latency_us"]) == {"1"}, name


def test_barrier_variants_compile_to_release_and_acquire():
    """The arrival must be a GPU-scope release add and the wait end in a GPU-scope acquire
    read, on the Triton in use. (Triton 3.6 drops an acquire read whose value is unused:
    a first version of the ``poll`` variant lost its acquire that way.)"""
    script = (
        "import json, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from benchmarks.floors import BARRIER_VARIANTS, _barrier_kernel\n"
        "from triton_rnn.kernels.inspect import barrier_ordering\n"
        "sig = {'counter_ptr': '*i32', 'n_iters': 'i32'}\n"
        "out = {}\n"
        "for v in BARRIER_VARIANTS:\n"
        "    src = ASTSource(fn=_barrier_kernel(v), signature=sig, constexprs={})\n"
        "    c = triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': 4})\n"
        "    out[v] = barrier_ordering(c.asm['ptx'])\n"
        "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {v: "release-acquire" for v in BARRIER_VARIANTS}
