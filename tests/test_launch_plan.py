"""The launcher's choice between one persistent launch and one launch per step.

A grid barrier deadlocks unless every program is resident, so the launcher
bounds the grid by SM count x occupancy and falls back to stepwise launches when
that cannot hold or when the driver refuses the cooperative launch. The real
kernels need a GPU for this; here a recording stand-in plays the kernel.
"""

import types
import warnings

import pytest
import torch

from triton_rnn.kernels import launch
from triton_rnn.kernels.config import KernelConfig

H100_LIKE = types.SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                                  max_threads_per_multi_processor=2048,
                                  shared_memory_per_multiprocessor=233472)


class FakeKernel:
    """Records launches; ``refuse`` makes the cooperative launch fail like the driver does."""

    def __init__(self, n_regs=128, shared=100_000, refuse=False):
        self.launches = []
        self.warmups = 0
        self.compiled = types.SimpleNamespace(n_regs=n_regs, metadata=types.SimpleNamespace(shared=shared),
                                              _init_handles=lambda: None)
        self.refuse = refuse

    def warmup(self, *args, grid, **kwargs):
        self.warmups += 1
        return self.compiled

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if kwargs.get("launch_cooperative_grid") and self.refuse:
                raise RuntimeError("Triton Error [CUDA]: cooperative launch too large")
            self.launches.append((grid, args[-2], args[-1], kwargs.get("USE_BARRIER"),
                                  kwargs.get("launch_cooperative_grid", False)))
        return run


@pytest.fixture
def gpu_props(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: H100_LIKE)
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "_warned", set())
    monkeypatch.setattr(launch, "_fit_cache", {})


def _run(kernel, hidden, batch, cfg, T=5, mode="auto", proj=0):
    plan = launch._plan(hidden, batch, cfg, mode, proj=proj)
    launch._launch(kernel, plan, cfg, T, batch, hidden, proj or hidden, (),
                   {"HAS_PROJ": bool(proj)}, "cpu", "test forward")
    return plan


def test_occupancy_from_registers_shared_memory_and_threads(gpu_props):
    c = types.SimpleNamespace(n_regs=128, metadata=types.SimpleNamespace(shared=100_000))
    assert launch._max_resident_programs(c, 4, None) == 132 * 2  # shared memory: 2 per SM
    c = types.SimpleNamespace(n_regs=255, metadata=types.SimpleNamespace(shared=10_000))
    assert launch._max_resident_programs(c, 8, None) == 132 * 1  # registers: 1 per SM
    c = types.SimpleNamespace(n_regs=32, metadata=types.SimpleNamespace(shared=0))
    assert launch._max_resident_programs(c, 8, None) == 132 * 8  # threads: 8 per SM
    # Shared memory is allocated in 128-byte units, beside the 1 KB reserve: 5 blocks of
    # 45,568 + 1,024 = 46,592 B fit in 228 KB; 8 bytes more round up to 46,720, and
    # 5 x 46,720 does not fit (5 x 46,600 unrounded would).
    c = types.SimpleNamespace(n_regs=32, metadata=types.SimpleNamespace(shared=45_568))
    assert launch._max_resident_programs(c, 4, None) == 132 * 5
    c = types.SimpleNamespace(n_regs=32, metadata=types.SimpleNamespace(shared=45_576))
    assert launch._max_resident_programs(c, 4, None) == 132 * 4
    # 136 registers: 3 warps per sub-partition, 12 per SM; 6 two-warp programs, not 7.
    c = types.SimpleNamespace(n_regs=136, metadata=types.SimpleNamespace(shared=0))
    assert launch._max_resident_programs(c, 2, None) == 132 * 6
    assert launch._max_resident_programs(c, 4, None) == 132 * 3


def test_single_program_tiling_needs_no_barrier(gpu_props):
    k = FakeKernel()
    plan = _run(k, hidden=64, batch=40, cfg=KernelConfig(64, 16))
    assert plan.grid_h == 1 and len(k.launches) == 1
    grid, t_begin, n_steps, barrier, coop = k.launches[0]
    assert grid == (3, 1) and (t_begin, n_steps) == (0, 5) and not barrier and not coop


def test_split_hidden_is_one_cooperative_launch_with_a_bounded_grid(gpu_props):
    k = FakeKernel(n_regs=128, shared=100_000)  # 2 programs per SM: 264 resident
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(k, hidden=1024, batch=16 * 20, cfg=KernelConfig(16, 16))
    assert len(k.launches) == 1
    (grid_b, grid_h), t_begin, n_steps, barrier, coop = k.launches[0]
    assert grid_h == 64 and grid_b == 264 // 64 and barrier and coop and n_steps == 5


def test_barrier_counters_never_overflow(gpu_props, monkeypatch):
    """The int32 counters reach steps x hidden blocks: long sequences take several launches."""
    monkeypatch.setattr(launch, "BARRIER_COUNT_LIMIT", 64 * 2 + 5)  # two steps of 64 blocks
    k = FakeKernel(n_regs=128, shared=100_000)
    _run(k, hidden=1024, batch=16, cfg=KernelConfig(16, 16), T=5)
    assert [(l[0][1], l[1], l[2], l[3], l[4]) for l in k.launches] == [
        (64, 0, 2, True, True), (64, 2, 2, True, True), (64, 4, 1, True, True)]


def test_lstm_projection_steps_are_two_phases(gpu_props, monkeypatch):
    """With proj_size a step is gates then projection, each followed by the barrier: the
    launches count phases, and the projection's outputs are spread over the grid."""
    k = FakeKernel(n_regs=128, shared=100_000)
    plan = _run(k, hidden=1024, batch=16, cfg=KernelConfig(16, 16), T=5, proj=256)
    assert plan.grid_h == 64 and plan.block_p == 4
    assert [(l[0][1], l[1], l[2], l[3]) for l in k.launches] == [(64, 0, 10, True)]
    k = FakeKernel()
    _run(k, hidden=64, batch=4, cfg=KernelConfig(16, 16), T=3, mode="stepwise", proj=24)
    assert [l[1] for l in k.launches] == list(range(6))
    monkeypatch.setattr(launch, "BARRIER_COUNT_LIMIT", 64 * 3 + 5)  # three phases of 64 blocks
    k = FakeKernel(n_regs=128, shared=100_000)
    _run(k, hidden=1024, batch=16, cfg=KernelConfig(16, 16), T=2, proj=256)
    assert [(l[1], l[2]) for l in k.launches] == [(0, 3), (3, 1)]


def test_grid_that_cannot_be_resident_falls_back_to_stepwise(gpu_props):
    k = FakeKernel(n_regs=255, shared=200_000)  # 1 program per SM: 132 < 256 hidden blocks
    with pytest.warns(RuntimeWarning, match="cannot run persistently.*exceed"):
        _run(k, hidden=4096, batch=8, cfg=KernelConfig(16, 16, block_k=128), T=3)
    assert [(l[1], l[2], l[3]) for l in k.launches] == [(0, 1, False), (1, 1, False),
                                                        (2, 1, False)]


def test_refused_cooperative_launch_falls_back_to_stepwise(gpu_props):
    k = FakeKernel(refuse=True)
    with pytest.warns(RuntimeWarning, match="cooperative launch failed"):
        _run(k, hidden=512, batch=4, cfg=KernelConfig(32, 16), T=2)
    assert [(l[1], l[2], l[4]) for l in k.launches] == [(0, 1, False), (1, 1, False)]


def test_refused_cooperative_launch_during_capture_says_so(gpu_props, monkeypatch):
    """Under CUDA graph capture a refused launch has already broken the capture: no
    fallback, but an error that says what happened."""
    monkeypatch.setattr(launch, "_capture_underway", lambda device: True)
    k = FakeKernel(refuse=True)
    with pytest.raises(RuntimeError, match="refused during CUDA graph capture"):
        _run(k, hidden=512, batch=4, cfg=KernelConfig(32, 16), T=2)
    assert not any(not l[4] for l in k.launches)  # no stepwise launch was tried


def test_stepwise_mode_is_one_launch_per_step(gpu_props):
    k = FakeKernel()
    _run(k, hidden=64, batch=4, cfg=KernelConfig(64, 16), T=4, mode="stepwise")
    assert [l[1] for l in k.launches] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="mode must be one of"):
        launch._plan(64, 4, KernelConfig(64, 16), "eager")


@pytest.mark.parametrize("hidden,gpu,expected", [
    (10, True, (16, 1)), (10, False, (16, 1)), (5, False, (8, 1)), (100, True, (128, 1)),
    (256, True, (256, 1)), (300, True, (256, 2)), (768, True, (256, 3)),
    (1536, True, (256, 6)), (2048, True, (256, 8)), (4, True, (16, 1)), (4, False, (4, 1))])
def test_k_tiling_pads_to_whole_chunks_not_powers_of_two(hidden, gpu, expected):
    """Hidden 1536 keeps six 256-input chunks of W_hh on-chip, not eight (2048's)."""
    assert launch.k_tiling(hidden, gpu=gpu) == expected
    kc, n = expected
    assert kc & (kc - 1) == 0 and kc * n >= hidden and kc * (n - 1) < hidden


def test_default_slice_size_counts_chunk_padding_only():
    """LSTM 1536 bf16: a 16-unit slice of 6 chunks (192 KB) stays on-chip; 8 chunks would not."""
    cfg = launch.default_config("lstm", "forward", torch.bfloat16, 1536, 32)
    assert cfg.block_k == 0 and cfg.block_h == 16
    assert 4 * launch.padded_k(1536, gpu=True) * 16 * 2 <= launch.ONCHIP_WEIGHT_LIMIT


@pytest.mark.parametrize("cell,dtype,hidden,block_h,resident_k", [
    ("lstm", torch.bfloat16, 2048, 16, 1536),  # 6 of 8 chunks on-chip: 192 KB of 256
    ("gru", torch.float32, 2048, 16, 1024),
    ("lstm", torch.bfloat16, 4096, 32, 768),  # 16 slices per SM would be 256 programs
    ("rnn_tanh", torch.bfloat16, 4096, 32, 3328)])
def test_slices_beyond_shared_memory_keep_whole_chunks_on_chip(cell, dtype, hidden, block_h,
                                                               resident_k):
    """A slice over the on-chip limit keeps its first K chunks on-chip and streams the rest:
    at most one slice per SM, and the resident chunks plus one streamed chunk of the
    weights and of the h tile within RESIDENT_STREAM_LIMIT, which one more chunk would
    exceed."""
    cfg = launch.default_config(cell, "forward", dtype, hidden, 32)
    assert (cfg.block_h, cfg.resident_k) == (block_h, resident_k) and cfg.block_k > 0
    assert hidden // block_h <= 132
    gates = launch.CELL_SPECS[cell].gates
    item = torch.empty((), dtype=dtype).element_size()
    resident = gates * block_h * resident_k * item
    streamed = gates * block_h * cfg.block_k * item
    assert streamed <= launch.PARTLY_RESIDENT_STREAM_CHUNK[item]
    streamed += cfg.block_b * cfg.block_k * item
    assert resident + streamed <= launch.RESIDENT_STREAM_LIMIT
    chunk = gates * block_h * 256 * item
    assert resident + chunk + streamed > launch.RESIDENT_STREAM_LIMIT
    # Both passes hold the same chunks; a projection streams all of its slice.
    assert launch.default_config(cell, "backward", dtype, hidden, 32) == cfg
    assert launch.resident_chunks(hidden, cfg.block_k, cfg.resident_k, gpu=True) == \
        resident_k // 256
    assert launch.resident_chunks(hidden, 0, 0, gpu=True) == launch.k_tiling(hidden, True)[1]
    big_proj = launch.default_config("lstm", "forward", torch.float16, 4096, 32, proj=1024)
    assert big_proj.block_k > 0 and big_proj.resident_k == 0


def test_one_slice_per_sm_before_streaming():
    """RNN 3072 bf16: 16-unit slices would be 192 programs; 32-unit ones (192 KB) fit."""
    cfg = launch.default_config("rnn_tanh", "forward", torch.bfloat16, 3072, 32)
    assert (cfg.block_h, cfg.block_k) == (32, 0)


def test_occupancy_is_read_once_per_compiled_variant(gpu_props):
    """The second call with the same variant skips the host-side compile lookup."""
    k = FakeKernel(n_regs=128, shared=100_000)
    for _ in range(3):
        _run(k, hidden=1024, batch=64, cfg=KernelConfig(16, 16))
    assert k.warmups == 1 and len(k.launches) == 3 and all(l[4] for l in k.launches)
    _run(k, hidden=1024, batch=64, cfg=KernelConfig(32, 16))  # another tile: another binary
    assert k.warmups == 2


def test_a_refused_cooperative_launch_is_not_retried(gpu_props):
    k = FakeKernel(refuse=True)
    with pytest.warns(RuntimeWarning, match="cooperative launch failed"):
        _run(k, hidden=512, batch=4, cfg=KernelConfig(32, 16), T=2)
    k.refuse = False  # would succeed now, but the variant is remembered as refused
    _run(k, hidden=512, batch=4, cfg=KernelConfig(32, 16), T=2)
    assert not any(l[4] for l in k.launches) and len(k.launches) == 4


def test_launches_run_on_the_tensors_device(gpu_props, monkeypatch):
    """Triton launches on the *current* device: a model on cuda:1 must make cuda:1 current."""
    current = [0]
    seen = []

    class DeviceGuard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.before, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.before

    monkeypatch.setattr(torch.cuda, "device", DeviceGuard)
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **kw: real_zeros(*a, **kw))
    k = FakeKernel()
    real_getitem = FakeKernel.__getitem__
    monkeypatch.setattr(FakeKernel, "__getitem__", lambda self, grid: (
        seen.append(current[0]), real_getitem(self, grid))[1])
    cfg = KernelConfig(16, 16)
    for dev in (torch.device("cuda", 1), torch.device("cuda", 0)):
        plan = launch._plan(64, 4, cfg, "stepwise")
        launch._launch(k, plan, cfg, 3, 4, 64, 64, (), {}, dev, "test forward")
    assert seen == [1, 1, 1, 0, 0, 0] and current[0] == 0


def test_fp32_recurrence_follows_cudnns_rnn_tf32_switch(gpu_props):
    """Also when conv and RNN precision were set apart (the legacy flag then raises)."""
    rnn, conv = torch.backends.cudnn.rnn, torch.backends.cudnn.conv
    if not hasattr(rnn, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision")
    before = rnn.fp32_precision, conv.fp32_precision
    try:
        conv.fp32_precision, rnn.fp32_precision = "ieee", "tf32"
        assert launch._dot_precision(torch.float32) == "tf32"
        rnn.fp32_precision = "ieee"
        assert launch._dot_precision(torch.float32) == "ieee"
        assert launch._dot_precision(torch.bfloat16) == "ieee"
    finally:
        rnn.fp32_precision, conv.fp32_precision = before


@pytest.mark.parametrize("cfg,hidden,proj,gpu,parts", [
    # GRU 1024's default: a 16 x 16 output is two 16 x 8 tensor-core tiles, so two of the
    # eight warps cover it and K splits in four for the rest.
    (KernelConfig(16, 16, num_warps=8), 1024, 0, True, 4),
    (KernelConfig(16, 16, num_warps=4), 1024, 0, True, 2),
    (KernelConfig(16, 16, num_warps=8, split_k=1), 1024, 0, True, 1),
    (KernelConfig(16, 16, num_warps=8, split_k=8), 1024, 0, True, 8),
    # An output tile that keeps every warp busy (one program holds all of hidden 256).
    (KernelConfig(256, 16, num_warps=4), 256, 0, True, 1),
    # Parts of a K chunk stay at least 16 inputs on a GPU: hidden 32 is one 32-input chunk.
    (KernelConfig(8, 16, num_warps=8), 32, 0, True, 2),
    (KernelConfig(8, 16, num_warps=8, split_k=4), 32, 0, False, 4),
    # The interpreter's automatic split is none: parts only cost time there.
    (KernelConfig(8, 16, num_warps=8), 32, 0, False, 1),
    # ... and so do parts of a streamed chunk, and of W_hr's chunk with a projection.
    (KernelConfig(16, 16, num_warps=8, block_k=32, split_k=4), 2048, 0, True, 2),
    (KernelConfig(32, 16, num_warps=8), 1024, 16, True, 1),
    # A projection phase's output is block_b x block_p (1024 / 256 over 32 programs: 8 wide).
    (KernelConfig(32, 16, num_warps=8), 1024, 256, True, 4),
])
def test_split_k_gives_idle_warps_part_of_k(monkeypatch, cfg, hidden, proj, gpu, parts):
    """split_k=0 splits K over the warps that the output tile leaves idle (at most
    MAX_AUTO_SPLIT_K parts); a set split_k is kept; neither goes under the dot's K minimum.
    (The rule of a Triton with automatic split-K; older ones: the next test.)"""
    monkeypatch.setattr(launch, "auto_split_k", lambda: True)
    plan = launch._plan(hidden, 64, cfg, "persistent", gpu=gpu, proj=proj)
    assert plan.split_k == parts
    meta = launch.k_chunk_meta(hidden, proj or hidden, plan.block_k, plan.resident_k, gpu=gpu,
                               split_k=plan.split_k)
    assert meta["SPLIT_K"] == parts and meta["KC"] % parts == 0


def test_no_automatic_split_k_before_its_triton_version(monkeypatch):
    """With a Triton before AUTO_SPLIT_K_MIN_TRITON, split_k=0 is the un-split dot on a GPU
    and the defaults ask for nothing more; a set split_k is kept, on a GPU and not."""
    monkeypatch.setattr(launch, "auto_split_k", lambda: False)
    auto, eight = KernelConfig(16, 16, num_warps=8), KernelConfig(16, 16, num_warps=8, split_k=8)
    assert launch._plan(1024, 64, auto, "persistent", gpu=True).split_k == 1
    assert launch._plan(1024, 64, eight, "persistent", gpu=True).split_k == 8
    assert launch._plan(1024, 64, eight, "persistent", gpu=False).split_k == 8
    for cell, hidden in (("lstm", 1024), ("gru", 2048), ("lstm", 2048)):
        assert launch.default_config(cell, "forward", torch.bfloat16, hidden, 64).split_k == 0


def test_split_k_is_a_config_field():
    cfg = KernelConfig.from_dict(dict(block_h=16, block_b=16, split_k=1))
    assert cfg.split_k == 1 and cfg.label() == "h16 b16 w4 s1 x1" and "split_k=1" in str(cfg)
    assert KernelConfig(16, 16).label() == "h16 b16 w4 s1"  # 0, the default, is not shown
    assert KernelConfig.from_dict(dict(block_h=16, block_b=16, split_k=0)).split_k == 0
    for bad in (3, 64, -1):
        with pytest.raises(ValueError, match="split_k"):
            KernelConfig.from_dict(dict(block_h=16, block_b=16, split_k=bad))
