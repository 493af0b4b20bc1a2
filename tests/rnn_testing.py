"""Compare a ``triton_rnn`` module with its float64 ``torch.nn`` twin: values and gradients."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pack_sequence

import triton_rnn
from conftest import GRAD_TOLERANCES, TOLERANCES

CLASSES = {"GRU": triton_rnn.GRU, "LSTM": triton_rnn.LSTM, "RNN": triton_rnn.RNN}


@dataclass
class Case:
    """One module configuration and input shape."""

    kind: str = "GRU"
    input_size: int = 5
    hidden: int = 7
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    proj: int = 0
    nonlinearity: str = "tanh"
    T: int = 4
    B: int = 3
    unbatched: bool = False
    packed_lengths: tuple = ()
    with_state: bool = True
    kwargs: dict = field(default_factory=dict)

    def module_kwargs(self):
        kw = dict(num_layers=self.layers, bidirectional=self.bidirectional,
                  batch_first=self.batch_first, bias=self.bias, **self.kwargs)
        if self.kind == "LSTM" and self.proj:
            kw["proj_size"] = self.proj
        if self.kind == "RNN":
            kw["nonlinearity"] = self.nonlinearity
        return kw


def random_case(rng: random.Random, kind=None, **over) -> Case:
    """A seeded random configuration covering the torch.nn options."""
    kind = kind or rng.choice(["GRU", "LSTM", "RNN"])
    c = Case(kind=kind, input_size=rng.choice([3, 5, 6]), hidden=rng.choice([4, 7, 9, 12]),
             layers=rng.choice([1, 2, 3]), bidirectional=rng.random() < 0.5,
             batch_first=rng.random() < 0.5, bias=rng.random() < 0.8,
             nonlinearity=rng.choice(["tanh", "relu"]), T=rng.choice([1, 3, 5]),
             B=rng.choice([1, 2, 3]), with_state=rng.random() < 0.6)
    if kind == "LSTM" and rng.random() < 0.4:
        c.proj = rng.randint(1, c.hidden - 1)
    mode = rng.random()
    if mode < 0.2:
        c.unbatched = True
    elif mode < 0.45:
        c.packed_lengths = tuple(rng.randint(1, c.T) for _ in range(c.B))
    for k, v in over.items():
        setattr(c, k, v)
    return c


def _state_shapes(case: Case, batch):
    D = 2 if case.bidirectional else 1
    out = case.proj or case.hidden
    lead = (case.layers * D,) + ((batch,) if batch is not None else ())
    h = lead + (out,)
    c = lead + (case.hidden,)
    return h, c


def make_inputs(case: Case, gen: torch.Generator):
    """Fresh random float64 inputs (never zeros): input and optional initial state."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if case.packed_lengths:
        seqs = [rnd(n, case.input_size) for n in case.packed_lengths]
        x = seqs
        batch = len(seqs)
    elif case.unbatched:
        x = rnd(case.T, case.input_size)
        batch = None
    else:
        x = rnd(case.B, case.T, case.input_size) if case.batch_first else rnd(case.T, case.B, case.input_size)
        batch = case.B
    hx = None
    if case.with_state:
        hs, cs = _state_shapes(case, batch)
        hx = (rnd(*hs), rnd(*cs)) if case.kind == "LSTM" else rnd(*hs)
    return x, hx


def _leaves(x, hx, dtype):
    xs = [t.detach().to(dtype).requires_grad_() for t in (x if isinstance(x, list) else [x])]
    hs = None
    if hx is not None:
        hs = tuple(h.detach().to(dtype).requires_grad_() for h in (hx if isinstance(hx, tuple) else (hx,)))
    return xs, hs


def _run(module, case, xs, hs):
    inp = pack_sequence(xs, enforce_sorted=False) if case.packed_lengths else xs[0]
    state = None if hs is None else (hs if case.kind == "LSTM" else hs[0])
    out, hn = module(inp) if state is None else module(inp, state)
    out_t = out.data if case.packed_lengths else out
    hn_t = list(hn) if isinstance(hn, tuple) else [hn]
    return out_t, hn_t


def compare(case: Case, *, dtype=torch.float32, backend="triton", sequence_backend=None,
            kernel_options=None, seed=0, check_grads=True, device="cpu", tolerances=None):
    """Run ``case`` through triton_rnn (``dtype``) and torch.nn (float64) and assert closeness."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ref = getattr(torch.nn, case.kind)(case.input_size, case.hidden, **case.module_kwargs()).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-0.6, 0.6, generator=gen)
    mod = CLASSES[case.kind](case.input_size, case.hidden, backend=backend,
                             **case.module_kwargs())
    mod = mod.to(dtype)
    mod.load_state_dict(ref.state_dict())
    ref, mod = ref.to(device), mod.to(device)
    if sequence_backend:
        mod._sequence_backend = sequence_backend
    if kernel_options:
        mod.kernel_options = dict(kernel_options)
    x, hx = make_inputs(case, gen)
    x = [t.to(device) for t in x] if isinstance(x, list) else x.to(device)
    if hx is not None:
        hx = tuple(h.to(device) for h in hx) if isinstance(hx, tuple) else hx.to(device)
    rx, rh = _leaves(x, hx, torch.float64)
    tx, th = _leaves(x, hx, dtype)
    r_out, r_hn = _run(ref, case, rx, rh)
    t_out, t_hn = _run(mod, case, tx, th)
    tol, gtol = (tolerances or (TOLERANCES, GRAD_TOLERANCES))
    tol, gtol = tol[dtype], gtol[dtype]
    assert t_out.dtype == dtype and t_out.shape == r_out.shape
    torch.testing.assert_close(t_out.double(), r_out, **tol, msg=lambda m: f"output: {m}")
    for i, (a, b) in enumerate(zip(t_hn, r_hn)):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"final state {i}: {m}")
    if not check_grads:
        return
    # Random cotangents on every output, so each gradient path is exercised.
    weights = [torch.randn(r_out.shape, generator=gen, dtype=torch.float64).to(device)] + [
        torch.randn(h.shape, generator=gen, dtype=torch.float64).to(device) for h in r_hn]
    loss_r = sum((w * o).sum() for w, o in zip(weights, [r_out] + r_hn))
    loss_t = sum((w.to(dtype) * o).sum() for w, o in zip(weights, [t_out] + t_hn))
    loss_r.backward()
    loss_t.backward()
    for i, (a, b) in enumerate(zip(tx, rx)):
        torch.testing.assert_close(a.grad.double(), b.grad, **gtol, msg=lambda m: f"d input {i}: {m}")
    if th is not None:
        for i, (a, b) in enumerate(zip(th, rh)):
            torch.testing.assert_close(a.grad.double(), b.grad, **gtol,
                                       msg=lambda m: f"d initial state {i}: {m}")
    for (name, p), (_, q) in zip(mod.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.double(), q.grad, **gtol, msg=lambda m: f"d {name}: {m}")
