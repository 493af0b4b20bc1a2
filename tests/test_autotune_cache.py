"""The autotuning cache: round trip, merge, concurrency, damaged files, look-up."""

from __future__ import annotations

import json
import multiprocessing as mp
import warnings

import pytest

import triton_rnn.autotune as at
from triton_rnn.autotune import cache as C
from triton_rnn.autotune.space import KernelKey
from triton_rnn.kernels.config import KernelConfig

GPU = "NVIDIA H200"
CAP = (9, 0)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("TRITON_RNN_CACHE_DIR", str(d))
    monkeypatch.delenv("TRITON_RNN_AUTOTUNE", raising=False)
    at.reload()
    at._failed.clear()
    at._warned.clear()
    yield d
    at.reload()


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make CUDA devices look like an H200 to the look-up (no GPU here)."""
    import torch

    def ident(device):
        dev = torch.device(device) if not isinstance(device, torch.device) else device
        return (GPU, CAP) if dev.type == "cuda" else None
    monkeypatch.setattr(at, "_device_identity", ident)


def make_entry(cfg: KernelConfig, ms: float = 1.0) -> dict:
    return {"config": cfg.to_dict(), "ms": ms,
            "timings": [{"config": cfg.to_dict(), "ms": ms}]}


def name_for(cell="gru", pass_="forward", dtype="bfloat16", hidden=256, batch=32, proj=0, **kw):
    return C.entry_key(KernelKey.for_shape(cell, pass_, dtype, hidden, batch, 90, proj=proj),
                       GPU, CAP, **kw)


def caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [x for x in w if issubclass(x.category, C.CacheWarning)]


def test_round_trip_and_key_parts(tmp_cache):
    cache = C.TuneCache()
    assert cache.path == tmp_cache / C.CACHE_FILENAME
    name = name_for()
    entry = make_entry(KernelConfig(32, 16, 8, 1), 0.5)
    cache.put(name, entry)
    assert C.TuneCache().load() == {name: entry}
    doc = json.loads(cache.path.read_text())
    assert doc["schema"] == C.SCHEMA_VERSION
    assert doc["triton_version"] == C.triton_version()
    parts = C.split_entry_key(name)
    assert parts["gpu"] == "NVIDIA_H200" and parts["capability"] == CAP
    assert parts["triton"] == C.triton_version()
    assert parts["library"] == C.library_version()
    assert str(parts["kernel_key"]) == "gru:forward:bfloat16:h256:b32:sm90"
    with pytest.raises(C.CacheFormatError):
        cache.put(name, {"config": {"block_h": 3, "block_b": 16}})
    assert not list(tmp_cache.glob("*.tmp"))
    # An LSTM with a projection: its own key, next to the old-format ones.
    lstmp = name_for("lstm", hidden=1024, proj=256)
    cache.put(lstmp, make_entry(KernelConfig(16, 16, 8, 1), 0.7))
    assert set(C.TuneCache().load()) == {name, lstmp}
    kkey = C.split_entry_key(lstmp)["kernel_key"]
    assert str(kkey) == "lstm:forward:bfloat16:h1024p256:b32:sm90" and kkey.proj == 256
    C.validate_entry(lstmp, make_entry(KernelConfig(16, 16)))
    with pytest.raises(C.CacheFormatError, match="malformed"):  # p0 is not how a key is written
        C.validate_entry(name_for("lstm", hidden=1024).replace(":h1024:", ":h1024p0:"),
                         make_entry(KernelConfig(16, 16)))
    with pytest.raises(C.CacheFormatError, match="only for lstm"):
        C.split_entry_key(name_for(hidden=1024).replace(":h1024:", ":h1024p256:"))


def test_export_import_merge(tmp_path, tmp_cache, monkeypatch):
    a, b, c = name_for(hidden=128), name_for(hidden=256), name_for(hidden=512)
    src = C.TuneCache(tmp_path / "a" / "autotune.json")
    src.put(a, make_entry(KernelConfig(128, 16)))
    src.put(b, make_entry(KernelConfig(64, 32)))
    exported = tmp_path / "export.json"
    assert src.export(exported) == 2

    dst = C.TuneCache()
    dst.put(b, make_entry(KernelConfig(16, 16)))
    dst.put(c, make_entry(KernelConfig(32, 16)))
    # An entry from another Triton version is valid but skipped.
    doc = json.loads(exported.read_text())
    stale = name_for(hidden=64, triton="0.0.1")
    doc["entries"][stale] = make_entry(KernelConfig(64, 16))
    exported.write_text(json.dumps(doc))
    counts = dst.import_file(exported)
    assert counts == {"added": 1, "replaced": 1, "skipped": 1}
    merged = dst.load()
    assert set(merged) == {a, b, c}
    assert merged[b]["config"] == KernelConfig(64, 32).to_dict()

    # An invalid document merges nothing.
    doc["entries"]["bogus"] = {"config": {}}
    exported.write_text(json.dumps(doc))
    with pytest.raises(C.CacheFormatError):
        dst.import_file(exported)
    assert dst.load() == merged


def _writer(args):
    path, worker, n, barrier = args
    barrier.wait()
    cache = C.TuneCache(path)
    for i in range(n):
        cache.put(name_for(hidden=16 * (worker * n + i + 1)),
                  make_entry(KernelConfig(16, 16), float(worker)))


def test_eight_concurrent_writers_lose_nothing(tmp_cache):
    ctx = mp.get_context("fork")
    path = tmp_cache / C.CACHE_FILENAME
    barrier = ctx.Barrier(8)
    n = 4
    procs = [ctx.Process(target=_writer, args=((path, w, n, barrier),)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    entries = C.TuneCache(path).load()
    assert len(entries) == 8 * n
    assert {name_for(hidden=16 * (k + 1)) for k in range(8 * n)} == set(entries)


def _valid_doc(**over):
    doc = {"schema": C.SCHEMA_VERSION, "triton_version": C.triton_version(),
           "library_version": C.library_version(),
           "entries": {name_for(): make_entry(KernelConfig(32, 16))}}
    doc.update(over)
    return json.dumps(doc, indent=1)


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "schema", "triton", "not-utf8"])
def test_damaged_file_warns_once_keeps_copy_and_rebuilds(tmp_cache, kind):
    tmp_cache.mkdir(parents=True)
    path = tmp_cache / C.CACHE_FILENAME
    raw = {
        "corrupt": b"{this is not json",
        "truncated": _valid_doc().encode()[:-40],
        "schema": _valid_doc(schema=99).encode(),
        "triton": _valid_doc(triton_version="0.0.1").encode(),
        "not-utf8": b"\xff\xfe\x00garbage",
    }[kind]
    path.write_bytes(raw)
    entries, w = caught(lambda: C.TuneCache().load())
    assert entries == {}
    assert len(w) == 1, [str(x.message) for x in w]
    bad = list(tmp_cache.glob(C.CACHE_FILENAME + ".bad-*"))
    assert len(bad) == 1 and bad[0].read_bytes() == raw
    # Rebuilt: valid, and no further warning.
    doc = json.loads(path.read_text())
    assert doc["schema"] == C.SCHEMA_VERSION and doc["entries"] == {}
    again, w2 = caught(lambda: C.TuneCache().load())
    assert again == {} and w2 == []
    C.TuneCache().put(name_for(), make_entry(KernelConfig(16, 16)))
    assert len(C.TuneCache().load()) == 1


def test_malformed_entry_dropped_valid_ones_kept(tmp_cache):
    tmp_cache.mkdir(parents=True)
    path = tmp_cache / C.CACHE_FILENAME
    doc = json.loads(_valid_doc())
    doc["entries"][name_for(hidden=64)] = {"config": {"block_h": 12, "block_b": 16}}
    doc["entries"]["not a key"] = make_entry(KernelConfig(16, 16))
    path.write_text(json.dumps(doc))
    entries, w = caught(lambda: C.TuneCache().load())
    assert list(entries) == [name_for()]
    assert len(w) == 1 and "2 malformed" in str(w[0].message)
    assert len(list(tmp_cache.glob("*.bad-*"))) == 1
    assert list(C.TuneCache().load()) == [name_for()]


def test_lookup_returns_cached_entry_for_its_bucket(fake_gpu):
    cfg = KernelConfig(32, 32, 8, 1)
    C.TuneCache().put(name_for(hidden=256, batch=32), make_entry(cfg))
    at.reload()
    # 17..32 share the bucket: a new batch size is served without tuning.
    for batch in (17, 20, 32):
        assert at.lookup_config("gru", "forward", "bfloat16", 256, batch, "cuda") == cfg
    # Other buckets of the same kernel take the nearest tuned one: no new variant to compile.
    for batch in (1, 7, 33, 1500):
        assert at.lookup_config("gru", "forward", "bfloat16", 256, batch, "cuda") == cfg
    big = KernelConfig(16, 64, 8, 1)
    C.TuneCache().put(name_for(hidden=256, batch=128), make_entry(big))
    at.reload()
    assert at.lookup_config("gru", "forward", "bfloat16", 256, 20, "cuda") == cfg
    assert at.lookup_config("gru", "forward", "bfloat16", 256, 100, "cuda") == big
    assert at.lookup_config("gru", "forward", "bfloat16", 256, 48, "cuda") == big  # tie: larger
    assert at.lookup_config("gru", "forward", "bfloat16", 256, 9, "cuda") == cfg
    # Nothing is borrowed across kernels: another hidden size, pass, dtype or device.
    assert at.lookup_config("gru", "forward", "bfloat16", 512, 32, "cuda") is None
    assert at.lookup_config("gru", "backward", "bfloat16", 256, 32, "cuda") is None
    assert at.lookup_config("gru", "forward", "float16", 256, 32, "cuda") is None
    assert at.lookup_config("gru", "forward", "bfloat16", 256, 32, "cpu") is None


def test_lookup_keeps_projections_apart(fake_gpu):
    """An LSTMP entry serves only that projection size; a plain LSTM entry only calls without
    one, and the nearest-bucket fallback never crosses between them."""
    def look(batch, proj=None):
        kw = {} if proj is None else {"proj": proj}
        return at.lookup_config("lstm", "forward", "bfloat16", 256, batch, "cuda", **kw)

    lstmp = KernelConfig(32, 16, 4, 1)
    C.TuneCache().put(name_for("lstm", hidden=256, batch=32, proj=64), make_entry(lstmp))
    at.reload()
    assert look(32, 64) == lstmp and look(20, 64) == lstmp
    assert look(256, 64) == lstmp                      # its nearest tuned bucket
    assert look(32) is None and look(32, 0) is None    # not for the plain LSTM
    assert look(32, 32) is None and look(32, 128) is None  # nor another projection size
    plain = KernelConfig(64, 16, 8, 1)
    C.TuneCache().put(name_for("lstm", hidden=256, batch=128), make_entry(plain))
    at.reload()
    assert look(128) == plain and look(32) == plain    # plain LSTM: its own entry, any bucket
    assert look(128, 64) == lstmp and look(32, 64) == lstmp
    assert look(128, 32) is None


def test_lookup_never_raises_on_broken_cache(tmp_cache, fake_gpu):
    tmp_cache.mkdir(parents=True)
    (tmp_cache / C.CACHE_FILENAME).write_text('{"schema": 1, "entries": [')
    out, w = caught(lambda: [at.lookup_config("gru", "forward", "bfloat16", 256, b, "cuda")
                             for b in (8, 16, 32)])
    assert out == [None, None, None]
    assert len(w) == 1
    # Unknown cell: still no exception, one warning.
    out, w = caught(lambda: [at.lookup_config("xyz", "forward", "bfloat16", 8, 8, "cuda")
                             for _ in range(2)])
    assert out == [None, None] and len(w) == 1


def test_autotune_env_tunes_missing_shape_once(monkeypatch, fake_gpu):
    from triton_rnn.autotune import tuner
    calls = []
    cfg = KernelConfig(64, 16, 4, 1)

    def fake_tune_and_store(key, *, gpu, capability, batch, **kw):
        calls.append((str(key), batch))
        C.TuneCache().put(C.entry_key(key, gpu, capability), make_entry(cfg))
        at.reload()

    monkeypatch.setattr(tuner, "tune_and_store", fake_tune_and_store)
    assert at.lookup_config("lstm", "forward", "float16", 128, 8, "cuda") is None  # env unset
    assert calls == []
    monkeypatch.setenv("TRITON_RNN_AUTOTUNE", "1")
    assert at.lookup_config("lstm", "forward", "float16", 128, 8, "cuda") == cfg
    assert at.lookup_config("lstm", "forward", "float16", 128, 7, "cuda") == cfg
    assert at.lookup_config("lstm", "forward", "float16", 128, 8, "cpu") is None
    # A batch in another bucket (the short last batch of an epoch, a bigger eval batch)
    # borrows the tuned neighbour instead of starting another tuning.
    assert at.lookup_config("lstm", "forward", "float16", 128, 3, "cuda") == cfg
    assert at.lookup_config("lstm", "forward", "float16", 128, 200, "cuda") == cfg
    assert calls == [("lstm:forward:float16:h128:b8:sm90", 8)]


def test_autotune_env_failed_tuning_warns_once_and_uses_the_default(monkeypatch, fake_gpu):
    """TRITON_RNN_AUTOTUNE=1 and the tuning fails (out of memory, say): training goes on
    with the default tile, one warning, and the shape is not tuned again at every call."""
    from triton_rnn.autotune import tuner
    calls = []

    def failing_tune_and_store(key, **kw):
        calls.append(str(key))
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(tuner, "tune_and_store", failing_tune_and_store)
    monkeypatch.setenv("TRITON_RNN_AUTOTUNE", "1")
    out, w = caught(lambda: [at.lookup_config("gru", "forward", "bfloat16", 512, b, "cuda")
                             for b in (16, 16, 13)])
    assert out == [None, None, None]
    assert calls == ["gru:forward:bfloat16:h512:b16:sm90"]
    assert len(w) == 1 and "out of memory" in str(w[0].message)
    assert "default tile" in str(w[0].message)


def test_autotune_env_tunes_a_projection_under_its_own_key(monkeypatch, fake_gpu):
    """The on-the-fly tuning of an LSTMP: its own key, and its backward is timed with the
    forward tile tuned for the same projection (not the plain LSTM's)."""
    from triton_rnn.autotune import tuner
    calls = []
    tiles = {"forward": KernelConfig(32, 16, 4, 1), "backward": KernelConfig(16, 16, 8, 1)}

    def fake_tune_and_store(key, *, gpu, capability, batch, forward_config=None, **kw):
        calls.append((str(key), forward_config))
        C.TuneCache().put(C.entry_key(key, gpu, capability), make_entry(tiles[key.pass_]))
        at.reload()

    monkeypatch.setattr(tuner, "tune_and_store", fake_tune_and_store)
    C.TuneCache().put(name_for("lstm", "forward", "float16", 128, 8), make_entry(
        KernelConfig(128, 16, 8, 1)))  # the plain LSTM's forward tile
    at.reload()
    monkeypatch.setenv("TRITON_RNN_AUTOTUNE", "1")
    assert at.lookup_config("lstm", "forward", "float16", 128, 8, "cuda", proj=32) == \
        tiles["forward"]
    assert at.lookup_config("lstm", "backward", "float16", 128, 8, "cuda", proj=32) == \
        tiles["backward"]
    assert calls == [("lstm:forward:float16:h128p32:b8:sm90", None),
                     ("lstm:backward:float16:h128p32:b8:sm90", tiles["forward"])]
    assert at.lookup_config("lstm", "forward", "float16", 128, 8, "cuda") == \
        KernelConfig(128, 16, 8, 1)
    assert len(calls) == 2


def test_launcher_uses_cached_config(fake_gpu):
    import torch

    from triton_rnn.kernels import launch
    select = launch.select_config
    default = launch.default_config("gru", "forward", torch.bfloat16, 256, 24)
    tuned = KernelConfig(block_h=default.block_h // 2 or 16, block_b=32, num_warps=8, num_stages=1)
    assert tuned != default
    C.TuneCache().put(name_for(hidden=256, batch=24), make_entry(tuned))
    at.reload()
    assert select("gru", "forward", torch.bfloat16, 256, 24, device="cuda") == tuned
    assert select("gru", "forward", torch.bfloat16, 256, 30, device="cuda") == tuned
    # No device (CPU/interpreter): the launcher's own default.
    assert select("gru", "forward", torch.bfloat16, 256, 24, device=None) == default


def test_launcher_uses_the_cached_config_of_a_projection(fake_gpu):
    """An LSTM with proj_size picks the tile tuned for its projection size (both passes)."""
    import torch

    from triton_rnn.kernels import launch
    select = launch.select_config
    default = launch.default_config("lstm", "forward", torch.bfloat16, 1024, 24, proj=256)
    tuned = {"forward": KernelConfig(default.block_h * 2, 32, 8, 1),
             "backward": KernelConfig(16, 16, 4, 1)}
    assert default not in tuned.values()
    for pass_, cfg in tuned.items():
        C.TuneCache().put(name_for("lstm", pass_, hidden=1024, batch=24, proj=256),
                          make_entry(cfg))
    at.reload()
    for pass_, cfg in tuned.items():
        assert select("lstm", pass_, torch.bfloat16, 1024, 24, device="cuda", proj=256) == cfg
        assert select("lstm", pass_, torch.bfloat16, 1024, 30, device="cuda", proj=256) == cfg
    # Not the plain LSTM of the same hidden size, nor another projection size.
    assert at.lookup_config("lstm", "forward", "bfloat16", 1024, 24, "cuda") is None
    assert at.lookup_config("lstm", "forward", "bfloat16", 1024, 24, "cuda", proj=128) is None
    # No device: the launcher's own default for the projection.
    assert select("lstm", "forward", torch.bfloat16, 1024, 24, device=None, proj=256) == default


@pytest.mark.parametrize("kind", ["infinity", "nan", "bigint", "deep"])
def test_hostile_json_is_set_aside_not_raised(tmp_cache, kind):
    """Numbers and nesting that Python's json turns into exceptions other than a decode error."""
    tmp_cache.mkdir(parents=True)
    path = tmp_cache / C.CACHE_FILENAME
    valid = json.loads(_valid_doc())
    bad_name = name_for(hidden=64)
    cfg = '{"block_h": %s, "block_b": 16}'
    raw = {
        "infinity": cfg % "Infinity",
        "nan": cfg % "NaN",
        "bigint": cfg % ("9" * 5000),
        "deep": "[" * 100000 + "]" * 100000,
    }[kind]
    text = json.dumps(valid)[:-2] + f', "{bad_name}": {raw}}}}}'
    path.write_text(text)
    entries, w = caught(lambda: C.TuneCache().load())
    assert entries == {} and len(w) == 1
    assert [p.read_text() for p in tmp_cache.glob("*.bad-*")] == [text]
    json.loads(path.read_text(), parse_constant=pytest.fail)  # rebuilt as strict JSON


@pytest.mark.parametrize("config,why", [
    ({"block_h": 2 ** 40, "block_b": 16}, "block_h"),
    ({"block_h": 16, "block_b": 16, "num_warps": 64}, "num_warps"),
    ({"block_h": 16, "block_b": 16, "num_stages": 100000}, "num_stages"),
    ({"block_h": 16.9, "block_b": 16}, "integer"),
    ({"block_h": True, "block_b": 16}, "integer"),
    ({"block_h": "16", "block_b": 16}, "integer"),
    ({"block_h": 16}, "missing"),
    ([16, 16], "object"),
    ({"block_h": 16, "block_b": 16, "block_k": 64, "resident_k": 100}, "multiple of 16"),
    ({"block_h": 16, "block_b": 16, "block_k": 64, "resident_k": 2 ** 20}, "resident_k"),
    ({"block_h": 16, "block_b": 16, "block_k": 64, "resident_k": -16}, "resident_k"),
])
def test_config_from_untrusted_data_is_bounded_and_strict(config, why):
    with pytest.raises(ValueError, match=why):
        KernelConfig.from_dict(config)


def test_partly_resident_configs_round_trip_and_old_entries_still_load():
    cfg = KernelConfig(16, 16, 8, 1, block_k=128, resident_k=1536)
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg
    assert str(cfg).endswith("block_k=128 resident_k=1536")
    # Entries written before resident_k existed lack the field: nothing kept on-chip.
    old = {"block_h": 32, "block_b": 16, "num_warps": 8, "num_stages": 1, "block_k": 128}
    assert KernelConfig.from_dict(old).resident_k == 0


def test_bad_values_and_noncanonical_keys_are_refused(tmp_path, tmp_cache):
    good = make_entry(KernelConfig(16, 16))
    with pytest.raises(C.CacheFormatError, match="finite"):
        C.validate_entry(name_for(), {**good, "ms": float("nan")})
    with pytest.raises(C.CacheFormatError, match="timing"):
        C.validate_entry(name_for(), {**good, "timings": [{"config": {}, "ms": float("inf")}]})
    loose = name_for().replace("gru:forward:bfloat16:h256", "GRU:forward:bf16:h0256")
    with pytest.raises(C.CacheFormatError, match="canonical"):
        C.validate_entry(loose, good)
    with pytest.raises(C.CacheFormatError, match="schema"):
        C.parse_document(_valid_doc(schema=True))
    # An import of a hostile tile merges nothing.
    src = tmp_path / "hostile.json"
    src.write_text(_valid_doc(entries={name_for(): {"config": {"block_h": 16, "block_b": 2 ** 40}}}))
    with pytest.raises(C.CacheFormatError, match="block_b"):
        C.TuneCache().import_file(src)
    assert C.TuneCache().load() == {}


def test_unrepairable_file_keeps_its_valid_entries(tmp_cache, monkeypatch):
    """A read-only shared cache with one bad entry still serves the others."""
    tmp_cache.mkdir(parents=True)
    doc = json.loads(_valid_doc())
    doc["entries"][name_for(hidden=64)] = {"config": {"block_h": 12, "block_b": 16}}
    (tmp_cache / C.CACHE_FILENAME).write_text(json.dumps(doc))

    def read_only(self):
        raise PermissionError(13, "Permission denied", str(self.lock_path))
    monkeypatch.setattr(C.TuneCache, "_lock", read_only)
    entries, w = caught(lambda: C.TuneCache().load())
    assert list(entries) == [name_for()]
    assert len(w) == 1 and "1 valid entries" in str(w[0].message)


def test_symlinked_cache_is_updated_in_place_and_modes_follow_umask(tmp_path, tmp_cache):
    import os
    import stat
    shared = tmp_path / "shared.json"
    C.TuneCache(shared).put(name_for(), make_entry(KernelConfig(16, 16)))
    assert stat.S_IMODE(shared.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0o600
    tmp_cache.mkdir(parents=True)
    link = tmp_cache / C.CACHE_FILENAME
    link.symlink_to(shared)
    assert C.TuneCache().clear() == 1
    assert link.is_symlink() and C.TuneCache(shared).load() == {}
    os.chmod(shared, 0o640)
    C.TuneCache().put(name_for(), make_entry(KernelConfig(16, 16)))
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    out = tmp_path / "export.json"
    C.TuneCache().export(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    import os
    old = os.umask(0o022)
    os.umask(old)
    return old
