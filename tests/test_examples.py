"""Smoke tests: each script in ``examples/`` runs end to end at a tiny size on the CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMON = ["--epochs", "1", "--embed", "8", "--hidden", "8", "--batch-size", "16",
          "--backend", "auto", "--device", "cpu", "--seed", "1"]

CASES = {
    "sentiment.py": (COMMON + ["--train-size", "96", "--test-size", "32", "--layers", "1"],
                     ("lstm_acc", "bow_acc")),
    "tagging.py": (COMMON + ["--train-size", "64", "--test-size", "32"],
                   ("gru_acc", "baseline_acc")),
    "generate.py": (["--steps", "3", "--embed", "8", "--hidden", "16", "--seq-len", "16",
                     "--batch-size", "4", "--max-chars", "3000", "--sample-len", "20",
                     "--temperature", "0.7", "--backend", "auto", "--device", "cpu"],
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


def test_example_docstrings_say_what_they_show():
    for script in CASES:
        source = (EXAMPLES / script).read_text()
        assert source.startswith('"""'), script
        assert "triton_rnn." in source.split('"""')[1], script
