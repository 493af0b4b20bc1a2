"""Measure the ceilings that the benchmark floors are built on, and write them to JSON.

    python -m benchmarks.floors --out floors.json [--tiny]

* copy bandwidth: a large device-to-device copy of random data, counting the
  bytes read plus the bytes written (GB/s);
* matrix rate: a large ``torch.matmul`` of random bf16, fp16, fp32 (IEEE) and
  fp32 with TF32 allowed (TFLOP/s);
* grid-barrier latency: a tiny Triton kernel that runs N of the library's
  ``grid_barrier`` calls (``triton_rnn.kernels.recurrent.grid_barrier``) over a
  cooperatively launched grid of 1 to 2 x SM-count programs; the latency is
  ``(t(N) - t(0)) / N`` (microseconds per barrier, by number of programs). A
  variant that polls differently is timed beside it (see ``_barrier_kernel``).

Every measurement is independent: one that fails is recorded under ``errors``
and the others go on, and the JSON file is rewritten after each. The barrier is
measured in a child process with a time limit, so a barrier that never returns
costs that limit and not the whole run.

``triton-rnn bench --floors FILE`` reads the file. On a machine without CUDA
(or with ``--tiny``) the sizes are tiny and the numbers mean nothing: it is a
smoke test of the script (the barrier then runs one program through Triton's
interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

SCHEMA = "triton-rnn-floors/1"


def _timer(device) -> Callable[[Callable[[], object]], float]:
    """Median ms of a callable: ``do_bench`` on a GPU, the host clock on the CPU."""
    import torch

    if device.type == "cuda":
        from triton.testing import do_bench

        def t(fn):
            try:
                return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
            except TypeError:  # an older do_bench
                return float(do_bench(fn, warmup=25, rep=200, quantiles=[0.5]))
        return t

    def host(fn):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return float(statistics.median(times))
    del torch
    return host


def measure_copy(device, tiny: bool) -> dict:
    import torch

    n = (4 << 20) if tiny else (256 << 20)  # fp32 elements: 16 MiB or 1 GiB
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = _timer(device)(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    return {"bytes": nbytes, "ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9}


def measure_matmul(device, tiny: bool, kind: str) -> dict:
    import torch

    n = 128 if tiny else 8192
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "tf32": torch.float32}[kind]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        ms = _timer(device)(lambda: torch.matmul(a, b, out=c))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return {"n": n, "ms": ms, "tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12}


# --------------------------------------------------------------------------
# Grid barrier (run in a child process: ``--barrier-only``)
# --------------------------------------------------------------------------


#: Barrier variants timed: the library's, and a candidate to replace it.
BARRIER_VARIANTS = ("library", "poll")


def _barrier_kernel(variant: str = "library"):
    """A kernel that runs ``n_iters`` grid barriers over the whole grid.

    ``library``: :func:`triton_rnn.kernels.recurrent.grid_barrier`, the kernels' own. On
    sm_90 its wait compiles to thread 0 reading the counter (``LDG.E.STRONG.GPU``, then
    ``CCTL.IVALL``) and handing it to the others through shared memory, with two
    ``BAR.SYNC`` per poll. ``poll``: every thread polls the counter with a volatile load
    (``LDG.E.STRONG.SYS``, no block barrier per poll), then one acquire read (kept in a
    loop on its value) orders what follows. Same arrival (a release add). Timed side by side, so a GPU run says whether
    the kernels should switch.
    """
    import triton
    import triton.language as tl

    from triton_rnn.kernels.recurrent import grid_barrier  # the library's own barrier

    # A jitted function resolves the functions it calls in its module's globals.
    globals()["grid_barrier"] = grid_barrier

    # n_iters is 1, 0 and 1000: not specialised, one compile each.
    @triton.jit(do_not_specialize=["n_iters"])
    def barrier_loop(counter_ptr, n_iters):
        n = tl.num_programs(0)
        for i in range(n_iters):
            grid_barrier(counter_ptr, (i + 1) * n)

    @triton.jit(do_not_specialize=["n_iters"])
    def poll_loop(counter_ptr, n_iters):
        n = tl.num_programs(0)
        for i in range(n_iters):
            target = (i + 1) * n
            tl.debug_barrier()
            tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
            while tl.load(counter_ptr, volatile=True) < target:
                pass
            # Once, normally; an acquire read whose value goes unused is dropped by
            # Triton 3.6 (the static report's barrier_ordering saw it).
            while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
                pass
            tl.debug_barrier()

    return {"library": barrier_loop, "poll": poll_loop}[variant]


def measure_barrier(device, tiny: bool, on_progress: Optional[Callable[[dict], None]] = None
                    ) -> dict:
    """Barrier latency by grid size, for the library's barrier (``latency_us``) and the
    other :data:`BARRIER_VARIANTS` (``variants.<name>``). ``on_progress`` gets the result
    so far after each variant (the child process saves it: a kill keeps what was done)."""
    import torch

    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        grids = sorted({1, 8, 32, max(1, sms // 2), sms, 2 * sms})
        n_iters = 1000
    else:
        grids = [1]  # the interpreter runs programs one after another
        n_iters = 4
    out = {"source": "triton_rnn.kernels.recurrent.grid_barrier", "n_iters": n_iters,
           "variants": {}}
    coop = {"launch_cooperative_grid": True} if device.type == "cuda" else {}
    for variant in BARRIER_VARIANTS:
        res = _measure_barrier_variant(_barrier_kernel(variant), device, grids, n_iters, coop)
        if variant == "library":
            out.update(res)
        else:
            out["variants"][variant] = res
        out["cooperative"] = bool(coop)
        if on_progress is not None:
            on_progress(out)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        out["full_grid"] = sms
        out["latency_us_full"] = out["latency_us"].get(str(sms))
    return out


def _measure_barrier_variant(kernel, device, grids, n_iters, coop) -> dict:
    """``latency_us``, ``raw`` and ``errors`` of one barrier kernel; ``coop`` is emptied
    (and ``cooperative_error`` set) if this Triton cannot launch cooperatively."""
    import torch

    from triton_rnn.kernels.launch import COMPILE_OPTIONS

    counter = torch.zeros(1, dtype=torch.int32, device=device)
    timer = _timer(device)
    out = {"latency_us": {}, "raw": {}, "errors": {}}

    def launch(g, n):
        counter.zero_()
        kernel[(g,)](counter, n, num_warps=4, **COMPILE_OPTIONS, **coop)

    for g in grids:
        try:
            try:
                launch(g, 1)
            except Exception as e:  # noqa: BLE001 - no cooperative launch in this Triton?
                if not coop:
                    raise
                # A kernel this small fits 2 x SM-count programs at once even without it.
                coop.clear()
                out["cooperative_error"] = f"{type(e).__name__}: {e}"
                launch(g, 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            got = int(counter.item())
            if got != g:
                raise RuntimeError(f"counter is {got} after one barrier of {g} programs")
            t0 = timer(lambda: launch(g, 0))
            tn = timer(lambda: launch(g, n_iters))
            out["raw"][str(g)] = {"ms_0": t0, "ms_n": tn}
            out["latency_us"][str(g)] = max(0.0, (tn - t0) / n_iters * 1e3)
        except Exception as e:  # noqa: BLE001 - one grid size failing stops the larger ones
            out["errors"][str(g)] = f"{type(e).__name__}: {e}"
            break
    return out


def _barrier_in_child(device, tiny: bool, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "barrier.json"
        cmd = [sys.executable, "-m", "benchmarks.floors", "--barrier-only", "--out", str(path),
               "--device", str(device)] + (["--tiny"] if tiny else [])
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                                  cwd=root)
        except subprocess.TimeoutExpired:
            msg = (f"barrier measurement did not finish in {timeout_s:.0f} s "
                   "(a barrier that never returns?)")
            if not path.exists():
                raise RuntimeError(msg) from None
            res = json.loads(path.read_text())  # the variants measured before the limit
            res.setdefault("errors", {})["child"] = msg
            return res
        if path.exists():
            res = json.loads(path.read_text())
            if proc.returncode != 0:
                res.setdefault("errors", {})["child"] = proc.stderr[-2000:]
            return res
        raise RuntimeError(f"barrier child failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


# --------------------------------------------------------------------------


def _save(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def summarize(path: Path) -> str:
    """The ceilings of a floors JSON file as a markdown section (for device_check's summary)."""
    try:
        d = json.loads(Path(path).read_text())
    except Exception as e:  # noqa: BLE001 - a missing or partial file is reported, not raised
        return f"ceilings: unavailable ({type(e).__name__})\n"
    lines = ["## ceilings", ""]
    bw = d.get("copy_bandwidth_gbps")
    lines.append(f"- copy bandwidth: {bw:.0f} GB/s" if bw else "- copy bandwidth: unavailable")
    lines += [f"- matmul {k}: {v:.1f} TFLOP/s" for k, v in (d.get("matmul_tflops") or {}).items()]
    variants = d.get("barrier_variants_latency_us") or {}
    lines += [f"- grid barrier over {k} programs: {v:.3f} us" + "".join(
                  f" ({name} variant: {lat[k]:.3f} us)" for name, lat in variants.items()
                  if k in lat)
              for k, v in (d.get("barrier_latency_us") or {}).items()]
    if d.get("errors"):
        lines.append(f"- errors: {json.dumps(d['errors'])[:800]}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.floors", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="floors.json", help="JSON file to write (default floors.json)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (default without CUDA)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--barrier-timeout", type=float, default=60.0,
                    help="seconds the barrier child may take (default 60)")
    ap.add_argument("--skip", default="", help="comma list of copy,matmul,barrier to skip")
    ap.add_argument("--barrier-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--summarize", metavar="FILE", help="print FILE's ceilings as markdown, and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or device.type != "cuda"
    if device.type != "cuda":
        # Without a GPU the barrier kernel runs in Triton's interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = Path(args.out)

    if args.barrier_only:
        _save(measure_barrier(device, tiny, on_progress=lambda res: _save(res, out)), out)
        return 0

    from triton_rnn.bench import environment

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    doc = {"schema": SCHEMA, "tiny": tiny, "env": environment(device), "errors": {},
           "copy_bandwidth_gbps": None, "matmul_tflops": {}, "barrier_latency_us": {},
           "barrier_variants_latency_us": {},
           "barrier_latency_us_full": None}
    _save(doc, out)

    def step(name, fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - record and go on
            doc["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"floors: {name} failed: {doc['errors'][name]}", file=sys.stderr)
            traceback.print_exc()
        print(f"floors: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        _save(doc, out)

    if "copy" not in skip:
        def copy():
            doc["copy"] = measure_copy(device, tiny)
            doc["copy_bandwidth_gbps"] = doc["copy"]["gbps"]
        step("copy", copy)
    if "matmul" not in skip:
        doc["matmul"] = {}
        kinds = ("bf16", "fp16", "tf32", "fp32") if device.type == "cuda" else ("bf16", "fp16", "fp32")
        for kind in kinds:
            def mm(kind=kind):
                doc["matmul"][kind] = measure_matmul(device, tiny, kind)
                doc["matmul_tflops"][kind] = doc["matmul"][kind]["tflops"]
            step(f"matmul_{kind}", mm)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "barrier" not in skip:
        def barrier():
            res = _barrier_in_child(device, tiny, args.barrier_timeout)
            doc["barrier"] = res
            doc["barrier_latency_us"] = res.get("latency_us", {})
            doc["barrier_latency_us_full"] = res.get("latency_us_full")
            doc["barrier_variants_latency_us"] = {
                k: v.get("latency_us", {}) for k, v in (res.get("variants") or {}).items()}
            errors = {k: v for k, v in [("library", res.get("errors"))] + [
                (k, v.get("errors")) for k, v in (res.get("variants") or {}).items()] if v}
            if errors:
                doc["errors"]["barrier"] = errors
        step("barrier", barrier)

    bw = doc["copy_bandwidth_gbps"]
    print(f"copy bandwidth: {bw:.1f} GB/s" if bw else "copy bandwidth: unavailable")
    for k, v in doc["matmul_tflops"].items():
        print(f"matmul {k}: {v:.2f} TFLOP/s")
    for k, v in doc["barrier_latency_us"].items():
        others = "".join(f", {name} {lat[k]:.3f} us"
                         for name, lat in doc.get("barrier_variants_latency_us", {}).items()
                         if k in lat)
        print(f"grid barrier, {k} programs: {v:.3f} us{others}")
    if not doc["barrier_latency_us"]:
        print("grid barrier: unavailable")
    print(f"floors: wrote {out}" + (" (tiny: the numbers mean nothing)" if tiny else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
