"""torch.compile over the Triton kernels, in Triton's interpreter.

By default Dynamo does not trace into ``torch.nn.RNN``/``GRU``/``LSTM`` modules
(subclasses included): the module call is a graph break and runs eagerly, as
torch.nn's own does. With ``torch._dynamo.config.allow_rnn`` (or through
``triton_rnn.functional``) it traces them, and the kernels are the custom ops of
``triton_rnn.ops``: the whole model is one graph, forward and backward.
"""

import os

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

import triton_rnn
from triton_rnn.kernels.config import KernelConfig

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests (a GPU runs tests/test_gpu.py)")

OPS = ("triton_rnn.recurrence_forward.default", "triton_rnn.recurrence_backward.default")


def _model(rnn):
    width = (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
    head = torch.nn.Linear(width, 3)

    def model(x):
        return head(torch.tanh(rnn(x)[0])).square().mean()

    return model


def _grads_match(compiled, model, x, params):
    eager = model(x)
    expected = torch.autograd.grad(eager, params)
    got = compiled(x)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
    for g, e in zip(torch.autograd.grad(got, params), expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def test_module_call_is_a_graph_break_by_default():
    """Without ``allow_rnn`` the module runs eagerly inside the compiled model, and agrees."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    rnn = triton_rnn.LSTM(6, 8, num_layers=2, bidirectional=True, backend="triton")
    model = _model(rnn)
    x = torch.randn(5, 3, 6, requires_grad=True)
    _grads_match(torch.compile(model, backend="aot_eager"), model, x, [x, *rnn.parameters()])
    torch._dynamo.reset()
    with pytest.raises(Exception, match="RNN, GRU, or LSTM"):
        torch.compile(model, backend="aot_eager", fullgraph=True)(x)


@pytest.mark.parametrize("kind,kwargs", [
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(proj_size=3, bidirectional=True, batch_first=True)),
    ("RNN", dict(nonlinearity="relu")),
    ("LSTM", dict(kernel_options={"config": KernelConfig(block_h=4, block_b=2),
                                  "backward_config": KernelConfig(block_h=8, block_b=2,
                                                                  block_k=4)})),
])
def test_fullgraph_compile_runs_the_kernels_as_custom_ops(kind, kwargs):
    """One graph for the whole model: the recurrence is the custom ops, forward and backward
    (both directions of a layer in one op), with the same values and gradients as eager
    (forced tile configs reach the ops too)."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    kernel_options = kwargs.pop("kernel_options", None)
    rnn = getattr(triton_rnn, kind)(5, 9, backend="triton", **kwargs)
    rnn.kernel_options = kernel_options
    model = _model(rnn)
    x = torch.randn(4, 3, 5, requires_grad=True)
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        _grads_match(compiled, model, x, [x, *rnn.parameters()])
    # One op per layer and pass, whether it has one direction or two.
    assert [seen.count(op) for op in OPS] == [rnn.num_layers] * 2


def test_compiled_bidirectional_layer_overlaps_its_directions(monkeypatch):
    """Compiled, a bidirectional layer is one op per pass, which runs the reverse direction
    on a side stream (stand-in streams here), forward and backward, as eager does."""
    from test_kernels_interpret import _FakeCuda

    from triton_rnn import ops
    from triton_rnn.kernels import launch

    torch._dynamo.reset()
    torch.manual_seed(5)
    rnn = triton_rnn.GRU(5, 6, bidirectional=True, backend="triton")
    model = _model(rnn)
    x = torch.randn(4, 3, 5, requires_grad=True)
    params = [x, *rnn.parameters()]
    eager = model(x)
    expected = torch.autograd.grad(eager, params)

    fake, recorded, launched = _FakeCuda(), [], []
    monkeypatch.setattr(ops, "_streams_on", lambda device: True)
    monkeypatch.setattr(ops, "_side_streams", {})
    for name in ("current_stream", "current_device", "Stream", "stream", "Event",
                 "is_current_stream_capturing"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda t, s: recorded.append(s.name), raising=False)
    for name, reverse_at in (("forward", 8), ("backward", 11)):
        real = getattr(launch, name)
        monkeypatch.setattr(launch, name, lambda *a, _n=name, _r=real, _i=reverse_at, **kw:
                            launched.append((_n, a[_i], fake.current)) or _r(*a, **kw))
    with torch._dynamo.config.patch(allow_rnn=True):
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    grads = torch.autograd.grad(got, params)
    assert launched == [("forward", False, "main"), ("forward", True, "side"),
                        ("backward", False, "main"), ("backward", True, "side")]
    assert fake.log.count(("wait_stream", "side", "main")) == 2
    assert fake.log.count(("wait_stream", "main", "side")) == 2
    assert {"main", "side"} <= set(recorded)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def test_fullgraph_compile_under_no_grad_saves_nothing(monkeypatch):
    """Inference through the compiled graph skips the activations, as eager does."""
    from triton_rnn.kernels import launch

    torch._dynamo.reset()
    saves = []
    real = launch.forward
    monkeypatch.setattr(launch, "forward",
                        lambda *a, **kw: saves.append(kw["save"]) or real(*a, **kw))
    torch.manual_seed(2)
    rnn = triton_rnn.GRU(5, 6, backend="triton")
    x = torch.randn(4, 2, 5)
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        got = torch.compile(lambda x: rnn(x)[0], backend="aot_eager", fullgraph=True)(x)
        want = rnn(x)[0]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert saves == [False, False]


def test_new_lengths_and_batch_sizes_do_not_recompile_each_time():
    """After one recompile each, Dynamo marks the length and the batch dynamic: the fake
    implementations take symbolic shapes, and later shapes reuse the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(4)
    rnn = triton_rnn.GRU(5, 6, backend="triton")
    counter = CompileCounterWithBackend("aot_eager")
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(lambda x: rnn(x)[0].square().sum(), backend=counter,
                                 fullgraph=True)
        frames = []
        for T, B in [(4, 2), (6, 2), (7, 3), (3, 5)]:
            x = torch.randn(T, B, 5, requires_grad=True)
            _grads_match(compiled, lambda x: rnn(x)[0].square().sum(), x, [x, rnn.weight_hh_l0])
            frames.append(counter.frame_count)
    assert frames == [1, 2, 3, 3]


@pytest.mark.parametrize("cell,packed,proj,reverses", [
    ("gru", False, 0, (False,)),
    ("gru", True, 0, (False, True)),
    ("lstm", True, 0, (True,)),
    ("lstm", False, 3, (False, True)),
])
def test_custom_ops_pass_opcheck(cell, packed, proj, reverses):
    """Schema, fake (shape-only) implementations and AOT tracing agree with the real ops,
    for one direction and for a layer's two: every output is fully written, padding
    included (it is zeroed)."""
    torch.manual_seed(3)
    T, B, H = 4, 3, 8
    G = {"gru": 3, "lstm": 4}[cell]
    R = proj or H

    def each(make):
        return [make() for _ in reverses]

    xg, w_hh = each(lambda: torch.randn(T, B, G * H)), each(lambda: torch.randn(G * H, R) * 0.3)
    h0 = each(lambda: torch.randn(B, R))
    c0 = each(lambda: torch.randn(B, H) if cell == "lstm" else None)
    b_hn = each(lambda: torch.randn(H) if cell == "gru" else None)
    w_hr = each(lambda: torch.randn(R, H) * 0.3 if proj else None)
    lengths = bsz = None
    if packed:
        lengths = torch.tensor([4, 3, 1])
        bsz = (lengths.view(1, -1) > torch.arange(T).view(-1, 1)).sum(1).to(torch.int32)
    args = (cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, bsz, list(reverses), "auto", None, None,
            True, True)
    torch.library.opcheck(torch.ops.triton_rnn.recurrence_forward, args)
    flat = torch.ops.triton_rnn.recurrence_forward(*args)
    assert len(flat) == 5 * len(reverses)
    cseq = flat[2::5] if cell == "lstm" else each(lambda: None)
    bargs = (cell, each(lambda: torch.randn(T, B, R)), each(lambda: torch.randn(B, R)),
             each(lambda: torch.randn(B, H) if cell == "lstm" else None), w_hh, flat[0::5], h0,
             c0, cseq, flat[3::5], w_hr, bsz, list(reverses), "auto", None, True)
    torch.library.opcheck(torch.ops.triton_rnn.recurrence_backward, bargs)
