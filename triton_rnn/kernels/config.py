"""Tile configuration of the persistent recurrent kernels."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


#: ``(lowest, highest)`` value of each field that :meth:`KernelConfig.from_dict` accepts:
#: a block is at most 1024 threads (32 warps), and tiles beyond these sizes could
#: not fit one block's registers and shared memory on any GPU.
FIELD_LIMITS = {
    "block_h": (1, 8192),
    "block_b": (1, 1024),
    "num_warps": (1, 32),
    "num_stages": (1, 8),
    "block_k": (1, 8192),
    "resident_k": (16, 65536),
    "split_k": (1, 32),
}


@dataclass(frozen=True)
class KernelConfig:
    """How one (layer, direction) is tiled across programs.

    * ``block_h``: hidden units per program. Each program owns all gates of its
      units and keeps their rows of ``W_hh`` on-chip. ``block_h >= hidden``
      means one program holds all of ``W_hh`` (no grid barrier is needed).
    * ``block_b``: batch rows per tile (the M dimension of the per-step dot).
    * ``num_warps``, ``num_stages``: passed to Triton.
    * ``block_k``: 0 keeps the program's ``W_hh`` slice on-chip for the whole
      sequence (persistent weights). A power of two streams the slice from
      global memory (L2) in chunks of ``block_k`` inputs at every step: the
      fallback for slices beyond on-chip capacity (e.g. GRU hidden 2048 fp32).
    * ``resident_k``: with ``block_k > 0``, the first ``resident_k`` inputs of the
      slice (rounded down to whole K chunks of the kernel, 256 inputs from hidden
      256 up) stay on-chip and only the rest is streamed at every step; 0 streams
      it all. This is how a slice too large for one block's shared memory still
      keeps most of its weights on-chip (e.g. LSTM hidden 2048 bf16).
    * ``split_k``: how many parts each step's recurrent dots cut their K (the
      inputs) into, one per group of warps, summed once per step (split-K). A
      program's output tile (16 x 16) is one tensor-core tile, so without a split
      every warp would multiply all of K and extra warps would only repeat it.
      0 (the default) lets :func:`triton_rnn.kernels.launch.split_parts` choose:
      the warps the output tile leaves idle with Triton 3.9 and later, none with
      older ones and in the interpreter; 1 does not split. Any value is halved
      while a part would be under the tensor cores' minimum K of 16 inputs.
    """

    block_h: int
    block_b: int
    num_warps: int = 4
    num_stages: int = 1
    block_k: int = 0
    resident_k: int = 0
    split_k: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        """Build and check a config from untrusted data (a cache file, the command line).

        Fields must be JSON integers (not booleans, floats or strings) within
        :data:`FIELD_LIMITS`: powers of two, except ``num_stages`` and
        ``resident_k`` (a multiple of 16); ``block_k``, ``resident_k`` and
        ``split_k`` may also be 0. Raises ``ValueError`` naming the field otherwise.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a KernelConfig must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown KernelConfig fields: {sorted(unknown)}")
        missing = {"block_h", "block_b"} - set(d)
        if missing:
            raise ValueError(f"KernelConfig is missing {sorted(missing)}")
        for name, v in d.items():
            if type(v) is not int:
                raise ValueError(f"KernelConfig.{name} must be an integer, got {v!r}")
            lo, hi = FIELD_LIMITS[name]
            if name in ("block_k", "resident_k", "split_k") and v == 0:
                continue
            if name == "resident_k":
                bad, kind = v % 16 != 0, "a multiple of 16"
            elif name == "num_stages":
                bad, kind = False, "an integer"
            else:
                bad, kind = bool(v & (v - 1)), "a power of two"
            if bad or not lo <= v <= hi:
                raise ValueError(f"KernelConfig.{name} must be {kind} in [{lo}, {hi}], got {v}")
        return cls(**d)

    def label(self) -> str:
        """Short form for tables: ``h16 b16 w8 s1``, plus ``k128`` for a streaming tile,
        ``r1536`` for the inputs of its slice kept on-chip and ``x1`` for a set ``split_k``."""
        return (f"h{self.block_h} b{self.block_b} w{self.num_warps} s{self.num_stages}"
                + (f" k{self.block_k}" if self.block_k else "")
                + (f" r{self.resident_k}" if self.resident_k else "")
                + (f" x{self.split_k}" if self.split_k else ""))

    @classmethod
    def label_of(cls, d, unknown: str = "?") -> str:
        """:meth:`label` of a stored tile (a dict from a cache or a results file), or
        ``unknown`` when ``d`` is not a valid tile."""
        try:
            return cls.from_dict(d).label()
        except ValueError:
            return unknown

    def __str__(self) -> str:
        return (f"block_h={self.block_h} block_b={self.block_b} "
                f"num_warps={self.num_warps} num_stages={self.num_stages}"
                + (f" block_k={self.block_k}" if self.block_k else "")
                + (f" resident_k={self.resident_k}" if self.resident_k else "")
                + (f" split_k={self.split_k}" if self.split_k else ""))
