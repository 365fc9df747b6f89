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


def test_loader_benchmark_passes_over_a_truncated_jpeg_in_its_baselines(tmp_path):
    """A real shard with a cut-off JPEG: every pipeline of the benchmark skips it instead of crashing."""
    from corpus import image_bytes, write_tar

    members = []
    for index in range(160):  # two full batches of 64 after the skip
        jpeg = image_bytes((96, 80), seed=index)
        members += [(f"{index:04d}.jpg", jpeg[: len(jpeg) // 2] if index == 7 else jpeg),
                    (f"{index:04d}.txt", f"caption number {index}".encode())]
    shard = write_tar(tmp_path / "shard-000000.tar", members)
    out = bench("loader.py", "--data", str(shard), "--repeats", "1", "--workers", "1")
    numbers = json.loads(out.strip().splitlines()[-1])
    assert numbers["mmscale_samples_per_s"] > 0 and numbers["pil_samples_per_s"] > 0


def test_train_throughput_benchmark_runs_zero3_and_plain_pytorch():
    out = bench("train_throughput.py", "--preset", "tiny", "--batch", "8", "--steps", "2", "--warmup", "1",
                "--peak-tflops", "989")
    assert "plain PyTorch" in out and "ZeRO-3" in out


def test_finetune_memory_benchmark_measures_lora_and_full():
    out = bench("finetune_memory.py", "--preset", "tiny", "--batch", "2", "--steps", "1")
    assert "| lora |" in out and "| full |" in out


def test_learning_benchmark_trains_mmscale_on_rendered_characters_end_to_end():
    """The mmscale half of tools/bench/learning.py at toy size (open_clip's half needs open-clip-torch
    installed into its own folder from PyPI, which the full benchmark does)."""
    out = bench("learning.py", "--corpus", "digits", "--train-samples", "128", "--test-samples", "40",
                "--per-shard", "64", "--epochs", "1", "--batch", "32", "--warmup", "1", "--skip-open-clip")
    numbers = json.loads(out.strip().splitlines()[-1])
    assert 0.0 <= numbers["mmscale_top1"] <= 1.0 and numbers["mmscale_seconds"] > 0
    assert "contrastive loss (mmscale): 4: " in out
