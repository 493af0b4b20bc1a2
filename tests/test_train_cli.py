"""Smoke tests of ``triton-rnn train`` / ``translate``, resuming, and two-process DDP (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from triton_rnn.cli import main
from triton_rnn.models.data import Vocab
from triton_rnn.models.seq2seq import Seq2Seq, default_config
from triton_rnn.models.training import save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--train-size", "96", "--val-size", "8", "--test-size", "8", "--batch-size", "16",
        "--hidden", "16", "--emb", "8", "--no-progress", "--threads", "1"]


def _env():
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("TRITON_RNN_BACKEND", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
        env.pop(k, None)
    return env


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_then_translate_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "triton_rnn.cli", "train", *TINY, "--steps", "6",
         "--eval-every", "3", "--out", str(out)],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for want in ("exact match", "token accuracy", "BLEU", "tokens/s", "attention heatmap"):
        assert want in proc.stdout, proc.stdout
    for name in ("best.pt", "last.pt", "attention.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "attention.png").read_bytes()[:4] == b"\x89PNG"
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["step"] == 6 and len(ck["history"]) == 2 and ck["tokenize"] == "char"

    # translate: arguments, a file, beam search; one line per input line, blank ones included.
    inputs = tmp_path / "in.txt"
    inputs.write_text("March 3, 2021\n\n3 Mar 2021\n  \n03/03/21\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["translate", "--checkpoint", str(out / "best.pt"), "March 3, 2021",
                 "Tuesday, March 3rd 2021"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["translate", "--checkpoint", str(out / "best.pt"), "--file", str(inputs),
                 "--beam", "3", "--show-source"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["March 3, 2021", "", "3 Mar 2021", "  ",
                                                       "03/03/21"]
    assert lines[1] == "\t" and lines[3] == "  \t"  # blank in, empty translation out

    # resume continues from the saved step with the saved data and model.
    assert main(["train", *TINY, "--steps", "8", "--eval-every", "4", "--out", str(out),
                 "--resume", "--hidden", "32"]) == 0
    text = capsys.readouterr().out
    assert "resuming from" in text and "hidden 16" in text
    ck2 = torch.load(out / "last.pt", weights_only=True)
    assert ck2["step"] == 8 and [h["step"] for h in ck2["history"]] == [3, 6, 8]


def test_cli_user_errors(tmp_path, capsys):
    assert main(["translate", "--checkpoint", str(tmp_path / "none.pt"), "x"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("only one field\n", encoding="utf-8")
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "bad.tsv:1" in capsys.readouterr().err
    assert main(["train", "--hidden", "15", "--out", str(tmp_path / "o")]) == 2
    assert "--hidden even" in capsys.readouterr().err


def test_word_level_tsv_training(tmp_path, capsys):
    data = tmp_path / "pairs.tsv"
    words = ["one", "two", "three", "four", "five", "six"]
    rows = [f"{a} {b}\t{b} {a}" for a in words for b in words]
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert main(["train", "--data", str(data), "--tokenize", "word", "--val-size", "3",
                 "--test-size", "3", "--batch-size", "10", "--steps", "3", "--hidden", "16",
                 "--emb", "8", "--threads", "1", "--no-progress", "--out",
                 str(tmp_path / "w")]) == 0
    assert "30 train / 3 val / 3 test" in capsys.readouterr().out
    ck = torch.load(tmp_path / "w" / "best.pt", weights_only=True)
    assert ck["tokenize"] == "word" and "three" in ck["src_vocab"]


def test_two_process_ddp_matches_one_process(tmp_path, capsys):
    """Same global batch split over two gloo ranks (torchrun): the same updates as one process."""
    common = [*TINY, "--steps", "4", "--eval-every", "4", "--dropout", "0", "--seed", "3"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "triton_rnn.cli", "train",
         *common, "--out", str(tmp_path / "ddp")],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout and proc.stdout.count("exact match") == 1
    assert main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    assert "1 process(es)" in capsys.readouterr().out
    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, atol=1e-5, rtol=1e-4, msg=k)


# --------------------------------------------------------------------------
# translate: bad checkpoints, bad numbers, blank lines (a tiny untrained model, no training)
# --------------------------------------------------------------------------


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    sv = Vocab(["<pad>", "<unk>", "<s>", "</s>"] + list("abc "))
    tv = Vocab(["<pad>", "<unk>", "<s>", "</s>"] + list("xyz"))
    model = Seq2Seq(default_config(len(sv), len(tv), emb=4, hidden=8, backend="torch"))
    path = tmp_path / "tiny.pt"
    save_checkpoint(str(path), model, sv, tv, "char")
    return path


def _bad_checkpoints(good, d):
    """name -> path of a broken variant of the checkpoint ``good``."""
    raw = good.read_bytes()
    ck = torch.load(good, weights_only=True)
    out = {"truncated": raw[:len(raw) // 2], "empty": b"", "random": os.urandom(2000)}
    paths = {}
    for name, data in out.items():
        paths[name] = d / f"{name}.pt"
        paths[name].write_bytes(data)
    paths["directory"] = d / "dir.pt"
    paths["directory"].mkdir()
    variants = {
        "mismatch": dict(ck, config=dict(ck["config"], hidden=16)),
        "noconfig": {k: v for k, v in ck.items() if k != "config"},
        "badtokenize": dict(ck, tokenize="bpe"),
        "badvocab": dict(ck, src_vocab=["a", "b"]),
        "shortvocab": dict(ck, tgt_vocab=ck["tgt_vocab"][:-1]),
        "notadict": [1, 2, 3],
    }
    for name, obj in variants.items():
        paths[name] = d / f"{name}.pt"
        torch.save(obj, paths[name])
    return paths


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_translate_bad_checkpoints_are_one_line_errors(tmp_path, tiny_ckpt, capsys):
    paths = _bad_checkpoints(tiny_ckpt, tmp_path)
    _Evil.marker = tmp_path / "PWNED"
    paths["evil"] = tmp_path / "evil.pt"
    torch.save({"format": "triton-rnn-seq2seq/1", "evil": _Evil()}, paths["evil"])
    capsys.readouterr()
    for name, path in paths.items():
        assert main(["translate", "--checkpoint", str(path), "abc"]) == 2, name
        captured = capsys.readouterr()
        err = captured.err.splitlines()
        assert len(err) == 1 and str(path) in err[0], (name, captured.err)
        assert "Traceback" not in captured.err and captured.out == "", name
    assert not _Evil.marker.exists()  # nothing in the file was executed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_translate_device_without_cuda_is_an_error(tiny_ckpt, capsys):
    for device in ("cuda", "cuda:1", "no-such-device"):
        assert main(["translate", "--checkpoint", str(tiny_ckpt), "--device", device, "a"]) == 2
        assert len(capsys.readouterr().err.splitlines()) == 1


def test_translate_triton_backend_on_cpu_without_interpreter(tiny_ckpt, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["translate", "--checkpoint", str(tiny_ckpt), "--backend", "triton",
                 "--device", "cpu", "abc"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--backend triton needs a CUDA" in err[0]


@pytest.mark.parametrize("flag", ["--max-len", "--batch-size", "--beam"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_translate_rejects_non_positive_numbers(tiny_ckpt, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["translate", "--checkpoint", str(tiny_ckpt), flag, value, "abc"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert f"argument {flag}: must be >= 1" in captured.err


def test_translate_keeps_one_output_line_per_input_line(tmp_path, tiny_ckpt, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_bytes("\ufeffabc\n\n \t \nba\n\n".encode("utf-8"))  # BOM, blank lines
    assert main(["translate", "--checkpoint", str(tiny_ckpt), "--file", str(inputs),
                 "--show-source", "--batch-size", "1", "--max-len", "3"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[-1] == "" and len(lines) == 6, lines
    assert [ln.rsplit("\t", 1)[0] for ln in lines[:-1]] == ["abc", "", " \t ", "ba", ""]
    assert [ln.rsplit("\t", 1)[1] for ln in lines[:-1]][1:3] == ["", ""]
    assert main(["translate", "--checkpoint", str(tiny_ckpt), "--file", str(inputs)]) == 0
    assert capsys.readouterr().out.split("\n")[1:3] == ["", ""]
