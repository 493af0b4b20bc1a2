"""The drop-in modules and the functional layer loop, on the PyTorch reference path.

Every configuration is compared with the same-weights ``torch.nn`` module in
float64: outputs, final states and the gradients of the input, the initial
states and every parameter.
"""

import io
import os
import pickle
import random
import subprocess
import sys

import pytest
import torch

import triton_rnn
from rnn_testing import Case, compare, random_case

SEEDS = list(range(48))


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_path_matches_torch_nn(seed):
    case = random_case(random.Random(seed))
    compare(case, dtype=torch.float64, backend="triton", sequence_backend="reference", seed=seed)


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
def test_auto_backend_on_cpu_is_torch(monkeypatch, kind):
    """fp32 CPU tensors (which the kernels take) under ``auto`` go to torch, not the kernels."""
    from triton_rnn import functional as Fn

    def no_kernels(*args, **kwargs):
        raise AssertionError("backend='auto' on a CPU tensor must not reach triton_rnn's path")

    monkeypatch.setattr(Fn, "rnn", no_kernels)
    case = Case(kind=kind, layers=2, bidirectional=True, T=5, B=2)
    compare(case, dtype=torch.float32, backend="auto", seed=1)


def test_backend_resolution_per_device(monkeypatch):
    """``auto`` is the kernels on CUDA and torch elsewhere; meta tensors always get torch."""
    from triton_rnn.functional import resolve_backend

    monkeypatch.delenv("TRITON_RNN_BACKEND", raising=False)
    cuda, cpu, meta = (torch.device(d) for d in ("cuda:0", "cpu", "meta"))
    assert [resolve_backend(b, cuda) for b in ("auto", None, "triton", "torch")] == \
        ["triton", "triton", "triton", "torch"]
    assert [resolve_backend(b, cpu) for b in ("auto", None, "triton", "torch")] == \
        ["torch", "torch", "triton", "torch"]
    assert resolve_backend("triton", meta) == "torch"
    monkeypatch.setenv("TRITON_RNN_BACKEND", "torch")
    assert resolve_backend(None, cuda) == "torch" and resolve_backend("auto", cuda) == "triton"


def test_isinstance_and_repr():
    g = triton_rnn.GRU(8, 16)
    assert isinstance(g, torch.nn.GRU)
    assert isinstance(triton_rnn.LSTM(8, 16), torch.nn.LSTM)
    assert isinstance(triton_rnn.RNN(8, 16), torch.nn.RNN)
    assert repr(g) == repr(torch.nn.GRU(8, 16))
    assert "backend='torch'" in repr(triton_rnn.GRU(8, 16, backend="torch"))


def test_state_dict_both_directions_lstm_proj():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(6, 10, proj_size=4, bidirectional=True, num_layers=2)
    mine = triton_rnn.LSTM(6, 10, proj_size=4, bidirectional=True, num_layers=2,
                           backend="triton")
    mine._sequence_backend = "reference"  # triton_rnn's own layer loop reads the weights
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 6)
    a, b = ref(x), mine(x)
    for want, got in [(a[0], b[0]), (a[1][0], b[1][0]), (a[1][1], b[1][1])]:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    back = torch.nn.LSTM(6, 10, proj_size=4, bidirectional=True, num_layers=2)
    back.load_state_dict(mine.state_dict())
    assert torch.equal(back(x)[0], a[0])
    assert list(mine.state_dict()) == list(ref.state_dict())


def test_pickle_to_half_flatten_all_weights():
    m = triton_rnn.GRU(4, 6, num_layers=2, backend="torch")
    m.kernel_options = {"mode": "stepwise"}
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    assert isinstance(m2, triton_rnn.GRU) and m2.backend == "torch"
    m3 = pickle.loads(pickle.dumps(m))
    assert m3.kernel_options == {"mode": "stepwise"}
    x = torch.randn(3, 2, 4)
    assert torch.equal(m3(x)[0], m(x)[0])
    m.flatten_parameters()
    assert len(m.all_weights) == 2 and len(m.all_weights[0]) == 4
    h = m.half()
    assert all(p.dtype == torch.float16 for p in h.parameters())
    d = m.to(torch.float64)
    assert d(x.double())[0].dtype == torch.float64


def test_backend_argument_and_environment(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        triton_rnn.GRU(4, 4, backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        triton_rnn.GRU(4, 4, backend=123)
    assert "backend='triton'" in repr(triton_rnn.GRU(4, 4, backend="Triton"))
    monkeypatch.setenv("TRITON_RNN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match=r"TRITON_RNN_BACKEND"):
        triton_rnn.GRU(4, 4)
    monkeypatch.setenv("TRITON_RNN_BACKEND", "torch")
    assert triton_rnn.GRU(4, 4).backend == "torch"
    assert triton_rnn.GRU(4, 4, backend="triton").backend == "triton"
    monkeypatch.delenv("TRITON_RNN_BACKEND")
    assert triton_rnn.GRU(4, 4).backend == "auto"


def test_triton_backend_on_cpu_without_interpreter_says_so():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, triton_rnn\n"
            "m = triton_rnn.GRU(3, 4, backend='triton')\n"
            "m(torch.randn(2, 1, 3))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1" in proc.stderr and "CUDA tensor" in proc.stderr


def test_dropout_between_layers_only_in_training(monkeypatch):
    torch.manual_seed(0)
    ref = torch.nn.GRU(4, 6, num_layers=3, dropout=0.5).double()
    m = triton_rnn.GRU(4, 6, num_layers=3, dropout=0.5, backend="triton").double()
    m._sequence_backend = "reference"
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    m.eval(), ref.eval()
    torch.testing.assert_close(m(x)[0], ref(x)[0])
    m.train()
    torch.manual_seed(1)
    a = m(x)[0]
    torch.manual_seed(2)
    b = m(x)[0]
    assert not torch.allclose(a, b), "dropout must be active in training mode"
    # Between layers only: two dropouts for three layers, none on the last output...
    calls = []
    real = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda t, *args, **kw: calls.append(t.shape) or real(t, *args, **kw))
    m(x)
    assert calls == [(5, 2, 6), (5, 2, 6)]
    # ...so one layer in training equals eval (torch warns about dropout with one layer).
    with pytest.warns(UserWarning, match="dropout"):
        one = triton_rnn.GRU(4, 6, num_layers=1, dropout=0.5, backend="triton").double()
    one._sequence_backend = "reference"
    one.train()
    torch.testing.assert_close(one(x)[0], one.eval()(x)[0], atol=0, rtol=0)


# --------------------------------------------------------------------------- errors
def _errors(module, x, hx):
    try:
        module(x) if hx is None else module(x, hx)
    except Exception as e:  # the exception itself is what we compare
        return e
    raise AssertionError("no error raised")


ERROR_CASES = {
    "feature size": (lambda: torch.randn(3, 2, 5), None),
    "h0 shape": (lambda: torch.randn(3, 2, 4), lambda kind: torch.randn(1, 3, 6)),
    "1-D input": (lambda: torch.randn(4), None),
    "4-D input": (lambda: torch.randn(3, 2, 4, 1), None),
    "2-D h0 for batched input": (lambda: torch.randn(3, 2, 4), lambda kind: torch.randn(2, 6)),
    "input dtype": (lambda: torch.randn(3, 2, 4, dtype=torch.float64), None),
}


@pytest.mark.parametrize("what", sorted(ERROR_CASES))
@pytest.mark.parametrize("kind", ["GRU", "RNN", "LSTM"])
def test_errors_match_torch(kind, what):
    make_x, make_h = ERROR_CASES[what]
    x = make_x()
    hx = None
    if make_h is not None:
        h = make_h(kind)
        hx = (h, h.clone()) if kind == "LSTM" else h
    ref = getattr(torch.nn, kind)(4, 6)
    mine = getattr(triton_rnn, kind)(4, 6, backend="triton")
    mine._sequence_backend = "reference"
    mine.load_state_dict(ref.state_dict())
    e_ref, e_mine = _errors(ref, x, hx), _errors(mine, x, hx)
    assert type(e_mine) is type(e_ref)
    assert str(e_mine) == str(e_ref)


def test_lstm_with_three_states_is_refused_like_torch():
    mine = triton_rnn.LSTM(4, 6, backend="triton")
    mine._sequence_backend = "reference"
    h = torch.randn(1, 2, 6)
    with pytest.raises(RuntimeError, match="^lstm expects two hidden states$"):
        mine(torch.randn(3, 2, 4), (h, h.clone(), h.clone()))


def test_c0_shape_error_matches_torch():
    ref, mine = torch.nn.LSTM(4, 6), triton_rnn.LSTM(4, 6, backend="triton")
    mine._sequence_backend = "reference"
    x = torch.randn(3, 2, 4)
    hx = (torch.randn(1, 2, 6), torch.randn(1, 3, 6))
    e_ref, e_mine = _errors(ref, x, hx), _errors(mine, x, hx)
    assert type(e_mine) is type(e_ref) and str(e_mine) == str(e_ref)
    assert "(1, 2, 6)" in str(e_mine) and "[1, 3, 6]" in str(e_mine)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_state_dtype_and_device_mismatch_are_named(kind):
    mine = getattr(triton_rnn, kind)(4, 6, backend="triton")
    mine._sequence_backend = "reference"
    x = torch.randn(3, 2, 4)
    h = torch.randn(1, 2, 6, dtype=torch.float64)
    hx = (h, h.clone()) if kind == "LSTM" else h
    with pytest.raises(RuntimeError, match=r"not the same dtype, found input tensor with Float and hidden tensor with Double"):
        mine(x, hx)
    h = torch.randn(1, 2, 6, device="meta")
    hx = (h, h.clone()) if kind == "LSTM" else h
    with pytest.raises(RuntimeError, match="not at the same device.*cpu.*meta"):
        mine(x, hx)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_proj_size_only_for_lstm(kind):
    with pytest.raises(ValueError) as mine:
        getattr(triton_rnn, kind)(4, 6, proj_size=2)
    with pytest.raises(ValueError) as ref:
        getattr(torch.nn, kind)(4, 6, proj_size=2)
    assert str(mine.value) == str(ref.value)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_zero_length_batch_and_sequence_like_torch(kind):
    ref = getattr(torch.nn, kind)(4, 6)
    mine = getattr(triton_rnn, kind)(4, 6, backend="triton")
    mine._sequence_backend = "reference"
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 0, 4)
    a, b = ref(x), mine(x)
    assert a[0].shape == b[0].shape == (3, 0, 6)
    e_ref, e_mine = _errors(ref, torch.randn(0, 2, 4), None), _errors(mine, torch.randn(0, 2, 4), None)
    assert type(e_ref) is type(e_mine) and str(e_ref) == str(e_mine)
