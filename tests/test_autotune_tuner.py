"""Tuner: buckets, candidates, static pruning rules, selection with an injected timer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import triton_rnn.autotune as at
from triton_rnn.autotune import cache as C
from triton_rnn.autotune import space, tuner
from triton_rnn.autotune.space import KernelKey, batch_bucket
from triton_rnn.kernels.config import KernelConfig


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_RNN_CACHE_DIR", str(tmp_path / "cache"))
    at.reload()
    yield tmp_path / "cache"
    at.reload()


def clean_report(cfg: KernelConfig, **over) -> dict:
    rep = {"registers": 128, "shared_bytes": 65536, "local_bytes": 0, "num_warps": cfg.num_warps,
           "grid": 8, "blocks_per_sm": 1, "max_shared_bytes": 232448, "num_sms": 132,
           "weights_loaded_in_loop": False, "tensor_cores": True, "config": cfg.to_dict()}
    rep.update(over)
    return rep


def test_batch_buckets_and_keys():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 16, 17, 100, 1024, 5000)] == \
        [1, 2, 4, 4, 8, 16, 32, 128, 1024, space.BATCH_CAP]
    k17 = KernelKey.for_shape("gru", "forward", "bf16", 256, 17)
    assert k17 == KernelKey.for_shape("gru", "forward", "bfloat16", 256, 32)
    assert KernelKey.parse(str(k17)) == k17
    with pytest.raises(ValueError):
        KernelKey.for_shape("gru", "sideways", "bf16", 256, 17)
    with pytest.raises(ValueError):
        batch_bucket(0)
    with pytest.raises(ValueError):
        KernelKey.parse("gru:forward:bfloat16:h256:b24:sm90")  # 24 is not a bucket


@pytest.mark.parametrize("cell,hidden,batch", [("gru", 64, 1), ("lstm", 256, 32),
                                               ("rnn_tanh", 1024, 8), ("gru", 2048, 300),
                                               ("rnn_relu", 100, 64)])
def test_candidates_small_valid_and_include_default(cell, hidden, batch):
    key = KernelKey.for_shape(cell, "forward", "bfloat16", hidden, batch)
    default = space.heuristic_config(key)
    cands = space.candidate_configs(key, default)
    assert 4 <= len(cands) <= 16
    assert cands[0] == default
    assert len(set(cands)) == len(cands)
    for c in cands:
        assert KernelConfig.from_dict(c.to_dict()) == c
        assert c.block_b >= 16 and c.block_h >= 16


def test_kernel_key_with_a_projection():
    plain = KernelKey.for_shape("lstm", "forward", "bf16", 1024, 20)
    assert str(plain) == "lstm:forward:bfloat16:h1024:b32:sm90"  # the old format, unchanged
    assert plain == KernelKey("lstm", "forward", "bfloat16", 1024, 32, 90)  # positional, as before
    assert plain.proj == 0 and KernelKey.parse(str(plain)) == plain
    assert plain.to_dict() == {"cell": "lstm", "pass": "forward", "dtype": "bfloat16",
                               "hidden": 1024, "batch_bucket": 32, "arch": 90}
    lstmp = KernelKey.for_shape("lstm", "forward", "bf16", 1024, 20, proj=256)
    assert str(lstmp) == "lstm:forward:bfloat16:h1024p256:b32:sm90"
    assert KernelKey.parse(str(lstmp)) == lstmp == KernelKey("lstm", "forward", "bfloat16", 1024,
                                                             32, 90, 256)
    assert lstmp != plain and hash(lstmp) != hash(plain)
    assert lstmp.to_dict() == {**plain.to_dict(), "proj": 256}
    assert KernelKey.parse("lstm:backward:fp16:h2048p512:b1024:sm100") == \
        KernelKey("lstm", "backward", "float16", 2048, 1024, 100, proj=512)
    for bad in ("h1024p", "h1024p0", "h1024p256p8", "hp256", "h1024q256", "h1024p-8"):
        with pytest.raises(ValueError, match="not a kernel key"):
            KernelKey.parse(f"lstm:forward:bfloat16:{bad}:b32:sm90")


@pytest.mark.parametrize("cell,hidden,proj,why", [
    ("gru", 256, 64, "only for lstm"), ("rnn_tanh", 256, 64, "only for lstm"),
    ("lstm", 256, 256, "smaller than hidden"), ("lstm", 256, 512, "smaller than hidden"),
    ("lstm", 256, -1, ">= 0"),
])
def test_kernel_key_refuses_a_bad_projection(cell, hidden, proj, why):
    with pytest.raises(ValueError, match=why):
        KernelKey.for_shape(cell, "forward", "bfloat16", hidden, 32, proj=proj)
    if proj > 0:
        with pytest.raises(ValueError, match=why):
            KernelKey.parse(f"{cell}:forward:bfloat16:h{hidden}p{proj}:b32:sm90")


@pytest.mark.parametrize("hidden,proj,dtype", [(2048, 512, "bfloat16"), (1024, 256, "bfloat16"),
                                               (4096, 1024, "float16"), (1024, 512, "float32"),
                                               (256, 64, "bfloat16"), (64, 16, "float32")])
def test_projection_candidates_fit_and_include_the_default(hidden, proj, dtype):
    from triton_rnn.kernels import launch
    key = KernelKey.for_shape("lstm", "forward", dtype, hidden, 64, proj=proj)
    default = space.heuristic_config(key)
    assert default == launch.default_config("lstm", "forward", dtype, hidden, 64, proj=proj)
    cands = space.candidate_configs(key, default)
    assert cands[0] == default and len(set(cands)) == len(cands)
    assert 4 <= len(cands) <= space.MAX_CANDIDATES
    _, max_smem = space.arch_info(key.arch)
    persistent = [c for c in cands if not c.block_k]
    assert persistent or default.block_k  # (4096, 1024) in fp16 streams W_hh by default
    for c in persistent:  # the slice is W_hh with proj inputs plus a share of W_hr
        assert launch.weight_slice_bytes("lstm", hidden, c.block_h, key.elem_bytes, proj=proj) \
            <= max_smem, c


def test_projection_changes_the_candidates():
    """LSTM 2048 bf16 streams W_hh; with a 512 projection the slices are small enough to stay
    on chip, and the block_h that fit differ."""
    plain = KernelKey.for_shape("lstm", "forward", "bfloat16", 2048, 64)
    lstmp = KernelKey.for_shape("lstm", "forward", "bfloat16", 2048, 64, proj=512)
    assert space.heuristic_config(plain).block_k > 0
    assert space.heuristic_config(lstmp).block_k == 0
    assert space.candidate_configs(plain) != space.candidate_configs(lstmp)


def test_static_checks_see_the_projection(monkeypatch):
    key = KernelKey.for_shape("lstm", "backward", "bfloat16", 1024, 20, proj=256)
    cands = space.candidate_configs(key)
    seen = []
    res = tuner.prune(key, cands, report_fn=fake_reports({}, seen))
    assert len(res.kept) == len(cands)
    assert set(seen) == {("lstm", "backward", "bfloat16", 1024, 32, 90, 256)}
    seen.clear()
    rf = fake_reports({cands[0]: {"local_bytes": 4}}, seen)
    assert space.heuristic_config(key, rf, tuner.drop_reasons) == cands[1]
    assert {s[-1] for s in seen} == {256}
    # In an interpreting process all candidates go to one subprocess: the requests carry it.
    from triton_rnn.kernels import inspect as kinspect
    requests = []

    def static_reports(reqs):
        requests.extend(reqs)
        return [clean_report(KernelConfig.from_dict(r["config"])) for r in reqs]
    monkeypatch.setattr(kinspect, "static_reports", static_reports)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuner.prune(key, cands[:3]).kept_configs == cands[:3]
    assert [(r["hidden"], r["proj"], r["batch"]) for r in requests] == [(1024, 256, 32)] * 3


def test_tune_and_store_a_projection(tmp_cache):
    key = KernelKey.for_shape("lstm", "forward", "bfloat16", 1024, 32, proj=256)
    cands = space.candidate_configs(key)
    fastest = cands[1]
    keys = []

    def timer(k, c):
        keys.append(k)
        return 0.5 if c == fastest else 1.0
    res = tuner.tune_and_store(key, gpu="NVIDIA H200", capability=(9, 0), batch=32,
                               timer=timer, report_fn=fake_reports({}))
    assert res.best == fastest and set(keys) == {key}
    name = C.entry_key(key, "NVIDIA H200", (9, 0))
    assert name.startswith("lstm:forward:bfloat16:h1024p256:b32:sm90|")
    entry = C.TuneCache().load()[name]
    assert entry["kernel"]["proj"] == 256 and entry["config"] == fastest.to_dict()
    assert entry["default_config"] == space.heuristic_config(key).to_dict()
    # The plain LSTM of the same hidden size is another key: nothing stored for it.
    plain = KernelKey.for_shape("lstm", "forward", "bfloat16", 1024, 32)
    assert C.entry_key(plain, "NVIDIA H200", (9, 0)) not in C.TuneCache().load()


def test_large_hidden_also_tries_streaming_tiles():
    # LSTM 1024 bf16: every persistent tile spills on sm_90 (triton 3.9), so
    # weight-streaming tiles (block_k > 0) must be among the candidates.
    key = KernelKey.for_shape("lstm", "forward", "bfloat16", 1024, 300)
    cands = space.candidate_configs(key)
    assert cands[0].block_k == 0
    assert any(c.block_k > 0 for c in cands) and len(cands) <= space.MAX_CANDIDATES
    small = space.candidate_configs(KernelKey.for_shape("gru", "forward", "bfloat16", 128, 8))
    assert all(c.block_k == 0 for c in small)


def test_drop_reasons_each_rule():
    cfg = KernelConfig(32, 16, 8, 1)
    assert tuner.drop_reasons(clean_report(cfg)) == []
    cases = {
        "local memory": clean_report(cfg, local_bytes=40),
        "shared memory": clean_report(cfg, shared_bytes=262656),
        "registers/thread": clean_report(cfg, registers=256),
        "registers/block": clean_report(KernelConfig(32, 16, 16, 1), registers=200),
        "co-resident": clean_report(cfg, grid=133, blocks_per_sm=1),
    }
    for what, rep in cases.items():
        reasons = tuner.drop_reasons(rep)
        assert len(reasons) == 1 and what in reasons[0], (what, reasons)
    assert "not even one block" in tuner.drop_reasons(clean_report(cfg, grid=1,
                                                                   blocks_per_sm=0))[0]
    assert "local memory" in tuner.drop_reasons(clean_report(cfg, stack_bytes=120))[0]
    assert "does not compile" in tuner.drop_reasons({"error": "RuntimeError: x\ny"})[0]
    # The kernel author's [grid_b, grid_h] form: only a split hidden dimension needs a
    # barrier; batch tiles past what fits are looped over inside the programs.
    split = clean_report(cfg, grid=[3, 64], programs=192, blocks_per_sm=1)
    assert "co-resident" in tuner.drop_reasons(split)[0]
    assert tuner.drop_reasons(clean_report(cfg, grid=[200, 1], programs=200,
                                           blocks_per_sm=1)) == []
    assert tuner.drop_reasons(clean_report(cfg, grid=[2, 64], programs=128,
                                           blocks_per_sm=1)) == []
    # A grid barrier without release/acquire (a compiler that dropped one) is unsafe;
    # without a barrier the ordering does not matter.
    unordered = clean_report(cfg, grid=[2, 64], programs=128, blocks_per_sm=1,
                             barrier_ordering="missing acquire")
    assert "not ordered (missing acquire)" in tuner.drop_reasons(unordered)[0]
    assert tuner.drop_reasons(clean_report(cfg, grid=[2, 1], programs=2, blocks_per_sm=1,
                                           barrier_ordering="none")) == []
    assert "without a grid barrier" in tuner.drop_reasons(
        clean_report(cfg, grid=[2, 64], programs=128, blocks_per_sm=1,
                     barrier_ordering="none"))[0]


def fake_reports(bad: dict, seen: list = None):
    """A static_report stand-in: ``bad`` maps config -> report overrides (or an exception).

    ``seen`` (a list) gets the shape of every call, projection included.
    """
    def report_fn(cell, pass_, dtype, hidden, batch, config=None, arch=90, proj=0):
        if seen is not None:
            seen.append((cell, pass_, dtype, hidden, batch, arch, proj))
        over = bad.get(config, {})
        if isinstance(over, Exception):
            raise over
        return clean_report(config, **over)
    return report_fn


def test_prune_explains_drops():
    c1, c2, c3, c4 = (KernelConfig(16, 16, 4), KernelConfig(32, 16, 4), KernelConfig(64, 16, 4),
                      KernelConfig(128, 16, 4))
    key = KernelKey.for_shape("gru", "forward", "bfloat16", 1024, 16)
    lines = []
    res = tuner.prune(key, [c1, c2, c3, c4], log=lines.append, report_fn=fake_reports({
        c2: {"local_bytes": 8},
        c3: {"shared_bytes": 10 ** 6},
        c4: RuntimeError("out of resource: shared memory\nmore detail"),
    }))
    assert res.kept_configs == [c1]
    assert [c for c, _ in res.dropped] == [c2, c3, c4]
    assert len(lines) == 3
    assert "local memory" in lines[0] and "shared memory" in lines[1]
    assert "does not compile" in lines[2] and "more detail" not in lines[2]


def test_selection_with_injected_timer():
    key = KernelKey.for_shape("lstm", "forward", "float16", 512, 32)
    default = space.heuristic_config(key)
    cands = space.candidate_configs(key, default)
    dropped = cands[-2:]
    failing = cands[2]
    times = {c: 1.0 + 0.1 * i for i, c in enumerate(cands)}
    fastest = cands[3]
    times[fastest] = 0.25
    seen = []

    def timer(k, cfg):
        assert k == key
        assert at._tuning.active  # nested look-ups (the module's launcher) do not tune again
        seen.append(cfg)
        if cfg == failing:
            raise RuntimeError("launch failed")
        return times[cfg]

    res = tuner.tune(key, timer, report_fn=fake_reports({c: {"registers": 300} for c in dropped}))
    kept = [c for c in cands if c not in dropped]
    n = len(kept)
    assert seen[:n] == kept                  # every survivor timed, nothing dropped was run
    # then the challenger is confirmed against the default, alternating who goes first
    assert seen[n:] == [default, fastest, fastest, default, default, fastest]
    assert res.confirm["accepted"] and len(res.confirm["challenger_ms"]) == 4
    assert res.best == fastest and res.best_ms == 0.25
    assert res.default == default and res.default_ms == times[default]
    assert res.speedup == pytest.approx(times[default] / 0.25)
    assert len(res.timings) == len(kept)
    assert [t["config"] for t in res.timings] == [c.to_dict() for c in kept]
    assert "error" in res.timings[kept.index(failing)]
    assert {KernelConfig.from_dict(c.to_dict()) for c, _ in res.dropped} == set(dropped)


def test_a_lucky_first_timing_does_not_replace_the_default():
    """Noise: the challenger won its first timing but is no faster when timed again."""
    key = KernelKey.for_shape("gru", "forward", "bfloat16", 1024, 32)
    default = space.heuristic_config(key)
    cands = space.candidate_configs(key, default)
    lucky = cands[1]
    calls = {c: 0 for c in cands}

    def timer(k, cfg):
        calls[cfg] += 1
        if cfg == lucky:
            return 0.80 if calls[cfg] == 1 else 1.02
        return 1.0 if cfg == default else 1.5

    lines = []
    res = tuner.tune(key, timer, report_fn=fake_reports({}), log=lines.append)
    assert res.best == default and res.speedup == 1.0
    assert res.confirm["accepted"] is False and res.confirm["challenger"] == lucky.to_dict()
    assert any("default kept" in ln for ln in lines)
    # All first-round timings are still recorded, the lucky one included.
    assert [t["ms"] for t in res.timings if t["config"] == lucky.to_dict()] == [0.80]


@pytest.mark.parametrize("gain,switch", [(0.30, True), (0.01, False)])
def test_a_challenger_must_beat_the_default_by_the_minimum_gain(gain, switch):
    key = KernelKey.for_shape("lstm", "backward", "bfloat16", 512, 64)
    default = space.heuristic_config(key)
    other = space.candidate_configs(key, default)[2]
    res = tuner.tune(key, lambda k, c: 1.0 - gain if c == other else 1.0,
                     report_fn=fake_reports({}))
    assert res.best == (other if switch else default)
    assert res.best_ms <= res.default_ms


def test_a_challenger_that_fails_on_confirmation_is_rejected():
    key = KernelKey.for_shape("gru", "forward", "float16", 512, 16)
    default = space.heuristic_config(key)
    flaky = space.candidate_configs(key, default)[1]
    calls = []

    def timer(k, cfg):
        calls.append(cfg)
        if cfg == flaky and calls.count(flaky) > 1:
            raise RuntimeError("illegal memory access")
        return 0.5 if cfg == flaky else 1.0

    res = tuner.tune(key, timer, report_fn=fake_reports({}))
    assert res.best == default and "illegal memory access" in res.confirm["error"]


def test_ties_go_to_the_default_and_dropped_default_falls_back():
    key = KernelKey.for_shape("gru", "forward", "bfloat16", 256, 8)
    default = space.heuristic_config(key)
    res = tuner.tune(key, lambda k, c: 1.0, report_fn=fake_reports({}))
    assert res.best == default and res.speedup == 1.0
    # The default is rejected statically: the reference is the next accepted config,
    # which is also what heuristic_config picks with the checker.
    rf = fake_reports({default: {"local_bytes": 4}})
    res = tuner.tune(key, lambda k, c: 1.0, report_fn=rf)
    assert res.default != default
    assert res.default == space.heuristic_config(key, rf, tuner.drop_reasons)


def test_nothing_survives_or_nothing_runs():
    key = KernelKey.for_shape("rnn_tanh", "backward", "float32", 128, 4)
    cands = space.candidate_configs(key)
    with pytest.raises(RuntimeError, match="dropped all"):
        tuner.tune(key, lambda k, c: 1.0, report_fn=fake_reports({c: {"grid": 10 ** 6}
                                                                   for c in cands}))

    def broken(k, c):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="failed to run"):
        tuner.tune(key, broken, report_fn=fake_reports({}))


def test_tune_and_store_records_all_timings(tmp_cache):
    key = KernelKey.for_shape("gru", "backward", "bfloat16", 128, 20)
    cands = space.candidate_configs(key)
    ms = {c: 2.0 - 0.1 * i for i, c in enumerate(cands)}
    res = tuner.tune_and_store(key, gpu="NVIDIA H200", capability=(9, 0), batch=20, seq_len=16,
                               timer=lambda k, c: ms[c], report_fn=fake_reports({}))
    assert res.best == cands[-1]
    name = C.entry_key(key, "NVIDIA H200", (9, 0))
    entry = C.TuneCache().load()[name]
    assert entry["config"] == cands[-1].to_dict()
    assert len(entry["timings"]) == len(cands)
    assert entry["tuned_with"] == {"batch": 20, "seq_len": 16, "direction": "uni"}
    assert entry["static"]["registers"] == 128
    json.dumps(entry)  # JSON-able


def test_module_timer_builds_the_right_layer():
    import torch
    t = tuner.ModuleTimer(batch=4, seq_len=8, direction="bi", device="cpu")
    m = t.build(KernelKey.for_shape("rnn_relu", "forward", "float32", 32, 4))
    assert isinstance(m, torch.nn.RNN) and m.nonlinearity == "relu"
    assert m.bidirectional and m.hidden_size == 32 and m.input_size == 32
    m = t.build(KernelKey.for_shape("lstm", "forward", "bfloat16", 16, 4))
    assert isinstance(m, torch.nn.LSTM) and m.weight_hh_l0.dtype == torch.bfloat16
    assert m.proj_size == 0
    m = t.build(KernelKey.for_shape("lstm", "backward", "bfloat16", 16, 4, proj=8))
    assert isinstance(m, torch.nn.LSTM) and m.proj_size == 8 and m.hidden_size == 16
    assert tuple(m.weight_hh_l0.shape) == (64, 8) and tuple(m.weight_hr_l0.shape) == (8, 16)


#: One key, two tiles. A 16-unit slice of a 512x512 bf16 W_hh (16 KB) fits with 8
#: warps; a 256-unit slice (256 KB of weights alone) cannot fit in the 227 KB of
#: shared memory a block gets on sm_90. tests/test_autotune_cli.py checks the same
#: two tiles, so the second compile of each is a Triton cache hit.
REAL_KEY = ("rnn_tanh", "forward", "bfloat16", 512, 16)
REAL_FITS = KernelConfig(16, 16, 8, 1)
REAL_TOO_BIG = KernelConfig(256, 16, 4, 1)

REAL_COMPILE = textwrap.dedent(f"""
    import json
    from triton_rnn.autotune import space, tuner
    from triton_rnn.kernels.config import KernelConfig
    key = space.KernelKey.for_shape(*{REAL_KEY!r})
    configs = [KernelConfig(**{REAL_FITS.to_dict()!r}), KernelConfig(**{REAL_TOO_BIG.to_dict()!r})]
    lines = []
    res = tuner.prune(key, configs, log=lines.append)
    print(json.dumps({{"kept": [[c.to_dict(), r] for c, r in res.kept],
                      "dropped": [[c.to_dict(), why] for c, why in res.dropped],
                      "lines": lines}}))
""")


def test_static_pruning_with_the_real_compiler(tmp_path):
    """Real ``triton.compile`` for sm_90, in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_RNN_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", REAL_COMPILE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [c for c, _ in out["kept"]] == [REAL_FITS.to_dict()], out
    rep = out["kept"][0][1]
    assert 0 < rep["registers"] <= 255 and rep["local_bytes"] == 0
    assert 0 < rep["shared_bytes"] <= rep["max_shared_bytes"]
    assert rep["weights_loaded_in_loop"] is False
    assert [c for c, _ in out["dropped"]] == [REAL_TOO_BIG.to_dict()]
    assert len(out["lines"]) == 1 and "shared memory" in out["lines"][0], out["lines"]


@pytest.mark.parametrize("pass_,cell,proj", [("forward", "gru", 0), ("backward", "gru", 0),
                                             ("backward", "lstm", 4)])
def test_module_timer_runs_what_it_times(monkeypatch, pass_, cell, proj):
    """The timer's calls, in the interpreter with do_bench replaced: a training forward
    (activations written) for a forward key, forward plus backward for a backward key,
    the candidate tile in the right slot, and fresh inputs on every call. An LSTMP key
    runs the projection (W_hr given, h0 and the output gradients ``proj`` wide; its backward
    key also covers the forward)."""
    import torch
    import triton.testing

    from triton_rnn.kernels import launch
    calls = []
    real_fwd, real_bwd = launch.forward, launch.backward

    widths = []

    def fwd(*a, **kw):  # launch.forward(cell, xg, w_hh, b_hn, h0, ..., cfg (9th), mode, save=...)
        calls.append(("forward", a[9], kw.get("save"), float(a[1].float().sum())))
        widths.append(("forward", a[4].shape[-1], kw.get("w_hr") is not None))
        return real_fwd(*a, **kw)

    def bwd(*a, **kw):  # launch.backward(cell, dout, ..., cfg (12th), mode)
        calls.append(("backward", a[12]))
        widths.append(("backward", a[1].shape[-1], kw.get("w_hr") is not None))
        return real_bwd(*a, **kw)

    def do_bench(fn, warmup, rep, return_mode, grad_to_none=None):
        for _ in range(3):
            fn()
        return 0.25
    monkeypatch.setattr(launch, "forward", fwd)
    monkeypatch.setattr(launch, "backward", bwd)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    fixed, cand = KernelConfig(8, 2), KernelConfig(4, 2)
    t = tuner.ModuleTimer(batch=3, seq_len=4, device="cpu", forward_config=fixed,
                          warmup_calls=1, rotate=2)
    ms = t(KernelKey.for_shape(cell, pass_, "float32", 8, 3, proj=proj), cand)
    assert ms == 0.25
    assert {(p, w) for p, w, _ in widths} <= {("forward", proj or 8), ("backward", proj or 8)}
    assert all(has_wr == bool(proj) for *_, has_wr in widths)
    fwds = [c for c in calls if c[0] == "forward"]
    bwds = [c for c in calls if c[0] == "backward"]
    assert len(fwds) == 4 and all(save for _, _, save, _ in fwds)
    assert len({s for *_, s in fwds}) == 2  # two inputs, used in turn
    if pass_ == "forward":
        assert bwds == [] and all(c == cand for _, c, _, _ in fwds)
    else:
        assert len(bwds) == 4 and all(c == cand for _, c in bwds)
        assert all(c == fixed for _, c, _, _ in fwds)
