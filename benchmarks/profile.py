"""Profile one benchmark shape with ``torch.profiler``: where a call's time goes.

    python -m benchmarks.profile --cell gru --hidden 1024 --batch 16 --directions 2 \\
        --pass fwdbwd --impls triton,triton_one_stream,torch --out trace-dir

For each implementation (the same modules and inputs as ``triton-rnn bench``,
:class:`triton_rnn.bench.Case`) it runs a few warm-up calls, then profiles
``--iters`` calls, prints the kernels by GPU time, and a per-call timeline
summary: wall time, GPU busy time (the union of kernel intervals), the time
two streams ran kernels at once, and the host time spent inside CUDA API
calls. ``--out DIR`` also writes one Chrome trace per implementation
(``DIR/<impl>.json``, open in Perfetto or ``chrome://tracing``).

On a CPU it runs through Triton's interpreter at whatever size is asked (use a
tiny one): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _union_length(intervals):
    """Total length covered by ``[(start, end), ...]``."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def timeline_summary(trace: dict, iters: int) -> dict:
    """Per-call figures (µs) from a Chrome trace of ``iters`` profiled calls."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    by_stream: dict = {}
    for e in kernels:
        by_stream.setdefault(e.get("args", {}).get("stream", e.get("tid")), []).append(
            (e["ts"], e["ts"] + e["dur"]))
    busy = _union_length(spans)
    # Overlap: time covered by kernels of two or more streams at once.
    per_stream = [_union_length(v) for v in by_stream.values()]
    overlap = sum(per_stream) - busy
    first = min((s for s, _ in spans), default=0.0)
    last = max((e for _, e in spans), default=0.0)
    return {
        "calls": iters,
        "kernels_per_call": len(kernels) / iters,
        "gpu_span_us": (last - first) / iters,
        "gpu_busy_us": busy / iters,
        "streams": len(by_stream),
        "two_streams_at_once_us": overlap / iters,
        "cuda_api_us": sum(e["dur"] for e in runtime) / iters,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--pass", dest="pass_", choices=("fwd", "fwdbwd"), default="fwdbwd")
    p.add_argument("--directions", type=int, choices=(1, 2), default=1)
    p.add_argument("--proj", type=int, default=0)
    p.add_argument("--impls", default="triton,torch",
                   help="comma-separated, as for triton-rnn bench (default triton,torch)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="directory for the Chrome traces")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from triton_rnn import bench as B

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = B.Shape(cell=args.cell, hidden=args.hidden, batch=args.batch,
                    seq_len=args.seq_len, dtype=args.dtype, pass_=args.pass_,
                    directions=args.directions, proj=args.proj)
    impls = [s for s in args.impls.split(",") if s]
    case = B.Case(shape, device, impls, n_sets=3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{shape.key} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    for name in impls:
        fn = case.fns.get(name)
        if fn is None:
            print(f"\n== {name}: not available for this shape")
            continue
        for _ in range(args.warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        sync()
        wall = (time.perf_counter() - t0) / args.iters * 1e6
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                fn()
            sync()
        trace_path = (args.out / f"{name}.json") if args.out else Path(f"/tmp/profile-{name}.json")
        prof.export_chrome_trace(str(trace_path))
        summary = timeline_summary(json.loads(trace_path.read_text()), args.iters)
        summary["wall_us_unprofiled"] = wall
        print(f"\n== {name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in summary.items()))
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
