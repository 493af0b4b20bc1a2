"""Tile configuration of the persistent recurrent kernels."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


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
      fallback for slices beyond on-chip capacity (e.g. GRU hidden 2048 bf16).
    """

    block_h: int
    block_b: int
    num_warps: int = 4
    num_stages: int = 1
    block_k: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown KernelConfig fields: {sorted(unknown)}")
        cfg = cls(**{k: int(v) for k, v in d.items()})
        for f in fields(cls):
            v = getattr(cfg, f.name)
            if f.name == "block_k" and v == 0:
                continue
            if v < 1 or (f.name != "num_stages" and v & (v - 1)):
                raise ValueError(f"KernelConfig.{f.name} must be a positive power of two, got {v}")
        return cfg

    def __str__(self) -> str:
        return (f"block_h={self.block_h} block_b={self.block_b} "
                f"num_warps={self.num_warps} num_stages={self.num_stages}"
                + (f" block_k={self.block_k}" if self.block_k else ""))
