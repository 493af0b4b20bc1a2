"""``torch.func`` transforms through the Triton kernels, in Triton's interpreter, against
float64 ``torch.nn``: ``grad``, ``vmap`` over inputs (one launch on the folded batch),
per-sample gradients (``vmap`` of ``grad``), ``grad`` of ``vmap``, ``vmap`` over stacked
parameters (an ensemble: one launch per member; also with eager ``backward``), ``jacrev``, and the kernel ops' vmap rules with packed
rows. Higher-order gradients and forward mode raise clear errors.
"""

import copy
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vjp, vmap

import triton_rnn
from conftest import GRAD_TOLERANCES, TOLERANCES
from triton_rnn import ops
from triton_rnn.kernels import launch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests (a GPU runs tests/test_gpu.py)")

I, H, T, V = 3, 5, 4, 3
CASES = {
    "gru-2-layers-bidirectional": ("GRU", dict(num_layers=2, bidirectional=True)),
    "lstm-proj-bidirectional": ("LSTM", dict(proj_size=3, bidirectional=True)),
    "rnn-relu": ("RNN", dict(nonlinearity="relu")),
}


def _pair(name, seed=0):
    """A triton_rnn module (fp32, Triton backend) and its float64 torch.nn twin, same weights."""
    kind, kw = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    ref = getattr(torch.nn, kind)(I, H, **kw).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-0.6, 0.6, generator=gen)
    ours = getattr(triton_rnn, kind)(I, H, backend="triton", **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref, gen


def _params(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def _state(module, gen, lead=(), batch=()):
    """A random float64 initial state for ``module``: ``[*lead, layers * D, *batch, size]``."""
    LD = module.num_layers * (2 if module.bidirectional else 1)
    h = torch.randn(*lead, LD, *batch, module.proj_size or H, generator=gen,
                    dtype=torch.float64)
    if isinstance(module, torch.nn.LSTM):
        return h, torch.randn(*lead, LD, *batch, H, generator=gen, dtype=torch.float64)
    return h


def _out_size(module):
    return (module.proj_size or H) * (2 if module.bidirectional else 1)


def _tensors(state):
    return list(state) if isinstance(state, tuple) else [state]


def _index(state, v):
    return tuple(s[v] for s in state) if isinstance(state, tuple) else state[v]


def _float(state):
    return tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()


def _loss(module, params, x, state, weight):
    """A scalar with a random cotangent on the output and the final cell/hidden state."""
    out, hn = functional_call(module, params, (x, state))
    last = hn[-1] if isinstance(hn, tuple) else hn
    return (out * weight).sum() + last.sin().sum()


def _spy(monkeypatch, name):
    """Record the batch size of every call of ``launch.<name>``."""
    calls, real = [], getattr(launch, name)

    def spy(cell, first, *args, **kwargs):
        calls.append(first.shape[1])
        return real(cell, first, *args, **kwargs)

    monkeypatch.setattr(launch, name, spy)
    return calls


def _forbid_flattening(monkeypatch, *modules):
    """Fail if a call flattens the weights: on CUDA, ``flatten_parameters`` reads
    ``data_ptr()``, which batched tensors under ``vmap`` do not have (a no-op on the CPU,
    so without this the interpreter tests would not see it)."""
    def flatten_parameters(self):
        raise AssertionError("flatten_parameters called inside a torch.func transform")

    for cls in {type(m) for m in modules}:
        monkeypatch.setattr(cls, "flatten_parameters", flatten_parameters)


def _launches(module):
    return module.num_layers * (2 if module.bidirectional else 1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_matches_autograd(poison_empty, name):
    ours, ref, gen = _pair(name, seed=1)
    x = torch.randn(T, 2, I, generator=gen, dtype=torch.float64)
    state = _state(ref, gen, batch=(2,))
    weight = torch.randn(T, 2, _out_size(ref),
                         generator=gen, dtype=torch.float64)
    got = grad(_loss, argnums=(1, 3))(ours, _params(ours), x.float(), _float(state),
                                      weight.float())
    for s in _tensors(state):
        s.requires_grad_()
    _loss(ref, dict(ref.named_parameters()), x, state, weight).backward()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(got[0][k].double(), p.grad, **GRAD_TOLERANCES[torch.float32],
                                   msg=lambda m: f"d {k}: {m}")
    for a, b in zip(_tensors(got[1]), _tensors(state)):
        torch.testing.assert_close(a.double(), b.grad, **GRAD_TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_over_inputs_folds_into_the_batch(monkeypatch, poison_empty, name):
    """V examples of [T, B, I] (each with its own initial state) run as one launch per
    (layer, direction) on V * B rows."""
    ours, ref, gen = _pair(name, seed=2)
    B = 2
    x = torch.randn(V, T, B, I, generator=gen, dtype=torch.float64)
    state = _state(ref, gen, lead=(V,), batch=(B,))
    calls = _spy(monkeypatch, "forward")
    _forbid_flattening(monkeypatch, ours)
    out, hn = vmap(lambda xx, ss: functional_call(ours, _params(ours), (xx, ss)))(
        x.float(), _float(state))
    assert calls == [V * B] * _launches(ours)
    for v in range(V):
        r_out, r_hn = ref(x[v], _index(state, v))
        torch.testing.assert_close(out[v].double(), r_out, **TOLERANCES[torch.float32])
        for a, b in zip(_tensors(hn), _tensors(r_hn)):
            torch.testing.assert_close(a[v].double(), b, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_sample_gradients(monkeypatch, poison_empty, name):
    """vmap(grad(...)) over unbatched sequences, as differentially private training does:
    every sample's parameter gradients, from one backward launch per (layer, direction)."""
    ours, ref, gen = _pair(name, seed=3)
    xs = torch.randn(V, T, I, generator=gen, dtype=torch.float64)
    states = _state(ref, gen, lead=(V,))
    weights = torch.randn(V, T, _out_size(ref),
                          generator=gen, dtype=torch.float64)
    calls = _spy(monkeypatch, "backward")
    _forbid_flattening(monkeypatch, ours)
    got = vmap(grad(_loss, argnums=1), in_dims=(None, None, 0, 0, 0))(
        ours, _params(ours), xs.float(), _float(states), weights.float())
    assert calls == [V] * _launches(ours)
    for v in range(V):
        ref.zero_grad()
        _loss(ref, dict(ref.named_parameters()), xs[v], _index(states, v), weights[v]).backward()
        for k, p in ref.named_parameters():
            torch.testing.assert_close(got[k][v].double(), p.grad,
                                       **GRAD_TOLERANCES[torch.float32],
                                       msg=lambda m: f"sample {v}, d {k}: {m}")


def test_vmap_over_stacked_parameters(monkeypatch, poison_empty):
    """An ensemble: each member's own weights, one launch per member; values and gradients."""
    pairs = [_pair("gru-2-layers-bidirectional", seed=10 + i) for i in range(V)]
    members = [ours for ours, _, _ in pairs]
    params, _ = stack_module_state(members)
    gen = pairs[0][2]
    x = torch.randn(T, 2, I, generator=gen, dtype=torch.float64)
    weight = torch.randn(T, 2, 2 * H, generator=gen, dtype=torch.float64)
    base = members[0]
    calls = _spy(monkeypatch, "forward")
    _forbid_flattening(monkeypatch, base)
    out = vmap(lambda p: functional_call(base, p, (x.float(),))[0])(params)
    assert calls == [2] * (V * _launches(base))
    got = vmap(lambda p: grad(lambda q: (functional_call(base, q, (x.float(),))[0]
                                         * weight.float()).sum())(p))(params)
    # Eager autograd through vmap: only the stacked parameters require a gradient.
    (vmap(lambda p: functional_call(base, p, (x.float(),))[0])(params)
     * weight.float()).sum().backward()
    for v, (_, ref, _) in enumerate(pairs):
        r_out = ref(x)[0]
        torch.testing.assert_close(out[v].double(), r_out, **TOLERANCES[torch.float32])
        (r_out * weight).sum().backward()
        for k, p in ref.named_parameters():
            for ours in (got[k][v], params[k].grad[v]):
                torch.testing.assert_close(ours.double(), p.grad,
                                           **GRAD_TOLERANCES[torch.float32])


def test_grad_of_vmap(poison_empty):
    """grad over a vmapped batch of sequences (the vmap is inside the gradient transform)."""
    ours, ref, gen = _pair("lstm-proj-bidirectional", seed=7)
    xs = torch.randn(V, T, I, generator=gen, dtype=torch.float64)
    weights = torch.randn(V, T, _out_size(ref), generator=gen, dtype=torch.float64)

    def loss(p):
        out = vmap(lambda xx: functional_call(ours, p, (xx,))[0])(xs.float())
        return (out * weights.float()).sum()

    got = grad(loss)(_params(ours))
    sum((ref(xs[v])[0] * weights[v]).sum() for v in range(V)).backward()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(got[k].double(), p.grad, **GRAD_TOLERANCES[torch.float32])


def test_jacrev_matches_float64(poison_empty):
    ours, ref, gen = _pair("lstm-proj-bidirectional", seed=4)
    x = torch.randn(T, 2, I, generator=gen, dtype=torch.float64)
    J = jacrev(lambda xx: functional_call(ours, _params(ours), (xx,))[1][1])(x.float())
    J_ref = torch.autograd.functional.jacobian(lambda xx: ref(xx)[1][1], x)
    torch.testing.assert_close(J.double(), J_ref, **GRAD_TOLERANCES[torch.float32])


@pytest.mark.parametrize("shared_weights", [True, False], ids=["folded", "per-member"])
def test_kernel_op_vmap_rules_with_packed_rows(poison_empty, shared_weights):
    """The ops' vmap rules straight, with packed rows in reverse time (lengths repeat per
    folded row): forward and backward against one call per vmapped index."""
    gen = torch.Generator().manual_seed(5)
    B, lengths = 3, torch.tensor([4, 3, 1])
    bsz = (lengths.view(1, -1) > torch.arange(T).view(-1, 1)).sum(1).to(torch.int32)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    w_hh = rnd(*((V,) if not shared_weights else ()), 4 * H, H) * 0.5
    xg, h0, c0, dout, dh_n, dc_n = (rnd(V, T, B, 4 * H), rnd(V, B, H), rnd(V, B, H),
                                    rnd(V, T, B, H), rnd(V, B, H), rnd(V, B, H))

    def forward(xg, w_hh, h0, c0):
        outs = ops.recurrence_forward("lstm", [xg], [w_hh], [None], [h0], [c0], [None],
                                      lengths, bsz, reverse=[True])[0]
        return outs[:4]  # hbuf, h_state, cseq, saved

    def backward(dout, dh_n, dc_n, w_hh, h0, c0, hbuf, cseq, saved):
        outs = ops.recurrence_backward("lstm", [dout], [dh_n], [dc_n], [w_hh], [hbuf], [h0],
                                       [c0], [cseq], [saved], [None], bsz, reverse=[True])[0]
        return outs[0], outs[2], outs[3]  # dgh, dh0's and dc0's elementwise parts

    w_dim = None if shared_weights else 0
    fwd = vmap(forward, in_dims=(0, w_dim, 0, 0))(xg, w_hh, h0, c0)
    bwd = vmap(backward, in_dims=(0, 0, 0, w_dim, 0, 0, 0, 0, 0))(
        dout, dh_n, dc_n, w_hh, h0, c0, fwd[0], fwd[2], fwd[3])
    for v in range(V):
        w = w_hh if shared_weights else w_hh[v]
        want = forward(xg[v], w, h0[v], c0[v])
        for a, b in zip(fwd, want):
            torch.testing.assert_close(a[v], b, atol=0, rtol=0)
        want = backward(dout[v], dh_n[v], dc_n[v], w, h0[v], c0[v], *(t.contiguous() for t in
                                                                      (want[0], want[2], want[3])))
        for a, b in zip(bwd, want):
            torch.testing.assert_close(a[v], b, atol=0, rtol=0)


# torch's forward-mode set-up scripts its decompositions with the deprecated torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_higher_order_gradients_and_forward_mode_raise():
    ours, _, gen = _pair("gru-2-layers-bidirectional", seed=6)
    params = _params(ours)
    x = torch.randn(T, 2, I, generator=gen)

    def f(xx):
        return functional_call(ours, params, (xx,))[0].square().sum()

    higher = "higher-order gradients .* not supported; use backend='torch'"
    with pytest.raises(RuntimeError, match=higher):
        grad(lambda xx: grad(f)(xx).sum())(x)
    with pytest.raises(RuntimeError, match=higher):
        vjp(lambda xx: vjp(f, xx)[1](torch.ones(()))[0].sum(), x)[1](torch.ones(()))
    xr = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match=higher):
        torch.autograd.grad(ours(xr)[0].sum(), xr, create_graph=True)
    with pytest.raises(RuntimeError, match=higher):  # eagerly through vmap
        xs = torch.randn(V, T, I, generator=gen, requires_grad=True)
        torch.autograd.grad(vmap(lambda xx: ours(xx)[0])(xs).sum(), xs, create_graph=True)
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp(f, (x,), (torch.randn_like(x),))
    frozen = copy.deepcopy(ours).requires_grad_(False)
    with pytest.raises(NotImplementedError, match="jvp"), fwAD.dual_level():
        frozen(fwAD.make_dual(x, torch.randn_like(x)))
    # A vjp's function called after the transform has ended is first order: fine.
    out, fn = vjp(f, x)
    assert fn(torch.ones(()))[0].shape == x.shape
