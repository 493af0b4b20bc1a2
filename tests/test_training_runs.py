"""Training runs of the reference seq2seq model: exact resume (one process and two-rank
DDP), per-rank dropout RNG, the logged loss under DDP, the schedule on resume, rank-0
failures, and the ``triton-rnn train`` user errors (one line, exit status 2).

The DDP tests share one ``torch.multiprocessing`` launch of two gloo ranks on the CPU
(:func:`ddp_runs`), which runs every scenario and records what the tests check.
"""

from __future__ import annotations

import datetime
import os
import random
import re
import shutil
import time

import pytest
import torch

import triton_rnn.models.training as T
from triton_rnn.cli import main

TINY_OPTS = dict(train_size=96, val_size=8, test_size=8, batch_size=16, hidden=16, emb=8,
                 threads=1, progress=False, samples=0, backend="torch", device="cpu")
TINY = ["--train-size", "96", "--val-size", "8", "--test-size", "8", "--batch-size", "16",
        "--hidden", "16", "--emb", "8", "--no-progress", "--threads", "1", "--samples", "0",
        "--backend", "torch", "--device", "cpu"]
#: The two-rank runs: 6 steps of a global batch of 16, validation (and last.pt) every 3.
DDP_OPTS = dict(TINY_OPTS, steps=6, eval_every=3, dropout=0.3, seed=3)

pytestmark = pytest.mark.usefixtures("one_thread")


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


# --------------------------------------------------------------------------
# Two gloo ranks (torch.multiprocessing), one launch for every DDP scenario
# --------------------------------------------------------------------------


def _ddp_worker(rank: int, root: str) -> None:
    """Rank ``rank`` of 2: runs the scenarios, writes what it saw to ``root/rank{rank}.pt``."""
    import torch.distributed as dist
    from torch import nn

    from triton_rnn.models.seq2seq import Seq2Seq

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    res: dict = {"errors": {}, "group_kept": []}
    stores = [0]

    def group():
        # The caller owns the process group; train() must leave it alone. If it does
        # not, make a new one so that the later scenarios still run.
        if not dist.is_initialized():
            stores[0] += 1
            dist.init_process_group("gloo", init_method=f"file://{root}/store{stores[0]}",
                                    rank=rank, world_size=2,
                                    timeout=datetime.timedelta(seconds=30))

    def run(name, **kw):
        group()
        try:
            T.train(dict(DDP_OPTS, out=os.path.join(root, name), **kw))
        except Exception as e:  # recorded; the tests say what went wrong
            res["errors"][name] = f"{type(e).__name__}: {e}"
        res["group_kept"].append(dist.is_initialized())

    # A: 6 steps straight. Record the dropout RNG state at the first dropout call,
    # every training loss (sum, target tokens), and keep last.pt as of step 3.
    first_rng, losses = [], []
    orig_dropout, orig_loss, orig_save = nn.Dropout.forward, Seq2Seq.loss, T.save_checkpoint

    def dropout(self, x):
        if self.training and self.p > 0 and not first_rng:
            first_rng.append(torch.get_rng_state().clone())
        return orig_dropout(self, x)

    def loss(self, logits, tgt_out, label_smoothing=0.0, reduction="mean"):
        out = orig_loss(self, logits, tgt_out, label_smoothing, reduction)
        if self.training:
            losses.append((float(out.detach()), int((tgt_out != self.pad_id).sum())))
        return out

    def save(path, model, *a, **k):
        orig_save(path, model, *a, **k)
        step = a[4] if len(a) > 4 else k.get("step")
        if os.path.basename(path) == "last.pt" and step == 3 and "A" in path:
            shutil.copy(path, os.path.join(root, "step3.pt"))

    nn.Dropout.forward, Seq2Seq.loss, T.save_checkpoint = dropout, loss, save
    try:
        run("A")
    finally:
        nn.Dropout.forward, Seq2Seq.loss, T.save_checkpoint = orig_dropout, orig_loss, orig_save
    res["first_rng"] = first_rng[0] if first_rng else None
    group()
    every = [None, None]
    dist.all_gather_object(every, losses)
    res["losses"] = every

    # B: resume A's step-3 checkpoint and run to step 6.
    if rank == 0:
        os.makedirs(os.path.join(root, "B"), exist_ok=True)
        shutil.copy(os.path.join(root, "step3.pt"), os.path.join(root, "B", "last.pt"))
    group()
    dist.barrier()
    run("B", resume="auto")

    # C: rank 0 fails in validation; rank 1 must not wait for it until the timeout.
    group()
    orig_eval = T.evaluate

    def failing(*a, **k):
        raise RuntimeError("validation exploded")

    if rank == 0:
        T.evaluate = failing
    t0 = time.perf_counter()
    try:
        run("C", steps=2, eval_every=1)
    finally:
        T.evaluate = orig_eval
    res["fail_seconds"] = time.perf_counter() - t0
    torch.save(res, os.path.join(root, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    import torch.multiprocessing as mp

    root = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_ddp_worker, args=(root,), nprocs=2, join=True)
    return root, [torch.load(os.path.join(root, f"rank{r}.pt"), weights_only=False)
                  for r in range(2)]


def test_ddp_resume_is_exact(ddp_runs):
    """3 steps + resume + 3 steps under DDP with dropout = 6 steps straight, bit for bit."""
    root, res = ddp_runs
    for r in res:
        assert "A" not in r["errors"] and "B" not in r["errors"], r["errors"]
    a = torch.load(os.path.join(root, "A", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(root, "B", "last.pt"), weights_only=True)
    assert a["step"] == b["step"] == 6
    assert _max_diff(a["model"], b["model"]) == 0.0
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_ddp_ranks_draw_different_dropout_masks(ddp_runs):
    _, res = ddp_runs
    s0, s1 = res[0]["first_rng"], res[1]["first_rng"]
    assert s0 is not None and s1 is not None
    assert not torch.equal(s0, s1), "both ranks start training with the same RNG state"


def test_ddp_logged_loss_is_the_global_mean(ddp_runs):
    """history[i]["loss"] (also the progress bar and the "step N: loss" line) is the mean
    over the global batch's target tokens, not rank 0's share."""
    root, res = ddp_runs
    per_rank = res[0]["losses"]
    assert len(per_rank[0]) == len(per_rank[1]) == 6
    hist = torch.load(os.path.join(root, "A", "last.pt"), weights_only=True)["history"]
    assert [h["step"] for h in hist] == [3, 6]
    for h in hist:
        (s0, n0), (s1, n1) = per_rank[0][h["step"] - 1], per_rank[1][h["step"] - 1]
        assert h["loss"] == pytest.approx((s0 + s1) / (n0 + n1), rel=1e-6)
        assert h["loss"] != pytest.approx(s0 / n0, rel=1e-6)  # rank 0 alone differs


def test_train_keeps_a_process_group_it_did_not_create(ddp_runs):
    _, res = ddp_runs
    for r in res:
        assert r["group_kept"] == [True, True, True]


def test_rank0_failure_in_validation_does_not_leave_other_ranks_waiting(ddp_runs):
    _, res = ddp_runs
    assert "validation exploded" in res[0]["errors"]["C"]
    err1 = res[1]["errors"].get("C", "")
    assert "rank 0" in err1, err1
    # The group's timeout is 30 s; the other rank must hear of the failure at once.
    assert res[1]["fail_seconds"] < 15, res[1]["fail_seconds"]


def test_resume_with_another_world_size_warns_and_reseeds(ddp_runs, tmp_path):
    """A two-rank checkpoint resumed by one process: a warning, then a deterministic reseed."""
    root, _ = ddp_runs
    outs = []
    for name in ("x", "y"):
        out = tmp_path / name
        out.mkdir()
        shutil.copy(os.path.join(root, "step3.pt"), out / "last.pt")
        with pytest.warns(RuntimeWarning, match="2 processes"):
            T.train(dict(DDP_OPTS, out=str(out), resume="auto"))
        outs.append(torch.load(out / "last.pt", weights_only=True))
    assert outs[0]["step"] == outs[1]["step"] == 6
    assert _max_diff(outs[0]["model"], outs[1]["model"]) == 0.0


# --------------------------------------------------------------------------
# One process: resume keeps the checkpoint's schedule
# --------------------------------------------------------------------------

#: A schedule that differs from the defaults in every option.
SCHEDULE = dict(steps=6, eval_every=3, lr=0.01, warmup=2, clip=0.5, label_smoothing=0.2,
                weight_decay=0.01, dropout=0.3, seed=1)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """6 steps straight in one process; ``step3.pt`` is its last.pt as of step 3."""
    root = tmp_path_factory.mktemp("one")
    orig_save = T.save_checkpoint

    def save(path, model, *a, **k):
        orig_save(path, model, *a, **k)
        step = a[4] if len(a) > 4 else k.get("step")
        if os.path.basename(path) == "last.pt" and step == 3:
            shutil.copy(path, root / "step3.pt")

    T.save_checkpoint = save
    before = torch.get_num_threads()
    try:
        T.train(dict(TINY_OPTS, **SCHEDULE, out=str(root / "A")))
    finally:
        T.save_checkpoint = orig_save
        torch.set_num_threads(before)
    return root


def _resume_argv(out, ckpt=None):
    return ["train", "--resume", *([str(ckpt)] if ckpt else []), "--out", str(out), "--no-progress", "--threads", "1",
            "--samples", "0", "--backend", "torch", "--device", "cpu"]


def test_plain_resume_keeps_the_checkpoint_schedule(single_run, tmp_path, capsys):
    """``--resume`` alone after a run with a non-default schedule finishes that run
    exactly: same steps, learning rate, warm-up, clipping, smoothing, weight decay."""
    out = tmp_path / "B"
    out.mkdir()
    shutil.copy(single_run / "step3.pt", out / "last.pt")
    assert main(_resume_argv(out)) == 0
    text = capsys.readouterr().out
    assert "resuming from" in text and "6 steps of batch 16" in text, text
    assert "overrid" not in text
    a = torch.load(single_run / "A" / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert b["step"] == 6
    assert _max_diff(a["model"], b["model"]) == 0.0
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert b["optimizer"]["param_groups"][0]["weight_decay"] == 0.01


def test_explicit_schedule_options_override_the_checkpoint_on_resume(single_run, tmp_path,
                                                                      capsys):
    out = tmp_path / "B"
    out.mkdir()
    shutil.copy(single_run / "step3.pt", out / "last.pt")
    assert main([*_resume_argv(out), "--steps", "4", "--lr", "0.005", "--weight-decay", "0",
                 "--batch-size", "16"]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if "overrid" in ln)
    for key in ("steps", "lr", "weight_decay"):
        assert re.search(rf"\b{key}\b", line), line
    for key in ("batch_size", "warmup", "clip", "label_smoothing"):  # as in the checkpoint
        assert key not in line, line
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["step"] == 4
    assert ck["options"]["lr"] == 0.005 and ck["options"]["warmup"] == 2
    assert ck["options"]["label_smoothing"] == 0.2 and ck["options"]["clip"] == 0.5
    assert ck["options"]["weight_decay"] == 0.0
    assert ck["optimizer"]["param_groups"][0]["weight_decay"] == 0.0


# --------------------------------------------------------------------------
# ``triton-rnn train`` user errors: one line, exit status 2
# --------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this creates a file: a checkpoint that would run code if loaded unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_checkpoint(kind: str, good, tmp_path):
    path = tmp_path / f"{kind}.pt"
    if kind == "missing":
        return path
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:3000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(2000))
    elif kind == "directory":
        path.mkdir()
    elif kind == "runs-code":
        torch.save({"format": T.CHECKPOINT_FORMAT, "x": _RunsCode(str(tmp_path / "PWNED"))},
                   path)
    else:
        ck = torch.load(good, weights_only=True)
        if kind == "config-mismatch":
            ck["config"] = dict(ck["config"], hidden=32)
        elif kind == "no-config":
            del ck["config"]
        elif kind == "not-a-checkpoint":
            ck = {"weights": torch.zeros(3)}
        torch.save(ck, path)
    return path


@pytest.mark.parametrize("kind", ["missing", "truncated", "empty", "random", "directory",
                                  "runs-code", "config-mismatch", "no-config",
                                  "not-a-checkpoint"])
def test_bad_resume_checkpoint_is_a_one_line_error(kind, single_run, tmp_path, capsys):
    bad = _bad_checkpoint(kind, single_run / "A" / "best.pt", tmp_path)
    capsys.readouterr()
    assert main(_resume_argv(tmp_path / "o", bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("triton-rnn train: error: "), err
    assert str(bad) in err[0]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "nonsense"])
def test_unavailable_device_is_a_one_line_error(device, tmp_path, capsys):
    argv = [a if a != "cpu" else device for a in TINY]
    assert main(["train", *argv, "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("triton-rnn train: error: "), err
    assert device in err[0]


def test_empty_test_set_skips_the_test_scores(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", *TINY, "--test-size", "0", "--steps", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 test pairs" in text and "no test set" in text, text
    assert "exact match" not in text
    assert (out / "last.pt").exists() and (out / "attention.png").exists()
    res = T.train(dict(TINY_OPTS, test_size=0, steps=1, out=str(tmp_path / "p")))
    assert res["steps"] == 1 and res["exact"] is None and res["bleu"] is None


def test_beam_larger_than_the_vocabulary_fails_before_training(tmp_path, capsys):
    data = tmp_path / "pairs.tsv"
    words = ["one", "two", "three", "four", "five", "six"]
    data.write_text("".join(f"{a} {b}\t{b} {a}\n" for a in words for b in words),
                    encoding="utf-8")
    out = tmp_path / "o"
    assert main(["train", "--data", str(data), "--tokenize", "word", "--val-size", "3",
                 "--test-size", "3", "--batch-size", "10", "--steps", "3", "--hidden", "16",
                 "--emb", "8", "--threads", "1", "--no-progress", "--beam", "9",
                 "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "beam 9 (--beam)" in err[0] and "at most 8" in err[0], err
    assert "steps of batch" not in captured.out  # stopped before the model was built
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-1"], ["--epochs", "0"],
                                  ["--epochs", "-2"]])
def test_non_positive_steps_or_epochs_are_rejected(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, *argv, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and argv[0] in err[0] and "must be >= 1" in err[0], err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=argv[0][2:]):
        T.train(dict(TINY_OPTS, out=str(tmp_path / "p"), **{argv[0][2:]: int(argv[1])}))
