"""Static pruning, GPU timing and selection of a tile per kernel key.

Tuning one :class:`~triton_rnn.autotune.space.KernelKey` runs three steps:

1. **Candidates**: :func:`~triton_rnn.autotune.space.candidate_configs`
   (the default first, 6 to 16 configs).
2. **Static pruning** (no GPU needed): each candidate is compiled for
   ``sm_{arch}`` by ``triton_rnn.kernels.inspect.static_report`` at the
   bucket's largest batch (with the key's LSTM projection, if any), and
   dropped when it spills to local memory, needs more shared memory than a
   block can get, needs more than 255 registers per thread or more than
   65,536 per block, or launches more programs than can be resident at once
   (``grid > num_sms * blocks_per_sm``: the grid barrier would deadlock).
   :func:`drop_reasons` says why.
3. **Timing** (GPU): every survivor is timed by a *timer*, a callable
   ``timer(key, config) -> milliseconds``. The default :class:`ModuleTimer`
   runs a one-layer ``triton_rnn`` module with ``kernel_options`` set to the
   candidate, on fresh random inputs rotated between calls, and takes the
   median of ``triton.testing.do_bench`` after a warm-up. Tests inject their
   own timer. The fastest survivor is the challenger (ties go to the earlier
   candidate, i.e. the one nearest the default); the timings of all survivors
   are recorded.
4. **Confirmation**: a challenger other than the default is timed again
   against the default, alternating, :data:`CONFIRM_ROUNDS` more times each.
   It wins only if its median beats the default's by :data:`MIN_GAIN`;
   otherwise the default is kept. One lucky measurement (clock boost, a
   neighbour's kernel) never replaces the default with a config that is not
   really faster, so the tuned pick is at least as fast as the default.

The *default* a result is compared with is the heuristic default when the
static check keeps it, else the first kept candidate in preference order:
exactly what :func:`~triton_rnn.autotune.space.heuristic_config` returns with
a static checker.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..kernels.config import KernelConfig
from .space import KernelKey, candidate_configs, heuristic_config

__all__ = [
    "MAX_REGISTERS_PER_THREAD", "MAX_REGISTERS_PER_BLOCK",
    "drop_reasons", "prune", "PruneResult", "TuneResult", "ModuleTimer",
    "get_static_report", "tune", "tune_and_store", "make_entry", "MIN_GAIN", "CONFIRM_ROUNDS",
]

MAX_REGISTERS_PER_THREAD = 255
MAX_REGISTERS_PER_BLOCK = 65536
#: Relative speed-up over the default that a tuned config must show (confirmed medians).
MIN_GAIN = 0.02
#: Extra alternating timings of the default and the challenger before a switch.
CONFIRM_ROUNDS = 3

Timer = Callable[[KernelKey, KernelConfig], float]


def get_static_report():
    """``triton_rnn.kernels.inspect.static_report``; RuntimeError when it is missing."""
    try:
        from ..kernels.inspect import static_report
    except ImportError as e:
        raise RuntimeError("static pruning needs triton_rnn.kernels.inspect.static_report, "
                           f"which is not available ({e})") from None
    return static_report


def drop_reasons(report: dict) -> List[str]:
    """Why a compiled config cannot run well (empty list: keep it).

    Reads the keys of ``static_report``: ``local_bytes``/``stack_bytes``
    (spills), ``shared_bytes`` vs ``max_shared_bytes``, ``registers`` and
    ``num_warps``, ``grid`` vs ``num_sms * blocks_per_sm``, and, for a grid
    barrier, ``barrier_ordering`` (release on arrival, acquire on the wait). ``grid`` may be
    a number of programs, or ``[grid_b, grid_h]`` as the kernel author's report
    gives it; then the programs that must be resident together for the grid
    barrier are the ``programs`` of a split hidden dimension (``grid_h > 1``;
    the launcher loops extra batch tiles inside the programs). A report with
    an ``error`` (the compiler refused the config) is dropped with it.
    """
    if report.get("error"):
        return [f"does not compile: {str(report['error']).splitlines()[0][:300]}"]
    reasons = []
    local = int(report.get("local_bytes", 0) or 0)
    stack = int(report.get("stack_bytes", 0) or 0)
    if local > 0 or stack > 0:
        what = " and ".join(s for s in (f"{local} B local" if local else "",
                                        f"{stack} B stack" if stack else "") if s)
        reasons.append(f"spills to local memory ({what} per thread)")
    shared, max_shared = int(report.get("shared_bytes", 0)), report.get("max_shared_bytes")
    if max_shared is not None and shared > int(max_shared):
        reasons.append(f"needs {shared} B shared memory > {int(max_shared)} B per block")
    regs = int(report.get("registers", 0))
    threads = int(report.get("num_warps", 0)) * 32
    if regs > MAX_REGISTERS_PER_THREAD:
        reasons.append(f"needs {regs} registers/thread > {MAX_REGISTERS_PER_THREAD}")
    if regs * threads > MAX_REGISTERS_PER_BLOCK:
        reasons.append(f"needs {regs}x{threads} = {regs * threads} registers/block "
                       f"> {MAX_REGISTERS_PER_BLOCK}")
    grid = report.get("grid")
    bps, sms = report.get("blocks_per_sm"), report.get("num_sms")
    if grid is not None and bps is not None and sms is not None:
        capacity = int(sms) * int(bps)
        if isinstance(grid, (list, tuple)):
            barrier = len(grid) > 1 and int(grid[-1]) > 1
            programs = int(report.get("programs") or math.prod(int(g) for g in grid))
        else:
            barrier, programs = True, int(grid)
        if int(bps) < 1:
            reasons.append(f"not even one block fits on an SM ({int(sms)} SMs x 0 blocks/SM)")
        elif barrier and programs > capacity:
            reasons.append(f"grid of {programs} programs cannot be co-resident "
                           f"({int(sms)} SMs x {int(bps)} blocks/SM = {capacity}): "
                           "the grid barrier would deadlock")
        # "none" (no atomics at all) is only wrong where the report shows a split grid.
        ordering = report.get("barrier_ordering")
        if barrier and ordering not in (None, "release-acquire") and (
                ordering != "none" or isinstance(grid, (list, tuple))):
            reasons.append(f"grid barrier not ordered ({ordering}): a step could read "
                           "the previous step's state before it is visible"
                           if ordering != "none" else
                           "split hidden dimension compiled without a grid barrier")
    return reasons


def _batched_reports(key: KernelKey, configs) -> Optional[list]:
    """All reports at once, from subprocesses, when ``TRITON_INTERPRET`` is set in this process.

    The jitted kernels cannot be compiled for a GPU in an interpreting process;
    ``static_report`` then starts one subprocess per call. ``static_reports``
    shares all candidates among a few subprocesses, each importing Triton once.
    """
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    try:
        from ..kernels.inspect import static_reports
    except ImportError:
        return None
    return static_reports([dict(cell=key.cell, pass_=key.pass_, dtype=key.dtype,
                                hidden=key.hidden, batch=key.batch_bucket,
                                config=c.to_dict(), arch=key.arch, proj=key.proj)
                           for c in configs])


@dataclass
class PruneResult:
    kept: List[Tuple[KernelConfig, dict]] = field(default_factory=list)
    dropped: List[Tuple[KernelConfig, List[str]]] = field(default_factory=list)

    @property
    def kept_configs(self) -> List[KernelConfig]:
        return [c for c, _ in self.kept]


def prune(key: KernelKey, configs: Sequence[KernelConfig], report_fn=None,
          progress: bool = False, log: Optional[Callable[[str], None]] = None) -> PruneResult:
    """Compile every config for ``key`` (at the bucket's top batch) and split kept/dropped.

    ``report_fn`` defaults to ``static_report``. A config that fails to compile
    is dropped with the compiler's message. ``log`` (e.g. ``print``) gets one
    line per dropped config.
    """
    batched = None
    if report_fn is None:
        report_fn = get_static_report()
        batched = _batched_reports(key, configs)
    result = PruneResult()
    it = configs
    bar = None
    if progress and batched is None:
        from tqdm import tqdm
        bar = tqdm(configs, desc=f"compile {key}", unit="cfg", leave=False)
        it = bar
    for i, cfg in enumerate(it):
        try:
            if batched is not None:
                report = batched[i]
            else:
                report = report_fn(key.cell, key.pass_, key.dtype, key.hidden, key.batch_bucket,
                                   config=cfg, arch=key.arch, proj=key.proj)
            reasons = drop_reasons(report)
        except Exception as e:  # noqa: BLE001 - e.g. out of resources at compile time
            msg = str(e).strip().splitlines()
            report, reasons = None, [f"does not compile: {type(e).__name__}: "
                                     f"{msg[0] if msg else ''}"[:300]]
        if reasons:
            result.dropped.append((cfg, reasons))
            if log is not None:
                log(f"dropped {cfg}: {'; '.join(reasons)}")
        else:
            result.kept.append((cfg, report))
    if bar is not None:
        bar.close()
    return result


@dataclass
class TuneResult:
    key: KernelKey
    best: KernelConfig
    best_ms: float
    default: KernelConfig
    default_ms: Optional[float]
    #: one dict per kept candidate: ``{"config", "ms"}`` or ``{"config", "error"}``
    timings: List[dict]
    dropped: List[Tuple[KernelConfig, List[str]]]
    reports: Dict[KernelConfig, dict]
    #: the confirmation round, when a challenger was timed again against the default:
    #: ``{"challenger", "default_ms", "challenger_ms" (lists), "accepted"}``
    confirm: Optional[dict] = None

    @property
    def speedup(self) -> Optional[float]:
        if self.default_ms is None or not self.best_ms:
            return None
        return self.default_ms / self.best_ms


class ModuleTimer:
    """Times one candidate on the GPU through a one-layer ``triton_rnn`` module.

    The module is built with ``input_size == hidden`` (and, for an LSTM key
    with a projection, ``proj_size`` = the key's: its initial ``h``, its outputs
    and so the output gradients are then ``proj`` wide, its initial ``c`` stays
    ``hidden`` wide), given
    ``kernel_options = {"config"/"backward_config": candidate, "mode": "persistent"}``
    and run on ``rotate`` fresh ``randn`` inputs (and initial states, and output
    gradients for the backward pass), used in turn so no two consecutive calls
    see the same data. After ``warmup_calls`` calls (compilation) it returns the
    median of ``triton.testing.do_bench``. A forward key is timed as a training
    forward (the kernel also writes the activations the backward reads, which
    an inference call skips), since training is where the time goes. For a
    backward key it times forward plus backward, with the forward tile fixed to
    ``forward_config``.
    """

    def __init__(self, batch: int, seq_len: int = 64, direction: str = "uni", device="cuda",
                 forward_config: Optional[KernelConfig] = None, rotate: int = 4,
                 warmup_calls: int = 3, warmup_ms: int = 25, rep_ms: int = 100, seed: int = 0):
        self.batch, self.seq_len, self.direction = int(batch), int(seq_len), direction
        self.device, self.forward_config = device, forward_config
        self.rotate, self.warmup_calls = max(2, int(rotate)), int(warmup_calls)
        self.warmup_ms, self.rep_ms, self.seed = warmup_ms, rep_ms, seed

    def build(self, key: KernelKey):
        import torch
        import triton_rnn
        H = key.hidden
        kw = {"bidirectional": self.direction == "bi", "backend": "triton"}
        if key.cell == "lstm":
            if key.proj:
                kw["proj_size"] = key.proj
            m = triton_rnn.LSTM(H, H, **kw)
        elif key.cell == "gru":
            m = triton_rnn.GRU(H, H, **kw)
        else:
            m = triton_rnn.RNN(H, H, nonlinearity=key.cell.split("_")[1], **kw)
        return m.to(device=self.device, dtype=getattr(torch, key.dtype))

    def __call__(self, key: KernelKey, config: KernelConfig) -> float:
        import torch
        import triton.testing
        m = self.build(key)
        opts = {"mode": "persistent"}
        if key.pass_ == "forward":
            opts["config"] = config
        else:
            opts["backward_config"] = config
            if self.forward_config is not None:
                opts["config"] = self.forward_config
        m.kernel_options = opts
        dtype = getattr(torch, key.dtype)
        T, B, H = self.seq_len, self.batch, key.hidden
        R = key.proj or H  # the width of h (initial state, outputs): the projection's
        D = 2 if self.direction == "bi" else 1
        g = torch.Generator(device=self.device).manual_seed(self.seed)

        def rnd(*shape):
            return torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32).to(dtype)

        xs = [rnd(T, B, H) for _ in range(self.rotate)]
        hs = [rnd(D, B, R) for _ in range(self.rotate)]
        if key.cell == "lstm":
            hs = [(h, rnd(D, B, H)) for h in hs]  # c stays hidden wide
        gos = [rnd(T, B, D * R) for _ in range(self.rotate)] if key.pass_ == "backward" else None
        params = list(m.parameters())
        turn = [0]

        def run():
            i = turn[0] % self.rotate
            turn[0] += 1
            if gos is None:
                m(xs[i], hs[i])  # parameters require grad: the training forward
            else:
                out, _ = m(xs[i], hs[i])
                out.backward(gos[i])

        for _ in range(self.warmup_calls):
            run()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(
            run, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median",
            grad_to_none=params if gos is not None else None))


def _time_one(key, timer, cfg) -> float:
    """``timer(key, cfg)`` as milliseconds; ValueError unless finite and positive."""
    ms = float(timer(key, cfg))
    if not math.isfinite(ms) or ms <= 0:
        raise ValueError(f"timer returned {ms!r}")
    return ms


def _error_text(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _time_all(key, configs, timer, timings: list, log) -> None:
    for cfg in configs:
        try:
            timings.append({"config": cfg.to_dict(), "ms": _time_one(key, timer, cfg)})
        except Exception as e:  # noqa: BLE001 - one failing candidate must not end the tuning
            timings.append({"config": cfg.to_dict(), "error": _error_text(e)})
            if log is not None:
                log(f"timing {cfg} failed: {timings[-1]['error']}")


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


def _confirm(key, timer, default: KernelConfig, default_ms: float, challenger: KernelConfig,
             challenger_ms: float, rounds: int, min_gain: float, log) -> dict:
    """Time ``default`` and ``challenger`` again, alternating which goes first.

    The challenger is accepted if its median beats the default's by ``min_gain``;
    a challenger that fails to run is rejected.
    """
    times = {default: [default_ms], challenger: [challenger_ms]}
    error = None
    for r in range(rounds):
        for cfg in ((default, challenger) if r % 2 == 0 else (challenger, default)):
            try:
                times[cfg].append(_time_one(key, timer, cfg))
            except Exception as e:  # noqa: BLE001 - a flaky config must not end the tuning
                error = (cfg, _error_text(e))
        if error is not None:
            break
    d_med, c_med = _median(times[default]), _median(times[challenger])
    accepted = (error is None or error[0] != challenger) and c_med < d_med * (1.0 - min_gain)
    if log is not None:
        log(f"confirm {challenger} ({c_med:.4f} ms) against the default {default} "
            f"({d_med:.4f} ms): {'accepted' if accepted else 'default kept'}")
    out = {"challenger": challenger.to_dict(), "default_ms": times[default],
           "challenger_ms": times[challenger], "min_gain": min_gain, "accepted": accepted}
    if error is not None:
        out["error"] = f"{error[0]}: {error[1]}"
    return out


def tune(key: KernelKey, timer: Timer, *, report_fn=None, configs=None, progress: bool = False,
         log: Optional[Callable[[str], None]] = None, confirm_rounds: int = CONFIRM_ROUNDS,
         min_gain: float = MIN_GAIN) -> TuneResult:
    """Prune, time every survivor with ``timer``, confirm the fastest against the default.

    The result's ``best`` is the default unless a challenger's confirmed median
    beats it by ``min_gain`` (see the module doc); ``best_ms`` and
    ``default_ms`` are then the confirmed medians. Raises ``RuntimeError`` when
    no candidate survives pruning or none could be timed.
    """
    base = heuristic_config(key)
    configs = list(configs) if configs else candidate_configs(key, base)
    if base not in configs:  # always time the default: it is the reference for the speedup
        configs.insert(0, base)
    pruned = prune(key, configs, report_fn=report_fn, progress=progress, log=log)
    if not pruned.kept:
        raise RuntimeError(f"{key}: static pruning dropped all {len(configs)} candidates")
    kept = pruned.kept_configs
    default = base if base in kept else kept[0]
    timings = []
    it = kept
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(kept, desc=f"time {key}", unit="cfg", leave=False)
        it = bar
    from . import _tuning  # nested look-ups while timing must not start another tuning
    was_active = getattr(_tuning, "active", False)
    _tuning.active = True
    confirm = None
    try:
        _time_all(key, it, timer, timings, log)
        if bar is not None:
            bar.close()
        ok = [(t["ms"], i) for i, t in enumerate(timings) if "ms" in t]
        if not ok:
            raise RuntimeError(f"{key}: every candidate failed to run "
                               f"({timings[0].get('error')})")
        best_ms, best_i = min(ok)
        best = kept[best_i]
        default_ms = timings[kept.index(default)].get("ms")
        if best != default and default_ms is not None and confirm_rounds > 0:
            confirm = _confirm(key, timer, default, default_ms, best, best_ms, confirm_rounds,
                               min_gain, log)
    finally:
        _tuning.active = was_active
    if confirm is not None:
        default_ms = _median(confirm["default_ms"])
        if confirm["accepted"]:
            best_ms = _median(confirm["challenger_ms"])
        else:
            best, best_ms = default, default_ms
    return TuneResult(key=key, best=best, best_ms=best_ms, default=default,
                      default_ms=default_ms, timings=timings, dropped=pruned.dropped,
                      reports={c: r for c, r in pruned.kept}, confirm=confirm)


def make_entry(result: TuneResult, *, gpu: str, capability, batch: int, seq_len: int,
               direction: str) -> dict:
    """The JSON-able cache entry for ``result``."""
    report = result.reports.get(result.best) or {}
    static = {k: report[k] for k in ("registers", "shared_bytes", "local_bytes", "grid",
                                     "blocks_per_sm", "num_sms") if k in report}
    return {
        "kernel": result.key.to_dict(),
        "gpu": gpu,
        "capability": list(capability),
        "config": result.best.to_dict(),
        "ms": result.best_ms,
        "default_config": result.default.to_dict(),
        "default_ms": result.default_ms,
        "speedup": result.speedup,
        "timings": result.timings,
        "confirm": result.confirm,
        "dropped": [{"config": c.to_dict(), "reasons": r} for c, r in result.dropped],
        "static": static,
        "tuned_with": {"batch": int(batch), "seq_len": int(seq_len), "direction": direction},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def tune_and_store(key: KernelKey, *, gpu: str, capability, batch: int, seq_len: int = 64,
                   direction: str = "uni", timer: Optional[Timer] = None, report_fn=None,
                   device="cuda", forward_config: Optional[KernelConfig] = None,
                   configs=None, progress: bool = False, log=None, cache=None) -> TuneResult:
    """:func:`tune` then write the winner (and all timings) to the cache."""
    from .cache import TuneCache, entry_key
    if timer is None:
        timer = ModuleTimer(batch=batch, seq_len=seq_len, direction=direction, device=device,
                            forward_config=forward_config)
    result = tune(key, timer, report_fn=report_fn, configs=configs, progress=progress, log=log)
    cache = cache or TuneCache()
    cache.put(entry_key(key, gpu, capability),
              make_entry(result, gpu=gpu, capability=capability, batch=batch, seq_len=seq_len,
                         direction=direction))
    from . import reload
    reload()
    return result
