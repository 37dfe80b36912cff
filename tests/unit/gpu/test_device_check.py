"""The GPU check's logic, run on the CPU: its dry run executes every check and prints one
line each; the token comparison tells rounding-order flips from wrong tokens; a wrong engine
answer fails the run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "gpu"))
import device_check

pytestmark = pytest.mark.timeout(300)

CHECKS = ["engine-greedy-batched", "engine-greedy-preemption", "tower-demo", "tower-internvl2",
          "tower-qwen-vl-chat", "tower-llava-1.6", "tower-megrez-omni",
          "tower-megrez-omni-audio", "throughput-c1", "throughput-c4"]


def test_the_dry_run_prints_a_passing_line_for_every_check(capsys):
    assert device_check.main(["--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    passed = {line.split(":")[0].removeprefix("[PASS] ") for line in lines
              if line.startswith("[PASS]")}
    assert passed == set(CHECKS)
    assert not [line for line in lines if line.startswith("[FAIL]")]
    preemption = next(line for line in lines if "engine-greedy-preemption" in line)
    assert " 0 preemptions" not in preemption


def test_compare_tells_near_ties_from_wrong_tokens():
    logits = [torch.tensor([0.0, 10.0, 9.99, 1.0]), torch.tensor([5.0, 0.0, 0.0, 0.0])]
    assert device_check.compare([1, 0], [1, 0], logits, tie=0.02) == "exact"
    # first divergence where transformers' choice beats the engine's by 0.01 of 10
    assert device_check.compare([1, 0], [2, 3], logits, tie=0.02) == "tie"
    assert device_check.compare([1, 0], [3, 0], logits, tie=0.02) == "wrong"
    assert device_check.compare([1, 0], [1], logits, tie=0.02) == "wrong"  # stopped early


def test_an_engine_that_differs_from_transformers_fails_the_run(monkeypatch, capsys):
    real = device_check.hf_greedy

    def shifted(model, prompt, steps):
        tokens, logits = real(model, prompt, steps)
        rows = []
        for token, row in zip(tokens, logits):
            row = row.clone()
            row[(token + 1) % row.shape[0]] = row.max() + 5  # a decisive, different choice
            rows.append(row)
        return [int(r.argmax()) for r in rows], rows

    monkeypatch.setattr(device_check, "hf_greedy", shifted)
    assert device_check.main(["--device", "cpu", "--only", "greedy"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] engine-greedy-batched" in out and "6 wrong" in out
