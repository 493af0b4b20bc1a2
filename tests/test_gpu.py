"""Compiled kernels on a CUDA GPU, at realistic sizes (skipped without one).

Run by whoever has a GPU (``benchmarks/device_check.sh`` runs ``pytest -m gpu``):
every cell against float64 torch.nn on the same GPU, the split-hidden barrier
path in one persistent launch, partly and fully streamed weights, packed sequences,
a long sequence, a sequence longer than cuDNN's 65,535-step limit, and per-sample
gradients through ``torch.func``.
"""

import copy
import warnings

import pytest
import torch

import triton_rnn
from rnn_testing import Case, compare, compare_with_torch_low_precision
from triton_rnn.kernels.config import KernelConfig

pytestmark = pytest.mark.gpu

#: Against float64, per storage dtype; fp32 runs with TF32 off (exact IEEE dots). bf16
#: results are held to torch's own bf16 error instead (see ``_compare``); its entry here
#: serves the comparison with cuDNN in fp32.
GPU_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}
GPU_GRAD_TOL = {
    torch.float32: dict(atol=1e-3, rtol=1e-3),
    torch.float16: dict(atol=6e-2, rtol=6e-2),
}


@pytest.fixture(autouse=True)
def exact_fp32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _compare(case, dtype, **kw):
    """``case`` against float64 torch.nn on the GPU. bf16 (8 significant bits) is held to
    within twice the error of torch's own bf16 RNN (cuDNN) on the same inputs, plus 1e-2,
    as in the interpreter tests; fp16 and fp32 to the fixed tables above. Weights at
    torch's own scale, ``hidden ** -0.5``: the interpreter tests' larger weights make a
    recurrence this wide chaotic, where even torch's float32 differs from float64 by
    O(1) after a few dozen steps."""
    kw.setdefault("weight_scale", case.hidden ** -0.5)
    if dtype == torch.bfloat16:
        compare_with_torch_low_precision(case, dtype=dtype, device="cuda", floor=1e-2, **kw)
    else:
        compare(case, dtype=dtype, device="cuda", tolerances=(GPU_TOL, GPU_GRAD_TOL), **kw)


def _no_fallback():
    """Turn the launcher's persistent-to-stepwise fallback warning into an error."""
    warnings.filterwarnings("error", message="triton_rnn: .* cannot run persistently")


# Each case compiles its own kernels (a few seconds each on the host CPU), so the
# grid is a spread of cells, sizes and dtypes rather than their full product.
@pytest.mark.parametrize("kind,hidden,batch,dtype,bidirectional", [
    ("GRU", 256, 64, torch.bfloat16, True),
    ("LSTM", 1024, 64, torch.bfloat16, False),
    ("GRU", 1024, 16, torch.float16, False),
    ("RNN", 512, 32, torch.bfloat16, False),
    ("LSTM", 256, 8, torch.float32, False),
    ("GRU", 1024, 8, torch.float32, False),
    ("LSTM", 1024, 4, torch.float32, False),
    ("GRU", 768, 24, torch.bfloat16, False),  # three K chunks, a partial batch tile
])
def test_cells_against_cudnn_float64(kind, hidden, batch, dtype, bidirectional):
    _no_fallback()
    case = Case(kind=kind, input_size=hidden, hidden=hidden, bidirectional=bidirectional, T=64,
                B=batch)
    _compare(case, dtype, seed=hidden + batch)


@pytest.mark.parametrize("hidden,proj,batch,dtype", [
    (1024, 256, 32, torch.bfloat16),
    (2048, 512, 16, torch.bfloat16),  # on-chip: W_hh [8192, 512] and W_hr over 128 programs
    (512, 128, 8, torch.float32),
])
def test_lstm_projection_against_float64(hidden, proj, batch, dtype):
    """proj_size as the kernel's second phase per step (two grid barriers), both directions."""
    _no_fallback()
    case = Case(kind="LSTM", input_size=proj, hidden=hidden, proj=proj, bidirectional=True,
                T=64, B=batch)
    _compare(case, dtype, seed=proj + batch)


@pytest.mark.parametrize("kind,proj", [("GRU", 0), ("LSTM", 0), ("LSTM", 256)])
def test_persistent_barrier_equals_stepwise(kind, proj):
    _no_fallback()
    torch.manual_seed(0)
    m = getattr(triton_rnn, kind)(512, 1024, backend="triton", **(
        {"proj_size": proj} if proj else {})).cuda().bfloat16()
    x = torch.randn(256, 32, 512, device="cuda", dtype=torch.bfloat16)
    cfg = KernelConfig(block_h=16, block_b=16, num_warps=4)
    m.kernel_options = {"config": cfg, "backward_config": cfg, "mode": "persistent"}
    a = m(x)[0]
    m.kernel_options = {"config": cfg, "backward_config": cfg, "mode": "stepwise"}
    b = m(x)[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def _run_and_grads(m, x, gy):
    m.zero_grad(set_to_none=True)
    x.grad = None
    y, h = m(x)
    y.backward(gy)
    return [y.detach().clone(), *[t.detach().clone() for t in (h if isinstance(h, tuple) else [h])],
            x.grad.clone(), *[p.grad.clone() for p in m.parameters()]]


@pytest.mark.parametrize("batch,waits", [(16, False), (256, True)])
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_bidirectional_directions_overlap_like_one_stream(monkeypatch, kind, batch, waits):
    """The two directions of a layer run on two streams, forward and backward. Batch 16:
    both barrier grids fit on the GPU at once and overlap; batch 256: they cannot, and
    the second waits for the first. Either way the same operations run as on one stream,
    so the results are the same bit for bit, over a few steps that allocate in between
    (a missing stream sync or allocator record would show as a difference)."""
    from triton_rnn.kernels import launch

    _no_fallback()
    decisions = []
    real_before = launch.DirectionPair.before

    def before(self, direction, grid, fit):
        second = self._done[1 - direction] is not None  # the other one launched first
        waited = real_before(self, direction, grid, fit)
        if second:
            decisions.append(waited)
        return waited

    monkeypatch.setattr(launch.DirectionPair, "before", before)
    torch.manual_seed(0)
    m = getattr(triton_rnn, kind)(256, 1024, num_layers=2, bidirectional=True,
                                  backend="triton", device="cuda", dtype=torch.bfloat16)
    runs = {True: [], False: []}
    for step in range(3):
        x = torch.randn(96, batch, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(96, batch, 2048, device="cuda", dtype=torch.bfloat16)
        for overlap in (True, False):
            m.kernel_options = {"overlap_directions": overlap}
            runs[overlap].append(_run_and_grads(m, x, gy))
            torch.empty(64 << 20, device="cuda").normal_()  # reuse freed blocks
    for a, b in zip(sum(runs[True], []), sum(runs[False], [])):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # One decision per layer and pass, taken by the second direction to launch.
    assert decisions and set(decisions) == {waits}


@pytest.mark.parametrize("how", ["graph", "make_graphed_callables"])
def test_bidirectional_training_step_in_a_cuda_graph(how):
    """Captured forward and backward (the side stream joins the capture; with
    make_graphed_callables forward and backward are captured apart) replay correctly."""
    torch.manual_seed(0)
    m = triton_rnn.GRU(64, 512, bidirectional=True, backend="triton", device="cuda")
    x = torch.randn(32, 8, 64, device="cuda", requires_grad=True)
    gy = torch.randn(32, 8, 1024, device="cuda")
    if how == "make_graphed_callables":
        eager = copy.deepcopy(m)  # make_graphed_callables replaces m's own forward
        g = torch.cuda.make_graphed_callables(m, (x,))
        y = g(x)[0]
        y.backward(gy)  # warm-up done inside; this replays both graphs
        got = [y.detach().clone(), x.grad.clone(), *[p.grad.clone() for p in m.parameters()]]
        want = _run_and_grads(eager, x.detach().clone().requires_grad_(), gy)
        want = [want[0], *want[2:]]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **GPU_TOL[torch.float32])
        return
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: compiles and occupancy queries happen here
        for _ in range(2):
            _run_and_grads(m, x, gy)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    m.zero_grad(set_to_none=True)
    x.grad = None
    with torch.cuda.graph(graph):
        y = m(x)[0]
        y.backward(gy)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        gy.copy_(torch.randn_like(gy))
    graph.replay()
    torch.cuda.synchronize()
    got = [y, x.grad, *[p.grad for p in m.parameters()]]
    want = _run_and_grads(m, x, gy)
    want = [want[0], *want[2:]]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **GPU_TOL[torch.float32])


@pytest.mark.parametrize("kind,hidden,dtype,config", [
    ("LSTM", 2048, torch.bfloat16, None),  # default: 1536 of 2048 inputs on-chip
    ("GRU", 2048, torch.float32, None),  # default: 1024 of 2048 on-chip
    ("GRU", 1024, torch.bfloat16, KernelConfig(16, 16, 8, 1, block_k=64)),  # all streamed
])
def test_streamed_weights(kind, hidden, dtype, config):
    """Slices beyond shared memory: the first K chunks on-chip, the rest streamed each step."""
    from triton_rnn.kernels import launch

    _no_fallback()
    if config is None:
        default = launch.default_config(kind.lower(), "forward", dtype, hidden, 16,
                                        torch.cuda.get_device_properties(0).multi_processor_count)
        assert default.block_k and default.resident_k, default
    case = Case(kind=kind, input_size=256, hidden=hidden, T=32, B=16)
    opts = None if config is None else {"config": config, "backward_config": config}
    _compare(case, dtype, seed=7, kernel_options=opts)


@pytest.mark.parametrize("kind,hidden,dtype,proj,config", [
    ("GRU", 1024, torch.bfloat16, 0, KernelConfig(16, 16, 8, split_k=8)),
    ("GRU", 1024, torch.bfloat16, 0, KernelConfig(16, 16, 8, split_k=1)),
    ("LSTM", 1024, torch.float32, 0, KernelConfig(8, 16, 8, split_k=4)),  # fp32: 8 units
    ("LSTM", 1024, torch.bfloat16, 256, KernelConfig(32, 16, 8, split_k=4)),
    ("LSTM", 2048, torch.bfloat16, 0, KernelConfig(16, 16, 8, 1, 128, 1536, split_k=8)),
])
def test_split_k(kind, hidden, dtype, proj, config):
    """K split over the warps (and not), set explicitly whatever this Triton's default,
    on-chip, with a projection and partly streamed: values and gradients."""
    _no_fallback()
    case = Case(kind=kind, input_size=128, hidden=hidden, T=24, B=24, proj=proj)
    _compare(case, dtype, seed=12, kernel_options={"config": config, "backward_config": config})


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_packed_sequences(kind):
    case = Case(kind=kind, input_size=128, hidden=512, layers=2, bidirectional=True, T=40,
                packed_lengths=(40, 3, 17, 40, 1, 29, 8, 33))
    _compare(case, torch.float32, seed=9)


def test_long_sequence_4096():
    case = Case(kind="LSTM", input_size=64, hidden=256, T=4096, B=8)
    _compare(case, torch.float32, seed=10)


def test_beyond_cudnn_sequence_limit():
    """T = 70,000 > 65,535, where cuDNN refuses; compared with float64 torch on the CPU."""
    torch.manual_seed(0)
    ref = torch.nn.GRU(16, 64).double()
    m = triton_rnn.GRU(16, 64, backend="triton")
    m.load_state_dict(ref.state_dict())
    x = 0.5 * torch.randn(70_000, 1, 16, dtype=torch.float64)
    want, h_want = ref(x)
    got, h_got = m.cuda()(x.float().cuda())
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_got.double().cpu(), h_want, atol=1e-4, rtol=1e-4)


def test_non_coresident_grid_falls_back_and_stays_correct():
    """A grid that cannot be resident must not hang: it warns and runs stepwise.

    Hidden 32768 in 16-unit slices is 2048 programs of 256 threads; an SM holds
    at most 8 such programs (2048 threads), so 132 SMs hold 1056 < 2048.
    """
    torch.manual_seed(0)
    m = triton_rnn.GRU(64, 32768, backend="triton", device="cuda", dtype=torch.bfloat16)
    cfg = KernelConfig(block_h=16, block_b=16, num_warps=8, block_k=128)
    m.kernel_options = {"config": cfg, "mode": "persistent"}
    x = torch.randn(4, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="cannot run persistently"):
        got = m(x)[0]
    m.kernel_options = {"config": cfg, "mode": "stepwise"}
    torch.testing.assert_close(got, m(x)[0], atol=0, rtol=0)
    # Gates 1 and 2 of W_hh start 2**30 and 2**31 elements in: against the PyTorch
    # reference loop in fp32 (torch indexing, 64-bit), so an offset that wrapped in int32
    # (both modes would share it) shows. (Not cuDNN: its weight buffer for 3.2e9
    # elements would be another 12.9 GB copy, and whether it indexes past 2**31 is its
    # own question.)
    ref = triton_rnn.GRU(64, 32768, backend="triton", device="cuda")
    ref._sequence_backend = "reference"
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    del m
    with torch.no_grad():
        want = ref(x.float())[0]
    torch.testing.assert_close(got.float(), want, **GPU_TOL[torch.bfloat16])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_module_on_second_gpu_while_first_is_current():
    """Triton launches on the current device: the launcher must switch to the tensors' own."""
    torch.manual_seed(0)
    ref = torch.nn.GRU(32, 256).to("cuda:1")
    m = triton_rnn.GRU(32, 256, backend="triton").to("cuda:1")
    m.load_state_dict(ref.state_dict())
    x = torch.randn(16, 8, 32, device="cuda:1")
    with torch.cuda.device(0):
        got = m(x)[0]
        torch.testing.assert_close(got, ref(x)[0], **GPU_TOL[torch.float32])


def test_new_batch_size_or_length_does_not_recompile():
    """Batch size and sequence length are runtime arguments: after warm-up, no compile."""
    import triton

    torch.manual_seed(0)
    m = triton_rnn.GRU(64, 1024, backend="triton", device="cuda", dtype=torch.bfloat16)
    m(torch.randn(5, 3, 64, device="cuda", dtype=torch.bfloat16))[0].sum().backward()
    compiled = []
    hook = triton.knobs.runtime.jit_post_compile_hook
    triton.knobs.runtime.jit_post_compile_hook = lambda *a, **k: compiled.append(k.get("key"))
    try:
        for T, B in [(9, 37), (1, 1), (200, 130)]:
            m(torch.randn(T, B, 64, device="cuda", dtype=torch.bfloat16))[0].sum().backward()
        torch.cuda.synchronize()
    finally:
        triton.knobs.runtime.jit_post_compile_hook = hook
    assert compiled == []


def test_autocast_like_torch():
    """Under autocast, fp32 parameters and states run in fp16, as cuDNN's LSTM does there;
    the gradients come back in fp32, with cuDNN's values."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(32, 64).cuda()
    m = triton_rnn.LSTM(32, 64, backend="triton").cuda()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(10, 4, 32, device="cuda")
    hx = tuple(torch.randn(1, 4, 64, device="cuda", requires_grad=True) for _ in range(2))
    gy = torch.randn(10, 4, 64, device="cuda")
    results = []
    for mod in (ref, m):
        xi = x.clone().requires_grad_()
        hi = tuple(h.detach().clone().requires_grad_() for h in hx)
        with torch.autocast("cuda", dtype=torch.float16):
            y, (h_n, c_n) = mod(xi, hi)
        assert y.dtype == h_n.dtype == c_n.dtype == torch.float16
        (y.float() * gy).sum().backward()
        results.append([y, h_n, c_n, xi.grad, *[h.grad for h in hi],
                        *[p.grad for p in mod.parameters()]])
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b.float(), a.float(), atol=1e-2, rtol=1e-2)


def test_torch_compile_on_gpu(monkeypatch):
    """Inductor compiles the whole model into one graph, the kernels as custom ops
    (``allow_rnn`` lets Dynamo trace into RNN modules), with eager's values and gradients."""
    from triton_rnn.kernels import launch

    torch._dynamo.reset()
    torch.manual_seed(0)
    rnn = triton_rnn.GRU(64, 256, bidirectional=True, backend="triton", device="cuda")
    head = torch.nn.Linear(512, 8, device="cuda")

    def model(x):
        return head(rnn(x)[0]).logsumexp(-1).mean()

    x = torch.randn(32, 16, 64, device="cuda")
    eager = model(x)
    expected = torch.autograd.grad(eager, list(rnn.parameters()))
    launches = []
    real = launch.forward
    monkeypatch.setattr(launch, "forward",
                        lambda *a, **kw: launches.append(a[0]) or real(*a, **kw))
    with torch._dynamo.config.patch(allow_rnn=True):
        got = torch.compile(model, fullgraph=True)(x)
    assert launches == ["gru", "gru"]  # the kernels ran (not torch's RNN), one per direction
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    for g, e in zip(torch.autograd.grad(got, list(rnn.parameters())), expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,hidden", [("GRU", 512), ("LSTM", 256)])
def test_per_sample_gradients_with_vmap(kind, hidden):
    """torch.func.vmap(grad(...)) through the compiled kernels: the vmapped samples fold
    into the batch (one persistent launch per direction), every sample's parameter
    gradients against float64 torch.nn on that sample alone."""
    from torch.func import functional_call, grad, vmap

    _no_fallback()
    torch.manual_seed(7)
    I, T, V = 64, 32, 8
    ref = getattr(torch.nn, kind)(I, hidden, bidirectional=True).cuda().double()
    ours = getattr(triton_rnn, kind)(I, hidden, bidirectional=True).cuda()
    ours.load_state_dict(ref.state_dict())
    xs = torch.randn(V, T, I, device="cuda", dtype=torch.float64)
    ws = torch.randn(V, T, 2 * hidden, device="cuda", dtype=torch.float64)
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def loss(p, x, w):
        return (functional_call(ours, p, (x,))[0] * w).sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs.float(), ws.float())
    for v in range(V):
        ref.zero_grad()
        (ref(xs[v])[0] * ws[v]).sum().backward()
        for k, p in ref.named_parameters():
            torch.testing.assert_close(got[k][v].double(), p.grad, **GPU_GRAD_TOL[torch.float32],
                                       msg=lambda m: f"sample {v}, d {k}: {m}")


def test_ensemble_vmap_over_stacked_parameters():
    """vmap over the stacked weights of bidirectional members (one launch per member, on
    one stream: vmapped tensors cannot be recorded on the side stream), values and
    gradients against each member in float64."""
    from torch.func import functional_call, stack_module_state, vmap

    _no_fallback()
    torch.manual_seed(8)
    I, H, T, B = 64, 256, 32, 4
    refs = [torch.nn.GRU(I, H, bidirectional=True).cuda().double() for _ in range(3)]
    members = [triton_rnn.GRU(I, H, bidirectional=True).cuda() for _ in refs]
    for m, r in zip(members, refs):
        m.load_state_dict(r.state_dict())
    params, _ = stack_module_state(members)
    x = torch.randn(T, B, I, device="cuda", dtype=torch.float64)
    w = torch.randn(T, B, 2 * H, device="cuda", dtype=torch.float64)
    out = vmap(lambda p: functional_call(members[0], p, (x.float(),))[0])(params)
    (out * w.float()).sum().backward()
    for v, r in enumerate(refs):
        r_out = r(x)[0]
        torch.testing.assert_close(out[v].double(), r_out, **GPU_TOL[torch.float32])
        (r_out * w).sum().backward()
        for k, p in r.named_parameters():
            torch.testing.assert_close(params[k].grad[v].double(), p.grad,
                                       **GPU_GRAD_TOL[torch.float32])
