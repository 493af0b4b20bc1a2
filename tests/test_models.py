"""Tests of the reference seq2seq model, its data and checkpoints (CPU, fast)."""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from triton_rnn.models.data import (DATE_FORMATS, Vocab, _fields, date_splits, detokenize, format_date,
                                    load_tsv, split_pairs, tokenize)
from triton_rnn.models.seq2seq import ATTENTION_TYPES, Attention, Seq2Seq, default_config
from triton_rnn.models.training import (collate, encode_pairs, load_checkpoint,
                                        model_from_checkpoint, save_checkpoint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed=0, B=5, src_vocab=12, tgt_vocab=9, max_src=7, max_tgt=5):
    g = torch.Generator().manual_seed(seed)
    lens = [max_src] + torch.randint(1, max_src + 1, (B - 1,), generator=g).tolist()
    ex = []
    for n in lens:
        s = torch.randint(4, src_vocab, (n,), generator=g).tolist()
        t = torch.randint(4, tgt_vocab, (int(torch.randint(1, max_tgt + 1, (1,), generator=g)),),
                          generator=g).tolist()
        ex.append((s, t))
    return collate(ex)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = default_config(12, 9, emb=8, hidden=16, dropout=0.0, backend="torch")
    cfg.update(kw)
    return Seq2Seq(cfg).eval()


# --------------------------------------------------------------------------
# Attention and masks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ATTENTION_TYPES)
def test_attention_gives_padding_exactly_zero_weight(kind):
    torch.manual_seed(0)
    B, Tq, Ts, H = 3, 4, 6, 8
    att = Attention(kind, H, H)
    lens = torch.tensor([6, 3, 1])
    mask = torch.arange(Ts)[None] < lens[:, None]
    memory = torch.randn(B, Ts, H)
    memory[~mask] = 1e4  # huge padding values must still get no weight
    query = torch.randn(B, Tq, H, requires_grad=True)
    context, w = att(query, memory, mask)
    assert context.shape == (B, Tq, H) and w.shape == (B, Tq, Ts)
    pad = (~mask).unsqueeze(1).expand_as(w)
    assert torch.equal(w[pad], torch.zeros_like(w[pad]))
    torch.testing.assert_close(w.sum(-1), torch.ones(B, Tq))
    assert torch.all(w[:, :, 0][lens == 1] == 1.0)
    context.sum().backward()
    assert torch.isfinite(query.grad).all()


@pytest.mark.parametrize("kind", ATTENTION_TYPES)
def test_attention_fully_masked_row_is_zero_not_nan(kind):
    torch.manual_seed(0)
    att = Attention(kind, 8, 8)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    memory = torch.randn(2, 3, 8, requires_grad=True)
    query = torch.randn(2, 2, 8, requires_grad=True)
    context, w = att(query, memory, mask)
    assert torch.isfinite(w).all() and torch.isfinite(context).all()
    assert torch.equal(w[1], torch.zeros(2, 3))
    (context.sum() + w.sum()).backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(memory.grad).all()


def test_dot_attention_needs_equal_sizes():
    with pytest.raises(ValueError):
        Attention("dot", 8, 6)


@pytest.mark.parametrize("cell,kind,feed", [("gru", "dot", False), ("gru", "general", True),
                                            ("lstm", "concat", False), ("lstm", "dot", True)])
def test_model_shapes_and_padding_mask(cell, kind, feed):
    model = _model(cell=cell, attention=kind, input_feeding=feed, layers=2)
    src, lens, tgt_in, tgt_out = _batch()
    logits, attn = model(src, lens, tgt_in, return_attention=True)
    assert logits.shape == (*tgt_in.shape, 9)
    assert attn.shape == (src.size(0), tgt_in.size(1), src.size(1))
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(attn[b, :, n:], torch.zeros_like(attn[b, :, n:]))
    loss = model.loss(logits, tgt_out, label_smoothing=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    # Padding in the source changes nothing for the other rows (packed encoder).
    wider = torch.cat([src, torch.full((src.size(0), 3), 0)], dim=1)
    logits2 = model(wider, lens, tgt_in)
    torch.testing.assert_close(logits2, logits)


def test_input_feeding_step_matches_teacher_forcing():
    for feed in (False, True):
        model = _model(input_feeding=feed, attention="general")
        src, lens, tgt_in, _ = _batch(seed=3)
        logits = model(src, lens, tgt_in)
        memory, mask, keys, state = model.encode(src, lens)
        f = model._initial_feed(src.size(0), memory)
        for t in range(tgt_in.size(1)):
            step_logits, state, f, _ = model.decoder.step(tgt_in[:, t], state, f, memory, mask, keys)
            torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cell,kind,feed", [("gru", "general", False), ("lstm", "concat", True),
                                            ("gru", "dot", True)])
def test_beam_one_equals_greedy(cell, kind, feed):
    for seed in range(3):
        model = _model(seed=seed, cell=cell, attention=kind, input_feeding=feed)
        # A strong EOS bias in one model makes rows finish at different steps.
        if seed == 1:
            with torch.no_grad():
                model.decoder.out.bias[model.eos_id] += 2.0
        src, lens, _, _ = _batch(seed=seed, B=7)
        greedy = model.greedy(src, lens, max_len=12)
        beam = model.beam_search(src, lens, beam=1, max_len=12)
        assert torch.equal(greedy, beam)
        assert model.translate_ids(src, lens, beam=1, max_len=12) == [
            row[:row.index(3)] if 3 in row else row for row in greedy.tolist()]


def test_beam_search_outputs_and_eos_handling():
    model = _model(seed=4, attention="concat")
    with torch.no_grad():
        model.decoder.out.bias[model.eos_id] += 1.5
    src, lens, _, _ = _batch(seed=4, B=6)
    out, scores = model.beam_search(src, lens, beam=4, max_len=10, return_scores=True)
    assert out.shape[0] == 6 and out.shape[1] <= 10 and scores.shape == (6,)
    assert torch.isfinite(scores).all() and (scores <= 0).all()
    for row in out.tolist():
        if model.eos_id in row:  # nothing but padding after EOS
            k = row.index(model.eos_id)
            assert all(i == model.pad_id for i in row[k + 1:])
            assert model.pad_id not in row[:k]
    # Each sentence is decoded independently of the rest of the batch.
    single = model.beam_search(src[2:3, :int(lens[2])], lens[2:3], beam=4, max_len=10)
    a, b = single[0].tolist(), out[2].tolist()
    assert a == b[:len(a)] and all(i == model.pad_id for i in b[len(a):])
    with pytest.raises(ValueError):
        model.beam_search(src, lens, beam=0)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def test_date_splits_are_seeded_disjoint_and_correct():
    train, val, test = date_splits(300, 50, 80, seed=7)
    assert (len(train), len(val), len(test)) == (300, 50, 80)
    assert date_splits(300, 50, 80, seed=7) == (train, val, test)
    assert date_splits(300, 50, 80, seed=8) != (train, val, test)
    days = [set(t for _, t in split) for split in (train, val, test)]
    assert sum(len(d) for d in days) == 430  # one pair per day, no day in two splits
    iso = re.compile(r"^\d{4}-\d{2}-\d{2}$")
    for s, t in train + val + test:
        assert iso.match(t)
        d = dt.date.fromisoformat(t)
        low = s.lower()
        if any(w.lower() in low for w in ("monday", "tuesday", "wednesday", "thursday",
                                          "friday", "saturday", "sunday")):
            assert d.strftime("%A").lower() in low
        assert str(d.day) in s
    with pytest.raises(ValueError):
        date_splits(40000, 0, 0)


def test_date_formats_examples():
    d = dt.date(2021, 3, 3)
    rendered = {f.format(**_fields(d)) for f in DATE_FORMATS}
    for want in ("Wednesday, March 3rd 2021", "03/03/21", "3 Mar 2021", "2021 March 3",
                 "March 3, 2021"):
        assert want in rendered
    rng = random.Random(0)
    texts = {format_date(d, rng) for _ in range(200)}
    assert any(t != t.strip() or "  " in t for t in texts)      # spacing noise
    assert any(t.isupper() for t in texts) and any(t.islower() for t in texts)


def test_vocab_tokenize_and_tsv(tmp_path):
    v = Vocab.build([tokenize("abca"), tokenize("cab")])
    assert v.itos[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert Vocab(v.to_list()) == v
    ids = v.encode(tokenize("abz"), bos=True, eos=True)
    assert ids[0] == v.bos_id and ids[-1] == v.eos_id and v.unk_id in ids
    assert detokenize(v.decode(v.encode(tokenize("cab"), eos=True) + [5]), "char") == "cab"
    assert tokenize("a  b c", "word") == ["a", "b", "c"]
    assert detokenize(["a", "b"], "word") == "a b"

    path = tmp_path / "pairs.tsv"
    lines = [f"src {i % 30}\ttgt {i}" for i in range(60)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    pairs = load_tsv(str(path))
    assert len(pairs) == 60 and pairs[0] == ("src 0", "tgt 0")
    tr, va, te = split_pairs(pairs, 3, 4, seed=1)
    assert len(tr) + len(va) + len(te) == 60
    srcs = [set(s for s, _ in x) for x in (tr, va, te)]
    assert not (srcs[0] & srcs[1] or srcs[0] & srcs[2] or srcs[1] & srcs[2])
    assert len(srcs[1]) == 3 and len(srcs[2]) == 4
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        load_tsv(str(bad))


def test_load_tsv_drops_a_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "bom.tsv"
    path.write_bytes("\ufeffhello\tbonjour\ncat\tchat\n".encode("utf-8"))
    assert load_tsv(str(path)) == [("hello", "bonjour"), ("cat", "chat")]


def test_literal_special_tokens_in_data_encode_as_unk():
    """A word spelled "</s>" or "<pad>" is data: never EOS mid-target, never ignored as PAD."""
    src, tgt = "a <pad> b </s> c <s> <unk>", "x </s> y <pad> z <s>"
    sv, tv = Vocab.build([tokenize(src, "word")]), Vocab.build([tokenize(tgt, "word")])
    assert sv.itos == ["<pad>", "<unk>", "<s>", "</s>", "a", "b", "c"]  # kept out of the vocab
    ids = sv.encode(tokenize(src, "word"), bos=True, eos=True)
    assert ids == [sv.bos_id, 4, sv.unk_id, 5, sv.unk_id, 6, sv.unk_id, sv.unk_id, sv.eos_id]
    (s_ids, t_ids), = encode_pairs([(src, tgt)], sv, tv, "word")
    _, _, tgt_in, tgt_out = collate([(s_ids, t_ids)])
    assert tgt_out[0].tolist().count(tv.eos_id) == 1 and tgt_out[0, -1] == tv.eos_id
    assert tv.pad_id not in tgt_out[0].tolist() and tgt_in[0].tolist().count(tv.bos_id) == 1
    # a vocabulary read back from a checkpoint behaves the same
    assert Vocab(tv.to_list()).encode(["</s>", "x"]) == [tv.unk_id, tv.stoi["x"]]


def test_split_pairs_is_disjoint_by_normalized_source():
    """"w1 x" and " w1  x " are one word-level input: they must land in the same split."""
    pairs = ([(f"w{i} x", f"y{i}") for i in range(50)]
             + [(f" w{i}  x ", f"y{i}") for i in range(50)]
             + [(f"w{i} </s>", "z") for i in range(20)] + [(f"w{i} <unk>", "z") for i in range(20)])
    tr, va, te = split_pairs(pairs, 10, 10, seed=0)
    assert len(tr) + len(va) + len(te) == len(pairs)
    keys = [{" ".join(tokenize(s, "word")).replace("</s>", "<unk>") for s, _ in x}
            for x in (tr, va, te)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert len(keys[1]) == len(keys[2]) == 10  # sizes count normalized sources
    # sources that are already normalized split exactly as they did by raw string
    plain = [(f"s {i}", "t") for i in range(30)]
    order = sorted(s for s, _ in plain)
    random.Random(1).shuffle(order)
    tr2, va2, te2 = split_pairs(plain, 3, 4, seed=1)
    assert [s for s, _ in va2] == order[:3] and [s for s, _ in te2] == order[3:7]
    assert len(tr2) == 23


@pytest.mark.parametrize("val, test, name", [(-1, 3, "val_size"), (2, -1, "test_size")])
def test_split_sizes_must_not_be_negative(val, test, name):
    pairs = [(f"s{i}", f"t{i}") for i in range(20)]
    with pytest.raises(ValueError, match=f"{name} \\(--{name.replace('_', '-')}\\) must be >= 0"):
        split_pairs(pairs, val, test)
    with pytest.raises(ValueError, match=name):
        date_splits(100, val, test)


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = _model(seed=5, cell="lstm", attention="concat", input_feeding=True)
    sv = Vocab(["<pad>", "<unk>", "<s>", "</s>"] + list("abcdefgh"))
    tv = Vocab(["<pad>", "<unk>", "<s>", "</s>"] + list("01234"))
    opt = torch.optim.Adam(model.parameters())
    src, lens, tgt_in, tgt_out = _batch(seed=5)
    model.train()
    model.loss(model(src, lens, tgt_in), tgt_out).backward()
    opt.step()
    model.eval()
    path = str(tmp_path / "ck.pt")
    save_checkpoint(path, model, sv, tv, "char", opt, step=3, extra={"history": [{"a": 1.0}]})
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["step"] == 3 and raw["src_vocab"] == sv.itos and raw["config"]["cell"] == "lstm"
    ck = load_checkpoint(path)
    model2, sv2, tv2, mode = model_from_checkpoint(ck, backend="torch")
    assert (sv2, tv2, mode) == (sv, tv, "char")
    torch.testing.assert_close(model2(src, lens, tgt_in), model(src, lens, tgt_in),
                               rtol=0, atol=0)
    assert torch.equal(model2.beam_search(src, lens, beam=3), model.beam_search(src, lens, beam=3))
    opt2 = torch.optim.Adam(model2.parameters())
    opt2.load_state_dict(ck["optimizer"])
    bogus = str(tmp_path / "bogus.pt")
    torch.save({"x": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError):
        load_checkpoint(bogus)


# --------------------------------------------------------------------------
# The Triton kernels (interpreter, subprocess)
# --------------------------------------------------------------------------

OVERFIT_SCRIPT = textwrap.dedent("""
    import copy, sys, torch
    torch.set_num_threads(1)  # tiny ops: extra threads only contend on a busy machine
    backend = sys.argv[1]
    if backend == "triton":
        import triton_rnn.autograd  # noqa: F401  -- must exist: an ImportError fails the test
    from triton_rnn import functional as Fn
    from triton_rnn.models.seq2seq import Seq2Seq, default_config
    from triton_rnn.models.training import collate

    torch.manual_seed(0)
    model = Seq2Seq(default_config(10, 9, emb=8, hidden=8, dropout=0.0, backend=backend))
    twin = copy.deepcopy(model)
    twin.set_backend("torch")
    if len(sys.argv) > 2:  # local check of the module path on the PyTorch reference loop
        model.encoder.rnn._sequence_backend = model.decoder.rnn._sequence_backend = sys.argv[2]
    for rnn in (model.encoder.rnn, model.decoder.rnn):
        assert Fn.resolve_backend(rnn.backend, torch.device("cpu")) == backend
    pairs = [([4, 5, 6, 7], [4, 5, 6]), ([9, 8, 7], [7, 8, 4]), ([5, 6], [6, 5])]
    src, lens, tgt_in, tgt_out = collate(pairs)

    def fit(m, steps=20):
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        losses = []
        for _ in range(steps):
            loss = m.loss(m(src, lens, tgt_in), tgt_out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    losses, ref = fit(model), fit(twin)
    print("losses", losses[::4], losses[-1], "torch", ref[-1])
    assert losses[-1] < 0.05, losses
    # Same trajectory as torch.nn's recurrence from the same initial weights.
    for a, b in zip(losses, ref):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (losses, ref)
    model.eval()
    assert model.translate_ids(src, lens, max_len=6) == [t for _, t in pairs]
    print("OK")
""")



def _run_overfit(*args):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("TRITON_RNN_BACKEND", None)
    return subprocess.run([sys.executable, "-c", OVERFIT_SCRIPT, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_tiny_model_overfits_with_triton_kernels_under_interpreter():
    """Train with backend="triton" under TRITON_INTERPRET=1 (in a subprocess, since the
    variable must be set before triton is imported): the loss must reach near zero in
    20 Adam steps, follow torch.nn's trajectory, and greedy decoding must reproduce
    the targets. (The interpreter runs about one training step per second here, so
    the problem is kept this small.) A missing or broken kernel import fails."""
    proc = _run_overfit("triton")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
