"""The benchmark scripts the README shows run end to end (tiny sizes; the numbers are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench(script: str, *args: str) -> str:
    env = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench" / script), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_loader_benchmark_compares_with_the_pil_pipeline():
    out = bench("loader.py", "--samples", "192", "--repeats", "1", "--workers", "1")
    numbers = json.loads(out.strip().splitlines()[-1])
    assert numbers["mmscale_samples_per_s"] > 0 and numbers["pil_samples_per_s"] > 0 and "PIL pipeline" in out


def test_train_throughput_benchmark_runs_zero3_and_plain_pytorch():
    out = bench("train_throughput.py", "--preset", "tiny", "--batch", "8", "--steps", "2", "--warmup", "1",
                "--peak-tflops", "989")
    assert "plain PyTorch" in out and "ZeRO-3" in out


def test_finetune_memory_benchmark_measures_lora_and_full():
    out = bench("finetune_memory.py", "--preset", "tiny", "--batch", "2", "--steps", "1")
    assert "| lora |" in out and "| full |" in out
