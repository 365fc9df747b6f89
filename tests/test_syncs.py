"""The training step makes the host wait for the device at most once (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
WARMUP_STEPS = 2
"""ZeRO-3 records its module order in the first steps, agreeing on it across ranks (a few broadcasts
read back to the host); from the third step on it replays the trace."""


@pytest.mark.slow
@pytest.mark.parametrize("stage,kind", [("zero3", "dual"), ("zero2", "dual"), ("zero3", "fusion")])
def test_a_training_step_syncs_the_host_at_most_once(tmp_path, stage, kind):
    """Also with a fusion model (issue 27): its hard negatives are drawn on the device (Gumbel-max) and its ITM
    loss divides by a count that stays there."""
    result = subprocess.run(
        [sys.executable, str(HERE / "synccount.py"), "--work", str(tmp_path), "--steps", "6",
         "--deepspeed", f"configs/deepspeed/{stage}.json", *(["--fusion"] if kind == "fusion" else [])],
        cwd=HERE.parent, capture_output=True, text=True, timeout=600,
        env=os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    steps = counts["steps"][WARMUP_STEPS:]
    assert len(steps) == 4 and counts["log_steps"] == [3, 6]
    for step in steps:
        # The one read: whether the loss is finite on every rank, before its gradients are reduced.
        assert sum(step.values()) <= 1, counts
        assert step.get("item", 0) == 1, counts  # the counter does see it: the harness is live
    assert all(sum(log.values()) >= 1 for log in counts["log"])  # log steps read values, as they may


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dual", "fusion"])
def test_gradcache_keeps_zero3s_module_trace(tmp_path, kind):
    """GradCache's feature pass and gradient pass run the modules in one order (the feature pass a prefix of the
    gradient pass), so ZeRO-3 keeps its recorded trace and prefetches from it: once recorded, never invalidated
    (issue 26 item 9; before, both passes invalidated it every step)."""
    result = subprocess.run(
        [sys.executable, str(HERE / "synccount.py"), "--work", str(tmp_path), "--steps", "6", "--micro-batch", "8",
         "--deepspeed", "configs/deepspeed/zero3.json", *(["--fusion"] if kind == "fusion" else [])],
        cwd=HERE.parent, capture_output=True, text=True, timeout=600,
        env=os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    invalidations = json.loads(result.stdout.strip().splitlines()[-1])["trace_invalidations"]
    assert len(invalidations) == 6 and invalidations[WARMUP_STEPS:] == [0] * 4, invalidations
