"""``triton-rnn bench``: the CLI end to end on the CPU, and the runner's bookkeeping.

The end-to-end test runs the quick grid, narrowed to batch 2, which on a CPU
becomes the tiny grid through Triton's interpreter. Nothing here checks a
time: only that every field is written and every shape is accounted for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_rnn import bench as B
from triton_rnn.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent

FLOORS = {"schema": "triton-rnn-floors/1", "copy_bandwidth_gbps": 4000.0,
          "matmul_tflops": {"bf16": 700.0, "fp16": 700.0, "tf32": 350.0, "fp32": 50.0},
          "barrier_latency_us": {"1": 0.5, "8": 1.0, "132": 2.0}, "barrier_latency_us_full": 2.0}


def _cpu_env() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the tiny CPU path, also on a machine with a GPU
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def test_bench_quick_cli_writes_json_table_and_plot(tmp_path):
    floors = tmp_path / "floors.json"
    floors.write_text(json.dumps(FLOORS))
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    cmd = [sys.executable, "-m", "triton_rnn.cli", "bench", "--quick", "--batch", "2",
           "--floors", str(floors), "--out", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads(out.read_text())
    assert doc["schema"] == B.SCHEMA
    assert doc["finished"] is True
    env = doc["env"]
    for key in ("device", "torch", "triton", "triton_rnn", "git", "created", "python"):
        assert env.get(key), key
    assert env["git"]["commit"]
    assert doc["settings"]["grid"] == "tiny"
    assert doc["impls"] == ["triton", "triton_stepwise", "torch"]
    assert doc["floors"]["copy_bandwidth_gbps"] == 4000.0

    shapes = {(r["shape"]["cell"], r["shape"]["pass"]) for r in doc["results"]}
    assert shapes == {("gru", "fwd"), ("gru", "fwdbwd"), ("lstm", "fwd"), ("lstm", "fwdbwd")}
    for r in doc["results"]:
        assert r["status"] == "ok", (r["key"], r.get("error"), r["impls"])
        assert r["shape"]["batch"] == 2 and r["shape"]["hidden"] == 8
        assert set(r["impls"]) == {"triton", "triton_stepwise", "torch"}
        for name, e in r["impls"].items():
            assert e["error"] is None, (r["key"], name, e["error"])
            assert e["ms"] > 0 and e["tokens_per_s"] > 0 and e["tflops"] > 0
            assert e["floor_fraction"] > 0
        # Same inputs, same weights: the kernels agree with torch.
        for name in ("triton", "triton_stepwise"):
            assert r["impls"][name]["rel_err"] < 1e-4, (r["key"], name)
            if r["shape"]["pass"] == "fwdbwd":
                assert r["impls"][name]["rel_err_grad_x"] < 1e-4, (r["key"], name)
        assert set(r["speedup"]) == {"triton", "triton_stepwise"}
        assert r["configs"]["forward"]["block_h"] >= 1
        if r["shape"]["pass"] == "fwdbwd":
            assert r["configs"]["backward"]["block_h"] >= 1
        assert r["model"]["flops"] > 0 and r["model"]["bytes"] > 0
        assert r["floor"]["floor_ms"] > 0 and r["floor"]["bound"] in ("compute", "memory", "barrier")

    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "triton vs torch" in proc.stdout  # the table, with the speedup column
    assert "| cell |" in md.read_text()


def _torch_only(monkeypatch):
    """Run the runner in-process on torch alone: no kernel is defined in this process."""
    monkeypatch.setattr(B, "select_configs", lambda shape, device: {})
    real = B.Case.__init__

    def init(self, shape, device, impls, n_sets, seed=0):
        if shape.batch == 3:
            raise RuntimeError("CUDA out of memory (injected)")
        real(self, shape, device, ["torch"], n_sets, seed)

    monkeypatch.setattr(B.Case, "__init__", init)


def test_failing_shape_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    _torch_only(monkeypatch)
    grid = dict(B.TINY_GRID, cells=["gru"], batch=[1, 3, 2], passes=["fwdbwd"])
    shapes = B.grid_shapes(grid)
    out = tmp_path / "r.json"
    settings = {"grid": "test", "rounds": 2, "n_sets": 2, "host_reps": 1}
    doc = B.run_grid(shapes, torch.device("cpu"), ["torch"], out, settings=settings,
                     floors=FLOORS, log=lambda s: None)
    status = {r["shape"]["batch"]: r["status"] for r in doc["results"]}
    assert status == {1: "ok", 3: "error", 2: "ok"}
    bad = next(r for r in doc["results"] if r["shape"]["batch"] == 3)
    assert "out of memory" in bad["error"]
    assert json.loads(out.read_text())["summary"]["status_counts"]["error"] == 1
    good = next(r for r in doc["results"] if r["shape"]["batch"] == 1)
    assert len(good["impls"]["torch"]["ms_rounds"]) == 2  # alternating rounds


def test_resume_marks_an_interrupted_shape_and_budget_skips(tmp_path, monkeypatch):
    _torch_only(monkeypatch)
    grid = dict(B.TINY_GRID, cells=["lstm"], batch=[1, 2], passes=["fwd"])
    shapes = B.grid_shapes(grid)
    out = tmp_path / "r.json"
    # A previous run that died inside the first shape.
    B.save_json({"results": [{"key": shapes[0].key, "shape": shapes[0].to_dict(),
                              "status": "running", "impls": {}}]}, out)
    settings = {"grid": "test", "rounds": 1, "n_sets": 1, "host_reps": 1}
    doc = B.run_grid(shapes, torch.device("cpu"), ["torch"], out, settings=settings, floors=None,
                     resume=True, log=lambda s: None)
    assert [r["status"] for r in doc["results"]] == ["error", "ok"]
    assert "interrupted" in doc["results"][0]["error"]

    doc = B.run_grid(shapes, torch.device("cpu"), ["torch"], tmp_path / "s.json",
                     settings=settings, floors=None, time_budget_s=-1.0, log=lambda s: None)
    assert [r["status"] for r in doc["results"]] == ["skipped", "skipped"]


def test_from_json_renders_table_markdown_and_plot(tmp_path, monkeypatch, capsys):
    _torch_only(monkeypatch)
    shapes = B.grid_shapes(dict(B.TINY_GRID, cells=["gru"], passes=["fwd"]))
    src = tmp_path / "r.json"
    B.run_grid(shapes, torch.device("cpu"), ["torch"], src, settings={"grid": "t", "host_reps": 1},
               floors=None, log=lambda s: None)
    png, md = tmp_path / "p.png", tmp_path / "r.md"
    rc = cli_main(["bench", "--from-json", str(src), "--plot", str(png), "--markdown", str(md)])
    assert rc == 0
    assert png.exists() and md.read_text().startswith("### triton-rnn bench")
    assert "torch ms" in capsys.readouterr().out


def test_model_counts_and_floor():
    s = B.Shape("gru", hidden=256, batch=8, seq_len=128, dtype="bf16", pass_="fwd")
    c = B.model_counts(s, {"forward": {"block_h": 64, "block_b": 16}})
    assert c["flops"] == 2 * 128 * 8 * 3 * 256 * (256 + 256)
    weights = 3 * 256 * 256 * 2 + 2 * 3 * 256
    assert c["bytes"] == 2 * (128 * 8 * 256 * 2 + weights + 2 * 8 * 256)
    assert c["barriers"] == 128 and c["programs"] == 4 and c["programs_per_barrier"] == 4
    fl = B.floor_model(c, s, FLOORS)
    assert fl["barrier_ms"] == pytest.approx(128 * 0.5e-3)  # 4 programs: the 1-program latency
    # 64 hidden blocks x 4 batch columns meet at 4 counters of 64: the 8-program latency.
    s3 = B.Shape("gru", hidden=1024, batch=64, seq_len=128, dtype="bf16", pass_="fwd")
    c3 = B.model_counts(s3, {"forward": {"block_h": 16, "block_b": 16}})
    assert c3["programs"] == 256 and c3["programs_per_barrier"] == 64
    assert B.floor_model(c3, s3, FLOORS)["barrier_ms"] == pytest.approx(128 * 1.0e-3)
    assert fl["compute_ms"] == pytest.approx(c["flops"] / 700e12 * 1e3)
    assert fl["bound"] == "barrier" and fl["floor_ms"] == fl["barrier_ms"]
    # One program holds all of W_hh: no barrier; fwd+bwd is three forwards of FLOPs.
    s2 = B.Shape("lstm", 64, 8, 16, "fp32", "fwdbwd")
    c2 = B.model_counts(s2, {"forward": {"block_h": 64, "block_b": 16}})
    assert c2["barriers"] == 0
    assert c2["flops"] == 3 * 2 * 16 * 8 * 4 * 64 * 128
    assert B.floor_model(c2, s2, FLOORS)["matmul_tflops"] == 350.0  # fp32 uses the TF32 rate
    assert B.floor_model(c2, s2, None) is None


def test_grids_match_the_issue():
    full = B.grid_shapes(B.FULL_GRID)
    assert len(full) == 2 * 4 * 5 * 2 * 3 * 2
    assert len({s.key for s in full}) == len(full)
    quick = B.grid_shapes(B.QUICK_GRID)
    assert 8 <= len(quick) <= 24


def test_every_shape_that_falls_back_is_flagged(monkeypatch):
    """The launcher warns once per process; the bench must still flag each shape."""
    import warnings

    from triton_rnn.kernels import launch
    real = B.Case.outputs_for_check

    def falls_back(self, name):
        if name == "triton":  # as the launcher reports a grid that cannot be resident
            launch._warn_once(("gru forward", 4, "cfg"), "triton_rnn: gru forward cannot run "
                              "persistently: ...; falling back to one launch per timestep.")
        return real(self, name)

    monkeypatch.setattr(B.Case, "outputs_for_check", falls_back)
    monkeypatch.setattr(launch, "_warned", set())
    flagged = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in (1, 2):
            shape = B.Shape("gru", 8, batch, 3, "fp32", "fwd")
            rec = B.measure_shape(shape, torch.device("cpu"), ["torch", "triton"], floors=None,
                                  rounds=1, n_sets=2, host_reps=1)
            flagged.append(rec["impls"]["triton"].get("fell_back_to_stepwise", False))
    assert flagged == [True, True]


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_inference_runs_every_module_in_eval_mode(pass_):
    """cuDNN's training-mode forward writes its reserve space even under no_grad: ``fwd``
    must time torch.nn in eval mode, as the kernels (which save nothing without a
    gradient) are; ``fwdbwd`` trains."""
    shape = B.Shape("lstm", 8, 2, 3, "fp32", pass_)
    case = B.Case(shape, torch.device("cpu"), ["triton", "triton_stepwise", "torch"], n_sets=1)
    assert {m.training for m in case.modules.values()} == {pass_ == "fwdbwd"}


def test_bidirectional_shapes():
    """``--directions 2``: a bidirectional layer, its own key, counts and implementations."""
    bi = B.Shape("lstm", 8, 2, 3, "fp32", "fwdbwd", directions=2)
    one = B.Shape("lstm", 8, 2, 3, "fp32", "fwdbwd")
    assert bi.key == "lstm-bi-fwdbwd-fp32-T3-B2-H8" and B.Shape.from_dict(bi.to_dict()) == bi
    assert B.Shape.from_dict({k: v for k, v in one.to_dict().items() if k != "directions"}) == one
    grid = dict(B.TINY_GRID, cells=["gru"], batch=[2], passes=["fwd"], directions=[2, 1])
    assert [s.key for s in B.grid_shapes(grid)] == ["gru-bi-fwd-fp32-T4-B2-H8",
                                                    "gru-fwd-fp32-T4-B2-H8"]
    cfg = {"forward": {"block_h": 4, "block_b": 16}}
    c1, c2 = B.model_counts(one, cfg), B.model_counts(bi, cfg)
    # Twice the work; the directions overlap, so the barriers are not doubled.
    assert c2["flops"] == 2 * c1["flops"] and c2["barriers"] == c1["barriers"] == 6
    es, T, Bn, H = 4, 3, 2, 8
    assert c2["bytes"] - c1["bytes"] == es * (c1["bytes"] // es - 2 * T * Bn * H)  # x once

    rec = B.measure_shape(bi, torch.device("cpu"),
                          ["triton", "triton_one_stream", "torch", "flashrnn"], floors=None,
                          rounds=1, n_sets=2, host_reps=1)
    impls = rec["impls"]
    for name in ("triton", "triton_one_stream"):
        assert impls[name]["error"] is None and impls[name]["ms"] > 0
        assert impls[name]["rel_err"] < 1e-5 and impls[name]["rel_err_grad_x"] < 1e-5
    assert impls["flashrnn"]["error"] == "not available"  # FlashRNN: one direction only
    assert rec["status"] == "ok"  # ...which does not fail the shape
    doc = {"impls": ["triton", "triton_one_stream", "torch"], "results": [rec]}
    assert B.table_rows(doc)[1][0] == "lstm-bi"
    assert "lstm-bi/fwdbwd/triton" in B.summarize([rec])["geomean_speedup"]


def test_projection_shapes():
    """``--proj``: LSTMP shapes, their own key and label; old results read as ``proj=0``."""
    p = B.Shape("lstm", 8, 2, 3, "fp32", "fwdbwd", proj=4)
    assert p.key == "lstm-fwdbwd-fp32-T3-B2-H8-P4" and p.label == "lstm-p4"
    assert B.Shape.from_dict(p.to_dict()) == p and p.to_dict()["proj"] == 4
    old = {k: v for k, v in B.Shape("lstm", 8, 2, 3, "fp32", "fwd").to_dict().items() if k != "proj"}
    assert B.Shape.from_dict(old).proj == 0 and B.Shape.from_dict(old).key == "lstm-fwd-fp32-T3-B2-H8"
    assert B.Shape("lstm", 8, 2, 3, "fp32", "fwd", 2, 4).label == "lstm-bi-p4"
    grid = dict(B.TINY_GRID, batch=[2], passes=["fwd"], proj=[0, 4])
    assert [s.key for s in B.grid_shapes(grid)] == [  # GRU shapes are not multiplied
        "gru-fwd-fp32-T4-B2-H8", "lstm-fwd-fp32-T4-B2-H8", "lstm-fwd-fp32-T4-B2-H8-P4"]


def test_projection_model_counts():
    T, Bn, H, P = 256, 16, 1024, 256
    s = B.Shape("lstm", H, Bn, T, "bf16", "fwdbwd", proj=P)
    c = B.model_counts(s, {"forward": {"block_h": 64, "block_b": 16}})
    # Per row and step: W_ih 4H x I, W_hh 4H x P, W_hr P x H multiply-adds.
    assert c["flops"] == 3 * 2 * T * Bn * (4 * H * H + 4 * H * P + P * H)
    weights = 4 * H * H + 4 * H * P + P * H + 2 * 4 * H
    states = Bn * (P + H)  # h (P wide) and c (H wide)
    fwd = T * Bn * H + weights + states + T * Bn * P + states  # x, weights, h0/c0, out, h_n/c_n
    bwd = T * Bn * P + T * Bn * H + weights + states  # gy read; gx, weight, h0/c0 grads written
    assert c["bytes"] == 2 * (fwd + bwd)
    assert c["barriers"] == 2 * T * 2  # two per step (gates, projection), two passes
    assert c["programs"] == 16 and c["programs_per_barrier"] == 16
    whole = B.model_counts(B.Shape("lstm", 8, 2, 3, "fp32", "fwd", proj=4),
                           {"forward": {"block_h": 8, "block_b": 16}})
    assert whole["barriers"] == 0  # one program: no barrier


def test_projection_shape_runs_against_torch(tmp_path, capsys):
    lstmp = B.Shape("lstm", 8, 2, 3, "fp32", "fwdbwd", proj=4)
    rec = B.measure_shape(lstmp, torch.device("cpu"),
                          ["triton", "triton_stepwise", "torch", "flashrnn"], floors=FLOORS,
                          rounds=1, n_sets=2, host_reps=1)
    impls = rec["impls"]
    for name in ("triton", "triton_stepwise"):
        assert impls[name]["error"] is None and impls[name]["ms"] > 0, impls[name]
        assert impls[name]["rel_err"] < 1e-5 and impls[name]["rel_err_grad_x"] < 1e-5
    assert impls["flashrnn"]["error"] == "not available"  # FlashRNN: no projection
    assert rec["configs"]["forward"]["block_h"] >= 1 and rec["configs"]["backward"]["block_h"] >= 1
    assert rec["shape"]["proj"] == 4 and rec["floor"]["floor_ms"] > 0
    doc = {"impls": ["triton", "triton_stepwise", "torch"], "results": [rec]}
    assert B.table_rows(doc)[1][0] == "lstm-p4"
    assert "lstm-p4/fwdbwd/triton" in B.summarize([rec])["geomean_speedup"]

    # The CLI: --proj multiplies the LSTM shapes of the grid.
    out = tmp_path / "r.json"
    assert cli_main(["bench", "--tiny", "--cells", "gru,lstm", "--batch", "2", "--passes", "fwd",
                     "--proj", "0,4", "--impls", "torch", "--out", str(out), "--no-plot"]) == 0
    doc = json.loads(out.read_text())
    assert [r["key"] for r in doc["results"]] == [
        "gru-fwd-fp32-T4-B2-H8", "lstm-fwd-fp32-T4-B2-H8", "lstm-fwd-fp32-T4-B2-H8-P4"]
    assert all(r["status"] == "ok" for r in doc["results"])
    assert "lstm-p4" in capsys.readouterr().out


@pytest.mark.parametrize("args, msg", [
    (["--proj", "8"], "below every hidden size (8 here), got 8"),
    (["--hidden", "8,16", "--proj", "12"], "below every hidden size (8 here), got 12"),
    (["--proj", "-1"], "got -1"),
    (["--cells", "gru", "--proj", "4"], "LSTM shapes only"),
])
def test_cli_rejects_a_bad_proj(args, msg, capsys):
    assert _rc(["bench", "--tiny", "--no-plot"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--proj" in err and msg in err, err


def _rc(argv):
    """The exit status of ``triton-rnn ARGV``, whether argparse or the command ends it."""
    try:
        return cli_main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("args, msg", [
    (["--hidden", "-5"], "must be >= 1, got -5"),
    (["--batch", "4,0"], "must be >= 1, got 0"),
    (["--seq-len", "0"], "must be >= 1"),
    (["--rounds", "0"], "must be >= 1"),
    (["--sets", "-1"], "must be >= 1"),
    (["--time-budget", "0"], "must be > 0"),
    (["--dtypes", "int8"], "unknown dtype 'int8'"),
    (["--cells", "transformer"], "unknown cell 'transformer'"),
    (["--impls", "cudnn"], "unknown implementation 'cudnn'"),
    (["--directions", "3"], "--directions takes 1 and 2"),
    (["--device", "tpu"], "--device takes cuda, cuda:N or cpu"),
    (["--resume"], "--resume needs --out"),
    (["--out", "/proc/no/such.json"], "cannot write result file"),
    (["--markdown", "/proc/no/such.md"], "cannot write markdown file"),
])
def test_cli_rejects_bad_arguments_before_measuring(args, msg, capsys, tmp_path, monkeypatch):
    """One line, exit status 2, and nothing measured (a bad output path is found first)."""
    from triton_rnn import bench as B
    monkeypatch.setattr(B, "run_grid", lambda *a, **kw: pytest.fail("measured anyway"))
    monkeypatch.chdir(tmp_path)
    assert _rc(["bench", "--tiny", "--no-plot"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and msg in err, err


def test_cli_takes_torch_dtype_names_and_says_when_quick_runs_tiny(tmp_path, capsys,
                                                                   monkeypatch):
    """bf16/bfloat16 alike; ``--quick`` without a GPU runs the tiny grid and says so."""
    seen = {}
    from triton_rnn import bench as B

    def fake_run_grid(shapes, device, impls, out_json, **kw):
        seen["dtypes"] = sorted({s.dtype for s in shapes})
        seen["grid"] = kw["settings"]["grid"]
        return {"schema": B.SCHEMA, "results": [], "env": {}, "settings": kw["settings"]}

    monkeypatch.setattr(B, "run_grid", fake_run_grid)
    rc = cli_main(["bench", "--quick", "--dtypes", "bfloat16,fp16,float", "--no-plot",
                   "--out", str(tmp_path / "q.json")])
    assert rc == 0
    assert seen == {"dtypes": ["bf16", "fp16", "fp32"], "grid": "tiny"}
    assert "running the tiny grid instead of --quick" in capsys.readouterr().out


def test_cli_exits_non_zero_when_a_shape_fails(tmp_path, capsys, monkeypatch):
    """The table and JSON are written, and the run's status says that a shape failed."""
    from triton_rnn import bench as B
    real = B.measure_shape

    def failing_lstm(shape, *a, **kw):
        if shape.cell == "lstm":
            raise RuntimeError("simulated failure")
        return real(shape, *a, **kw)

    monkeypatch.setattr(B, "measure_shape", failing_lstm)
    out = tmp_path / "r.json"
    rc = cli_main(["bench", "--tiny", "--cells", "gru,lstm", "--passes", "fwd", "--batch", "1",
                   "--no-plot", "--out", str(out)])
    assert rc == 1
    doc = json.loads(out.read_text())
    assert sorted(r["status"] for r in doc["results"]) == ["error", "ok"]
    assert "1 of 2 shapes failed" in capsys.readouterr().err


@pytest.mark.parametrize("content, msg", [
    ("[]", "is not a triton-rnn bench result"),
    ('{"schema": 1, "entries": {}}', "is not a triton-rnn bench result (schema 1"),
    ("{", "cannot read"),
])
def test_from_json_refuses_other_files(tmp_path, capsys, content, msg):
    src = tmp_path / "other.json"
    src.write_text(content)
    assert cli_main(["bench", "--from-json", str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err
    assert list(tmp_path.iterdir()) == [src]  # no plot written beside it


def test_profile_timeline_summary():
    """benchmarks/profile.py's per-call figures from a Chrome trace: GPU busy time is the
    union of kernel intervals, and two streams' kernels running at once count as overlap."""
    from benchmarks.profile import timeline_summary

    def kernel(ts, dur, stream):
        return {"ph": "X", "cat": "kernel", "ts": ts, "dur": dur, "args": {"stream": stream}}

    trace = {"traceEvents": [
        kernel(0, 10, 7), kernel(5, 10, 13),  # 5 us of overlap
        kernel(30, 10, 7),
        {"ph": "X", "cat": "cuda_runtime", "ts": 0, "dur": 4},
        {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 100},
    ]}
    s = timeline_summary(trace, iters=2)
    assert s["kernels_per_call"] == 1.5 and s["streams"] == 2
    assert s["gpu_busy_us"] == 12.5 and s["gpu_span_us"] == 20.0
    assert s["two_streams_at_once_us"] == 2.5 and s["cuda_api_us"] == 2.0
