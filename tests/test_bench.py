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
    assert numbers["pil_uint8_samples_per_s"] > 0 and "PIL, bilinear, uint8 out" in out
    assert numbers["ratio_like_for_like"] == pytest.approx(
        numbers["mmscale_samples_per_s"] / numbers["pil_uint8_samples_per_s"], rel=0.01)


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


def test_loader_benchmark_runs_what_small_data_allows_and_says_why_it_skips_the_rest(tmp_path):
    """50 good and 7 corrupt samples (under one batch of 64 for the training loader, which drops an incomplete
    last batch) in 2 shards: the PIL rows run, each mmscale row is skipped with its reason, none crashes."""
    from corpus import image_bytes, write_tar

    for shard, indexes in enumerate((range(0, 30), range(30, 57))):
        members = []
        for index in indexes:
            jpeg = image_bytes((64, 48), seed=index)
            members += [(f"{index:04d}.jpg", b"not a jpeg" if index % 8 == 7 else jpeg),
                        (f"{index:04d}.txt", f"caption number {index}".encode())]
        write_tar(tmp_path / f"shard-{shard:06d}.tar", members)
    out = bench("loader.py", "--data", f"{tmp_path}/shard-{{000000..000001}}.tar", "--repeats", "1", "--workers",
                "1,4")
    numbers = json.loads(out.strip().splitlines()[-1])
    assert numbers["pil_samples_per_s"] > 0 and numbers["mmscale_samples_per_s"] is None
    assert numbers["pil_uint8_samples_per_s"] > 0
    skipped = [line for line in out.splitlines() if line.startswith("mmscale loader")]
    assert len(skipped) == 3 and all("skipped: the data holds fewer good samples than one batch of 64" in line
                                     for line in skipped), out


def test_elastic_resume_check_counts_the_keys_of_a_run_killed_on_two_ranks_and_resumed_on_one():
    """The script's smallest case (600 samples in 3 shards, 9 steps of 64, killed after step 8, resumed on 1 rank):
    its table and verdict come from the runs' sample_keys, and the resumed run trained each key once."""
    out = bench("elastic_resume.py", "--samples", "600", "--budget", "576", "--cases", "2:1", "--kill", "after")
    verdict = json.loads(out.strip().splitlines()[-1])
    [row] = verdict["rows"]
    assert verdict["exact"] and (row["trained"], row["distinct"], row["repeated"], row["later_epochs"]) == (576, 576, 0, 0)
    assert "2 -> 1" in out and "shards of [200, 200, 200]" in out


def test_train_throughput_benchmark_runs_every_stage_patch_dropout_and_plain_pytorch():
    """The GPU benchmark's variants at tiny size on CPU (compile is left to the GPU run: minutes on CPU)."""
    out = bench("train_throughput.py", "--preset", "tiny", "--batch", "8", "--steps", "2", "--warmup", "1",
                "--variants", "plain,zero1,zero2,zero3,zero2+pd0.5", "--peak-tflops", "989")
    results = json.loads(out.strip().splitlines()[-1])["variants"]
    assert set(results) == {"plain", "zero1", "zero2", "zero3", "zero2+pd0.5"}
    assert all(row["samples_per_s"] > 0 for row in results.values())
    assert results["zero2+pd0.5"]["gflop_per_sample"] < results["zero2"]["gflop_per_sample"]  # half the patches


def test_finetune_memory_benchmark_measures_lora_and_full():
    out = bench("finetune_memory.py", "--preset", "tiny", "--batch", "2", "--steps", "1", "--modes", "full", "lora",
                "qlora-nf4")  # (QLoRA int8 is tests/test_qlora.py's)
    assert "| lora |" in out and "| full |" in out and "| qlora-nf4 |" in out
    out = bench("finetune_memory.py", "--architecture", "siglip", "--preset", "tiny", "--batch", "2", "--steps", "1",
                "--modes", "lora")
    peaks = json.loads(out.strip().splitlines()[-1])
    assert set(peaks) == {"lora"} and peaks["lora"] > 0 and "siglip tiny" in out


def test_final_save_benchmark_compares_both_methods_and_finds_the_same_weights():
    """tools/bench/final_save.py at tiny size: both methods run in their own DeepSpeed jobs (2 ranks) and the
    script itself stops if their weights differ in any bit."""
    out = bench("final_save.py", "--preset", "tiny", "--batch", "2")
    report = json.loads(out.strip().splitlines()[-1])
    assert report["identical_weights"] and report["parameters"] > 0
    for method in ("before", "after"):
        assert report[method]["seconds"] > 0 and len(report[method]["peak_mib_per_rank"]) == 2


def test_eval_scaling_benchmark_times_both_methods_on_one_and_two_ranks():
    """tools/bench/eval_scaling.py at toy size; the script itself stops if any run's metrics differ."""
    out = bench("eval_scaling.py", "--pairs", "600", "--dim", "32")
    runs = json.loads(out.strip().splitlines()[-1])["runs"]
    assert [(run["ranks"], run["method"]) for run in runs] == [(1, "before"), (1, "after"), (2, "before"), (2, "after")]
    assert all(run["seconds"] > 0 for run in runs) and "identical metrics" in out


def test_learning_benchmark_trains_mmscale_on_rendered_characters_end_to_end():
    """Only that the mmscale half of tools/bench/learning.py runs end to end at toy size and reports its figures
    (open_clip's half needs open-clip-torch installed into its own folder from PyPI, which the full benchmark
    does). Four steps on 128 samples learn nothing worth checking: learning itself is checked by
    test_train.py's ZeRO-3 learning test and the trained_tiny fixture's users."""
    out = bench("learning.py", "--corpus", "digits", "--train-samples", "128", "--test-samples", "40",
                "--per-shard", "64", "--epochs", "1", "--batch", "32", "--warmup", "1", "--skip-open-clip", "--skip-zero3")
    numbers = json.loads(out.strip().splitlines()[-1])
    assert {"mmscale_top1", "mmscale_seconds"} <= set(numbers) and numbers["mmscale_seconds"] > 0
    assert "contrastive loss (mmscale, seed 0): 4: " in out
    assert numbers["mmscale_fusion_seconds"] > 0 and 0 <= numbers["mmscale_fusion_mlm_accuracy"] <= 1


def test_itm_negatives_benchmark_trains_the_global_mode_through_the_launcher_and_scores_it():
    """tools/bench/itm_negatives.py at toy size: the global ITM negatives run (image tokens gathered with gradient
    across the 2 ranks; the micro-batch runs differ only in their overrides) trains through the DeepSpeed launcher
    and is scored (by label too, and conditioned MLM on the class names); four steps learn nothing, so only the
    figures' presence and range are checked, and that matching by label never finds less."""
    out = bench("itm_negatives.py", "--train-samples", "128", "--test-samples", "64", "--per-shard", "64",
                "--steps", "4", "--batch", "32", "--rerank", "4", "--label-groups", "--modes", "global")
    numbers = json.loads(out.strip().splitlines()[-1])
    assert set(numbers) == {"global"}  # the other modes differ only in their overrides (~40 s each here)
    for row in numbers.values():
        assert row["seconds"] > 0 and row["itm_loss"] > 0 and 0 <= row["itm_accuracy"] <= 1
        assert 0 <= row["rerank_i2t_r1"] <= 1 and 0 <= row["i2t_r1"] <= 1
        assert 0 <= row["mlm_accuracy"] <= 1 and 0 <= row["mlm_accuracy_without_image"] <= 1
        assert all(row[f"label_{name}"] >= row[name] for name in ("i2t_r1", "t2i_r1", "rerank_i2t_r1",
                                                                   "rerank_t2i_r1"))
    assert "| global |" in out



def test_vqa_benchmark_pretrains_fine_tunes_and_scores_float_and_int8():
    """tools/bench/vqa.py at toy size on shapes: pretraining through the launcher, VQA fine-tuning of the saved
    model, held-out scores per question type beside the question-only prior, and the int8 export's accuracy; a few
    steps learn little, so only the figures' presence and range are checked."""
    out = bench("vqa.py", "--corpora", "shapes", "--caption-samples", "256", "--pretrain-steps", "4", "--vqa-images",
                "64", "--test-images", "32", "--vqa-steps", "4")
    row = json.loads(out.strip().splitlines()[-1])["shapes"]
    assert row["questions"] == 96 and 0 <= row["accuracy"] <= 1 and 0 < row["question_only_prior"] <= 0.4
    assert {"accuracy_colour", "accuracy_shape", "accuracy_background"} <= set(row)
    assert 0 <= row["int8_accuracy"] <= 1 and row["pretrain_seconds"] > 0 and row["finetune_seconds"] > 0
    assert "| shapes |" in out

def test_sharding_benchmark_downloads_from_its_loopback_server():
    """The make_shards half of tools/bench/sharding.py at toy size (img2dataset needs its own virtual
    environment from PyPI, which the full benchmark makes)."""
    out = bench("sharding.py", "--images", "24", "--repeats", "1", "--skip-img2dataset")
    numbers = json.loads(out.strip().splitlines()[-1])
    assert numbers["mmscale_images_per_s"] > 0 and numbers["mmscale_2_processes_images_per_s"] > 0
    assert out.count("     24 ") == 3  # every run wrote all 24 images


def test_gpu_check_runs_its_cpu_half_and_writes_one_json_file(tmp_path):
    """tools/gpu_check.sh without CUDA: the gpu tests are collected and skip, the throughput benchmark
    runs tiny, and the results land in one JSON file."""
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=os.environ | {"PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads(out.read_text())
    assert summary["pytest"]["tests"] >= 4 and summary["pytest"]["skipped"] == summary["pytest"]["tests"]
    assert summary["throughput"]["variants"]["zero3"]["samples_per_s"] > 0
