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
    #: Pack with ``enforce_sorted=True`` (lengths must then be decreasing): no
    #: ``sorted_indices`` to permute by.
    enforce_sorted: bool = False
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


def _leaves(x, hx, dtype, input_grad=True):
    xs = [t.detach().to(dtype).requires_grad_(input_grad)
          for t in (x if isinstance(x, list) else [x])]
    hs = None
    if hx is not None:
        hs = tuple(h.detach().to(dtype).requires_grad_() for h in (hx if isinstance(hx, tuple) else (hx,)))
    return xs, hs


def _run(module, case, xs, hs):
    inp = (pack_sequence(xs, enforce_sorted=case.enforce_sorted) if case.packed_lengths
           else xs[0])
    state = None if hs is None else (hs if case.kind == "LSTM" else hs[0])
    out, hn = module(inp) if state is None else module(inp, state)
    out_t = out.data if case.packed_lengths else out
    hn_t = list(hn) if isinstance(hn, tuple) else [hn]
    return out_t, hn_t


def outputs_and_grads(case: Case, *, dtype=torch.float32, backend="triton", sequence_backend=None,
                      kernel_options=None, seed=0, check_grads=True, device="cpu",
                      loss_on=("output", "h_n", "c_n"), input_grad=True, frozen=(),
                      weight_scale=0.6):
    """Run ``case`` through triton_rnn (``dtype``) and torch.nn (float64) on the same inputs.

    Returns ``[(name, ours, reference, is_gradient)]``: the output, the final
    states and, with ``check_grads``, the gradients of the inputs, initial
    states and every parameter under random cotangents on the outputs named in
    ``loss_on`` (``"output"``, ``"h_n"``, ``"c_n"``; the others get no gradient).
    ``input_grad=False`` leaves the input without ``requires_grad``; parameters whose
    name starts with one of ``frozen`` are frozen in both modules, and must get no
    gradient in either. Weights are drawn from ``uniform(-weight_scale, weight_scale)``:
    0.6 keeps the tiny interpreter shapes far from zero; at hidden sizes in the hundreds
    that makes the recurrence chaotic (float32 rounding grows tenfold every few steps,
    torch's own included), so realistic sizes pass ``hidden ** -0.5``, torch's init.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ref = getattr(torch.nn, case.kind)(case.input_size, case.hidden, **case.module_kwargs()).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-weight_scale, weight_scale, generator=gen)
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
    for m in (ref, mod):
        for name, p in m.named_parameters():
            p.requires_grad_(not name.startswith(tuple(frozen)))
    rx, rh = _leaves(x, hx, torch.float64, input_grad)
    tx, th = _leaves(x, hx, dtype, input_grad)
    r_out, r_hn = _run(ref, case, rx, rh)
    t_out, t_hn = _run(mod, case, tx, th)
    assert t_out.dtype == dtype and t_out.shape == r_out.shape
    out = [("output", t_out, r_out, False)]
    for i, (a, b) in enumerate(zip(t_hn, r_hn)):
        assert a.shape == b.shape
        out.append((f"final state {i}", a, b, False))
    if not check_grads:
        return out
    # Random cotangents on the chosen outputs (by default all, so each gradient path is
    # exercised).
    names = ["output", "h_n", "c_n"][:1 + len(r_hn)]
    used = [i for i, n in enumerate(names) if n in loss_on]
    assert used, (loss_on, names)
    weights = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(device)
               for r in [r_out] + r_hn]
    loss_r = sum((weights[i] * o).sum() for i, o in enumerate([r_out] + r_hn) if i in used)
    loss_t = sum((weights[i].to(dtype) * o).sum() for i, o in enumerate([t_out] + t_hn)
                 if i in used)
    loss_r.backward()
    loss_t.backward()
    if input_grad:
        out += [(f"d input {i}", a.grad, b.grad, True) for i, (a, b) in enumerate(zip(tx, rx))]
    else:
        assert all(a.grad is None for a in tx)
    if th is not None:
        out += [(f"d initial state {i}", a.grad, b.grad, True)
                for i, (a, b) in enumerate(zip(th, rh))]
    for (name, p), (_, q) in zip(mod.named_parameters(), ref.named_parameters()):
        if not p.requires_grad:
            assert p.grad is None and q.grad is None, name
            continue
        assert p.grad is not None, name
        out.append((f"d {name}", p.grad, q.grad, True))
    return out


def compare(case: Case, *, dtype=torch.float32, tolerances=None, **kw):
    """Assert that ``case`` in triton_rnn (``dtype``) matches float64 torch.nn, per-dtype tolerances.

    Keywords as :func:`outputs_and_grads`; ``tolerances`` is a pair of
    ``{dtype: dict(atol, rtol)}`` tables (values, gradients).
    """
    tol, gtol = (tolerances or (TOLERANCES, GRAD_TOLERANCES))
    for name, ours, ref, is_grad in outputs_and_grads(case, dtype=dtype, **kw):
        torch.testing.assert_close(ours.double(), ref, **(gtol if is_grad else tol)[dtype],
                                   msg=lambda m: f"{name}: {m}")


def compare_with_torch_low_precision(case: Case, *, dtype, ratio=2.0, floor=5e-3, **kw):
    """Assert triton_rnn's error against float64 is within ``ratio`` x torch's own (same dtype).

    For bf16, whose rounding (8 significant bits) dominates: a fixed tolerance
    that fits every shape would be loose for most of them, while torch's own
    bf16 implementation on the same inputs shows what is achievable. Every
    output and gradient must satisfy ``max|ours - f64| <= ratio * max|torch - f64| + floor``.
    """
    ours = outputs_and_grads(case, dtype=dtype, **kw)
    kw = {k: v for k, v in kw.items() if k not in ("kernel_options", "sequence_backend")}
    theirs = outputs_and_grads(case, dtype=dtype, **{**kw, "backend": "torch"})
    for (name, a, ref, _), (_, b, _, _) in zip(ours, theirs):
        err = (a.double() - ref).abs().max().item()
        bound = ratio * (b.double() - ref).abs().max().item() + floor
        assert err <= bound, f"{name}: error {err:.4g} against float64, torch's {dtype}: {bound:.4g} allowed"
    return ours
