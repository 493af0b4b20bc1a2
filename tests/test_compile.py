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
    """One graph for the whole model: the recurrence is the custom ops, forward and backward,
    with the same values and gradients as eager (forced tile configs reach the ops too)."""
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
    layers_x_directions = rnn.num_layers * (2 if rnn.bidirectional else 1)
    assert [seen.count(op) for op in OPS] == [layers_x_directions] * 2


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


@pytest.mark.parametrize("cell,packed,reverse,proj", [
    ("gru", False, False, 0),
    ("gru", True, True, 0),
    ("lstm", True, False, 0),
    ("lstm", False, True, 3),
])
def test_custom_ops_pass_opcheck(cell, packed, reverse, proj):
    """Schema, fake (shape-only) implementations and AOT tracing agree with the real ops:
    every output is fully written, padding included (it is zeroed)."""
    torch.manual_seed(3)
    T, B, H = 4, 3, 8
    G = {"gru": 3, "lstm": 4}[cell]
    R = proj or H
    xg, w_hh = torch.randn(T, B, G * H), torch.randn(G * H, R) * 0.3
    h0, c0 = torch.randn(B, R), (torch.randn(B, H) if cell == "lstm" else None)
    b_hn = torch.randn(H) if cell == "gru" else None
    w_hr = torch.randn(R, H) * 0.3 if proj else None
    lengths = bsz = None
    if packed:
        lengths = torch.tensor([4, 3, 1])
        bsz = (lengths.view(1, -1) > torch.arange(T).view(-1, 1)).sum(1).to(torch.int32)
    args = (cell, xg, w_hh, b_hn, h0, c0, w_hr, lengths, bsz, reverse, "auto", None, None, True)
    torch.library.opcheck(torch.ops.triton_rnn.recurrence_forward, args)
    hbuf, _, cseq, saved, _ = torch.ops.triton_rnn.recurrence_forward(*args)
    dc_n = torch.randn(B, H) if cell == "lstm" else None
    bargs = (cell, torch.randn(T, B, R), torch.randn(B, R), dc_n, w_hh, hbuf, h0, c0,
             cseq if cell == "lstm" else None, saved, w_hr, bsz, reverse, "auto", None)
    torch.library.opcheck(torch.ops.triton_rnn.recurrence_backward, bargs)
