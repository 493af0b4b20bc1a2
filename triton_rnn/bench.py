"""Throughput benchmark of the Triton kernels against cuDNN (``torch.nn``) and FlashRNN.

:func:`run_grid` walks a grid of shapes (cell, hidden size, batch, sequence
length, dtype, pass). For each shape it builds one ``triton_rnn`` module and
copies its weights into every peer, draws a few sets of random inputs, and
times every implementation on the same inputs in the same process:

* ``triton``: ``triton_rnn`` with the persistent kernels (the default path);
* ``triton_stepwise``: ``triton_rnn`` with one launch per timestep, the
  non-persistent baseline that shows what persistence buys;
* ``torch``: ``torch.nn.GRU``/``LSTM``, which is cuDNN on a GPU. torch.nn
  flattens its weights into cuDNN's buffer only in fp16/fp32/fp64; in bf16 every
  call would first copy them into one (its "not part of single contiguous chunk
  of memory" warning). The benchmark flattens them in bf16 too
  (:func:`flatten_for_cudnn`), so cuDNN is timed at its best;
* ``flashrnn``: FlashRNN's fused CUDA kernels, when ``import flashrnn`` works;
* ``triton_one_stream`` (only when asked for): for bidirectional shapes, the
  persistent kernels with the two directions one after the other on one
  stream, which shows what overlapping them buys.

Timing (GPU): :func:`triton.testing.do_bench` medians from CUDA events after
its warm-up, with the L2 cache flushed between calls and gradients reset
outside the timed region. Each call takes the next of ``n_sets`` input sets, so
no two consecutive calls read the same buffers. Implementations are measured
in ``rounds`` alternating rounds (the order rotates each round) and the
reported time is the median of the round medians. On a CPU (Triton's
interpreter) a host clock is used instead: those numbers only prove that the
path runs.

``fwd`` is inference (under ``torch.no_grad``); ``fwdbwd`` is a training step's
forward plus ``backward`` with a random output gradient, including the input
gradient (as for a layer above the first). An LSTM shape with ``proj`` > 0 is
an LSTM with ``proj_size=proj`` (LSTMP). FlashRNN has neither a projection nor
a bidirectional layer: it is "not available" on those shapes.

Next to each time, :func:`floor_model` gives an analytic floor for the shape
(FLOPs over the measured matrix rate, fewest bytes over the measured copy
bandwidth, grid barriers times the measured barrier latency; see
``benchmarks/floors.py``) and the achieved fraction of it.

The results are one JSON document (:func:`save_json`, rewritten after every
shape so that a run killed half way still leaves its numbers), a plain-text
table (:func:`format_table`), a markdown table (:func:`markdown_report`) and a
PNG of speedup against batch size (:func:`plot`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

SCHEMA = "triton-rnn-bench/1"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GATES = {"gru": 3, "lstm": 4}
PASSES = ("fwd", "fwdbwd")
#: Every implementation the runner runs by default, in table order. ``torch`` is the reference.
IMPLS = ("triton", "triton_stepwise", "torch", "flashrnn")
#: Run only when asked for (``--impls``).
EXTRA_IMPLS = ("triton_one_stream",)
REFERENCE = "torch"
#: The error of an implementation that does not cover a shape (it does not fail it).
NOT_AVAILABLE = "not available"
#: FlashRNN's backend: its fused CUDA kernels (it switches GRU to its ``cuda`` kernels itself).
FLASHRNN_BACKEND = os.environ.get("TRITON_RNN_FLASHRNN_BACKEND", "cuda_fused")

#: The full grid of the issue: 2 cells x 4 hidden x 5 batch x 2 lengths x 3 dtypes x 2 passes.
FULL_GRID = dict(cells=["gru", "lstm"], hidden=[256, 512, 1024, 2048], batch=[1, 8, 32, 128, 256],
                 seq_len=[128, 512], dtypes=["bf16", "fp16", "fp32"], passes=["fwd", "fwdbwd"])
#: A few minutes on one GPU.
QUICK_GRID = dict(cells=["gru", "lstm"], hidden=[256, 1024], batch=[8, 64], seq_len=[128],
                  dtypes=["bf16"], passes=["fwd", "fwdbwd"])
#: CPU smoke test through Triton's interpreter (fp32: the interpreter's bf16 dot is wrong).
TINY_GRID = dict(cells=["gru", "lstm"], hidden=[8], batch=[1, 2], seq_len=[4],
                 dtypes=["fp32"], passes=["fwd", "fwdbwd"])


class ContextLost(RuntimeError):
    """The CUDA context is unusable (a sticky error such as an illegal address)."""


@dataclass(frozen=True)
class Shape:
    cell: str
    hidden: int
    batch: int
    seq_len: int
    dtype: str
    pass_: str
    directions: int = 1  # 2: a bidirectional layer
    proj: int = 0  # LSTM only: proj_size (0: no projection)

    @property
    def label(self) -> str:
        """The cell, with ``-bi`` for a bidirectional layer and ``-p<proj>`` for a projection."""
        return _cell_label({"cell": self.cell, "directions": self.directions, "proj": self.proj})

    @property
    def key(self) -> str:
        cell = _cell_label({"cell": self.cell, "directions": self.directions})
        return (f"{cell}-{self.pass_}-{self.dtype}-T{self.seq_len}-B{self.batch}"
                f"-H{self.hidden}" + (f"-P{self.proj}" if self.proj else ""))

    @property
    def out_size(self) -> int:
        """Width of the output and of ``h``: ``proj``, else ``hidden``."""
        return self.proj or self.hidden

    @property
    def input_size(self) -> int:
        return self.hidden  # a stacked layer: input size == hidden size

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        d["input_size"] = self.input_size
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Shape":
        return cls(d["cell"], int(d["hidden"]), int(d["batch"]), int(d["seq_len"]), d["dtype"],
                   d["pass"], int(d.get("directions", 1)), int(d.get("proj", 0)))


def grid_shapes(grid: dict) -> List[Shape]:
    """All shapes of ``grid``, ordered so that the cheap and common ones come first.

    ``grid["proj"]`` (default ``[0]``) multiplies the LSTM shapes only.
    """
    out = []
    for pass_ in grid["passes"]:
        for dtype in grid["dtypes"]:
            for seq_len in grid["seq_len"]:
                for cell in grid["cells"]:
                    projs = grid.get("proj", [0]) if cell == "lstm" else [0]
                    for hidden in grid["hidden"]:
                        for batch in grid["batch"]:
                            for d in grid.get("directions", [1]):
                                for p in projs:
                                    out.append(Shape(cell, hidden, batch, seq_len, dtype, pass_,
                                                     d, p))
    return out


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------


def _run_quiet(cmd: Sequence[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=20)
    except Exception:  # noqa: BLE001 - a missing tool is an answer
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip()


def git_commit(root: Optional[Path] = None) -> dict:
    """The commit: ``$TRITON_RNN_GIT_COMMIT`` when set, else ``git``, else ``.git/HEAD``.

    The variable comes first: a copy of the tree without its history (a lent GPU's)
    can hold a stale ``.git`` that would name another commit.
    """
    env = os.environ.get("TRITON_RNN_GIT_COMMIT")
    if env:
        return {"commit": env, "dirty": None}
    root = Path(root or Path(__file__).resolve().parent.parent)
    sha = _run_quiet(["git", "rev-parse", "HEAD"], cwd=str(root))
    dirty = None
    if sha:
        st = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=str(root))
        dirty = bool(st) if st is not None else None
    else:
        head = root / ".git" / "HEAD"
        try:
            ref = head.read_text().strip()
            if ref.startswith("ref:"):
                ref_path = root / ".git" / ref.split(None, 1)[1]
                sha = ref_path.read_text().strip() if ref_path.exists() else None
            else:
                sha = ref
        except OSError:
            sha = None
    return {"commit": sha or "unknown", "dirty": dirty}


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device) -> dict:
    """Versions and device properties recorded with every result file."""
    from . import __version__

    env = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": None,
        "triton_rnn": __version__,
        "flashrnn": _version("flashrnn"),
        "numpy": _version("numpy"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "device_type": device.type,
        "device": "cpu",
        "git": git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"unavailable: {e}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update({
            "device": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count,
            "total_memory_gib": round(p.total_memory / 2**30, 2),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        })
        # torch routes bf16 RNNs to cuDNN only from cuDNN 9.13 on; before, its own kernels run.
        env["cudnn_rnn_bf16"] = bool(env["cudnn"] and env["cudnn"] >= 91300)
        # fp32 shapes: cuDNN's RNN and the kernels' recurrence follow this switch; the
        # kernels' input projection and weight gradients (torch matmuls) are timed with
        # TF32 set to match it (see measure_shape).
        from .kernels.launch import rnn_allows_tf32
        env["fp32_rnn_tf32"] = rnn_allows_tf32()
        smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                          "--format=csv,noheader"])
        env["driver"] = smi.splitlines()[0] if smi else None
    else:
        env["device"] = platform.processor() or platform.machine() or "cpu"
        env["cpu_count"] = os.cpu_count()
    return env


# --------------------------------------------------------------------------
# The analytic model: FLOPs, fewest bytes, grid barriers, and the floor
# --------------------------------------------------------------------------


def _config_dict(cfg) -> Optional[dict]:
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    try:
        return asdict(cfg)
    except TypeError:
        return {"repr": repr(cfg)}


def select_configs(shape: Shape, device: torch.device) -> dict:
    """The tile configs the launcher would pick (``launch.select_config``), or the error."""
    out: dict = {}
    try:
        from .kernels.launch import select_config
    except Exception as e:  # noqa: BLE001 - the kernels may not be there yet
        return {"error": f"select_config unavailable: {type(e).__name__}: {e}"}
    passes = ["forward"] + (["backward"] if shape.pass_ == "fwdbwd" else [])
    for p in passes:
        try:
            cfg = select_config(shape.cell, p, DTYPES[shape.dtype], shape.hidden, shape.batch,
                                device, proj=shape.proj)
            out[p] = _config_dict(cfg)
        except Exception as e:  # noqa: BLE001
            out[p] = {"error": f"{type(e).__name__}: {e}"}
    return out


def model_counts(shape: Shape, configs: Optional[dict] = None) -> dict:
    """FLOPs, fewest bytes and grid barriers of one call for ``shape`` (one layer).

    * FLOPs: the input projection and the recurrence, ``2*T*B*G*H*(I+H)`` for
      the forward; the backward is counted as twice the forward (gradients of
      the inputs and of the weights). Elementwise gate math is left out. With
      an LSTM projection ``P`` the recurrence is ``G*H*P`` and the projection
      ``P*H`` multiply-adds per row and step: ``2*T*B*(G*H*I + G*H*P + P*H)``.
    * Bytes: every input read once and every output written once: ``x``,
      weights, biases, initial states, the output and final states; for
      ``fwdbwd`` also the output gradient read and the input, weight and
      initial-state gradients written. Saved activations are left out, so this
      is a floor that no implementation reaches. With a projection, ``h``, the
      output and its gradient are ``P`` wide, ``c`` stays ``H`` wide.
    * Barriers: one grid barrier per step and pass when the hidden dimension is
      split over several programs (``block_h < hidden`` in the selected
      config, assumed when the config is unknown), none otherwise; two with a
      projection (the gates, then the projection).

    A bidirectional layer (``directions=2``) doubles the FLOPs and everything
    but the input; its two directions can run at once, so not the barriers.
    """
    T, B, H, I = shape.seq_len, shape.batch, shape.hidden, shape.input_size
    G = GATES[shape.cell]
    D = shape.directions
    P, R = shape.proj, shape.out_size
    es = torch.tensor([], dtype=DTYPES[shape.dtype]).element_size()
    states = B * (R + H) if shape.cell == "lstm" else B * H  # h (and c) of one direction
    fwd_flops = D * 2 * T * B * (G * H * I + G * H * R + P * H)
    weights = D * (G * H * I + G * H * R + P * H + 2 * G * H)
    fwd_elems = T * B * I + weights + D * (states + T * B * R + states)
    flops, elems = fwd_flops, fwd_elems
    n_pass = 1
    if shape.pass_ == "fwdbwd":
        flops = 3 * fwd_flops
        elems = fwd_elems + D * T * B * R + T * B * I + weights + D * states
        n_pass = 2
    programs = per_barrier = None
    split = True
    fcfg = (configs or {}).get("forward")
    if isinstance(fcfg, dict) and "block_h" in fcfg:
        try:
            bh, bb = int(fcfg["block_h"]), int(fcfg.get("block_b", B) or B)
            split = bh < H
            programs = math.ceil(H / bh) * math.ceil(B / max(1, bb))
            # Each batch column of programs has its own barrier counter: the hidden
            # blocks of one column meet at it.
            per_barrier = math.ceil(H / bh)
        except (TypeError, ValueError):
            pass
    per_step = 2 if P else 1
    return {"flops": int(flops), "bytes": int(elems * es),
            "barriers": per_step * T * n_pass if split else 0,
            "programs": programs, "programs_per_barrier": per_barrier}


def _matmul_rate(floors: dict, dtype: str) -> Optional[float]:
    rates = floors.get("matmul_tflops") or {}
    # fp32 floors use the TF32 rate: the fastest a fp32 recurrence could go on
    # the matrix units (cuDNN's default allows TF32 for RNNs).
    order = {"fp32": ["tf32", "fp32"]}.get(dtype, [dtype])
    for k in order:
        v = rates.get(k)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return None


def _barrier_us(floors: dict, programs: Optional[int]) -> Optional[float]:
    """Measured latency of a barrier of ``programs`` programs, rounded *down* to the
    nearest measured grid (latency grows with the grid; a floor must not overshoot)."""
    table = floors.get("barrier_latency_us") or {}
    pts = sorted((int(k), float(v)) for k, v in table.items()
                 if isinstance(v, (int, float)) and v > 0)
    if not pts:
        v = floors.get("barrier_latency_us_full")
        return float(v) if isinstance(v, (int, float)) and v > 0 else None
    if programs is None:
        return pts[-1][1]
    below = [v for n, v in pts if n <= programs]
    return below[-1] if below else pts[0][1]


def floor_model(counts: dict, shape: Shape, floors: Optional[dict]) -> Optional[dict]:
    """The floor of one call in ms: the largest of the compute, memory and barrier terms.

    Each term is a lower bound on its own, so their maximum is too. ``None``
    without measured ceilings.
    """
    if not floors:
        return None
    rate = _matmul_rate(floors, shape.dtype)
    bw = floors.get("copy_bandwidth_gbps")
    bar = _barrier_us(floors, counts.get("programs_per_barrier") or counts.get("programs"))
    terms = {
        "compute_ms": counts["flops"] / (rate * 1e12) * 1e3 if rate else None,
        "memory_ms": counts["bytes"] / (float(bw) * 1e9) * 1e3 if isinstance(bw, (int, float)) and bw > 0 else None,
        "barrier_ms": counts["barriers"] * bar * 1e-3 if bar is not None else None,
    }
    known = {k: v for k, v in terms.items() if v is not None}
    if not known:
        return None
    bound = max(known, key=known.get)
    terms["floor_ms"] = known[bound]
    terms["bound"] = bound.replace("_ms", "")
    terms["matmul_tflops"] = rate
    terms["copy_bandwidth_gbps"] = bw
    terms["barrier_latency_us"] = bar
    return terms


def load_floors(path: Optional[str]) -> Optional[dict]:
    if not path:
        return None
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------
# Building one shape's case: modules with equal weights and rotated inputs
# --------------------------------------------------------------------------


def flashrnn_available() -> bool:
    try:
        import flashrnn  # noqa: F401
    except Exception:  # noqa: BLE001 - optional peer
        return False
    return True


def flatten_for_cudnn(m: torch.nn.RNNBase) -> bool:
    """Put ``m``'s weights in one cuDNN weight buffer, in bf16 as well.

    ``torch.nn.RNNBase.flatten_parameters`` does this only for the dtypes in
    ``torch.backends.cudnn.CUDNN_TENSOR_DTYPES`` (no bf16); this makes the same
    call for any dtype. Returns whether it flattened (CUDA and cuDNN only).
    """
    ws = m._flat_weights
    if (not torch.backends.cudnn.enabled or not all(isinstance(w, torch.Tensor) for w in ws)
            or not all(w.is_cuda for w in ws)):
        return False
    from torch.backends.cudnn import rnn as cudnn_rnn
    num_weights = (4 if m.bias else 2) + (1 if m.proj_size > 0 else 0)
    with torch.cuda.device_of(ws[0]), torch.no_grad():
        torch._cudnn_rnn_flatten_weight(ws, num_weights, m.input_size,
                                        cudnn_rnn.get_cudnn_mode(m.mode), m.hidden_size,
                                        m.proj_size, m.num_layers, m.batch_first,
                                        bool(m.bidirectional))
    return True


class Case:
    """Modules and input sets of one shape; ``fns[name]()`` runs one call of ``name``."""

    def __init__(self, shape: Shape, device: torch.device, impls: Sequence[str], n_sets: int,
                 seed: int = 0):
        import triton_rnn

        self.shape = shape
        self.device = device
        dtype = DTYPES[shape.dtype]
        T, B, H, I = shape.seq_len, shape.batch, shape.hidden, shape.input_size
        train = shape.pass_ == "fwdbwd"
        torch.manual_seed(seed)
        cls = {"gru": triton_rnn.GRU, "lstm": triton_rnn.LSTM}[shape.cell]
        tcls = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[shape.cell]
        D = shape.directions
        bi = D == 2
        kw = {"bidirectional": bi}
        if shape.proj:
            kw["proj_size"] = shape.proj
        base = cls(I, H, backend="triton", **kw).to(device=device, dtype=dtype)
        state = base.state_dict()
        self.modules: Dict[str, torch.nn.Module] = {}
        if "triton" in impls:
            base.kernel_options = {"mode": "persistent"}
            self.modules["triton"] = base
        for name, opts in (("triton_stepwise", {"mode": "stepwise"}),
                           ("triton_one_stream", {"mode": "persistent",
                                                  "overlap_directions": False})):
            if name in impls:
                m = cls(I, H, backend="triton", **kw).to(device=device, dtype=dtype)
                m.load_state_dict(state)
                m.kernel_options = opts
                self.modules[name] = m
        if "torch" in impls:
            m = tcls(I, H, **kw).to(device=device, dtype=dtype)
            m.load_state_dict(state)
            if dtype == torch.bfloat16:
                try:
                    flatten_for_cudnn(m)
                except RuntimeError as e:  # timed as torch.nn leaves it, and said so
                    warnings.warn(f"cuDNN weights left unflattened: {e}", RuntimeWarning)
            self.modules["torch"] = m
        self.n_states = 2 if shape.cell == "lstm" else 1
        R = shape.out_size  # h0 and the output: P wide with a projection; c0: H wide
        gen = torch.Generator(device=device).manual_seed(seed + 1)

        def rnd(*size, scale=1.0):
            # drawn in fp32 on the device (fast for large shapes), then cast
            x = torch.randn(*size, generator=gen, device=device, dtype=torch.float32)
            return (x * scale).to(dtype)

        self.sets = []
        for _ in range(n_sets):
            s = {"x": rnd(T, B, I).requires_grad_(train),
                 "h0": [rnd(D, B, w, scale=0.5) for w in (R, H)[:self.n_states]]}
            if train:
                s["gy"] = rnd(T, B, D * R)
            self.sets.append(s)
        self.flash = None
        # One direction, no projection: "not available" otherwise.
        if "flashrnn" in impls and not bi and not shape.proj:
            self._build_flashrnn(state)
        # Inference is eval mode as well as no_grad: torch.nn's RNNs pass ``self.training``
        # to cuDNN, which in training mode writes its reserve space (every gate of every
        # step) even under no_grad; the kernels save nothing without a gradient.
        for m in self.modules.values():
            m.train(train)
        self._i = 0
        self.params = [p for m in self.modules.values() for p in m.parameters()]
        if self.flash is not None:
            self.params += self.flash["params"]
        self.grad_to_none = (self.params + [s["x"] for s in self.sets]) if train else None
        self.fns: Dict[str, Callable[[], object]] = {}
        for name in self.modules:
            self.fns[name] = self._module_fn(self.modules[name], train)
        if self.flash is not None:
            self.fns["flashrnn"] = self._flash_fn(train)

    def next_set(self) -> dict:
        s = self.sets[self._i % len(self.sets)]
        self._i += 1
        return s

    def _hx(self, s):
        return (s["h0"][0], s["h0"][1]) if self.n_states == 2 else s["h0"][0]

    def _module_fn(self, m: torch.nn.Module, train: bool):
        def fwd():
            s = self.next_set()
            with torch.no_grad():
                return m(s["x"], self._hx(s))[0]

        def fwdbwd():
            s = self.next_set()
            out = m(s["x"], self._hx(s))[0]
            out.backward(s["gy"])
            return out

        return fwdbwd if train else fwd

    # FlashRNN takes the input projection ``Wx [B, T, G, NH, D]``, the recurrent
    # matrix ``R [G, NH, D, D]`` and biases ``b [G_total, NH, D]``. The input
    # projection is computed here with torch (part of the timed call), as the
    # other implementations also do it inside their call.
    def _build_flashrnn(self, state: dict) -> None:
        sh = self.shape
        H = sh.hidden
        G = GATES[sh.cell]
        train = sh.pass_ == "fwdbwd"
        w_ih = state["weight_ih_l0"].detach().clone().requires_grad_(train)
        b_ih = state["bias_ih_l0"].detach().clone().requires_grad_(train)
        R = state["weight_hh_l0"].detach().reshape(G, 1, H, H)
        b_hh = state["bias_hh_l0"].detach().reshape(G, 1, H)
        if sh.cell == "gru":
            # FlashRNN's GRU takes the recurrent gates as (n, r, z) and biases as
            # (b_hn, b_r, b_z, b_in); b_in is already in Wx. With this it is torch's GRU.
            R = R[[2, 0, 1]]
            b_hh = torch.cat([b_hh[[2, 0, 1]], torch.zeros_like(b_hh[:1])], 0)
        R = R.clone().requires_grad_(train)
        b = b_hh.clone().requires_grad_(train)
        for s in self.sets:
            # batch-first copies of the same values (FlashRNN is batch-first)
            s["x_bt"] = s["x"].detach().transpose(0, 1).contiguous().requires_grad_(train)
            # initial states as FlashRNN takes them: [S, B, T=1, NH=1, H]
            s["st_bt"] = torch.stack([h[0] for h in s["h0"]], 0).reshape(
                len(s["h0"]), sh.batch, 1, 1, H).contiguous()
            if train:
                s["gy_bt"] = s["gy"].transpose(0, 1).reshape(sh.batch, sh.seq_len, 1, H).contiguous()
        self.flash = {"w_ih": w_ih, "b_ih": b_ih, "R": R, "b": b,
                      "params": [w_ih, b_ih, R, b],
                      "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[sh.dtype]}

    def _flash_fn(self, train: bool):
        from flashrnn import flashrnn as frnn

        sh = self.shape
        f = self.flash
        G = GATES[sh.cell]

        def call(s):
            wx = torch.nn.functional.linear(s["x_bt"], f["w_ih"], f["b_ih"])
            wx = wx.reshape(sh.batch, sh.seq_len, G, 1, sh.hidden)
            h, _ = frnn(Wx=wx, R=f["R"], b=f["b"], states=s["st_bt"], function=sh.cell,
                        backend=FLASHRNN_BACKEND, dtype=f["dtype"])
            return h[0]

        def fwd():
            s = self.next_set()
            with torch.no_grad():
                return call(s)

        def fwdbwd():
            s = self.next_set()
            out = call(s)
            out.backward(s["gy_bt"])
            return out

        return fwdbwd if train else fwd

    def reset_grads(self) -> None:
        if self.grad_to_none:
            for t in self.grad_to_none:
                t.grad = None
            for s in self.sets:
                if "x_bt" in s:
                    s["x_bt"].grad = None

    def outputs_for_check(self, name: str):
        """Output and input gradient (``None`` for ``fwd``) of ``name`` on input set 0.

        FlashRNN's batch-first tensors are transposed back to time-major.
        """
        self.reset_grads()
        self._i = 0
        out = self.fns[name]()
        self._i = 0
        s = self.sets[0]
        gx = s["x_bt"].grad if name == "flashrnn" and "x_bt" in s else s["x"].grad
        if name == "flashrnn":
            out = out.reshape(self.shape.batch, self.shape.seq_len, -1).transpose(0, 1)
            if gx is not None:
                gx = gx.transpose(0, 1)
        gx = None if gx is None else gx.detach().float().clone()
        self.reset_grads()
        return out.detach().float(), gx


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cuda(fn: Callable, case: Case, warmup_ms: float, rep_ms: float) -> float:
    """Median ms of ``fn`` by ``triton.testing.do_bench`` (CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    grads = case.grad_to_none
    if grads is not None:
        grads = grads + [s["x_bt"] for s in case.sets if "x_bt" in s]
    try:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads,
                              return_mode="median"))
    except TypeError:  # an older do_bench without return_mode
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads,
                              quantiles=[0.5]))


def time_host(fn: Callable, case: Case, reps: int, warmup: int = 1) -> float:
    """Median ms of ``fn`` by the host clock (CPU smoke runs)."""
    for _ in range(warmup):
        case.reset_grads()
        fn()
        _sync(case.device)
    times = []
    for _ in range(max(1, reps)):
        case.reset_grads()
        t0 = time.perf_counter()
        fn()
        _sync(case.device)
        times.append((time.perf_counter() - t0) * 1e3)
    case.reset_grads()
    return float(statistics.median(times))


def _capture_graphs(case: Case, name: str) -> Callable:
    """CUDA graphs of ``name``, one per input set; the returned function replays the next."""
    fn = case.fns[name]
    graphs = []
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as capture requires
            case.reset_grads()
            for _ in range(len(case.sets)):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for i in range(len(case.sets)):
        case.reset_grads()
        case._i = i
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # a private memory pool per graph: replays never collide
            fn()
        graphs.append(g)
    torch.cuda.synchronize()
    state = {"i": 0}

    def replay():
        graphs[state["i"] % len(graphs)].replay()
        state["i"] += 1

    replay.graphs = graphs  # keep them alive with the function
    return replay


def _check_context(device: torch.device) -> None:
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        torch.empty(1, device=device).add_(1).item()
    except Exception as e:  # noqa: BLE001
        raise ContextLost(f"CUDA context unusable after an error: {e}") from e


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> Optional[float]:
    """``|a - ref| / |ref|``; the string ``"nan"`` when not finite, ``None`` for a zero reference."""
    denom = ref.norm().item()
    if not denom > 0:
        return None
    v = (a - ref).norm().item() / denom
    return v if math.isfinite(v) else "nan"


def _err(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    return msg[:2000]


def measure_shape(shape: Shape, device: torch.device, impls: Sequence[str], *, floors: Optional[dict],
                  warmup_ms: float = 25.0, rep_ms: float = 100.0, rounds: int = 3, n_sets: int = 3,
                  host_reps: int = 5, cuda_graphs: bool = False, check: bool = True,
                  seed: int = 0) -> dict:
    """Measure every implementation of ``impls`` on ``shape``; returns the shape's record.

    Errors of one implementation are recorded in its entry and the others go
    on; an error building the case (out of memory, say) makes the whole shape
    an error. Raises :class:`ContextLost` when the CUDA context is gone.
    """
    with _fp32_matmuls_like_cudnn(shape, device):
        return _measure_shape(shape, device, impls, floors=floors, warmup_ms=warmup_ms,
                              rep_ms=rep_ms, rounds=rounds, n_sets=n_sets, host_reps=host_reps,
                              cuda_graphs=cuda_graphs, check=check, seed=seed)


@contextlib.contextmanager
def _fp32_matmuls_like_cudnn(shape: "Shape", device: torch.device):
    """For fp32 on a GPU, torch matmuls use TF32 exactly when cuDNN's RNNs do.

    cuDNN runs a whole fp32 RNN in TF32 by default, and the kernels' recurrence
    follows the same switch; the kernels' input projection and weight gradients
    are torch matmuls, which follow ``torch.backends.cuda.matmul`` (IEEE by
    default). Matching the two compares like with like.
    """
    if device.type != "cuda" or shape.dtype != "fp32":
        yield
        return
    from .kernels.launch import rnn_allows_tf32
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = rnn_allows_tf32()
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _measure_shape(shape: Shape, device: torch.device, impls: Sequence[str], *, floors, warmup_ms,
                   rep_ms, rounds, n_sets, host_reps, cuda_graphs, check, seed) -> dict:
    from .kernels import launch
    t_start = time.perf_counter()
    rec: dict = {"key": shape.key, "shape": shape.to_dict(), "status": "running", "error": None,
                 "impls": {}}
    rec["configs"] = select_configs(shape, device)
    rec["model"] = model_counts(shape, rec["configs"])
    case = None
    try:
        try:
            case = Case(shape, device, impls, n_sets=n_sets, seed=seed)
        except Exception as e:  # noqa: BLE001
            rec["status"] = "error"
            rec["error"] = "building the inputs failed: " + _err(e)
            _check_context(device)
            return rec
        entries = {name: {"ms": None, "ms_rounds": [], "error": None} for name in case.fns}
        for name in impls:
            if name not in case.fns:
                entries[name] = {"ms": None, "ms_rounds": [], "error": NOT_AVAILABLE}
        rec["impls"] = entries
        # First call of each: compiles, warms up, and checks the output against torch.
        # The launcher warns once per process about a fallback to stepwise launches:
        # forget that, so every shape that falls back is flagged.
        launch._warned.clear()
        ref = None
        for name in list(case.fns):
            try:
                # Record warnings such as the launcher's fallback from persistent to stepwise.
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    res = case.outputs_for_check(name)
                    _sync(device)
                if caught:
                    entries[name]["warnings"] = sorted({str(w.message)[:500] for w in caught})
                    if any("falling back" in str(w.message) for w in caught):
                        entries[name]["fell_back_to_stepwise"] = True
                if check and name == REFERENCE:
                    ref = res
                entries[name]["_out"] = res
            except Exception as e:  # noqa: BLE001
                entries[name]["error"] = "first call failed: " + _err(e)
                entries[name]["traceback"] = traceback.format_exc()[-4000:]
                _check_context(device)
        for name, ent in entries.items():
            res = ent.pop("_out", None)
            if ref is None or res is None or name == REFERENCE:
                continue
            ent["rel_err"] = _rel_err(res[0], ref[0])
            if res[1] is not None and ref[1] is not None:
                ent["rel_err_grad_x"] = _rel_err(res[1], ref[1])
        live = [n for n in case.fns if entries[n]["error"] is None]
        timers = {n: case.fns[n] for n in live}
        if cuda_graphs and device.type == "cuda":
            for n in list(live):
                gname = n + "+graph"
                entries[gname] = {"ms": None, "ms_rounds": [], "error": None}
                try:
                    timers[gname] = _capture_graphs(case, n)
                except Exception as e:  # noqa: BLE001
                    entries[gname]["error"] = "graph capture failed: " + _err(e)
                    _check_context(device)
        order = list(timers)
        for r in range(max(1, rounds)):
            k = r % len(order) if order else 0
            for n in order[k:] + order[:k]:
                if entries[n]["error"] is not None:
                    continue
                try:
                    if device.type == "cuda":
                        graph = n.endswith("+graph")
                        grads = case.grad_to_none
                        if graph:
                            case.grad_to_none = None  # graphs own their gradient buffers
                        try:
                            ms = time_cuda(timers[n], case, warmup_ms, rep_ms)
                        finally:
                            case.grad_to_none = grads
                    else:
                        # the checked first call already compiled and warmed up
                        ms = time_host(timers[n], case, host_reps, warmup=0)
                    entries[n]["ms_rounds"].append(ms)
                except Exception as e:  # noqa: BLE001
                    entries[n]["error"] = "timing failed: " + _err(e)
                    entries[n]["traceback"] = traceback.format_exc()[-4000:]
                    _check_context(device)
        counts = rec["model"]
        rec["floor"] = floor_model(counts, shape, floors)
        for n, ent in entries.items():
            if ent["ms_rounds"]:
                ms = float(statistics.median(ent["ms_rounds"]))
                ent["ms"] = ms
                ent["tokens_per_s"] = shape.tokens / (ms * 1e-3)
                ent["tflops"] = counts["flops"] / (ms * 1e-3) / 1e12
                if rec["floor"]:
                    ent["floor_fraction"] = rec["floor"]["floor_ms"] / ms
        ref_ms = entries.get(REFERENCE, {}).get("ms")
        # Graph replays are compared with cuDNN's graph replays (what a user who
        # captures would compare); cuDNN's own replay with its eager run.
        ref_graph_ms = entries.get(REFERENCE + "+graph", {}).get("ms")

        def reference_ms(n):
            return ref_graph_ms if n.endswith("+graph") and n != REFERENCE + "+graph" \
                else ref_ms
        rec["speedup"] = {n: (reference_ms(n) / e["ms"]) for n, e in entries.items()
                          if reference_ms(n) and e.get("ms") and n != REFERENCE}
        ok = [n for n, e in entries.items() if e.get("ms") is not None]
        # An implementation that does not cover the shape (FlashRNN: bidirectional or
        # projected) is no failure of the shape.
        bad = [n for n, e in entries.items() if e.get("error") and e["error"] != NOT_AVAILABLE]
        rec["status"] = "ok" if ok and not bad else ("partial" if ok else "error")
        if not ok:
            rec["error"] = "; ".join(f"{n}: {entries[n]['error']}" for n in bad)[:2000]
        return rec
    finally:
        rec["wall_s"] = round(time.perf_counter() - t_start, 3)
        del case
        gc.collect()
        if device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass


# --------------------------------------------------------------------------
# The grid runner
# --------------------------------------------------------------------------


def save_json(data: dict, path: Path) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def _cell_label(shape: dict) -> str:
    """A result's cell, with ``-bi`` for a bidirectional layer and ``-p<proj>`` for an LSTM
    projection (:attr:`Shape.label`)."""
    proj = int(shape.get("proj") or 0)
    return (str(shape.get("cell")) + ("-bi" if shape.get("directions", 1) == 2 else "")
            + (f"-p{proj}" if proj else ""))


def summarize(results: Iterable[dict]) -> dict:
    """Geometric-mean speedup over the reference per (cell, pass, impl), and counts."""
    by: Dict[str, List[float]] = {}
    counts = {"ok": 0, "partial": 0, "error": 0, "skipped": 0, "running": 0}
    for r in results:
        counts[r.get("status", "error")] = counts.get(r.get("status", "error"), 0) + 1
        sh = r.get("shape", {})
        for n, s in (r.get("speedup") or {}).items():
            if s and s > 0:
                by.setdefault(f"{_cell_label(sh)}/{sh.get('pass')}/{n}", []).append(s)
    geo = {k: math.exp(sum(math.log(v) for v in vs) / len(vs)) for k, vs in by.items()}
    return {"status_counts": counts, "geomean_speedup": geo}


def run_grid(shapes: Sequence[Shape], device: torch.device, impls: Sequence[str], out_json: Path, *,
             settings: dict, floors: Optional[dict], floors_file: Optional[str] = None,
             time_budget_s: Optional[float] = None, resume: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Measure ``shapes`` one by one, rewriting ``out_json`` after each; returns the document.

    A shape already in ``out_json`` is skipped with ``resume``; one left
    ``running`` there (the previous run died in it) is recorded as an error.
    Once ``time_budget_s`` has passed, the remaining shapes are recorded as
    ``skipped``. :class:`ContextLost` stops the run (the rest is ``skipped``)
    and is raised again after the file is written.
    """
    t0 = time.perf_counter()
    done: Dict[str, dict] = {}
    if resume and Path(out_json).exists():
        try:
            with open(out_json) as f:
                old = json.load(f)
            for r in old.get("results", []):
                if r.get("status") == "running":
                    r["status"] = "error"
                    r["error"] = ("interrupted: the previous run ended during this shape "
                                  "(a hang, a crash or its time limit)")
                if r.get("status") != "skipped":
                    done[r["key"]] = r
        except Exception as e:  # noqa: BLE001
            log(f"could not resume from {out_json}: {e}")
    doc = {"schema": SCHEMA, "env": environment(device), "settings": settings,
           "impls": list(impls), "reference": REFERENCE, "floors_file": floors_file,
           "floors": floors, "results": [], "finished": False}
    results: List[dict] = doc["results"]
    lost: Optional[ContextLost] = None
    n = len(shapes)
    for i, shape in enumerate(shapes):
        if shape.key in done:
            results.append(done[shape.key])
            continue
        over = time_budget_s is not None and time.perf_counter() - t0 > time_budget_s
        if lost is not None or over:
            why = "CUDA context lost earlier in the run" if lost is not None else "time budget spent"
            results.append({"key": shape.key, "shape": shape.to_dict(), "status": "skipped",
                            "error": why, "impls": {}})
            continue
        placeholder = {"key": shape.key, "shape": shape.to_dict(), "status": "running",
                       "error": None, "impls": {}}
        results.append(placeholder)
        doc["summary"] = summarize(results)
        save_json(doc, out_json)
        try:
            rec = measure_shape(shape, device, impls, floors=floors, **_measure_kwargs(settings))
        except ContextLost as e:
            lost = e
            rec = dict(placeholder, status="error", error=_err(e))
        except Exception as e:  # noqa: BLE001 - one shape never stops the grid
            rec = dict(placeholder, status="error", error=_err(e),
                       traceback=traceback.format_exc()[-4000:])
        results[-1] = rec
        doc["summary"] = summarize(results)
        save_json(doc, out_json)
        log(f"[{i + 1}/{n}] {progress_line(rec)}")
    doc["finished"] = lost is None
    doc["elapsed_s"] = round(time.perf_counter() - t0, 1)
    doc["summary"] = summarize(results)
    save_json(doc, out_json)
    if lost is not None:
        raise lost
    return doc


def _measure_kwargs(settings: dict) -> dict:
    keys = ("warmup_ms", "rep_ms", "rounds", "n_sets", "host_reps", "cuda_graphs", "check", "seed")
    return {k: settings[k] for k in keys if k in settings}


# --------------------------------------------------------------------------
# Reports: table, markdown, plot
# --------------------------------------------------------------------------


def _fmt(v, spec=".3f", none="-"):
    if v is None:
        return none
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def progress_line(rec: dict) -> str:
    parts = [f"{rec['key']:<34} {rec.get('status', '?'):<7}"]
    for n, e in (rec.get("impls") or {}).items():
        parts.append(f"{n}={_fmt(e.get('ms'))}ms" if e.get("ms") is not None else f"{n}=ERR")
    sp = (rec.get("speedup") or {}).get("triton")
    if sp:
        parts.append(f"x{sp:.2f}")
    if rec.get("error"):
        parts.append(f"({str(rec['error'])[:120]})")
    return " ".join(parts)


def _ref_label(doc: dict) -> str:
    return "cuDNN" if doc.get("env", {}).get("device_type") == "cuda" else "torch"


def table_rows(doc: dict) -> List[List[str]]:
    from .kernels.config import KernelConfig

    ref = _ref_label(doc)
    impls = [n for n in doc.get("impls", IMPLS)]
    # CUDA-graph replays (--cuda-graphs) get their own time columns.
    impls += sorted({n for r in doc.get("results", []) for n in (r.get("impls") or {})
                     if n.endswith("+graph")})
    head = ["cell", "pass", "dtype", "T", "B", "H"] + [f"{n} ms" for n in impls]
    # Speedups: the reference's time over the implementation's (> 1: faster than it).
    head += [f"triton vs {ref}", f"stepwise vs {ref}"]
    if "flashrnn" in impls:
        head.append(f"flashrnn vs {ref}")
    head += ["Mtok/s", "TFLOP/s", "floor ms", "bound", "%floor", "config", "status"]
    rows = [head]
    for r in doc.get("results", []):
        sh = r.get("shape", {})
        ent = r.get("impls") or {}
        row = [_cell_label(sh), str(sh.get("pass")), str(sh.get("dtype")), str(sh.get("seq_len")),
               str(sh.get("batch")), str(sh.get("hidden"))]
        for n in impls:
            e = ent.get(n) or {}
            row.append(_fmt(e.get("ms")) if e.get("ms") is not None else ("err" if e.get("error") else "-"))
        sp = r.get("speedup") or {}
        row += [_fmt(sp.get("triton"), ".2f"), _fmt(sp.get("triton_stepwise"), ".2f")]
        if "flashrnn" in impls:
            row.append(_fmt(sp.get("flashrnn"), ".2f"))
        t = ent.get("triton") or {}
        fl = r.get("floor") or {}
        tok = t.get("tokens_per_s")
        row += [_fmt(tok / 1e6 if tok else None, ".2f"), _fmt(t.get("tflops"), ".2f"),
                _fmt(fl.get("floor_ms")), str(fl.get("bound", "-")),
                _fmt(100 * t["floor_fraction"] if t.get("floor_fraction") else None, ".1f")]
        row.append(KernelConfig.label_of((r.get("configs") or {}).get("forward"), "-"))
        row.append(str(r.get("status")))
        rows.append(row)
    return rows


def format_table(doc: dict) -> str:
    rows = table_rows(doc)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    summ = doc.get("summary") or summarize(doc.get("results", []))
    lines.append("")
    lines.append("status: " + ", ".join(f"{k}={v}" for k, v in summ["status_counts"].items() if v))
    for k, v in sorted(summ["geomean_speedup"].items()):
        lines.append(f"geomean speedup vs {_ref_label(doc)} {k}: {v:.3f}")
    return "\n".join(lines)


def markdown_report(doc: dict) -> str:
    env = doc.get("env", {})
    out = [f"### triton-rnn bench ({doc.get('settings', {}).get('grid', '?')} grid)", "",
           f"device: {env.get('device')} (cc {env.get('capability', '-')}, "
           f"{env.get('sm_count', '-')} SMs), driver {env.get('driver', '-')}, torch {env.get('torch')}, "
           f"CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn', '-')}, triton {env.get('triton')}, "
           f"triton_rnn {env.get('triton_rnn')}, flashrnn {env.get('flashrnn') or '-'}, "
           f"commit {env.get('git', {}).get('commit')}", ""]
    fl = doc.get("floors")
    if fl:
        out.append(f"ceilings: copy {_fmt(fl.get('copy_bandwidth_gbps'), '.0f')} GB/s, matmul "
                   + ", ".join(f"{k} {_fmt(v, '.0f')}" for k, v in (fl.get('matmul_tflops') or {}).items())
                   + " TFLOP/s, barrier "
                   + ", ".join(f"{k} progs {_fmt(v, '.2f')} us"
                               for k, v in (fl.get('barrier_latency_us') or {}).items()))
        out.append("")
    rows = table_rows(doc)
    out.append(f"Times in ms; 'X vs {_ref_label(doc)}' is a speedup: {_ref_label(doc)}'s time over "
               "X's (above 1: X is faster).")
    out.append("")
    out.append("| " + " | ".join(rows[0]) + " |")
    out.append("|" + "---|" * len(rows[0]))
    for r in rows[1:]:
        out.append("| " + " | ".join(r) + " |")
    summ = doc.get("summary") or summarize(doc.get("results", []))
    out.append("")
    out.append("status: " + ", ".join(f"{k}={v}" for k, v in summ["status_counts"].items() if v))
    for k, v in sorted(summ["geomean_speedup"].items()):
        out.append(f"- geomean speedup vs {_ref_label(doc)} {k}: {v:.3f}")
    errs = [r for r in doc.get("results", []) if r.get("error") or any(
        (e or {}).get("error") for e in (r.get("impls") or {}).values())]
    if errs:
        out.append("")
        out.append("errors:")
        for r in errs[:40]:
            msgs = [f"{n}: {e['error']}" for n, e in (r.get("impls") or {}).items() if e.get("error")]
            msg = r.get("error") or "; ".join(msgs)
            out.append(f"- {r['key']}: {str(msg)[:300]}")
    return "\n".join(out) + "\n"


def plot(doc: dict, path: Path) -> Optional[Path]:
    """Speedup over the reference against batch size, one line per hidden size.

    One panel per (cell, pass, dtype, length); solid lines are the persistent
    kernels, dotted the stepwise baseline, dashed FlashRNN. Returns ``None``
    when there is nothing to plot (no speedup measured).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used through matplotlib.ticker

    panels: Dict[tuple, Dict[str, Dict[int, List[tuple]]]] = {}
    for r in doc.get("results", []):
        sh = r.get("shape", {})
        key = (_cell_label(sh), sh.get("pass"), sh.get("dtype"), sh.get("seq_len"))
        for impl, s in (r.get("speedup") or {}).items():
            if s:
                panels.setdefault(key, {}).setdefault(impl, {}).setdefault(
                    int(sh["hidden"]), []).append((int(sh["batch"]), float(s)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ref = _ref_label(doc)
    n = max(1, len(panels))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    styles = {"triton": "-", "triton_stepwise": ":", "flashrnn": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    hidden_all = sorted({h for p in panels.values() for d in p.values() for h in d})
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (key, impls) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
        for impl, by_h in sorted(impls.items()):
            base = impl.replace("+graph", "")
            for h, pts in sorted(by_h.items()):
                pts.sort()
                c = colors[hidden_all.index(h) % len(colors)]
                label = f"H={h}" if impl == "triton" else f"H={h} {impl}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(base, "-."),
                        color=c, marker="o", ms=3, label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"speedup vs {ref}")
        ax.set_title("{} {} {} T={}".format(*key), fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no speedup measured", ha="center", va="center")
    env = doc.get("env", {})
    fig.suptitle(f"triton-rnn vs {ref} on {env.get('device')} "
                 f"(solid: persistent, dotted: stepwise, dashed: FlashRNN)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
