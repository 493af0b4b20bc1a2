"""The Triton kernels in Triton's interpreter, against float64 torch.nn.

Small shapes only: the interpreter's cost grows with grid size x steps x ops.
Split-hidden tilings run stepwise here (the interpreter runs programs one after
another, so a grid barrier cannot work); the single-program tiling runs the
whole time loop in one persistent launch. The interpreter's ``tl.dot`` is
wrong for bf16, so bf16 dots take fp32 operands here (exactly the products a
GPU's bf16 tensor cores form); the bf16 dot itself is covered by the static
report and the GPU tests.
"""

import os
import random

import pytest
import torch
import triton
import triton.language as tl

import triton_rnn
from rnn_testing import Case, compare, compare_with_torch_low_precision, random_case
from triton_rnn.kernels.config import KernelConfig
from triton_rnn.kernels.recurrent import _gate_stride

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests (a GPU runs tests/test_gpu.py)")

#: Tilings: one program holding all of W_hh; the hidden dimension split over
#: programs (H=10 over blocks of 8: the second block is mostly masked) and the batch
#: over tiles of 2 (B=3: so is the second tile); the weights streamed in K chunks.
#: (Each program costs the interpreter about the same, whatever its size: the split
#: tiling has as few programs as still show both kinds of masking.)
TILINGS = {
    "single": None,
    "split": KernelConfig(block_h=8, block_b=2),
    "streamed": KernelConfig(block_h=8, block_b=4, block_k=4),
}


def _opts(tiling):
    cfg = TILINGS[tiling]
    return None if cfg is None else {"config": cfg, "backward_config": cfg}


@pytest.mark.parametrize("tiling", sorted(TILINGS))
@pytest.mark.parametrize("kind,nl", [("GRU", "tanh"), ("LSTM", "tanh"), ("RNN", "tanh"),
                                     ("RNN", "relu")])
def test_cell_matches_torch_fp32(poison_empty, kind, nl, tiling):
    case = Case(kind=kind, nonlinearity=nl, input_size=6, hidden=10, bidirectional=True,
                T=4, B=3)
    compare(case, dtype=torch.float32, kernel_options=_opts(tiling), seed=3)


#: The first K chunk on-chip, the rest streamed two inputs at a time (with 4-input chunks).
PARTLY_RESIDENT = KernelConfig(block_h=8, block_b=4, block_k=2, resident_k=4)


@pytest.mark.parametrize("tiling", ["single", "split", "partly_resident"])
@pytest.mark.parametrize("kind,proj", [("GRU", 0), ("LSTM", 0), ("LSTM", 6)])
def test_resident_weights_in_k_chunks(monkeypatch, poison_empty, kind, proj, tiling):
    """Resident W_hh (and W_hr) tiles are kept in K chunks (256 inputs on a GPU); force
    several here: with proj 6, W_hh's K is 6 (two chunks) and W_hr's is 10 (three).
    ``partly_resident`` keeps the first chunk of each on-chip and streams the rest."""
    from triton_rnn.kernels import launch

    monkeypatch.setattr(launch, "RESIDENT_K_CHUNK", 4)
    case = Case(kind=kind, input_size=6, hidden=10, proj=proj, bidirectional=True, T=4, B=3)
    partly = tiling == "partly_resident"
    opts = ({"config": PARTLY_RESIDENT, "backward_config": PARTLY_RESIDENT} if partly
            else _opts(tiling))
    seen = []
    real_launch = launch._launch

    def spy(kernel, plan, cfg, T, B, H, R, args, meta, *rest, **kw):
        seen.append((meta["NUM_RES"], meta["NUM_KC"], meta["NUM_RES2"], meta["NUM_KC2"]))
        return real_launch(kernel, plan, cfg, T, B, H, R, args, meta, *rest, **kw)

    monkeypatch.setattr(launch, "_launch", spy)
    compare(case, dtype=torch.float32, kernel_options=opts, seed=12)
    assert seen
    for res, num_kc, res2, num_kc2 in seen:
        # Partly resident: one chunk on-chip, the others streamed; else all on-chip.
        assert (res, res2) == ((1, 1) if partly else (num_kc, num_kc2)) and num_kc >= 2


@pytest.mark.parametrize("kind,proj,layers,tiling,loss_on,input_grad,frozen", [
    # A loss on the output only (h_n, c_n get no gradient), input without requires_grad
    # (embeddings computed under no_grad), frozen input weights.
    ("LSTM", 0, 2, "single", ("output",), False, ("weight_ih",)),
    # A classifier on h_n only; frozen biases.
    ("GRU", 0, 2, "single", ("h_n",), True, ("bias",)),
    # c_n only, frozen recurrent weights; a projection with W_hr frozen.
    ("LSTM", 0, 1, "single", ("c_n",), True, ("weight_hh",)),
    ("LSTM", 3, 2, "single", ("output", "c_n"), False, ("weight_hr", "bias_ih")),
    # The hidden size split over programs (stepwise here): one direction frozen.
    ("RNN", 0, 1, "split", ("output",), True, ("weight_ih", "weight_hh_l0_reverse")),
])
def test_partial_losses_frozen_weights_and_inputs_without_grad(poison_empty, kind, proj, layers,
                                                                tiling, loss_on, input_grad,
                                                                frozen):
    """The common training set-ups beside "every output has a gradient": outputs with no
    gradient (``None`` cotangents), an input that needs none, frozen parameters (no
    gradient computed for them, in either module); both directions."""
    case = Case(kind=kind, input_size=5, hidden=6, proj=proj, layers=layers,
                bidirectional=True, T=4, B=3)
    compare(case, dtype=torch.float32, kernel_options=_opts(tiling), seed=21, loss_on=loss_on,
            input_grad=input_grad, frozen=frozen)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_packed_unsorted_split_two_layers(poison_empty, kind):
    case = Case(kind=kind, input_size=4, hidden=6, layers=2, bidirectional=True, T=5,
                packed_lengths=(3, 5, 1, 4))
    compare(case, dtype=torch.float32,
            kernel_options={"config": KernelConfig(4, 2), "backward_config": KernelConfig(4, 2)},
            seed=4)


@pytest.mark.parametrize("kind,proj,partly,reverse", [("LSTM", 128, False, True),
                                                     ("LSTM", 0, True, False)])
def test_hidden_512_with_the_gpu_default_tiles(monkeypatch, poison_empty, kind, proj, partly,
                                               reverse):
    """Real sizes, not only toy ones: LSTM hidden 512 with the tiles the launcher picks for
    an H100/H200 (132 SMs), so the hidden dimension splits over 16 or 32 programs of 32
    or 16 units, and 2 rows fill a 16-row batch tile; stepwise here, at T = 2 (about 10 s
    each). With proj 128, ``W_hh`` is one 128-input K chunk in the forward and two
    256-input chunks in the backward, all on-chip; ``partly``: the default tile with the
    first of its two chunks on-chip and the second streamed 128 inputs at a time, as LSTM
    2048's default does with 6 of its 8. Weights at torch's init scale. The projection
    case runs its programs in the opposite order (see the next test). (GRU 512 and 1024,
    LSTM 1024 and 1024 / proj 256 pass too, in 15-26 s each.)"""
    from dataclasses import replace

    from triton_rnn.kernels import launch

    hidden = 512
    cfg = {}
    for p in ("forward", "backward"):
        tile = launch.default_config(kind.lower(), p, "float32", hidden, 2, 132, proj)
        assert tile.block_h < hidden and tile.block_k == 0
        cfg[f"{'backward_' if p == 'backward' else ''}config"] = (
            replace(tile, block_k=128, resident_k=256) if partly else tile)
    chunks = []
    real_launch = launch._launch

    def spy(kernel, plan, tile, T, B, H, R, args, meta, *rest, **kw):
        chunks.append((meta["KC"], meta["NUM_KC"], meta["NUM_RES"]))
        return real_launch(kernel, plan, tile, T, B, H, R, args, meta, *rest, **kw)

    monkeypatch.setattr(launch, "_launch", spy)
    moved = _programs_in_reverse_order(monkeypatch) if reverse else []
    case = Case(kind=kind, input_size=64, hidden=hidden, proj=proj, T=2, B=2)
    compare(case, dtype=torch.float32, kernel_options={**cfg, "mode": "stepwise"}, seed=1,
            weight_scale=hidden ** -0.5)
    # W_hh's K is the hidden size, or the projection size in the forward pass.
    assert {(256, 2, 1 if partly else 2), (128, 1, 1)} >= set(chunks)
    assert (256, 2, 1 if partly else 2) in chunks
    assert bool(moved) == reverse


def _programs_in_reverse_order(monkeypatch) -> list:
    """Make the interpreter run every launch's programs in the opposite order.

    It runs them one after another in grid order, setting each one's ids through
    ``interpreter_builder.set_grid_idx``: mirroring the ids reverses the order.
    Returns a list that counts the programs whose id was moved."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real = builder.set_grid_idx
    moved = []

    def mirrored(x, y, z):
        gx, gy, gz = builder.grid_dim
        idx = (gx - 1 - x, gy - 1 - y, gz - 1 - z)
        if idx != (x, y, z):
            moved.append(idx)
        real(*idx)

    monkeypatch.setattr(builder, "set_grid_idx", mirrored)
    return moved


@pytest.mark.parametrize("kind,proj,lengths", [
    ("GRU", 0, (3, 1, 2)),  # packed: rows end at their own length, in both directions
    ("LSTM", 4, ()),        # a projection: two phases, so two barriers, per step
])
def test_no_program_reads_what_another_writes_in_the_same_step(monkeypatch, poison_empty,
                                                               kind, proj, lengths):
    """On a GPU the programs between two grid barriers run concurrently, in any order; the
    interpreter runs them one after another, in grid order, so a program that read
    another's output of the same step (a race) would pass the other tests whenever the
    writer came first. Here the split tiling (2 x 2 programs, stepwise) runs with the
    programs in the opposite order, and must still match float64 torch.nn."""
    case = Case(kind=kind, input_size=5, hidden=10, proj=proj, bidirectional=True, T=3, B=3,
                packed_lengths=lengths)
    moved = _programs_in_reverse_order(monkeypatch)
    compare(case, dtype=torch.float32, kernel_options=_opts("split"), seed=31)
    assert len(moved) > 20  # forward and backward launches, every step


def test_packed_sorted_without_indices(poison_empty):
    """``pack_sequence(enforce_sorted=True)``: a PackedSequence whose ``sorted_indices``
    is None (states are then used in the given order)."""
    case = Case(kind="LSTM", input_size=4, hidden=5, bidirectional=True, T=5,
                packed_lengths=(5, 3, 3, 1), enforce_sorted=True, with_state=True)
    compare(case, dtype=torch.float32, seed=8)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_packed_single_program_batch_first_states(poison_empty, kind):
    case = Case(kind=kind, input_size=5, hidden=7, bidirectional=True, batch_first=True, T=4,
                packed_lengths=(2, 4, 4, 1, 3), with_state=True)
    compare(case, dtype=torch.float32, seed=5)


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
def test_fp16(poison_empty, kind):
    case = Case(kind=kind, input_size=8, hidden=16, bidirectional=False, T=4, B=4)
    compare(case, dtype=torch.float16, seed=6)


@pytest.mark.parametrize("kind,tiling", [("GRU", "split"), ("LSTM", "single"),
                                         ("RNN", "streamed")])
def test_bf16(poison_empty, kind, tiling):
    """bf16 storage and rounding, as accurate as torch's own bf16 RNNs (on the CPU here).

    The interpreter's dots take fp32 operands (see ``_dot``): the products a GPU's
    bf16 tensor cores form.
    """
    case = Case(kind=kind, input_size=8, hidden=16, bidirectional=True, T=4, B=4)
    compare_with_torch_low_precision(case, dtype=torch.bfloat16, seed=7,
                                     kernel_options=_opts(tiling))


@pytest.mark.parametrize("seed", list(range(11, 35)))
def test_foundation_grid_through_triton(seed):
    """The foundation's randomized configurations, now through the kernels."""
    rng = random.Random(seed)
    case = random_case(rng, T=rng.choice([2, 3]), B=rng.choice([1, 2]),
                       layers=rng.choice([1, 2]))
    compare(case, dtype=torch.float32, seed=seed)


@pytest.mark.parametrize("kind,proj,hidden,block_k,split_k", [
    ("GRU", 0, 12, 0, 2), ("LSTM", 8, 12, 0, 8), ("LSTM", 0, 24, 8, 8)])
def test_split_k_parts(monkeypatch, poison_empty, kind, proj, hidden, block_k, split_k):
    """Each step's dots cut K into split_k parts and sum them (the other tests run the
    interpreter's default, one part): 2 parts of a 16-input K chunk, 8 with a projection,
    and 8 with one chunk of hidden 24 on-chip and one streamed 8 at a time (in 8 parts
    of one input)."""
    from triton_rnn.kernels import launch

    monkeypatch.setattr(launch, "RESIDENT_K_CHUNK", 16)
    cfg = KernelConfig(block_h=8, block_b=4, block_k=block_k, resident_k=16 if block_k else 0,
                       split_k=split_k)
    case = Case(kind=kind, input_size=5, hidden=hidden, proj=proj, bidirectional=not block_k,
                T=3, B=5)
    seen = set()
    real_launch = launch._launch

    def spy(kernel, plan, cfg, T, B, H, R, args, meta, *rest, **kw):
        seen.add((meta["SPLIT_K"], meta["NUM_RES"], meta["NUM_KC"]))
        return real_launch(kernel, plan, cfg, T, B, H, R, args, meta, *rest, **kw)

    monkeypatch.setattr(launch, "_launch", spy)
    compare(case, dtype=torch.float32, kernel_options={"config": cfg, "backward_config": cfg},
            seed=split_k)
    assert seen == ({(split_k, 1, 2)} if block_k else {(split_k, 1, 1)})


@pytest.mark.parametrize("tiling", sorted(TILINGS))
@pytest.mark.parametrize("packed", [False, True])
def test_lstm_projection(poison_empty, tiling, packed):
    """proj_size: each step computes m = o * tanh(c) from W_hh [4H, P], then h = W_hr m.

    Split: the 10 units over 2 programs (8 and 2), projecting 2 and 1 of the 3 outputs
    (two phases and two launches per step here). Streamed: both weights read in K chunks every step.
    """
    case = Case(kind="LSTM", input_size=5, hidden=10, proj=3, bidirectional=True, T=5, B=4,
                packed_lengths=(3, 5, 1, 4) if packed else ())
    compare(case, dtype=torch.float32, kernel_options=_opts(tiling), seed=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lstm_projection_low_precision(poison_empty, dtype):
    """m_t and dh_t are stored in the storage dtype between the phases, as h and the gate
    gradients are: as accurate as torch's own LSTM with proj_size in that dtype."""
    case = Case(kind="LSTM", input_size=8, hidden=16, proj=8, T=4, B=4)
    compare_with_torch_low_precision(case, dtype=dtype, seed=9, kernel_options=_opts("split"))


def test_stepwise_equals_persistent():
    torch.manual_seed(0)
    m = triton_rnn.GRU(5, 8, backend="triton")
    x = torch.randn(6, 3, 5)
    a = m(x)[0]
    m.kernel_options = {"mode": "stepwise"}
    b = m(x)[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
def test_large_preactivations_do_not_overflow(kind):
    """Pre-activations in the hundreds (``exp(2x)`` overflows fp32 from x = 45): values and
    gradients still match float64 torch.nn, where a naive tanh would give NaN."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(4, 8).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-8.0, 8.0)
    m = getattr(triton_rnn, kind)(4, 8, backend="triton")
    m.load_state_dict(ref.state_dict())
    x = 30 * torch.randn(5, 2, 4, dtype=torch.float64)
    gy = torch.randn(5, 2, 8, dtype=torch.float64)
    xs = [x.clone().requires_grad_(), x.float().requires_grad_()]
    outs = [mod(xi)[0] for mod, xi in zip((ref, m), xs)]
    assert (x @ ref.weight_ih_l0.detach().t()).abs().max() > 200  # far past exp's range
    for o, g in zip(outs, (gy, gy.float())):
        (o * g).sum().backward()
    torch.testing.assert_close(outs[1].double(), outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs[1].grad.double(), xs[0].grad, atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-3, rtol=1e-4,
                                   msg=lambda msg: f"d {name}: {msg}")


def test_double_backward_raises_clearly():
    m = triton_rnn.GRU(3, 4, backend="triton")
    x = torch.randn(2, 1, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)


def test_zero_batch_through_triton():
    m = triton_rnn.LSTM(3, 4, backend="triton")
    out, (h, c) = m(torch.randn(2, 0, 3))
    assert out.shape == (2, 0, 4) and h.shape == (1, 0, 4) and c.shape == (1, 0, 4)
    # Every parameter gets a zero gradient, as torch gives (DDP on an empty rank needs them).
    (out.sum() + h.sum() + c.sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning",
                            "ignore:The tensor attributes:UserWarning")
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_tracing_export_and_meta_use_torchs_op(kind):
    """jit.trace, torch.export and meta tensors get torch's RNN op, not the opaque kernels."""
    torch.manual_seed(0)
    m = getattr(triton_rnn, kind)(3, 5, backend="triton")
    x = torch.randn(4, 2, 3)
    traced = torch.jit.trace(m, (x,), check_trace=False)
    assert f"aten::{kind.lower()}" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x)[0], m(x)[0], atol=1e-6, rtol=1e-6)
    exported = torch.export.export(m, (x,))
    assert any(kind.lower() in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x)[0], m(x)[0], atol=1e-6, rtol=1e-6)
    meta = getattr(triton_rnn, kind)(3, 5, backend="triton", device="meta")
    assert meta(torch.randn(4, 2, 3, device="meta"))[0].shape == (4, 2, 5)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_inference_skips_saved_activations(monkeypatch, poison_empty, kind):
    """Under no_grad the kernel writes no activations for the backward; outputs are the same."""
    from triton_rnn.kernels import launch

    seen = []
    real_forward = launch.forward

    def spy(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        seen.append(out[3])
        return out

    monkeypatch.setattr(launch, "forward", spy)
    torch.manual_seed(0)
    m = getattr(triton_rnn, kind)(5, 12, backend="triton")
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        a = m(x)[0]
    b = m(x)[0]
    assert seen[0] is None and seen[1] is not None
    torch.testing.assert_close(a, b.detach(), atol=0, rtol=0)


def test_float64_runs_on_torch_with_a_warning():
    torch.manual_seed(0)
    ref = torch.nn.GRU(3, 5).double()
    m = triton_rnn.GRU(3, 5, backend="triton").double()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    triton_rnn.modules._warned.discard(("dtype", torch.float64))
    with pytest.warns(RuntimeWarning, match="torch's implementation") as w:
        out = m(x)[0]
    assert w[0].filename == __file__  # points at the caller, not torch's Module.__call__
    torch.testing.assert_close(out, ref(x)[0], atol=0, rtol=0)


def test_backward_tile_is_chosen_before_the_forward_runs(monkeypatch):
    """Both passes' tiles are settled before the forward launch (``TRITON_RNN_AUTOTUNE=1``
    tunes there, never inside the backward pass); inference looks up the forward's only."""
    from triton_rnn.kernels import launch

    events = []
    for name in ("select_config", "forward", "backward"):
        real = getattr(launch, name)

        def spy(*a, _real=real, _name=name, **kw):
            events.append(f"select {a[1]}" if _name == "select_config" else f"launch {_name}")
            return _real(*a, **kw)

        monkeypatch.setattr(launch, name, spy)
    torch.manual_seed(0)
    m = triton_rnn.GRU(5, 6, backend="triton")
    x = torch.randn(3, 2, 5)
    with torch.no_grad():
        m(x)
    assert events == ["select forward", "launch forward"]
    events.clear()
    m(x)[0].sum().backward()
    assert events[:3] == ["select forward", "select backward", "launch forward"]
    assert events[-1] == "launch backward"


@triton.jit
def _gate_offsets_kernel(OUT, H, R):
    s = _gate_stride(H, R)
    tl.store(OUT, s)
    tl.store(OUT + 1, 2 * s)
    tl.store(OUT + 2, 3 * s)


def test_gate_offsets_of_w_hh_are_64_bit():
    """Gate g of W_hh ``[G*H, R]`` starts g * H * R elements in: past 2**31 from hidden
    26,755 (LSTM), or with a projection (R = P) from H * P >= 2**31 / 3.

    Allocating such a W_hh takes gigabytes, so this checks the offset arithmetic
    the kernels use, in the interpreter (which wraps int32 like a GPU).
    """
    out = torch.zeros(3, dtype=torch.int64)
    for hidden, r in ((26755, 26755), (32768, 32768), (46341, 46341), (131072, 8192)):
        _gate_offsets_kernel[(1,)](out, hidden, r)
        assert out.tolist() == [g * hidden * r for g in (1, 2, 3)], (hidden, r)


class _FakeCuda:
    """Stand-ins for the CUDA stream API, recording what the two-stream path does with it."""

    def __init__(self):
        self.log = []
        self.current = "main"

    def current_stream(self, device=None):
        return _FakeStream(self, self.current)

    def current_device(self):
        return 0

    def Stream(self, device=None):  # noqa: N802 - torch.cuda.Stream
        return _FakeStream(self, "side")

    def stream(self, s):
        fake = self

        class _Ctx:
            def __enter__(self):
                self.prev, fake.current = fake.current, s.name
                fake.log.append(("enter", s.name))

            def __exit__(self, *exc):
                fake.current = self.prev

        return _Ctx()

    def is_current_stream_capturing(self):
        return False

    def Event(self):  # noqa: N802 - torch.cuda.Event
        fake = self

        class _Event:
            def record(self):
                self.stream = fake.current
                fake.log.append(("record", fake.current))

        return _Event()


class _FakeStream:
    def __init__(self, fake, name):
        self.fake, self.name = fake, name

    def wait_stream(self, other):
        self.fake.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.fake.log.append(("wait_event", self.name, event.stream))


@pytest.mark.parametrize("kind,tiling", [("LSTM", "single"), ("GRU", "split")])
def test_bidirectional_two_stream_path(monkeypatch, poison_empty, kind, tiling):
    """The GPU path that overlaps a layer's directions on two streams, on fake streams here:
    same values and gradients, the reverse direction launched inside the side stream, and
    the streams joined and tensors recorded for the caching allocator."""
    from triton_rnn import autograd, ops

    from triton_rnn.kernels import launch

    fake = _FakeCuda()
    recorded, launched = [], []
    monkeypatch.setattr(autograd, "_overlaps", lambda *a: True)
    monkeypatch.setattr(ops, "_side_streams", {})
    for name in ("current_stream", "current_device", "Stream", "stream", "Event",
                 "is_current_stream_capturing"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda t, s: recorded.append((tuple(t.shape), s.name)), raising=False)
    real_forward = launch.forward

    def forward(*args, **kwargs):
        launched.append((args[8], fake.current, kwargs.get("pair") is not None))  # reverse
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(launch, "forward", forward)
    case = Case(kind=kind, input_size=5, hidden=6, layers=2, bidirectional=True, T=3, B=2,
                packed_lengths=(3, 2))
    compare(case, dtype=torch.float32, kernel_options=_opts(tiling), seed=21)
    # Per layer: fork, the reverse direction on the side stream, join.
    assert fake.log.count(("wait_stream", "side", "main")) == 2
    assert fake.log.count(("enter", "side")) == 2
    assert fake.log.count(("wait_stream", "main", "side")) == 2
    assert launched == [(False, "main", True), (True, "side", True)] * 2
    # The first direction to launch records an event for the other, forward and
    # backward; the second ends the pass (2 layers).
    assert sum(1 for e in fake.log if e[0] == "record") == 4
    assert {s for _, s in recorded} == {"main", "side"}


def test_direction_pair_waits_only_when_two_barrier_grids_cannot_fit(monkeypatch):
    from triton_rnn.kernels.launch import DirectionPair

    fake = _FakeCuda()
    for name in ("current_stream", "Event", "is_current_stream_capturing"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))

    def waits(first, second, pair=None):
        pair = pair or DirectionPair()
        assert not pair.before(0, *first)  # nothing launched yet: never waits
        pair.after(0, *first)
        waited = pair.before(1, *second)
        pair.after(1, *second)
        return waited

    assert not waits((0, 1), (128, 264))      # the first has no barrier
    assert not waits((128, 264), (0, 1))      # the second has no barrier
    assert not waits((128, 264), (132, 264))  # both fit at once
    assert waits((128, 264), (192, 264))      # together too many to be resident
    assert waits((132, 132), (1, 132))        # a full GPU
    # A pass ends when both directions have launched: the next one starts afresh.
    pair = DirectionPair()
    assert waits((132, 132), (132, 132), pair)
    assert not pair.before(1, 132, 132)
    # An event recorded under a stream capture is not waited on outside it.
    pair = DirectionPair()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    pair.after(0, 132, 132)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not pair.before(1, 132, 132)
