"""What the autotuner tunes: kernel keys, shape buckets, candidate tiles, the default rule.

Kernel key
----------
A tuned tile is stored per :class:`KernelKey`:

``(cell, pass, dtype, hidden, batch bucket, arch, proj)``

* ``cell``: ``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"``;
* ``pass``: ``"forward"`` or ``"backward"`` (the backward kernel has its own tile);
* ``dtype``: ``"bfloat16"``, ``"float16"`` or ``"float32"``;
* ``hidden``: the hidden size, **exact** (not bucketed). It is a constant of a
  model, so a model meets only one or two values, and it decides how many bytes
  of ``W_hh`` each program keeps on chip: a tile that fits at ``hidden=768``
  may not fit at ``hidden=1024``, so two hidden sizes never share an entry;
* ``proj``: an LSTM's projection size (``proj_size``), **exact** like the hidden
  size, 0 without a projection (LSTM only, less than ``hidden``). It changes the
  weight slice each program keeps on chip (``W_hh`` has ``proj`` inputs, and each
  program also holds its share of ``W_hr``: see
  :func:`triton_rnn.kernels.launch.weight_slice_bytes`), so an LSTMP never shares
  an entry with the plain LSTM of the same hidden size, nor with another
  projection size. A key without a projection is written as before
  (``lstm:forward:bfloat16:h1024:b32:sm90``); with one, the hidden field carries
  it (``lstm:forward:bfloat16:h1024p256:b32:sm90``);
* ``batch bucket``: the batch size rounded **up** to a power of two, at least
  1 and at most :data:`BATCH_CAP` (see :func:`batch_bucket`). A batch whose
  bucket was never tuned takes the tile of the nearest tuned bucket of the same
  kernel (:func:`triton_rnn.autotune.lookup_config`), so a new batch size
  never triggers a re-tune or a recompile. Static checks run at the bucket's
  upper bound (its largest batch). Batches above the cap share the top bucket.
  Co-residency never depends on the batch: the launcher bounds the number of
  batch-tile programs by what can be resident, and programs loop over batch
  tiles, so the grid does not grow past what was checked;
* ``arch``: the compute capability as an integer (``90`` for sm_90).

The sequence length and the direction (uni/bi) are *not* part of the key: the
per-step work of a persistent kernel does not depend on them, only the number
of steps and launches does. They are recorded with each entry for reference.

Candidate tiles
---------------
:func:`candidate_configs` returns a small set (at most :data:`MAX_CANDIDATES`)
of :class:`~triton_rnn.kernels.config.KernelConfig` around the default: up to
four ``block_h`` values (powers of two from 16 to the padded hidden size whose
weight slice, :func:`~triton_rnn.kernels.launch.weight_slice_bytes` with the
key's projection, fits a block's shared memory, nearest to the default's), two or
three ``block_b`` values (the default's, 32 or 16 beside it, and 64 for batch
buckets of 64 and more), ``num_warps`` in {4, 8}, ``num_stages=1`` and, when
the default streams ``W_hh`` (``block_k > 0``), ``block_k`` at the default's
value, half and double it, each keeping on-chip what the default rule would
(``resident_k``, :func:`~triton_rnn.kernels.launch.default_resident_k`), and
the default with nothing kept on-chip; ordered by closeness to the default. For
``hidden >= 512`` with a persistent default, a few weight-streaming tiles
(``block_k=128``) are added at the end, so the tuner can compare persistence
against streaming, and so is the default with ``split_k=1`` (every warp
multiplies all of K), so that it measures what splitting K over the warps buys.
With a Triton whose defaults do not split K (``launch.AUTO_SPLIT_K_MIN_TRITON``),
the default split over all its warps and over half of them instead.
The default config is always a candidate.

Default rule
------------
:func:`heuristic_config` is what runs when nothing is cached: the launcher's
documented rule, :func:`triton_rnn.kernels.launch.default_config`. Given a
static checker (``report_fn``), it returns the first config in preference
order that the checker accepts, so the default is always one the static check
would keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, List, Optional

from ..functional import CELLS, GATES
from ..kernels.config import KernelConfig
from ..kernels.inspect import arch_limits

__all__ = [
    "CELLS", "PASSES", "DTYPES", "GATES", "BATCH_CAP",
    "KernelKey", "batch_bucket", "normalize_dtype", "normalize_cell", "arch_info",
    "candidate_configs", "heuristic_config",
]

PASSES = ("forward", "backward")
DTYPES = ("bfloat16", "float16", "float32")
_DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16", "torch.bfloat16": "bfloat16",
    "fp16": "float16", "half": "float16", "float16": "float16", "torch.float16": "float16",
    "fp32": "float32", "float": "float32", "float32": "float32", "torch.float32": "float32",
}
_ELEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

#: At most this many candidates per key (the default and the nearest to it are kept).
MAX_CANDIDATES = 16

#: Largest batch bucket. Batches above it share this bucket.
BATCH_CAP = 1024

def arch_info(arch: int):
    """``(num_sms, max_shared_bytes)`` for ``arch``, the nearest lower known one otherwise."""
    lim = arch_limits(arch)
    return lim["num_sms"], lim["max_smem_block"]


def normalize_dtype(dtype) -> str:
    """``torch.bfloat16``, ``"bf16"``, ``"bfloat16"`` -> ``"bfloat16"`` (and so on)."""
    name = str(dtype).lower()
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return _DTYPE_ALIASES[name]


def normalize_cell(cell: str) -> str:
    name = str(cell).lower()
    if name not in GATES:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    return name


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def batch_bucket(batch: int) -> int:
    """The batch bucket: ``batch`` rounded up to a power of two, capped at :data:`BATCH_CAP`.

    ``1 -> 1, 2 -> 2, 3 -> 4, 17 -> 32, 100 -> 128, 5000 -> 1024``.
    """
    batch = int(batch)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return min(_next_pow2(batch), BATCH_CAP)


@dataclass(frozen=True)
class KernelKey:
    """One tuned kernel: see the module docstring for what each field means."""

    cell: str
    pass_: str
    dtype: str
    hidden: int
    batch_bucket: int
    arch: int
    #: an LSTM's projection size (``proj_size``); 0: none
    proj: int = 0

    def __post_init__(self):
        object.__setattr__(self, "cell", normalize_cell(self.cell))
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.pass_ not in PASSES:
            raise ValueError(f"pass must be one of {PASSES}, got {self.pass_!r}")
        for name in ("hidden", "batch_bucket", "arch"):
            v = int(getattr(self, name))
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
            object.__setattr__(self, name, v)
        if self.batch_bucket != batch_bucket(self.batch_bucket):
            raise ValueError(f"batch_bucket must be a power of two <= {BATCH_CAP}, "
                             f"got {self.batch_bucket}")
        proj = int(self.proj or 0)
        if proj < 0:
            raise ValueError(f"proj must be >= 0, got {proj}")
        if proj and self.cell != "lstm":
            raise ValueError(f"proj (a projection size) is only for lstm, got cell "
                             f"{self.cell!r} with proj={proj}")
        if proj >= self.hidden:
            raise ValueError(f"proj must be smaller than hidden ({self.hidden}), got {proj}")
        object.__setattr__(self, "proj", proj)

    @classmethod
    def for_shape(cls, cell, pass_, dtype, hidden, batch, arch=90, proj=0) -> "KernelKey":
        """The key a call with this shape uses (the batch goes to its bucket)."""
        return cls(cell, pass_, dtype, int(hidden), batch_bucket(batch), int(arch),
                   int(proj or 0))

    @property
    def shape_label(self) -> str:
        """``"1024"``, or ``"1024p256"`` with a projection: the key's hidden field."""
        return f"{self.hidden}p{self.proj}" if self.proj else str(self.hidden)

    def __str__(self) -> str:
        return (f"{self.cell}:{self.pass_}:{self.dtype}:h{self.shape_label}:"
                f"b{self.batch_bucket}:sm{self.arch}")

    @classmethod
    def parse(cls, text: str) -> "KernelKey":
        """Inverse of ``str(key)``: ``...:h1024:...``, with a projection ``...:h1024p256:...``."""
        parts = text.split(":")
        if (len(parts) != 6 or not parts[3].startswith("h") or not parts[4].startswith("b")
                or not parts[5].startswith("sm")):
            raise ValueError(f"not a kernel key: {text!r}")
        hidden, sep, proj = parts[3][1:].partition("p")
        try:
            proj = int(proj) if sep else 0
            if sep and proj < 1:  # "h1024p0" is not how a key is written
                raise ValueError(f"projection size must be >= 1, got {proj}")
            return cls(parts[0], parts[1], parts[2], int(hidden), int(parts[4][1:]),
                       int(parts[5][2:]), proj)
        except (TypeError, ValueError) as e:
            raise ValueError(f"not a kernel key: {text!r} ({e})") from None

    def to_dict(self) -> dict:
        """The key's fields; ``"proj"`` only with a projection (as ``str(key)`` shows it)."""
        d = {"cell": self.cell, "pass": self.pass_, "dtype": self.dtype,
             "hidden": self.hidden, "batch_bucket": self.batch_bucket, "arch": self.arch}
        if self.proj:
            d["proj"] = self.proj
        return d

    @property
    def gates(self) -> int:
        return GATES[self.cell]

    @property
    def elem_bytes(self) -> int:
        return _ELEM_BYTES[self.dtype]


def _default(key: KernelKey) -> KernelConfig:
    from ..kernels.launch import default_config

    return default_config(key.cell, key.pass_, key.dtype, key.hidden, key.batch_bucket,
                          num_sms=arch_info(key.arch)[0], proj=key.proj)


def _log2(v: int) -> float:
    return math.log2(v) if v > 0 else 0.0


def _preference_order(key: KernelKey, base: KernelConfig,
                      configs: Iterable[KernelConfig]) -> List[KernelConfig]:
    """``configs`` sorted by closeness to ``base`` (log2 distance, block_h weighs most)."""
    def dist(c: KernelConfig):
        k, bk = c.block_k, base.block_k
        k_dist = 0.0 if k == bk else (3.0 if (k == 0) != (bk == 0) else abs(_log2(k) - _log2(bk)))
        k_dist += 0.0 if c.resident_k == base.resident_k else 1.0
        return (abs(_log2(c.block_h) - _log2(base.block_h)) * 4
                + abs(_log2(c.block_b) - _log2(base.block_b)) * 2
                + abs(_log2(c.num_warps) - _log2(base.num_warps))
                + abs(c.num_stages - base.num_stages) + k_dist,
                -c.block_h, c.num_warps)
    return sorted(dict.fromkeys(configs), key=dist)


def _own_candidates(key: KernelKey, base: KernelConfig) -> List[KernelConfig]:
    from ..kernels.launch import default_resident_k, weight_slice_bytes

    top = max(16, _next_pow2(key.hidden))
    _, max_smem = arch_info(key.arch)
    streams = bool(base.block_k)
    bhs = []
    b = 16
    while b <= top:
        # A persistent slice that alone exceeds a block's shared memory would only be
        # compiled to be dropped: leave it out (the default's own block_h always stays).
        # (The slice: K padded to whole 256-input chunks; with a projection, the larger
        # of the two passes' W_hh and W_hr shares.)
        if streams or b == base.block_h or weight_slice_bytes(
                key.cell, key.hidden, b, key.elem_bytes, proj=key.proj, gpu=True) <= max_smem:
            bhs.append(b)
        b *= 2
    bhs.sort(key=lambda v: (abs(math.log2(v) - math.log2(base.block_h)), -v))
    bhs = sorted(bhs[:4])
    other_bb = 32 if (base.block_b <= 16 and key.batch_bucket > 16) else 16
    bbs = sorted({base.block_b, other_bb} | ({64} if key.batch_bucket >= 64 else set()))
    # Streaming tiles (block_k > 0) only when the default streams: a persistent tile
    # that the default could not fit on chip would only be compiled to be dropped.
    bk = base.block_k
    ks = [0] if not bk else sorted({bk, max(16, bk // 2), min(top, bk * 2)})
    out = []
    for bh in bhs:
        for bb in bbs:
            for w in (4, 8):
                for k in ks:
                    # A streaming tile keeps what the default rule would keep on-chip.
                    rk = 0 if not k or key.proj else default_resident_k(
                        key.cell, key.hidden, bh, k, key.elem_bytes, bb)
                    out.append(KernelConfig(bh, bb, w, 1, k, rk))
    if base.resident_k:  # and the default with all of its slice streamed
        out.append(replace(base, resident_k=0))
    return out


def _streaming_extras(key: KernelKey, base: KernelConfig) -> List[KernelConfig]:
    """A few weight-streaming tiles for large hidden sizes whose default is persistent.

    Streaming ``W_hh`` from L2 frees shared memory for more programs per SM; at
    ``hidden >= 512`` that is worth timing against the persistent tiles.
    """
    if base.block_k or key.hidden < 512:
        return []
    top = _next_pow2(key.hidden)
    out = []
    for bh in sorted({base.block_h, 32}):
        for w in (4, 8):
            out.append(KernelConfig(min(bh, top), base.block_b, w, 1, 128))
    return list(dict.fromkeys(out))


def candidate_configs(key: KernelKey, default: Optional[KernelConfig] = None) -> List[KernelConfig]:
    """The configs the tuner tries for ``key`` (the default first, then by closeness to it)."""
    from ..kernels.launch import auto_split_k
    base = default or heuristic_config(key)
    extras = _streaming_extras(key, base)
    if not auto_split_k():  # the default is un-split here: time split tiles against it
        extras = [replace(base, split_k=base.num_warps),
                  replace(base, split_k=base.num_warps // 2)] + extras
    elif base.split_k != 1:  # the default without split-K: what splitting K buys
        extras = [replace(base, split_k=1)] + extras
    own = _preference_order(key, base, [base, *_own_candidates(key, base)])
    own = own[:MAX_CANDIDATES - len(extras)]
    return own + [c for c in extras if c not in own]


def heuristic_config(key: KernelKey, report_fn: Optional[Callable] = None,
                     accept: Optional[Callable] = None) -> KernelConfig:
    """The config used when nothing is cached for ``key``.

    Without ``report_fn`` this is the launcher's ``default_config``. With
    ``report_fn`` (a ``static_report``-like callable) and ``accept`` (``report ->
    list of reasons``, empty when accepted), it is the first config in
    preference order that passes the static check; the unchecked default when
    none does.
    """
    base = _default(key)
    if report_fn is None or accept is None:
        return base
    for cfg in candidate_configs(key, base):
        try:
            report = report_fn(key.cell, key.pass_, key.dtype, key.hidden, key.batch_bucket,
                               config=cfg, arch=key.arch, proj=key.proj)
        except Exception:  # noqa: BLE001 - a config that fails to compile is not accepted
            continue
        if not accept(report):
            return cfg
    return base
