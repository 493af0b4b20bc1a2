"""Smoke tests: each script in ``examples/`` runs end to end at a tiny size on the CPU."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMON = ["--epochs", "1", "--embed", "8", "--hidden", "8", "--batch-size", "16",
          "--backend", "auto", "--device", "cpu", "--seed", "1"]

CASES = {
    "sentiment.py": (COMMON + ["--train-size", "96", "--test-size", "32", "--layers", "1"],
                     ("lstm_acc", "bow_acc")),
    "tagging.py": (COMMON + ["--train-size", "64", "--test-size", "32"],
                   ("gru_acc", "baseline_acc")),
    # --max-chars 120 leaves 13 validation characters (fewer than the 16 scoring streams),
    # and "\u00fc" is not in the (ASCII) text: the prime is used without it, with a warning.
    "generate.py": (["--steps", "3", "--embed", "8", "--hidden", "16", "--seq-len", "16",
                     "--batch-size", "4", "--max-chars", "120", "--sample-len", "20",
                     "--prime", "the \u00fc", "--temperature", "0.7", "--backend", "auto",
                     "--device", "cpu"],
                    ("val_bpc", "unigram_bpc")),
}


@pytest.fixture(scope="module")
def runs():
    """Start all three tiny runs at once (most of each is importing torch), then collect them."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_RNN_BACKEND", None)
    procs = {script: subprocess.Popen([sys.executable, str(EXAMPLES / script), *args],
                                      cwd=EXAMPLES.parent, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for script, (args, _) in CASES.items()}
    results = {}
    try:
        for script, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=55)
            results[script] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_tiny(runs, script):
    keys = CASES[script][1]
    returncode, stdout, stderr = runs[script]
    assert returncode == 0, stderr[-3000:]
    final = [line for line in stdout.splitlines() if line.startswith("final: ")]
    assert len(final) == 1, stdout
    values = dict(kv.split("=") for kv in final[0][len("final: "):].split())
    assert set(values) == set(keys)
    for key in keys:
        assert re.fullmatch(r"\d+\.\d{4}", values[key]), final[0]
        value = float(values[key])
        if key.endswith("acc"):
            assert 0.0 <= value <= 1.0
        else:
            assert 0.0 < value < 10.0  # bits per character; log2 of ~100 symbols is 6.6
    assert "100%" in stderr  # tqdm finished its bar
    if script == "generate.py":
        warning = [line for line in stderr.splitlines() if "--prime" in line]
        assert len(warning) == 1 and "'\u00fc'" in warning[0], stderr[-3000:]


def test_example_docstrings_say_what_they_show():
    for script in CASES:
        source = (EXAMPLES / script).read_text()
        assert source.startswith('"""'), script
        assert "triton_rnn." in source.split('"""')[1], script


def _example(name: str):
    """Import ``examples/<name>.py`` as a module (its ``main`` does not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, sizes", [("sentiment", (6000, 2000)), ("tagging", (4000, 1000))])
def test_example_test_sets_are_disjoint_from_training(name, sizes):
    """The default splits, drawn independently, shared 440 and 50 texts; none now."""
    train, test = _example(name).make_splits(*sizes, seed=0)
    assert (len(train), len(test)) == sizes
    assert not {tuple(w) for w, _ in train} & {tuple(w) for w, _ in test}


def test_tagging_tags_do_not_depend_on_the_batch_padding(one_thread):
    tagging = _example("tagging")
    torch.manual_seed(0)
    model = tagging.GRUTagger(12, 7, embed=8, hidden=8, layers=1, backend="auto").eval()
    short, long = [4, 5, 6], [4, 5, 6, 7, 8, 9, 10, 11]
    with torch.no_grad():
        alone = model(torch.tensor([short]))
        batch = model(torch.tensor([short + [0] * (len(long) - len(short)), long]))
    assert batch.shape == (2, len(long), 7)
    torch.testing.assert_close(batch[0, :len(short)], alone[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(batch[1], model(torch.tensor([long]))[0], rtol=0, atol=1e-6)
