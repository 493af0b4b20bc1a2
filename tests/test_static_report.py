"""The static kernel report: real sm_90 compiles on the CPU, read with the wheel's cuobjdump.

All reports come from one call of ``static_reports`` (see ``all_reports``): a few
subprocesses, one per CPU, compile them in parallel. For the default
tile configs of every cell at hidden 256, 512 and 1024 and batch 1, 16 and 64
in bf16: no spills, shared memory within the per-block
limit, tensor cores used, and the recurrent weights never loaded from global
memory inside the time loop. (Batch is a runtime argument: the three batch
sizes share one compiled kernel and differ only in the grid.)
"""

import json
import os
import subprocess
import sys

import pytest
import triton

from triton_rnn.kernels import launch
from triton_rnn.kernels.inspect import _weights_loaded_in_loop, barrier_ordering, static_reports

CELLS = ["gru", "lstm", "rnn_tanh"]
HIDDEN = [256, 512, 1024]
BATCH = [1, 16, 64]


#: Default configs compiled beyond the grid above: (cell, pass, dtype, hidden), at batch 64.
LARGEST_PERSISTENT = [(c, p, d, h) for c, d, h in [("gru", "bfloat16", 2048),
                                                   ("gru", "float32", 1024),
                                                   ("lstm", "float32", 1024),
                                                   ("lstm", "bfloat16", 1536)]
                      for p in ("forward", "backward")]
USED_TO_SPILL = [("lstm", "forward", "float32", 256), ("lstm", "forward", "bfloat16", 128),
                 ("gru", "backward", "float32", 128), ("lstm", "backward", "float32", 2048),
                 ("rnn_tanh", "forward", "float32", 2048),
                 ("rnn_tanh", "forward", "bfloat16", 1536)]
NON_POW2 = [("gru", "forward", "bfloat16", 1536), ("gru", "forward", "bfloat16", 2048)]
#: Defaults whose slice exceeds a block's shared memory: most of it stays on-chip, the
#: rest streams (LSTM 2048 bf16: 1536 of 2048 inputs; LSTM 2048 fp32's backward is in
#: USED_TO_SPILL).
PARTLY_RESIDENT = [("lstm", p, "bfloat16", 2048) for p in ("forward", "backward")]
STREAMING = dict(block_h=32, block_b=16, num_warps=4, num_stages=1, block_k=64)
#: LSTM with proj_size: (pass, dtype, hidden, proj). 2048/512 in bf16 keeps W_hh and W_hr
#: on-chip (a folded [4H, H] recurrent weight would be LSTM 2048's 32 MB: streamed).
PROJECTED = [(p, "bfloat16", h, proj) for h, proj in [(1024, 256), (2048, 512)]
             for p in ("forward", "backward")]


@pytest.fixture(scope="module")
def all_reports():
    """Every report these tests read, from one call of ``static_reports``."""
    reqs = [dict(cell=c, pass_=p, dtype="bfloat16", hidden=h, batch=b, config=None, arch=90)
            for c in CELLS for h in HIDDEN for b in BATCH for p in ("forward", "backward")]
    extra = sorted(set(LARGEST_PERSISTENT + USED_TO_SPILL + NON_POW2 + PARTLY_RESIDENT))
    reqs += [dict(cell=c, pass_=p, dtype=d, hidden=h, batch=64, config=None, arch=90)
             for c, p, d, h in extra]
    reqs += [dict(cell="lstm", pass_=p, dtype=d, hidden=h, batch=64, config=None, arch=90,
                  proj=proj) for p, d, h, proj in PROJECTED]
    reqs.append(dict(cell="gru", pass_="forward", dtype="bfloat16", hidden=256, batch=16,
                     config=STREAMING, arch=90))
    out = static_reports(reqs)
    n = len(CELLS) * len(HIDDEN) * len(BATCH) * 2
    by_shape = {(r["cell"], r["pass_"], r["dtype"], r["hidden"]) + ((r["proj"],) if r.get("proj")
                                                                     else ()): r
                for r in out[n:-1]}
    return {"defaults": out[:n], "by_shape": by_shape, "streaming": out[-1]}


@pytest.fixture(scope="module")
def default_reports(all_reports):
    return all_reports["defaults"]


@pytest.fixture(scope="module")
def report_for(all_reports):
    return lambda *shape: all_reports["by_shape"][shape]


def test_default_configs_fit_sm90_without_spills(default_reports):
    assert len(default_reports) == len(CELLS) * len(HIDDEN) * len(BATCH) * 2
    for r in default_reports:
        where = f"{r['cell']} {r['pass_']} H={r['hidden']} B={r['batch']} {r.get('config')}"
        assert "error" not in r, f"{where}: {r.get('error')}"
        assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, f"{where}: spills"
        assert not r["local_memory_instructions"], f"{where}: LDL/STL in SASS"
        assert 0 < r["shared_bytes"] <= r["max_shared_bytes"], where
        assert r["registers"] <= 255, where
        assert r["weights_loaded_in_loop"] is False, f"{where}: W_hh read inside the loop"
        assert r["tensor_cores"], f"{where}: no HMMA/HGMMA"
        assert r["barrier_ordering"] == ("release-acquire" if r["persistent_barrier"]
                                         else "none"), where
        assert r["co_resident"] and r["blocks_per_sm"] >= 1, where
        assert r["config"]["block_k"] == 0 and r["weights_on_chip"] == 1, f"{where}: off-chip"


@pytest.mark.skipif(not launch.auto_split_k(),
                    reason="this Triton's defaults keep the un-split dot "
                           "(launch.AUTO_SPLIT_K_MIN_TRITON)")
def test_no_warp_repeats_another_warps_tensor_core_work(default_reports):
    """Every warp of a program runs the same tensor-core instructions, so their count
    times the warps must be one step's work (in 16 x 8 x 16 bf16 tiles): the gates x
    batch tile x the program's units x K. A program's output tile is small (16 x 16 at
    hidden 1024), so a plain 2-D ``tl.dot`` gave each of the 8 warps all of it, 384
    instructions per warp per step at GRU hidden 1024, where split-K has 48."""
    from triton_rnn.functional import GATES
    from triton_rnn.kernels.launch import padded_k

    for r in default_reports:
        cfg = r["config"]
        units = min(cfg["block_h"], triton.next_power_of_2(r["hidden"]))
        work = (GATES[r["cell"]] * -(-cfg["block_b"] // 16) * -(-units // 8)
                * padded_k(r["hidden"], gpu=True) // 16)
        where = f"{r['cell']} {r['pass_']} H={r['hidden']} {cfg} split_k={r['split_k']}"
        assert r["tensor_core_instructions"] * r["num_warps"] == work, where


@pytest.mark.parametrize("cell,pass_,dtype,hidden", LARGEST_PERSISTENT)
def test_largest_persistent_sizes(report_for, cell, pass_, dtype, hidden):
    """GRU 2048 and LSTM 1536 in bf16, GRU and LSTM 1024 in fp32 keep their weights on-chip.

    One slice per SM. LSTM 1536 fits because K pads to six 256-input chunks, not to 2048.
    """
    r = report_for(cell, pass_, dtype, hidden)
    assert "error" not in r, r.get("error")
    assert r["config"]["block_k"] == 0 and r["weights_loaded_in_loop"] is False
    assert r["stack_bytes"] == 0 and r["local_bytes"] == 0
    assert r["shared_bytes"] <= r["max_shared_bytes"] and r["co_resident"]


@pytest.mark.parametrize("pass_,dtype,hidden,proj", PROJECTED)
def test_lstm_projection_keeps_both_weights_on_chip(report_for, pass_, dtype, hidden, proj):
    """proj_size is a phase of the kernel: W_hh [4H, P] and W_hr [P, H] stay on-chip.

    Triton 3.6's ptxas (the GPU image's) keeps two 32-bit loop invariants of the
    2048/512 forward on the stack: stored before the time loop, reloaded once per
    step; a larger register budget does not reliably remove them). 3.9's does not.
    """
    r = report_for("lstm", pass_, dtype, hidden, proj)
    assert "error" not in r, r.get("error")
    assert r["config"]["block_k"] == 0 and r["weights_loaded_in_loop"] is False
    triton_36 = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7)
    allowed = 8 if triton_36 and (pass_, hidden) == ("forward", 2048) else 0
    assert r["stack_bytes"] <= allowed and r["local_bytes"] == 0, (r["config"], r["registers"])
    assert allowed or not r["local_memory_instructions"]
    assert r["tensor_cores"]
    assert r["shared_bytes"] <= r["max_shared_bytes"] and r["co_resident"]
    assert r["persistent_barrier"] and r["programs"] >= hidden // 32
    assert r["barrier_ordering"] == "release-acquire"


def test_streamed_weights_are_detected_in_the_loop(all_reports):
    """Positive control for the PTX check: a streaming tile does read W_hh every step."""
    r = all_reports["streaming"]
    assert r["weights_loaded_in_loop"] is True and r["weights_on_chip"] == 0


@pytest.mark.parametrize("cell,pass_,dtype,hidden", PARTLY_RESIDENT)
def test_slices_beyond_shared_memory_stay_mostly_on_chip(report_for, cell, pass_, dtype,
                                                          hidden):
    """LSTM 2048 bf16: a 16-unit slice is 256 KB. The default keeps three quarters of it
    on-chip and streams the rest, with one program per SM for 128 of the 132 SMs."""
    r = report_for(cell, pass_, dtype, hidden)
    assert "error" not in r, r.get("error")
    assert r["config"]["block_k"] > 0 and r["config"]["resident_k"] == 1536
    assert r["weights_on_chip"] == 0.75 and r["weights_loaded_in_loop"] is True
    assert r["stack_bytes"] == 0 and r["local_bytes"] == 0
    assert not r["local_memory_instructions"] and r["tensor_cores"]
    # The resident 192 KB are in shared memory, within what a block can have.
    assert 192 * 1024 < r["shared_bytes"] <= r["max_shared_bytes"]
    assert r["co_resident"] and r["programs"] == 128 and r["blocks_per_sm"] == 1


def test_weight_load_detector_on_hand_written_ptx():
    ptx = """
    ld.param.u64 %rd1, [k_param_1];
    ld.param.u64 %rd2, [k_param_0];
    add.s64 %rd3, %rd1, 64;
    ld.global.b32 %r1, [%rd3];
$L__BB0_1:
    ld.global.b32 %r2, [%rd2];
    add.s64 %rd4, %rd2, 4;
    mov.u64 %rd2, %rd4;
    @%p1 bra $L__BB0_1;
    """
    assert _weights_loaded_in_loop(ptx, 1) is False
    looped = ptx.replace("ld.global.b32 %r2, [%rd2];", "ld.global.b32 %r2, [%rd3+128];")
    assert _weights_loaded_in_loop(looped, 1) is True


def test_barrier_ordering_on_hand_written_ptx():
    """The barrier's arrival must publish the step's stores to the whole GPU (a release
    add) and its wait must see everyone's (an acquire read), whatever order Triton
    writes the qualifiers in; relaxed or CTA-scoped operations are not enough."""
    arrive = "@%p2 red.global.gpu.release.add.u32 [ %rd1 + 0 ], %r6;"
    wait = "@%p2 ld.global.gpu.acquire.b32 %r7, [ %rd1 + 0 ];"
    assert barrier_ordering(f"{arrive}\n{wait}") == "release-acquire"
    assert barrier_ordering("atom.acq_rel.sys.global.add.u32 %r1, [%rd1], 1;\n"
                            "atom.global.acquire.gpu.add.u32 %r2, [%rd1], 0;") == "release-acquire"
    assert barrier_ordering("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd2];") == "none"
    assert barrier_ordering(f"red.global.add.u32 [%rd1], 1;\n{wait}") == "missing release"
    assert barrier_ordering(f"{arrive}\nld.global.b32 %r7, [%rd1];") == "missing acquire"
    assert barrier_ordering(arrive.replace("gpu", "cta") + "\n" + wait.replace("gpu", "cta")) \
        == "missing release and acquire"


def test_facts_read_from_a_binary_are_cached_beside_it(monkeypatch, tmp_path):
    """Reading a binary's SASS takes most of a warm report's second: the facts are kept in
    Triton's cache, keyed by the binary and the weight arguments; a damaged entry is
    read again and rewritten."""
    from types import SimpleNamespace

    from triton_rnn.kernels import inspect as I

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    reads = []
    monkeypatch.setattr(I, "_read_binary", lambda c, w: reads.append(w) or {"regs": len(reads)})
    kernel = SimpleNamespace(hash="0123abcd")
    assert I._cached_facts(kernel, [3]) == {"regs": 1}
    assert I._cached_facts(kernel, [3]) == {"regs": 1} and len(reads) == 1
    assert I._cached_facts(kernel, [3, 4]) == {"regs": 2}  # other weight arguments
    (entry,) = [p for p in tmp_path.rglob(I._FACTS_FILE) if json.loads(p.read_text())["regs"] == 1]
    for n, damaged in enumerate(['{"regs": ', '[1, 2]'], start=3):
        entry.write_text(damaged)
        assert I._cached_facts(kernel, [3]) == {"regs": n}
        assert json.loads(entry.read_text()) == {"regs": n}


def test_inspect_cli_prints_json():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [["--cell", "gru", "--hidden", "1024", "--batch", "64", "--dtype", "bfloat16"],
            ["--hidden", "64", "--arch", "volta"],
            ["--hidden", "64", "--proj", "64", "--cell", "lstm"]]
    # Each process spends seconds importing torch: run the three at once.
    procs = [subprocess.Popen([sys.executable, "-m", "triton_rnn.cli", "inspect", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for args in runs]
    (rc, out, err), *bad = [(p.returncode, *outputs) for p, outputs in
                            ((p, p.communicate(timeout=300)) for p in procs)]
    assert rc == 0, err
    r = json.loads(out)
    assert r["arch"] == "sm_90" and r["hidden"] == 1024
    assert r["local_bytes"] == 0 and r["stack_bytes"] == 0
    assert r["weights_loaded_in_loop"] is False and r["tensor_cores"] is True
    for (rc, _, err), flag in zip(bad, ("--arch", "--proj")):
        assert rc == 2 and flag in err and err.count("\n") == 1, err


def test_non_power_of_two_hidden_pays_only_for_its_chunks(report_for):
    """GRU 1536 holds 6/8 of GRU 2048's weight slice (same 16-unit tile), in shared memory."""
    r1536, r2048 = (report_for(*shape) for shape in NON_POW2)
    assert r1536["config"] == r2048["config"] and r1536["config"]["block_k"] == 0
    assert r1536["weights_loaded_in_loop"] is False and r1536["local_bytes"] == 0
    assert r1536["shared_bytes"] < r2048["shared_bytes"]
    assert r1536["programs"] == 96 and r2048["programs"] == 128


@pytest.mark.parametrize("cell,pass_,dtype,hidden", USED_TO_SPILL)
def test_defaults_that_used_to_spill(report_for, cell, pass_, dtype, hidden):
    """Defaults that spilled 8-24 B with the old warp/stream rule on Triton 3.6 or 3.9.

    A sweep of every cell x dtype x hidden 32..2048 x pass (162 defaults) compiles
    spill-free on both versions with the current rule; these are its former failures.
    """
    r = report_for(cell, pass_, dtype, hidden)
    assert "error" not in r, r.get("error")
    assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, (r["config"], r["registers"])
    assert not r["local_memory_instructions"]
