"""``triton-rnn tune`` and ``triton-rnn cache`` through subprocesses.

Starting Python with torch costs seconds here, so most commands run one after
another in a single driver subprocess that calls the CLI's ``main(argv)`` with
its own stdin/stdout/stderr per command; the commands whose process-level
behaviour matters (exit status and the one-line error of the console entry
point, the real compiler) run as ``python -m triton_rnn.cli`` processes, in
parallel with the driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


from triton_rnn.autotune import cache as C
from triton_rnn.autotune.space import KernelKey
from triton_rnn.kernels.config import KernelConfig

DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys
    from triton_rnn.cli import main
    results = []
    for argv, stdin in json.load(sys.stdin):
        out, err = io.StringIO(), io.StringIO()
        sys.stdin = io.StringIO(stdin) if stdin is not None else None  # None: no stdin at all
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        results.append({"argv": argv, "rc": rc, "out": out.getvalue(), "err": err.getvalue()})
    sys.__stdout__.write(json.dumps(results))
""")

GPU, CAP = "NVIDIA H200", (9, 0)


def env_for(cache_dir, interpret: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                             "TRITON_RNN_AUTOTUNE")}
    env["TRITON_RNN_CACHE_DIR"] = str(cache_dir)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the no-GPU path, even on a machine with one
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def start(args, env, stdin=""):
    return subprocess.Popen([sys.executable, *args], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), stdin


def finish(proc_and_input, timeout=300):
    proc, stdin = proc_and_input
    out, err = proc.communicate(stdin, timeout=timeout)
    return proc.returncode, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_commands(tmp_path):
    from triton_rnn.cli.cache import short_id
    cache_dir = tmp_path / "cache"
    names = [C.entry_key(KernelKey.for_shape("gru", "forward", "bfloat16", h, 32), GPU, CAP)
             for h in (128, 256)]
    good = C.TuneCache(tmp_path / "src" / "autotune.json")
    for n, h in zip(names, (128, 64)):
        good.put(n, {"config": KernelConfig(h, 16, 4, 1).to_dict(), "ms": 0.5, "speedup": 1.5,
                     "timings": [{"config": KernelConfig(h, 16, 4, 1).to_dict(), "ms": 0.5}]})
    good_file = tmp_path / "good.json"
    good.export(good_file)
    stream_file = tmp_path / "stream.json"
    C.TuneCache(stream_file).put(
        C.entry_key(KernelKey.for_shape("lstm", "forward", "float32", 2048, 8), GPU, CAP),
        {"config": KernelConfig(16, 16, 8, 1, 32, resident_k=768).to_dict(), "ms": 2.0})
    proj_file = tmp_path / "proj.json"
    lstm_names = [C.entry_key(KernelKey.for_shape("lstm", "forward", "bfloat16", 256, 32,
                                                  proj=p), GPU, CAP) for p in (64, 0)]
    for n, h in zip(lstm_names, (32, 64)):
        C.TuneCache(proj_file).put(n, {"config": KernelConfig(h, 16, 4, 1).to_dict(), "ms": 0.5})
    bad_file = tmp_path / "bad.json"
    bad_file.write_text('{"schema": 1, "entries": {')
    exported = tmp_path / "exported.json"

    helps = [[["--help"], ""], [["tune", "--help"], ""], [["cache", "--help"], ""]] + \
        [[["cache", a, "--help"], ""] for a in ("list", "show", "clear", "export", "import", "path")]
    steps = [
        (["cache", "path"], ""),
        (["cache", "list"], ""),
        (["cache", "import", str(good_file)], ""),
        (["cache", "list"], ""),
        (["cache", "show", short_id(names[1])], ""),
        (["cache", "show", "h128"], ""),
        (["cache", "show", "nomatch"], ""),
        (["cache", "show", "gru"], ""),
        (["cache", "export", str(exported)], ""),
        (["cache", "export", str(tmp_path / "no" / "such" / "dir.json")], ""),
        (["cache", "import", str(bad_file)], ""),
        (["cache", "import", str(tmp_path / "missing.json")], ""),
        (["cache", "clear"], "n\n"),
        (["cache", "list"], ""),
        (["cache", "clear"], "y\n"),
        (["cache", "list"], ""),
        (["cache", "import", str(exported)], ""),
        (["cache", "clear", "--yes"], ""),
        (["cache"], ""),
        (["cache", "frobnicate"], ""),
        (["tune", "--cell", "gru"], ""),
        (["tune", "--cell", "gru", "--hidden", "0"], ""),
        (["tune", "--cell", "gru", "--hidden", "64", "--config", "3,16,4"], ""),
        (["tune", "--cell", "gru", "--hidden", "64"], ""),
        (["cache", "import", str(stream_file)], ""),
        (["cache", "clear"], None),
        (["cache", "list"], ""),
        (["tune", "--cell", "gru", "--hidden", "64", "--proj", "16", "--static-only"], ""),
        (["tune", "--cell", "lstm", "--hidden", "64", "--proj", "64", "--static-only"], ""),
        (["tune", "--cell", "lstm", "--hidden", "64", "--proj", "-1", "--static-only"], ""),
        (["tune", "--cell", "lstm", "--hidden", "64", "--proj", "16"], ""),
        (["cache", "import", str(proj_file)], ""),
        (["cache", "list"], ""),
        (["cache", "show", "lstm:forward:bf16:h256p64:b32:sm90"], ""),
        (["cache", "show", "lstm:forward:bfloat16:h256:b32:sm90"], ""),
        (["cache", "show", "h256p64"], ""),
        (["cache", "export", "-"], ""),
        (["cache", "clear", "--yes"], ""),
        (["cache", "import", "-"], good_file.read_text()),
        (["cache", "show", "gru"], ""),
        (["cache", "clear", "--yes"], ""),
        (["cache", "clear"], None),
        (["tune", "--cell", "gru", "--hidden", "64", "--arch", "sm_91", "--static-only"], ""),
        (["inspect", "--hidden", "64", "--num-warps", "8"], ""),
        (["cache", "export", str(tmp_path)], ""),
    ]
    driver = start(["-c", DRIVER], env_for(cache_dir),
                   json.dumps(helps + [list(s) for s in steps]))
    no_gpu = start(["-m", "triton_rnn.cli", "tune", "--cell", "gru", "--hidden", "64"],
                   env_for(tmp_path / "other"))
    bad_proj = start(["-m", "triton_rnn.cli", "tune", "--cell", "lstm", "--hidden", "128",
                      "--proj", "256", "--static-only"], env_for(tmp_path / "other"))
    bad_import = start(["-m", "triton_rnn.cli", "cache", "import", str(bad_file)],
                       env_for(tmp_path / "other"))
    not_a_dir = start(["-m", "triton_rnn.cli", "cache", "list"], env_for(bad_file))

    rc, out, err = finish(driver)
    assert rc == 0, err[-3000:]
    res = json.loads(out)
    for r in res[:len(helps)]:
        assert r["rc"] == 0 and "usage:" in r["out"], r
    r = {i: x for i, x in enumerate(res[len(helps):])}

    def ok(i, rc=0):
        assert r[i]["rc"] == rc, r[i]
        return r[i]["out"]

    def fails(i, rc=2):
        assert r[i]["rc"] == rc, r[i]
        return one_line(r[i]["err"])

    assert ok(0).strip() == str(cache_dir / C.CACHE_FILENAME)
    assert "no entries" in ok(1)
    assert "imported 2 new, 0 replaced" in ok(2)
    table = ok(3).splitlines()
    assert table[0].split()[:3] == ["ID", "CELL", "PASS"]
    assert len(table) == 4 and all(short_id(n) in ok(3) for n in names)
    assert "h64 b16 w4 s1" in ok(3) and "1.50x" in ok(3)
    shown = json.loads(ok(4))
    assert shown["key"] == names[1] and shown["config"]["block_h"] == 64
    assert json.loads(ok(5))["key"] == names[0]
    assert "no entry matches" in fails(6)
    assert "matches 2 entries" in fails(7)
    assert "exported 2 entries" in ok(8)
    assert set(json.loads(exported.read_text())["entries"]) == set(names)
    assert "cannot write" in fails(9)
    assert "not a valid cache file" in fails(10)
    assert "cannot read" in fails(11)
    assert r[12]["rc"] == 1 and "[y/N]" in r[12]["out"]
    assert len(ok(13).splitlines()) == 4          # still there
    assert "deleted 2 entries" in ok(14)
    assert "no entries" in ok(15)
    assert "imported 2 new" in ok(16)
    assert "deleted 2 entries" in ok(17)
    for i in (18, 19, 20, 21, 22):                # argparse errors: usage + one error line
        assert r[i]["rc"] == 2 and "error:" in r[i]["err"], r[i]
    assert "--static-only" in fails(23)
    assert "imported 1 new" in ok(24)
    assert r[25]["rc"] == 1 and "nothing deleted" in r[25]["err"]  # closed stdin: no answer
    assert "h16 b16 w8 s1 k32 r768" in ok(26)  # a streaming tile says so, and what stays
    # --proj: LSTM only, smaller than --hidden, not negative; checked before the GPU is.
    assert "--cell lstm only" in fails(27)
    assert "smaller than --hidden (64)" in fails(28)
    assert "--proj" in fails(29) and "must be >= 0" in fails(29)
    assert "--static-only" in fails(30)
    assert "imported 2 new" in ok(31)
    table = [ln.split() for ln in ok(32).splitlines()[1:-1]]
    hidden_col = ok(32).splitlines()[0].split().index("HIDDEN")
    assert sorted(row[hidden_col] for row in table) == ["2048", "256", "256p64"]  # + step 24
    assert json.loads(ok(33))["key"] == lstm_names[0]   # the kernel key, any dtype spelling
    assert json.loads(ok(34))["key"] == lstm_names[1]   # the plain LSTM: not the LSTMP
    assert json.loads(ok(35))["key"] == lstm_names[0]
    # '-': standard output and input.
    assert set(json.loads(ok(36))["entries"]) == set(lstm_names) | {
        n for n in json.loads(stream_file.read_text())["entries"]}
    assert "exported 3 entries to standard output" in one_line(r[36]["err"])
    assert "imported 2 new" in ok(38)
    ambiguous = fails(39)
    assert "matches 2 entries" in ambiguous and all(short_id(n) in ambiguous for n in names)
    assert "nothing to delete" in ok(41)  # an empty cache: no question asked
    assert "sm_91 is not a CUDA architecture" in fails(42) and "sm_90" in fails(42)
    assert "need a forced tile" in fails(43)
    assert "give a file name" in fails(44)

    rc, out, err = finish(no_gpu)
    assert rc != 0 and "no CUDA GPU" in one_line(err)
    rc, out, err = finish(bad_proj)
    assert rc == 2 and "smaller than --hidden (128), got 256" in one_line(err)
    rc, out, err = finish(bad_import)
    assert rc == 2 and "not a valid cache file" in one_line(err)
    rc, out, err = finish(not_a_dir)  # $TRITON_RNN_CACHE_DIR names a file
    assert rc == 2 and "is not a directory" in one_line(err)


def test_cli_tune_static_only_real_compiler(tmp_path):
    """``--static-only`` with the real compiler (no GPU), same two tiles as the tuner test."""
    rc, out, err = finish(start(
        ["-m", "triton_rnn.cli", "tune", "--static-only", "--verbose", "--cell", "rnn_tanh",
         "--hidden", "512", "--batch", "12", "--config", "16,16,8", "--config", "256,16,4,1"],
        env_for(tmp_path / "cache")))
    assert rc == 0, err[-3000:]
    lines = out.splitlines()
    assert lines[0].startswith("rnn_tanh:forward:bfloat16:h512:b16:sm90: 2 candidates")
    kept = lines.index("kept 1:")
    assert lines[kept + 1].strip().startswith("block_h=16 block_b=16 num_warps=8")
    dropped = lines.index("dropped 1:")
    assert "block_h=256" in lines[dropped + 1] and "shared memory" in lines[dropped + 1]
    assert not (tmp_path / "cache" / C.CACHE_FILENAME).exists()   # static-only stores nothing


def test_cli_import_names_the_cache_when_the_write_fails(tmp_path, monkeypatch, capsys):
    """A readable source whose merge fails blames the cache, not the source."""
    from triton_rnn.cli import main
    monkeypatch.setenv("TRITON_RNN_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src.json"
    C.TuneCache(src).put(C.entry_key(KernelKey.for_shape("gru", "forward", "bfloat16", 64, 8),
                                     GPU, CAP), {"config": KernelConfig(64, 16).to_dict()})

    def refused(self, fn):
        raise PermissionError(1, "Operation not permitted", str(self.lock_path))
    monkeypatch.setattr(C.TuneCache, "update", refused)
    assert main(["cache", "import", str(src)]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and str(tmp_path / "cache") in err and "src.json" not in err


def test_cli_warnings_are_one_line_and_a_closed_pipe_is_quiet(tmp_path):
    """A damaged cache is reported as one ``triton-rnn: warning:`` line (no source
    excerpt); a reader that goes away (``| head``) ends the command quietly, status 141."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / C.CACHE_FILENAME).write_text('{"schema": 1, "entries": [')
    code = textwrap.dedent("""
        import sys
        import triton_rnn.cli.cache as cache_cli
        from triton_rnn.cli import main
        if sys.argv[1] == "pipe":
            def cmd_path(args):
                raise BrokenPipeError(32, "Broken pipe")
            cache_cli.cmd_path = cmd_path
            sys.exit(main(["cache", "path"]))
        sys.exit(main(["cache", "list"]))
    """)
    listed = start(["-c", code, "list"], env_for(cache_dir))
    piped = start(["-c", code, "pipe"], env_for(cache_dir))
    rc, out, err = finish(listed)
    assert rc == 0 and "no entries" in out
    line = one_line(err)
    assert line.startswith("triton-rnn: warning: triton_rnn autotune cache:") and "unusable" in line
    rc, out, err = finish(piped)
    assert rc == 141 and err == "", err
