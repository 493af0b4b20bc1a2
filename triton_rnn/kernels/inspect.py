"""Static kernel report: compile for a CUDA target without a GPU and read the result.

Triton compiles to PTX and cubin on any machine; the ``cuobjdump`` shipped in
the triton wheel reads registers, shared and local (spill) memory and SASS.
:func:`static_report` returns, for one kernel and tile config:

* ``registers``, ``shared_bytes``, ``local_bytes`` (> 0 means spills);
* ``weights_loaded_in_loop``: whether any global load inside a PTX loop reads
  an address derived from the ``W_hh`` argument, or ``W_hr`` with an LSTM
  projection (it must be False for a persistent tile: the weights are loaded
  once, before the time loop);
* ``weights_on_chip``: the fraction of the program's ``W_hh`` slice kept on-chip
  (1.0 unless the tile streams, ``block_k > 0``; see ``resident_k``);
* ``tensor_cores``: whether the SASS has ``HMMA``/``HGMMA`` instructions;
* ``tensor_core_instructions``: how many (every warp runs them all; without a
  streamed or projected part, that is one step's tensor-core work per warp);
  ``split_k``: the parts each dot splits K into, so that the warps share that
  work rather than each repeating all of it (see ``KernelConfig.split_k``);
* ``barrier_ordering``: how the PTX orders memory around the grid barrier:
  ``"release-acquire"`` (the arrival is a GPU-scope release add, the wait a
  GPU-scope acquire read: what makes one step's ``h`` visible to every program
  in the next), ``"none"`` (no barrier: one program per batch tile), or what is
  missing;
* ``grid``, ``blocks_per_sm``, ``max_programs``, ``co_resident``: the
  occupancy estimate that bounds a barrier-synchronised grid.

Under ``TRITON_INTERPRET=1`` the kernels are interpreted functions that cannot
be compiled, so the report is computed in a subprocess without that variable.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

#: Cached facts are keyed on this module's source too (see :func:`_cached_facts`).
with open(__file__, "rb") as _f:
    _SOURCE_DIGEST = hashlib.sha256(_f.read()).hexdigest()

#: Per-architecture limits used for the occupancy estimate.
ARCH_LIMITS = {
    70: dict(num_sms=80, regs_per_sm=65536, smem_per_sm=98304, max_smem_block=98304,
             threads_per_sm=2048),
    75: dict(num_sms=40, regs_per_sm=65536, smem_per_sm=65536, max_smem_block=65536,
             threads_per_sm=1024),
    80: dict(num_sms=108, regs_per_sm=65536, smem_per_sm=167936, max_smem_block=166912,
             threads_per_sm=2048),
    86: dict(num_sms=84, regs_per_sm=65536, smem_per_sm=102400, max_smem_block=101376,
             threads_per_sm=1536),
    89: dict(num_sms=128, regs_per_sm=65536, smem_per_sm=102400, max_smem_block=101376,
             threads_per_sm=1536),
    90: dict(num_sms=132, regs_per_sm=65536, smem_per_sm=233472, max_smem_block=232448,
             threads_per_sm=2048),
}



def arch_limits(arch: int) -> dict:
    """:data:`ARCH_LIMITS` of ``arch``, else of the nearest lower known one (else the lowest)."""
    known = sorted(a for a in ARCH_LIMITS if a <= arch) or [min(ARCH_LIMITS)]
    return ARCH_LIMITS[known[-1]]


_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton wheel ({path})")
    return path


def _signature(kernel, cell: str, pass_: str, dtype: str, hidden: int, config, arch: int,
               proj: int = 0):
    from .cells import CELL_SPECS
    from .launch import _plan, k_chunk_meta

    spec = CELL_SPECS[cell]
    st = "*" + _TRITON_TYPES[dtype]
    plan = _plan(hidden, config.block_b, config, "persistent", gpu=True, proj=proj)
    rec = proj or hidden  # the recurrent width R
    block_h, block_b, split = plan.block_h, plan.block_b, plan.use_barrier
    if pass_ == "forward":
        ptrs = dict(XG=st, W=st, WR=st, BHN=st, H0=st, C0=st, HBUF=st, MBUF=st, HST="*fp32",
                    CSEQ="*fp32", SAVED="*fp32", BATCH_SIZES="*i32", BAR="*i32")
        consts = dict(CELL_FWD=spec.fwd, NUM_GATES=spec.gates, NUM_SAVED=spec.saved,
                      HAS_C=spec.has_c, HAS_BHN=spec.separate_bhn, HAS_PROJ=bool(proj))
        k1, k2 = rec, hidden  # K of the W_hh and W_hr dots
    else:
        ptrs = dict(DOUT=st, DHN=st, DCN=st, W=st, WR=st, HBUF=st, H0=st, C0=st, CSEQ="*fp32",
                    SAVED="*fp32", DGH=st, DXN=st, DHSEQ=st, DHST="*fp32", DCST="*fp32",
                    BATCH_SIZES="*i32", BAR="*i32")
        consts = dict(CELL_BWD=spec.bwd, NUM_GATES=spec.gates, NUM_SAVED=spec.saved,
                      HAS_C=spec.has_c, SPLIT_X_GRAD=spec.split_x_grad, HAS_PROJ=bool(proj))
        k1, k2 = hidden, rec
    consts.update(**k_chunk_meta(k1, k2, plan.block_k, plan.resident_k, gpu=True,
                               split_k=plan.split_k),
                  BLOCK_H=block_h, BLOCK_P=plan.block_p, BLOCK_B=block_b, BLOCK_K=plan.block_k,
                  REVERSE=False, VARLEN=False, USE_BARRIER=split,
                  DOT_PRECISION="tf32" if dtype == "float32" else "ieee")
    sig = dict(ptrs)
    sig.update(T="i32", B="i32", H="i32", R="i32", t_begin="i32", n_steps="i32")
    sig.update({k: "constexpr" for k in consts})
    assert list(sig) == kernel.arg_names, (list(sig), kernel.arg_names)
    # As at run time: pointers 16-byte aligned, H specialised when divisible by 16.
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in ptrs}
    for name, v in (("H", hidden), ("R", rec)):
        if v % 16 == 0:
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    grid_h = plan.grid_h
    return sig, consts, attrs, grid_h, block_h, block_b, plan.split_k


_MEMORY_OP = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld|red|atom)\.([\w.]+)", re.M)


def barrier_ordering(ptx: str) -> str:
    """The memory ordering of the PTX's grid barrier; see the module docstring."""
    release = acquire = atomics = False
    for op, quals in _MEMORY_OP.findall(ptx):
        q = set(quals.split("."))
        scoped = bool(q & {"gpu", "sys"})
        if op in ("red", "atom"):
            atomics = True
            release |= scoped and "add" in q and bool(q & {"release", "acq_rel"})
        acquire |= scoped and bool(q & {"acquire", "acq_rel"}) and op in ("ld", "atom")
    if not atomics:
        return "none"
    missing = [name for name, ok in (("release", release), ("acquire", acquire)) if not ok]
    return "release-acquire" if not missing else "missing " + " and ".join(missing)


def _weights_loaded_in_loop(ptx: str, w_param_index: int) -> bool:
    """True if a global load inside a loop reads an address derived from param ``w_param_index``."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    tainted: set = set()
    param_re = re.compile(rf"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_{w_param_index}\]")
    reg_re = re.compile(r"%[A-Za-z_]+\d*")
    labels = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^(\$\w+):", ln)
        if m:
            labels[m.group(1)] = i
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$\w+);", ln)
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append((labels[m.group(1)], i))
    # Taint propagation to a fixed point (loops carry values through movs).
    changed = True
    while changed:
        changed = False
        for ln in lines:
            m = param_re.search(ln)
            if m and m.group(1) not in tainted:
                tainted.add(m.group(1))
                changed = True
                continue
            body = re.sub(r"^@!?%\w+\s+", "", ln)
            if not body or body.startswith(("st.", "bra", "//", "$", ".", "ret", "bar.")):
                continue
            regs = reg_re.findall(body)
            if len(regs) < 2:
                continue
            dst, srcs = regs[0], regs[1:]
            if dst not in tainted and any(r in tainted for r in srcs):
                tainted.add(dst)
                changed = True
    for start, end in loops:
        for ln in lines[start:end + 1]:
            body = re.sub(r"^@!?%\w+\s+", "", ln)
            if body.startswith(("ld.global", "cp.async")) and "shared" not in body.split()[0][:9]:
                addr = re.findall(r"\[([^\]]+)\]", body)
                if body.startswith("cp.async"):
                    addr = addr[1:]
                if any(r in tainted for a in addr for r in reg_re.findall(a)):
                    return True
    return False


def compile_kernel(cell: str, pass_: str, dtype: str, hidden: int, config, arch: int = 90,
                   proj: int = 0):
    """Compile one kernel for ``sm_{arch}`` on the CPU; returns ``(compiled, info)``.

    ``proj``: an LSTM's projection size (0: none)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .launch import COMPILE_OPTIONS
    from .recurrent import rnn_backward_kernel, rnn_forward_kernel

    kernel = rnn_forward_kernel if pass_ == "forward" else rnn_backward_kernel
    sig, consts, attrs, grid_h, block_h, block_b, split_k = _signature(
        kernel, cell, pass_, dtype, hidden, config, arch, proj)
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps,
                                       "num_stages": config.num_stages, **COMPILE_OPTIONS})
    weights = ("W", "WR") if proj else ("W",)
    return compiled, dict(grid_h=grid_h, block_h=block_h, block_b=block_b, split_k=split_k,
                          w_indices=[kernel.arg_names.index(w) for w in weights])


@functools.lru_cache(maxsize=256)
def _binary_facts(cell, pass_, dtype, hidden, config, arch, proj=0) -> dict:
    """What the compiled binary says, independent of the batch size (a runtime argument)."""
    compiled, info = compile_kernel(cell, pass_, dtype, hidden, config, arch, proj)
    w_indices = info.pop("w_indices")
    return dict(info, **_cached_facts(compiled, w_indices))


#: The file :func:`_cached_facts` keeps beside Triton's own cache entries.
_FACTS_FILE = "triton_rnn_static_facts.json"


def _cached_facts(compiled, w_indices: list) -> dict:
    """:func:`_read_binary`, kept in Triton's cache under a key of the binary, the weight
    arguments and this module's source (so a change to how facts are read is never
    served stale). Reading the SASS is most of a warm report's time."""
    from triton.runtime.cache import get_cache_manager

    key = hashlib.sha256(b"".join([compiled.hash.encode(), repr(w_indices).encode(),
                                   _SOURCE_DIGEST.encode()])).hexdigest()
    try:
        manager = get_cache_manager(key)
    except (OSError, RuntimeError):  # no usable cache folder: read the binary every time
        return _read_binary(compiled, w_indices)
    path = manager.get_file(_FACTS_FILE)
    if path is not None:
        try:
            with open(path) as f:
                facts = json.load(f)
            if isinstance(facts, dict):
                return facts
        except (OSError, ValueError):
            pass  # unreadable or damaged: read the binary again, and rewrite it
    facts = _read_binary(compiled, w_indices)
    try:
        manager.put(json.dumps(facts), _FACTS_FILE, binary=False)
    except OSError:
        pass  # a read-only cache only costs the next report the same time
    return facts


def _read_binary(compiled, w_indices: list) -> dict:
    """Registers, stack, local and shared memory (``cuobjdump``), and what the PTX and
    SASS show (see the module docstring)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    regs, stack, static_shared, local = (int(g) for g in m.groups())
    return dict(regs=regs, stack=stack, local=local,
                shared=max(int(compiled.metadata.shared), static_shared),
                weights_loaded_in_loop=any(_weights_loaded_in_loop(compiled.asm["ptx"], i)
                                           for i in w_indices),
                tensor_cores=bool(re.search(r"\b(HMMA|HGMMA|IMMA)\b", sass)),
                tensor_core_instructions=len(re.findall(r"\b(?:HMMA|HGMMA|IMMA)\.", sass)),
                barrier_ordering=barrier_ordering(compiled.asm["ptx"]),
                local_memory_instructions=bool(re.search(r"\b(LDL|STL)\b", sass)))


def _report_in_process(cell, pass_, dtype, hidden, batch, config, arch, proj=0) -> dict:
    import triton

    from .launch import default_config, k_chunk_meta, programs_per_sm

    if config is None:
        config = default_config(cell, pass_, dtype, hidden, batch, arch_limits(arch)["num_sms"],
                                proj)
    info = _binary_facts(cell, pass_, dtype, hidden, config, arch, proj)
    regs, stack, local, shared = info["regs"], info["stack"], info["local"], info["shared"]
    lim = arch_limits(arch)
    per_sm = programs_per_sm(regs, config.num_warps, shared, lim["regs_per_sm"],
                             lim["threads_per_sm"], lim["smem_per_sm"])
    if shared > lim["max_smem_block"]:
        per_sm = 0
    max_programs = per_sm * lim["num_sms"]
    k = hidden if pass_ == "backward" else (proj or hidden)  # W_hh's K in this pass
    chunks = k_chunk_meta(k, k, config.block_k, config.resident_k, gpu=True)
    on_chip = chunks["NUM_RES"] / chunks["NUM_KC"]
    batch_tiles = triton.cdiv(max(batch, 1), info["block_b"])
    # A split hidden dimension needs all its blocks resident (grid barrier); batch
    # tiles beyond what fits are looped over inside the programs.
    grid_b = batch_tiles if info["grid_h"] == 1 else max(1, min(batch_tiles,
                                                               max_programs // info["grid_h"]))
    return dict(
        cell=cell, pass_=pass_, dtype=dtype, hidden=hidden, proj=proj, batch=batch,
        arch=f"sm_{arch}",
        config=config.to_dict(), registers=regs, stack_bytes=stack, shared_bytes=shared,
        local_bytes=local, spills=local > 0 or stack > 0, num_warps=config.num_warps,
        grid=[grid_b, info["grid_h"]], programs=grid_b * info["grid_h"],
        persistent_barrier=info["grid_h"] > 1, blocks_per_sm=per_sm,
        max_programs=max_programs, num_sms=lim["num_sms"],
        max_shared_bytes=lim["max_smem_block"],
        co_resident=info["grid_h"] <= max_programs,
        weights_loaded_in_loop=info["weights_loaded_in_loop"], weights_on_chip=on_chip,
        tensor_cores=info["tensor_cores"],
        tensor_core_instructions=info["tensor_core_instructions"], split_k=info["split_k"],
        barrier_ordering=info["barrier_ordering"],
        local_memory_instructions=info["local_memory_instructions"],
    )


def static_report(cell: str, pass_: str, dtype: str, hidden: int, batch: int,
                  config=None, arch: int = 90, proj: int = 0) -> dict:
    """Compile one kernel for ``sm_{arch}`` without a GPU and report its resources (see module doc)."""
    from .config import KernelConfig

    if isinstance(config, dict):
        config = KernelConfig.from_dict(config)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return _report_in_process(cell, pass_, dtype, hidden, batch, config, arch, proj)
    return static_reports([dict(cell=cell, pass_=pass_, dtype=dtype, hidden=hidden, batch=batch,
                                config=config.to_dict() if config else None, arch=arch,
                                proj=proj)])[0]


#: Most subprocesses :func:`static_reports` runs at once (each compiles with one core).
MAX_COMPILE_JOBS = 4


def static_reports(requests: list, jobs: Optional[int] = None) -> list:
    """Several reports from subprocesses without ``TRITON_INTERPRET``, in request order.

    The requests are shared among up to ``jobs`` subprocesses (default: the CPUs
    this process may use, at most :data:`MAX_COMPILE_JOBS`), each importing triton
    once and compiling its share one kernel after another. Requests that differ
    only in the batch size (the same binary) go to the same subprocess, which
    compiles it once.
    """
    if not requests:
        return []
    groups: dict = {}
    for i, r in enumerate(requests):
        same_binary = json.dumps({k: v for k, v in r.items() if k != "batch"}, sort_keys=True)
        groups.setdefault(same_binary, []).append(i)
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = max(1, min(jobs or 1, MAX_COMPILE_JOBS, len(groups)))
    shares: list = [[] for _ in range(jobs)]
    for n, indices in enumerate(groups.values()):
        shares[n % jobs].extend(indices)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(share):
        proc = subprocess.run([sys.executable, "-m", "triton_rnn.kernels.inspect"],
                              input=json.dumps([requests[i] for i in share]),
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"static compile failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout)

    out: list = [None] * len(requests)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for share, reports in zip(shares, pool.map(run, shares)):
            for i, report in zip(share, reports):
                out[i] = report
    return out


def _main() -> None:
    from .config import KernelConfig

    out = []
    for r in json.loads(sys.stdin.read()):
        cfg = KernelConfig.from_dict(r["config"]) if r.get("config") else None
        try:
            out.append(_report_in_process(r["cell"], r["pass_"], r["dtype"], r["hidden"],
                                          r["batch"], cfg, r.get("arch", 90),
                                          r.get("proj", 0)))
        except Exception as e:  # reported per request, e.g. a config the compiler rejects
            out.append(dict(r, error=f"{type(e).__name__}: {e}".splitlines()[0][:500]))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    _main()
