"""Host-side launchers for the recurrent kernels: configs, grids, persistence.

Modes (``mode=`` in ``kernel_options``):

* ``"persistent"`` (the default, ``"auto"``): one launch for all timesteps. With
  one hidden block per program no barrier is needed. With the hidden dimension
  split, the grid is launched cooperatively and bounded by SM count times
  occupancy so that the grid barrier cannot deadlock. When that bound cannot
  hold, the launcher warns once and falls back to stepwise mode.
* ``"stepwise"``: one launch per timestep of the same kernel; the launch
  boundary is the barrier. Always used under Triton's interpreter when the
  hidden dimension is split (programs run one after another there).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .cells import CELL_SPECS, CellSpec
from .config import KernelConfig
from .recurrent import rnn_backward_kernel, rnn_forward_kernel

__all__ = [
    "MODES",
    "interpreting",
    "default_config",
    "select_config",
    "forward",
    "backward",
    "dtype_name",
    "output_view",
    "hidden_before_view",
]

MODES = ("auto", "persistent", "stepwise")

#: Minimum K of ``tl.dot`` on a GPU for 16- and 32-bit inputs (M and N may be
#: smaller: Triton pads them for the tensor cores).
MIN_DOT = 16
#: Default batch tile: the M of the tensor-core instruction.
MIN_BLOCK_B = 16
#: Smallest hidden slice per program the default rule uses.
MIN_BLOCK_H = 8
#: Largest weight slice a program keeps on-chip: sm_90 opts into 227 KB of
#: shared memory per block, and the rest is left for one K chunk of the h tile.
#: Beyond it, the weights are streamed from L2.
ONCHIP_WEIGHT_LIMIT = 200 * 1024
#: Slice size the default configs aim for when several fit: smaller slices
#: mean more programs, i.e. more SMs working on each step.
ONCHIP_WEIGHT_TARGET = 96 * 1024
#: Resident weights are kept as K chunks of this many inputs, so that each
#: step's dot operands stay small in registers (hidden 1024 spilled on
#: Triton 3.6 with one [1024, block_h] operand per gate).
RESIDENT_K_CHUNK = 256
#: Largest streamed weight chunk (all gates, ``block_k`` inputs) of the default configs.
STREAM_CHUNK_LIMIT = 48 * 1024
#: When a slice streams, the default keeps as many whole K chunks of it on-chip as fit
#: in this budget together with one streamed chunk of the weights and one of the ``h``
#: tile (``block_b x block_k``): what the compiled kernels hold in shared memory on
#: sm_90, which leaves 7 KB of the 227 KB a block can have. LSTM hidden 2048 bf16 keeps
#: 1536 of 2048 inputs on-chip in 217,088 B (batch tile 16), 221,184 B (32).
RESIDENT_STREAM_LIMIT = 220 * 1024
#: Largest streamed chunk beside resident chunks, by element size. Found by compiling
#: for sm_90: GRU hidden 2048 fp32 kept 16 B on the stack with 24 KB chunks (Triton
#: 3.9), LSTM 2048 fp32 24 B with 16 KB (3.6), none with 8 KB; GRU 3072 bf16 none
#: with 24 KB, but 32 B with 12 KB (3.9; ptxas capped it at 128 registers).
PARTLY_RESIDENT_STREAM_CHUNK = {2: 24 * 1024, 4: 8 * 1024}
#: Compile options of every recurrent kernel, beside the tile's warps and stages (the
#: static report compiles with the same). FP fusion (``a * b + c`` as one FMA) is what
#: Triton has always done; saying so keeps the kernels' rounding the same when Triton's
#: default flips (3.10 turns it off; 3.9 warns at every first compile until it is set).
COMPILE_OPTIONS = {"enable_fp_fusion": True}
#: Largest value of a grid barrier's int32 arrival counter: one persistent launch
#: runs at most this many steps x hidden blocks (more take several launches).
BARRIER_COUNT_LIMIT = 2**31 - 1
#: With an LSTM projection the weight slices are narrow (``proj`` inputs), so the
#: slice target alone would give a program up to 64 units (256 gate columns) and
#: spill: the default split keeps at most this many gate columns per program.
MAX_PROJ_GATE_COLUMNS = 128
#: A single program holds at most this many gate columns (LSTM hidden 64), as many
#: as the budget allows without a projection; a small projection would otherwise
#: give one program all of hidden 128 or 256, which spills.
MAX_SINGLE_PROGRAM_COLUMNS = 256
#: The automatic split-K (``split_k=0``) uses at most this many parts. Compiled for sm_90,
#: 8 parts of 8 warps took 138 registers per thread where 4 parts took 74 (GRU hidden
#: 1024 bf16 forward; 1 instead of 2 programs per SM) for the same tensor-core work per
#: warp (the other factor of 2 goes to the output tile's two 8-column halves). Where a
#: program's slice leaves room for one program per SM anyway, :func:`default_config`
#: splits over all the warps: 4 parts (or 2) there kept 8-16 B of loop invariants on the
#: stack with Triton 3.9 (GRU hidden 1024 fp32 backward, GRU 2560-4096 bf16 forward), 8
#: parts did not. (LSTM 2560-4096 fp32, whose 32-input streamed chunks allow 2 parts,
#: keep 16 B there; with 1 part, GRU 2560-4096 fp32 and LSTM 2560-4096 bf16 backward
#: did instead.)
MAX_AUTO_SPLIT_K = 4
#: The automatic split-K (``split_k=0``, and the defaults' ``split_k``) from this Triton
#: version on; before it, the un-split 2-D dot. Compiled for sm_90, Triton 3.6 lays a
#: batched dot's spare warps along M rather than N (GRU hidden 1024 bf16 at 4 parts of 8
#: warps: 96 ``HMMA`` per warp, 768 in all for a 384-``HMMA`` step), and at 8 parts keeps
#: 8-16 B of loop invariants on the stack in LSTM defaults (hidden 1024 bf16 forward,
#: 1536 backward, 256 fp32 forward). The tuner still times split tiles there, and a
#: config's explicit ``split_k`` is always kept.
AUTO_SPLIT_K_MIN_TRITON = (3, 9)


_TRITON_VERSION = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])


def auto_split_k() -> bool:
    """Whether this Triton gets split-K by default (:data:`AUTO_SPLIT_K_MIN_TRITON`)."""
    return _TRITON_VERSION >= AUTO_SPLIT_K_MIN_TRITON


#: Up to this many weight bytes, one program holds all of W_hh (no barrier).
SINGLE_PROGRAM_BUDGET = 64 * 1024

_warned: set = set()
#: Per compiled variant (see :func:`_variant_key`): how many programs can be resident,
#: or 0 with the reason once the driver refused the cooperative launch. Saves a
#: second host-side compile lookup on every call, and retrying a refused launch.
_fit_cache: dict = {}


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def interpreting() -> bool:
    """True when Triton's interpreter is active (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _pow2_extent(hidden: int, gpu: Optional[bool] = None) -> int:
    """``hidden`` padded to a power of two (an ``arange`` size), at least MIN_DOT on a GPU."""
    if gpu is None:
        gpu = not interpreting()
    k = triton.next_power_of_2(hidden)
    return max(MIN_DOT, k) if gpu else k


def k_tiling(hidden: int, gpu: Optional[bool] = None) -> tuple:
    """``(KC, NUM_KC)``: the recurrent dots' K (= hidden) in ``NUM_KC`` chunks of ``KC``.

    ``KC`` is a power of two (an ``arange`` size): the padded hidden size up to
    :data:`RESIDENT_K_CHUNK`, at least :data:`MIN_DOT` on a GPU. Larger hidden
    sizes pad only to a whole number of chunks, not to the next power of two:
    hidden 1536 holds six chunks of 256 on-chip, not eight.
    """
    kc = min(_pow2_extent(hidden, gpu), RESIDENT_K_CHUNK)
    return kc, triton.cdiv(hidden, kc)


def resident_chunks(k: int, block_k: int, resident_k: int, gpu: Optional[bool] = None) -> int:
    """How many of the :func:`k_tiling` chunks of a weight with ``k`` inputs stay on-chip:
    all of them when nothing streams (``block_k == 0``), else the whole chunks within
    the first ``resident_k`` inputs."""
    kc, num_kc = k_tiling(k, gpu)
    return num_kc if not block_k else min(resident_k // kc, num_kc)


def k_chunk_meta(k: int, k2: int, block_k: int, resident_k: int,
                 gpu: Optional[bool] = None, split_k: int = 1) -> dict:
    """The kernels' K-chunk constexprs: ``KC, NUM_KC, NUM_RES`` for ``W_hh``'s K (``k``),
    ``KC2, NUM_KC2, NUM_RES2`` for ``W_hr``'s (``k2``; unused without a projection), and
    ``SPLIT_K`` (a plan's :func:`split_parts`)."""
    (kc, num_kc), (kc2, num_kc2) = k_tiling(k, gpu), k_tiling(k2, gpu)
    return dict(KC=kc, NUM_KC=num_kc, NUM_RES=resident_chunks(k, block_k, resident_k, gpu),
                KC2=kc2, NUM_KC2=num_kc2,
                NUM_RES2=resident_chunks(k2, block_k, resident_k, gpu), SPLIT_K=split_k)


def split_parts(split_k: int, num_warps: int, out_tiles: int, k_extents,
                gpu: Optional[bool] = None) -> int:
    """Parts each step's dots split K into (``SPLIT_K``, see :class:`KernelConfig`).

    ``split_k`` when set; else (0) 1 in the interpreter (where parts cost time and buy
    nothing) and with a Triton older than :data:`AUTO_SPLIT_K_MIN_TRITON`; else the warps
    the output tile leaves idle: a dot
    gives each warp whole ``16 x 8`` tensor-core tiles of its output, so a
    program's ``out_tiles`` of them (``BLOCK_B / 16 * N / 8``) keep at most that
    many warps busy, and ``num_warps / out_tiles`` parts of K give the rest work
    (at most :data:`MAX_AUTO_SPLIT_K`). Either way halved while a part of any of
    ``k_extents`` (the K chunk of ``W_hh``, of ``W_hr`` with a projection, and the
    streamed chunk ``block_k``) would be under :data:`MIN_DOT` inputs on a GPU
    (under one in the interpreter).
    """
    if gpu is None:
        gpu = not interpreting()
    if split_k:
        parts = triton.next_power_of_2(split_k)
    elif not gpu or not auto_split_k():
        parts = 1
    else:
        parts = min(MAX_AUTO_SPLIT_K, max(1, num_warps // max(1, out_tiles)))
    least = MIN_DOT if gpu else 1
    while parts > 1 and any(k // parts < least for k in k_extents):
        parts //= 2
    return parts


def padded_k(hidden: int, gpu: Optional[bool] = None) -> int:
    """Hidden size padded to whole K chunks: the K extent of the on-chip weight slice."""
    kc, n = k_tiling(hidden, gpu)
    return kc * n


def block_p_for(proj: int, hidden: int, block_h: int, gpu: Optional[bool] = None) -> int:
    """LSTM projection outputs per program: ``proj`` over the ``cdiv(hidden, block_h)`` programs."""
    grid_h = triton.cdiv(hidden, min(block_h, _pow2_extent(hidden, gpu)))
    return triton.next_power_of_2(triton.cdiv(proj, grid_h))


def weight_slice_bytes(cell: str, hidden: int, block_h: int, itemsize: int, proj: int = 0,
                       gpu: Optional[bool] = True) -> int:
    """On-chip weight bytes of one program: ``W_hh`` rows of its ``block_h`` units (all gates,
    K padded to whole chunks). With ``proj``, the larger of the two passes: the forward
    holds those rows (K = ``proj``) and ``W_hr`` rows of its ``block_p`` outputs (K =
    ``hidden``); the backward ``W_hh`` columns of its outputs (K = ``hidden``) and ``W_hr``
    columns of its units (K = ``proj``). ``block_p`` is rounded up to a power of two, so
    the two can differ."""
    spec = CELL_SPECS[cell]
    if not proj:
        return spec.gates * padded_k(hidden, gpu) * block_h * itemsize
    block_p = block_p_for(proj, hidden, block_h, gpu)
    fwd = spec.gates * padded_k(proj, gpu) * block_h + padded_k(hidden, gpu) * block_p
    bwd = spec.gates * padded_k(hidden, gpu) * block_p + padded_k(proj, gpu) * block_h
    return max(fwd, bwd) * itemsize


def default_config(cell: str, pass_: str, dtype, hidden: int, batch: int,
                   num_sms: int = 132, proj: int = 0) -> KernelConfig:
    """The heuristic tile config used when nothing is tuned.

    Rule: if all of ``W_hh`` fits in :data:`SINGLE_PROGRAM_BUDGET`, one program
    per batch tile holds it (``block_h`` = padded hidden, no barrier). Otherwise
    ``block_h`` is the largest power of two >= 16 whose weight slice
    (``gates * padded_k * block_h * itemsize``, :func:`padded_k`) fits in
    :data:`ONCHIP_WEIGHT_TARGET`; 16, or 8 when a 16-unit slice exceeds
    :data:`ONCHIP_WEIGHT_LIMIT` (LSTM hidden 1024 in fp32), if none does.
    When the slices outnumber the SMs (one resident program per SM),
    ``block_h`` doubles until they do not; if the slice then exceeds the limit
    (LSTM hidden 2048 in bf16, GRU hidden 2048 in fp32), part of each slice is
    streamed from L2 every step instead:
    ``resident_k`` keeps the first inputs of the slice on-chip
    (:func:`default_resident_k`), and the rest streams in chunks of ``block_k``
    inputs: 128, halved (down to 32) while a chunk of all gates exceeds
    :data:`PARTLY_RESIDENT_STREAM_CHUNK`. LSTM hidden 2048 bf16 streams a quarter
    of ``W_hh`` per step, GRU hidden 2048 fp32 half. With a projection, ``block_h``
    does not double: when the slice exceeds the limit or the slices outnumber the SMs,
    all of it streams, 32 units per program, in chunks up to :data:`STREAM_CHUNK_LIMIT`
    (the rule that was checked spill-free for LSTMP below).
    ``block_b`` is 16 whatever the batch (programs loop over batch tiles), so
    the default never depends on the batch size.
    ``num_warps``: 4 for the one-gate RNN; 8 for GRU and LSTM from hidden 1024
    up, in fp32, or when a program owns 256 or more gate columns
    (``gates * block_h``); else 4. That rule is what keeps every default
    spill-free (no local memory) when compiled for sm_90 with Triton 3.6 and 3.9,
    for every cell and dtype at hidden 32 to 2048.
    ``split_k``: 0 (as many K parts as the warps the 16-row output tile leaves idle, at
    most :data:`MAX_AUTO_SPLIT_K`), except where the on-chip slice leaves room for one
    program per SM anyway (over half of :data:`ONCHIP_WEIGHT_LIMIT`, or partly
    streamed): all ``num_warps``, unless a streamed chunk is too narrow for that.
    With a Triton older than :data:`AUTO_SPLIT_K_MIN_TRITON`, 0 (which is 1 there).
    ``pass_`` is accepted for symmetry: both passes hold the same slice size.

    With an LSTM projection (``proj``) a slice is its ``W_hh`` rows (``proj``
    inputs) plus its share of ``W_hr`` (:func:`weight_slice_bytes`), under the same
    rule, except that a program keeps at most :data:`MAX_PROJ_GATE_COLUMNS` gate
    columns when split, :data:`MAX_SINGLE_PROGRAM_COLUMNS` when not. Checked
    spill-free for LSTM (hidden, proj) from (64, 16) to (4096, 1024) in bf16, fp16
    and fp32 on sm_90 with Triton 3.6 and 3.9.
    """
    spec = CELL_SPECS[cell]
    itemsize = torch.empty((), dtype=_as_dtype(dtype)).element_size()
    hp = _pow2_extent(hidden, gpu=True)  # block_h is an arange size

    def size(bh):
        return weight_slice_bytes(cell, hidden, bh, itemsize, proj)

    block_k = resident_k = 0
    if size(hp) <= SINGLE_PROGRAM_BUDGET and spec.gates * hp <= MAX_SINGLE_PROGRAM_COLUMNS:
        block_h = hp
    else:
        block_h = 16 if size(16) <= ONCHIP_WEIGHT_LIMIT else MIN_BLOCK_H
        while not proj and triton.cdiv(hidden, block_h) > num_sms and block_h < hp:
            block_h *= 2  # at most one slice per SM
        if size(block_h) > ONCHIP_WEIGHT_LIMIT or triton.cdiv(hidden, block_h) > num_sms:
            # Beyond on-chip capacity: stream (part of) W_hh from L2 at every step.
            if proj:
                block_h = 32
            block_k = 128
            limit = STREAM_CHUNK_LIMIT if proj else PARTLY_RESIDENT_STREAM_CHUNK[itemsize]
            while block_k > 32 and spec.gates * block_h * block_k * itemsize > limit:
                block_k //= 2
            if not proj:
                resident_k = default_resident_k(cell, hidden, block_h, block_k, itemsize,
                                                MIN_BLOCK_B)
        else:
            while block_h * 2 <= hp and size(block_h * 2) <= ONCHIP_WEIGHT_TARGET and (
                    not proj or spec.gates * block_h * 2 <= MAX_PROJ_GATE_COLUMNS):
                block_h *= 2
    # The same tile for every batch size: a new batch size never recompiles.
    block_b = MIN_BLOCK_B
    big = hp >= 1024 or itemsize == 4 or spec.gates * block_h >= 256
    num_warps = 8 if spec.gates > 1 and big else 4
    split_k = 0
    if auto_split_k() and (resident_k or (
            not block_k and size(block_h) > ONCHIP_WEIGHT_LIMIT // 2)):
        # One program per SM whatever its registers (its slice takes most of the shared
        # memory): split K over all the warps, unless a streamed chunk is too narrow for
        # that (then the automatic rule; see MAX_AUTO_SPLIT_K).
        split_k = 0 if block_k and block_k // num_warps < MIN_DOT else num_warps
    return KernelConfig(block_h=block_h, block_b=block_b, num_warps=num_warps, num_stages=1,
                        block_k=block_k, resident_k=resident_k, split_k=split_k)


def default_resident_k(cell: str, hidden: int, block_h: int, block_k: int, itemsize: int,
                       block_b: int) -> int:
    """Inputs of a streamed ``W_hh`` slice the default keeps on-chip: the most whole K
    chunks (:func:`k_tiling`) that fit :data:`RESIDENT_STREAM_LIMIT` beside one streamed
    chunk of ``block_k`` inputs of the weights and of the ``h`` tile; 0 when none does."""
    gates = CELL_SPECS[cell].gates
    kc, num_kc = k_tiling(hidden, gpu=True)
    room = RESIDENT_STREAM_LIMIT - (gates * block_h + block_b) * block_k * itemsize
    return kc * max(0, min(num_kc - 1, room // (gates * kc * block_h * itemsize)))


def _as_dtype(dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def select_config(cell: str, pass_: str, dtype, hidden: int, batch: int,
                  device=None, override: Optional[KernelConfig] = None,
                  proj: int = 0) -> KernelConfig:
    """The config the launcher uses: ``override``, else the tuned cache entry, else the default.

    An LSTM with ``proj`` looks up the entries tuned for that projection size only.
    """
    if override is not None:
        return override
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        try:
            from ..autotune import lookup_config
        except ImportError:  # autotuner not installed in this tree
            lookup_config = None
        if lookup_config is not None:
            cfg = lookup_config(cell, pass_, dtype_name(_as_dtype(dtype)), hidden, batch, device,
                                proj=proj)
            if cfg is not None:
                return cfg
    num_sms = 132
    if device is not None and device.type == "cuda":
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    return default_config(cell, pass_, dtype, hidden, batch, num_sms, proj)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's cuDNN TF32 switch, as cuDNN RNNs do; exact IEEE when it is off.

    Under Triton's interpreter bf16 dots take fp32 operands: its bf16 ``tl.dot``
    is wrong (it multiplies the raw 16-bit patterns). The products of bf16 values
    are exact in fp32, so this is what a GPU's bf16 tensor cores compute.
    """
    if interpreting():
        return "fp32_operands" if dtype == torch.bfloat16 else "ieee"
    if dtype == torch.float32 and rnn_allows_tf32():
        return "tf32"
    return "ieee"


def rnn_allows_tf32() -> bool:
    """Whether torch lets cuDNN's RNNs compute fp32 in TF32 (the recurrence follows suit).

    Reads ``torch.backends.cudnn.rnn.fp32_precision`` where torch has it (reading
    the legacy ``cudnn.allow_tf32`` raises once the new API set conv and RNN
    apart), else ``torch.backends.cudnn.allow_tf32``.
    """
    precision = getattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # legacy and new precision settings mixed
        return True


@dataclass
class _Plan:
    grid_b: int
    grid_h: int
    block_h: int
    block_b: int
    block_k: int
    resident_k: int
    persistent: bool
    use_barrier: bool
    block_p: int = 1
    split_k: int = 1


def programs_per_sm(regs_per_thread: int, num_warps: int, shared_bytes: int, regs_per_sm: int,
                    threads_per_sm: int, smem_per_sm: int) -> int:
    """How many programs of this size one SM holds at once (at most 32 blocks).

    Registers are allocated per warp in units of 256 and sit in four
    sub-partitions that each hold whole warps; each block's shared memory also
    reserves 1 KB for the runtime, and is allocated in units of 128 bytes (as
    CUDA's occupancy calculator counts it).
    """
    regs_per_warp = ((max(regs_per_thread, 1) * 32 + 255) // 256) * 256
    by_regs = 4 * ((regs_per_sm // 4) // regs_per_warp) // num_warps
    by_threads = threads_per_sm // (32 * num_warps)
    smem_per_block = (shared_bytes + 1024 + 127) // 128 * 128
    by_smem = smem_per_sm // smem_per_block if shared_bytes else by_threads
    return max(0, min(by_regs, by_threads, by_smem, 32))


def _max_resident_programs(compiled, num_warps: int, device) -> int:
    """Programs that fit on the whole GPU at once, from the compiled kernel's resources."""
    props = torch.cuda.get_device_properties(device)
    per_sm = programs_per_sm(
        int(getattr(compiled, "n_regs", 0) or 0), num_warps, int(compiled.metadata.shared),
        int(getattr(props, "regs_per_multiprocessor", 65536) or 65536),
        int(getattr(props, "max_threads_per_multi_processor", 2048) or 2048),
        int(getattr(props, "shared_memory_per_multiprocessor", 233472) or 233472))
    return per_sm * props.multi_processor_count


def _variant_key(kernel, cfg: KernelConfig, args: tuple, H: int, R: int, meta: dict,
                 device) -> tuple:
    """What selects the compiled binary: constexprs, tile config, argument dtypes and the
    specialisations Triton makes (16-byte aligned pointers, ``H`` divisible by 16)."""
    spec = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
                 for a in args)
    return (kernel, str(device), cfg, tuple(sorted(meta.items())), spec, H % 16 == 0, H == 1,
            R % 16 == 0, R == 1)


def _plan(hidden: int, batch: int, cfg: KernelConfig, mode: str,
          gpu: Optional[bool] = None, proj: int = 0) -> _Plan:
    """Tiles and grid of a launch; ``gpu`` (default: not interpreting) applies the dot minima.

    ``block_p``: the LSTM projection's outputs per program (``proj`` over the grid)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if gpu is None:
        gpu = not interpreting()
    hp = _pow2_extent(hidden, gpu)
    block_h = min(cfg.block_h, hp)
    block_b = cfg.block_b
    block_k = 0 if not cfg.block_k else min(hp, max(cfg.block_k, MIN_DOT) if gpu
                                            else cfg.block_k)
    grid_h = triton.cdiv(hidden, block_h)
    tiles = triton.cdiv(batch, block_b)
    stepwise = mode == "stepwise" or (grid_h > 1 and not gpu)
    # Both passes' dots have K extents of hidden and (with a projection) proj; their
    # narrowest output is block_b x block_h, or x block_p in a projection phase.
    extents = [k_tiling(hidden, gpu)[0]] + ([k_tiling(proj, gpu)[0]] if proj else []) + (
        [block_k] if block_k else [])
    block_p = block_p_for(proj or hidden, hidden, block_h, gpu)
    out_tiles = max(1, block_b // 16) * max(1, min(block_h, block_p if proj else block_h) // 8)
    return _Plan(grid_b=tiles, grid_h=grid_h, block_h=block_h, block_b=block_b, block_k=block_k,
                 resident_k=cfg.resident_k if block_k else 0, persistent=not stepwise,
                 use_barrier=(not stepwise and grid_h > 1),
                 block_p=block_p,
                 split_k=split_parts(cfg.split_k, cfg.num_warps, out_tiles, extents, gpu))


class DirectionPair:
    """The two directions of one bidirectional layer and pass, running on two CUDA streams.

    Independent launches on two streams overlap on the GPU, which is the point:
    one direction's grid often leaves most SMs idle. Barrier grids are launched
    cooperatively, and CUDA keeps a cooperative grid fully resident, so two of
    them cannot starve each other; but when both cannot be resident at once
    (the sum of each grid over its resident bound exceeds 1) they would only
    compete for SMs. Then the second to launch waits for the first to finish,
    whichever stream runs first, rather than relying on how the hardware
    admits them. Each launch records an event for the other. One pair per
    pass (a CUDA graph may capture forward and backward apart); entries are
    forgotten once both directions have launched, and an event recorded under
    a stream capture is never waited on outside it, or the reverse.
    """

    def __init__(self) -> None:
        #: Per direction: (event after its latest launch, barrier grid or 0, resident bound,
        #: whether it was recorded during a stream capture).
        self._done: list = [None, None]

    def before(self, direction: int, barrier_grid: int, fit: int) -> bool:
        """Called before a barrier launch of ``barrier_grid`` programs (``fit`` resident at most).

        Returns whether the current stream now waits for the other direction.
        """
        other = self._done[1 - direction]
        if other is None or not other[1] or other[3] != _capturing():
            return False
        if barrier_grid / fit + other[1] / other[2] <= 1:
            return False
        torch.cuda.current_stream().wait_event(other[0])
        return True

    def after(self, direction: int, barrier_grid: int = 0, fit: int = 1) -> None:
        """Called once the launch(es) of ``direction`` are queued on the current stream."""
        if self._done[1 - direction] is not None:  # both directions launched: a pass is over
            self._done = [None, None]
            return
        event = torch.cuda.Event()
        event.record()
        self._done[direction] = (event, barrier_grid, fit, _capturing())


def _capturing() -> bool:
    return bool(torch.cuda.is_current_stream_capturing())


def _capture_underway(device: torch.device) -> bool:
    """Whether launches on ``device`` are being captured into a CUDA graph."""
    return device.type == "cuda" and _capturing()


def _launch(kernel, plan: _Plan, cfg: KernelConfig, T: int, B: int, H: int, R: int,
            args: tuple, meta: dict, device, what: str,
            pair: Optional[DirectionPair] = None) -> None:
    """Run all ``T`` steps: one persistent launch if possible, else one launch per step.

    ``args`` are the kernel's tensor arguments up to ``BATCH_SIZES``; the barrier
    counters and ``T, B, H, R, t_begin, n_steps`` are appended here. With an LSTM
    projection (``HAS_PROJ``) a step is two phases, and the launches count phases. Triton launches
    on the current CUDA device and its current stream, so the tensors' device is
    made current first (a model on ``cuda:1`` while ``cuda:0`` is current).
    ``pair`` is given when the other direction of the layer runs on another
    stream (see :class:`DirectionPair`). The kernels index their tensors as dense and
    row-major, so a strided one (an expanded state, say) is refused, not misread.
    """
    strided = [f"argument {i} {tuple(a.shape)} strides {a.stride()}"
               for i, a in enumerate(args) if not a.is_contiguous()]
    if strided:
        raise ValueError(f"triton_rnn {what}: the kernel needs contiguous tensors; got "
                         + "; ".join(strided))
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:  # a tensor's device: indexed
        with torch.cuda.device(device.index):
            return _launch_here(kernel, plan, cfg, T, B, H, R, args, meta, device, what, pair)
    return _launch_here(kernel, plan, cfg, T, B, H, R, args, meta, device, what, pair)


def _launch_here(kernel, plan: _Plan, cfg: KernelConfig, T: int, B: int, H: int, R: int,
                 args: tuple, meta: dict, device, what: str,
                 pair: Optional[DirectionPair] = None) -> None:
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **COMPILE_OPTIONS, **meta)
    direction = int(bool(meta.get("REVERSE")))
    n_phases = T * (2 if meta.get("HAS_PROJ") else 1)

    def full(bar, t_begin, n_steps):
        return (*args, bar, T, B, H, R, t_begin, n_steps)

    if plan.persistent and not plan.use_barrier:
        bar = torch.zeros(1, dtype=torch.int32, device=device)
        kernel[(plan.grid_b, plan.grid_h)](*full(bar, 0, n_phases), USE_BARRIER=False, **opts)
        if pair is not None:
            pair.after(direction)
        return
    if plan.persistent:
        # The grid barrier needs every program resident: bound the grid, launch cooperatively.
        bar = torch.zeros(plan.grid_b, dtype=torch.int32, device=device)
        vkey = _variant_key(kernel, cfg, args, H, R, meta, device)
        fit, reason = _fit_cache.get(vkey, (None, None))
        if fit is None:
            # Compile (the same variant the launch below uses) and load it, to read its
            # registers and shared memory before choosing the grid.
            compiled = kernel.warmup(*full(bar, 0, n_phases), USE_BARRIER=True,
                                     launch_cooperative_grid=True,
                                     grid=(plan.grid_b, plan.grid_h), **opts)
            compiled._init_handles()
            fit = _max_resident_programs(compiled, cfg.num_warps, device)
            _fit_cache[vkey] = (fit, None)
        grid_b = min(plan.grid_b, fit // plan.grid_h)
        if grid_b >= 1:
            if pair is not None:
                pair.before(direction, grid_b * plan.grid_h, fit)
            # The int32 barrier counters reach n_steps * grid_h: more steps than that
            # allows (millions) run as several launches, each with zeroed counters.
            chunk = max(1, BARRIER_COUNT_LIMIT // plan.grid_h)
            try:
                for t0 in range(0, n_phases, chunk):
                    if t0:
                        bar.zero_()
                    kernel[(grid_b, plan.grid_h)](*full(bar[:grid_b], t0,
                                                        min(chunk, n_phases - t0)),
                                                  USE_BARRIER=True, launch_cooperative_grid=True,
                                                  **opts)
                if pair is not None:
                    pair.after(direction, grid_b * plan.grid_h, fit)
                return
            except RuntimeError as e:  # the driver refused the cooperative launch
                if _capture_underway(device):
                    # The failed launch has invalidated the capture: a stepwise fallback
                    # could only fail there too, with a less helpful error.
                    raise RuntimeError(
                        f"triton_rnn: {what} with {cfg}: the cooperative launch was refused "
                        f"during CUDA graph capture ({e}); run it once outside the capture "
                        "(the warm-up) so that the fallback is chosen there, or pass "
                        "mode='stepwise'") from e
                reason = f"cooperative launch failed ({e})"
                _fit_cache[vkey] = (0, reason)
        elif reason is None:
            reason = (f"{plan.grid_h} hidden blocks exceed the {fit} programs that can be "
                      "resident at once")
        _warn_once((what, plan.grid_h, cfg), f"triton_rnn: {what} with {cfg} cannot run "
                   f"persistently: {reason}; falling back to one launch per timestep.")
    bar = torch.zeros(1, dtype=torch.int32, device=device)
    for phase in range(n_phases):
        kernel[(plan.grid_b, plan.grid_h)](*full(bar, phase, 1), USE_BARRIER=False, **opts)
    if pair is not None:
        pair.after(direction)


def forward(cell: str, xg: torch.Tensor, w_hh: torch.Tensor, b_hn: Optional[torch.Tensor],
            h0: torch.Tensor, c0: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
            batch_sizes: Optional[torch.Tensor], reverse: bool, cfg: KernelConfig,
            mode: str = "auto", save: bool = True, pair: Optional[DirectionPair] = None,
            w_hr: Optional[torch.Tensor] = None):
    """Run the recurrence of one (layer, direction).

    ``xg [T, B, G*H]`` is the input projection with the fused biases;
    ``w_hh [G*H, R]`` with ``R = H``, or the projection size ``P`` of an LSTM
    with ``w_hr [P, H]``; ``lengths`` (CPU int64, decreasing) and ``batch_sizes``
    (int32 on the device: live rows per step) describe packed input, or are
    ``None``. Returns ``hbuf [T + 1, B, R]`` (storage dtype: the outputs and
    ``h0``, see :func:`output_view`; zero on padding), ``h_state [B, H]`` fp32
    final hidden state per row (not with ``w_hr``), ``cseq [T, B, H]`` fp32 cell
    states (LSTM) or ``None``, ``saved [T, B, S*H]`` fp32 activations for the
    backward (not written, and ``None``, when ``save`` is false: inference) and,
    with ``w_hr``, ``mbuf [T, B, H]`` (``m_t = o * tanh(c_t)`` before the
    projection, storage dtype), else ``None``. ``pair``: the layer's other
    direction runs on another stream (:class:`DirectionPair`).
    """
    spec: CellSpec = CELL_SPECS[cell]
    T, B, GH = xg.shape
    H = GH // spec.gates
    R = w_hh.shape[1]
    dev = xg.device
    varlen = batch_sizes is not None
    hbuf, hst, cseq, saved, mbuf = forward_buffers(cell, xg, w_hh, varlen, save, w_hr)
    hbuf[T if reverse else 0] = h0
    pad_rows = None
    if varlen and reverse:
        # A reverse packed row starts at its own last step and reads h0 from the
        # padding slot just past it; that slot is zeroed again afterwards.
        pad_rows = torch.nonzero(lengths < T).flatten()
        slots = lengths[pad_rows].to(dev)
        pad_rows = pad_rows.to(dev)
        hbuf[slots, pad_rows] = h0[pad_rows]
    n_saved = spec.saved if save else 0
    proj = R if w_hr is not None else 0
    plan = _plan(H, B, cfg, mode, proj=proj)
    dummy = hst
    args = (xg, w_hh, w_hr if proj else xg, b_hn if b_hn is not None else dummy, h0,
            c0 if c0 is not None else h0, hbuf, mbuf if proj else hbuf, hst,
            cseq if cseq is not None else dummy, saved if save else dummy,
            batch_sizes if varlen else dummy)
    _launch(rnn_forward_kernel, plan, cfg, T, B, H, R, args, dict(
        CELL_FWD=spec.fwd, NUM_GATES=spec.gates, NUM_SAVED=n_saved, HAS_C=spec.has_c,
        HAS_BHN=spec.separate_bhn and b_hn is not None, HAS_PROJ=bool(proj),
        **k_chunk_meta(R, H, plan.block_k, plan.resident_k,
                       split_k=plan.split_k), BLOCK_H=plan.block_h,
        BLOCK_P=plan.block_p, BLOCK_B=plan.block_b, BLOCK_K=plan.block_k, REVERSE=reverse,
        VARLEN=varlen,
        DOT_PRECISION=_dot_precision(xg.dtype)), dev, f"{cell} forward", pair)
    if pad_rows is not None:
        hbuf[slots, pad_rows] = 0
    return hbuf, hst, cseq, saved, mbuf


def forward_buffers(cell: str, xg: torch.Tensor, w_hh: torch.Tensor, varlen: bool, save: bool,
                    w_hr: Optional[torch.Tensor] = None) -> tuple:
    """The tensors :func:`forward` returns, allocated (``None`` where it returns ``None``).

    With packed input (``varlen``) the per-step buffers start zeroed: the kernel
    writes no step past a row's length, and no output holds stale memory. So
    does ``h_state`` with ``w_hr``, which the kernel does not write then.
    """
    spec: CellSpec = CELL_SPECS[cell]
    T, B, GH = xg.shape
    H, R, dev = GH // spec.gates, w_hh.shape[1], xg.device
    alloc = torch.zeros if varlen else torch.empty
    hbuf = alloc(T + 1, B, R, dtype=xg.dtype, device=dev)
    hst = (torch.zeros if w_hr is not None else torch.empty)(B, H, dtype=torch.float32,
                                                             device=dev)
    cseq = alloc(T, B, H, dtype=torch.float32, device=dev) if spec.has_c else None
    saved = alloc(T, B, spec.saved * H, dtype=torch.float32, device=dev) if save else None
    mbuf = alloc(T, B, H, dtype=xg.dtype, device=dev) if w_hr is not None else None
    return hbuf, hst, cseq, saved, mbuf


def output_view(hbuf: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The ``[T, B, R]`` outputs inside ``hbuf`` (``h_t`` sits at slot ``t + 1``, or ``t`` in reverse)."""
    return hbuf[:-1] if reverse else hbuf[1:]


def hidden_before_view(hbuf: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``h_{t-1}`` for every step ``t`` (``h0`` at the first step of dense rows)."""
    return hbuf[1:] if reverse else hbuf[:-1]


def backward(cell: str, dout: torch.Tensor, dh_n: torch.Tensor, dc_n: Optional[torch.Tensor],
             w_hh: torch.Tensor, hbuf: torch.Tensor, h0: torch.Tensor, c0: Optional[torch.Tensor],
             cseq: Optional[torch.Tensor], saved: torch.Tensor,
             batch_sizes: Optional[torch.Tensor], reverse: bool, cfg: KernelConfig,
             mode: str = "auto", pair: Optional[DirectionPair] = None,
             w_hr: Optional[torch.Tensor] = None):
    """Reverse-time recurrence of one (layer, direction).

    ``dout [T, B, R]``, ``dh_n [B, R]`` (see :func:`forward` for ``R`` and ``w_hr``).
    Returns ``dgh [T, B, G*H]`` (gradients of the recurrent pre-activations,
    storage dtype), ``dxn [T, B, H]`` or ``None`` (GRU's input-side ``n``
    gradient), the fp32 elementwise parts of ``dh0``/``dc0`` (``[B, H]``; ``dh0``'s
    is zero with ``w_hr``) and, with ``w_hr``, ``dhseq [T, B, P]``: the whole
    gradient of every ``h_t`` (storage dtype), else ``None``.
    """
    spec: CellSpec = CELL_SPECS[cell]
    T, B, R = dout.shape
    H = w_hh.shape[0] // spec.gates
    dev = dout.device
    varlen = batch_sizes is not None
    proj = R if w_hr is not None else 0
    dgh, dxn, dhst, dcst, dhseq = backward_buffers(cell, dout, w_hh, hbuf.dtype, varlen, w_hr)
    plan = _plan(H, B, cfg, mode, proj=proj)
    dummy = dhst
    args = (dout, dh_n, dc_n if dc_n is not None else dh_n, w_hh, w_hr if proj else w_hh, hbuf,
            h0, c0 if c0 is not None else h0, cseq if cseq is not None else dummy, saved, dgh,
            dxn if dxn is not None else dgh, dhseq if proj else dgh, dhst,
            dcst if dcst is not None else dhst, batch_sizes if varlen else dummy)
    _launch(rnn_backward_kernel, plan, cfg, T, B, H, R, args, dict(
        CELL_BWD=spec.bwd, NUM_GATES=spec.gates, NUM_SAVED=spec.saved, HAS_C=spec.has_c,
        SPLIT_X_GRAD=spec.split_x_grad, HAS_PROJ=bool(proj),
        **k_chunk_meta(H, R, plan.block_k, plan.resident_k,
                       split_k=plan.split_k), BLOCK_H=plan.block_h,
        BLOCK_P=plan.block_p, BLOCK_B=plan.block_b, BLOCK_K=plan.block_k, REVERSE=reverse,
        VARLEN=varlen,
        DOT_PRECISION=_dot_precision(hbuf.dtype)), dev, f"{cell} backward", pair)
    return dgh, dxn, dhst, dcst, dhseq


def backward_buffers(cell: str, dout: torch.Tensor, w_hh: torch.Tensor, dtype: torch.dtype,
                     varlen: bool, w_hr: Optional[torch.Tensor] = None) -> tuple:
    """The tensors :func:`backward` returns, allocated (``None`` where it returns ``None``).

    With packed input (``varlen``) the per-step buffers start zeroed, as in
    :func:`forward_buffers`; so does ``dh0``'s elementwise part with ``w_hr``,
    which the kernel leaves to the caller.
    """
    spec: CellSpec = CELL_SPECS[cell]
    T, B, R = dout.shape
    H, dev = w_hh.shape[0] // spec.gates, dout.device
    alloc = torch.zeros if varlen else torch.empty
    dgh = alloc(T, B, spec.gates * H, dtype=dtype, device=dev)
    dxn = alloc(T, B, H, dtype=dtype, device=dev) if spec.split_x_grad else None
    dhseq = alloc(T, B, R, dtype=dtype, device=dev) if w_hr is not None else None
    dhst = (torch.zeros if w_hr is not None else torch.empty)(B, H, dtype=torch.float32,
                                                              device=dev)
    dcst = torch.empty(B, H, dtype=torch.float32, device=dev) if spec.has_c else None
    return dgh, dxn, dhst, dcst, dhseq
