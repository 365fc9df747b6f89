"""The GPU path: NCCL training through the launcher in bf16 and fp16, the gather's NCCL backward, a step
that syncs the host only where named, and int8 models on CUDA. Marked `gpu` and skipped without CUDA; tools/gpu_check.sh runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

HERE = Path(__file__).parent
REPO = HERE.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    from mmscale.shards.synthetic import make_synthetic_shards, write_zeroshot_files
    from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece

    root = tmp_path_factory.mktemp("gpu_corpus")
    make_synthetic_shards(root / "train", 512, samples_per_shard=128, seed=0, corpus_name="digits")
    make_synthetic_shards(root / "val", 128, samples_per_shard=128, seed=1, corpus_name="digits")
    train_wordpiece(iter_captions(str(root / "train")), vocab_size=200, output_dir=root / "tokenizer")
    classnames, templates = write_zeroshot_files(root, "digits")
    return {"root": root, "classnames": classnames, "templates": templates}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_one_rank_nccl_training_through_the_launcher_reaches_final_and_evaluates(corpus, tmp_path, precision):
    """ZeRO-3, DeepSpeed's FusedAdam (make_optimizer on CUDA), NCCL + gloo process group; fp16 with dynamic
    loss scaling. Logging, checkpoints and the eval all run collectives on this group."""
    from mmscale.quickstart import local_device_args
    from mmscale.train.engine import free_port

    output = tmp_path / "run"
    command = [sys.executable, "-m", "deepspeed.launcher.runner", *local_device_args(1), "--master_port", str(free_port()),
               "--module", "mmscale.train", "--config", str(REPO / "configs" / "pretrain" / "tiny.yaml"),
               f"data.train={corpus['root'] / 'train'}", f"data.val={corpus['root'] / 'val'}",
               f"tokenizer={corpus['root'] / 'tokenizer'}", f"output_dir={output}", f"train.precision={precision}",
               f"train.deepspeed={REPO / 'configs' / 'deepspeed' / 'zero3.json'}", "train.samples=1280",
               "train.global_batch_size=64", "train.log_every_steps=5", "train.save_every_steps=10",
               "eval.every_steps=10", f"eval.classnames={corpus['classnames']}",
               f"eval.templates={corpus['templates']}", "train.progress=false", "train.tensorboard=false"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"precision {precision}" in result.stdout
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if record["kind"] == "train"]
    assert train[-1]["step"] == 20 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    # Steps were taken and learned: a loss scaler that skipped every step would leave the loss at ln(64).
    assert train[-1].get("fp16_skipped_steps", 0) <= 5, train[-1]  # a few while the fp16 scale calibrates
    assert train[-1]["loss"] < train[0]["loss"] - 0.1, [r["loss"] for r in train]  # not yet run on a GPU: see issue 24
    assert any(record["kind"] == "eval" and "top1" in record for record in records)
    assert (output / "final" / "config.json").is_file()
    evaluation = subprocess.run(
        [sys.executable, "-m", "mmscale.cli", "eval", "zeroshot", "--checkpoint", str(output / "final"),
         "--data", str(corpus["root"] / "val"), "--classnames", str(corpus["classnames"]),
         "--templates", str(corpus["templates"])], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert json.loads(evaluation.stdout.strip().splitlines()[-1])["samples"] == 128


def test_gather_with_grad_backward_on_nccl_equals_the_single_process_gradient(tmp_path):
    """One rank per visible GPU (one is enough to run the NCCL reduce_scatter branch)."""
    ranks = torch.cuda.device_count()
    script = HERE / "distkit.py"
    result = subprocess.run([sys.executable, str(script), "gather-grad", "--ranks", str(ranks), "--device", "cuda"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "gather-grad ok" in result.stdout


@pytest.mark.parametrize("micro_batch", [0, 8], ids=["one-micro-batch", "gradcache"])
def test_a_cuda_step_syncs_only_where_named(tmp_path, micro_batch):
    """CUDA raises on any synchronizing call in a bf16 ZeRO-3 step outside DeepSpeed's optimizer step and the agreed
    finiteness check (synccount.ALLOWED_CUDA_SYNCS); with GradCache too (issue 26 item 8)."""
    result = subprocess.run([sys.executable, str(HERE / "synccount.py"), "--work", str(tmp_path), "--steps", "4",
                             "--precision", "bf16", "--cuda-sync-error", "--micro-batch", str(micro_batch)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    allowed = json.loads(result.stdout.strip().splitlines()[-1])["allowed_syncs"]
    assert allowed.get("DeepSpeedEngine.step", 0) >= 4, allowed


def test_int8_export_embeds_and_classifies_on_cuda(corpus, tmp_path):
    """bitsandbytes puts int8 towers on the current CUDA device: the export's agreement check, `embed` and
    `zeroshot` must run there with the wrapper's normalization and inputs alongside (issue 26 item 4)."""
    from mmscale.data.text import load_tokenizer
    from mmscale.models import ModelConfig, build_model, load_model

    torch.manual_seed(0)
    base = tmp_path / "base"
    build_model(ModelConfig(preset="tiny"), vocab_size=200).save(base, tokenizer=load_tokenizer(corpus["root"] / "tokenizer"))

    def cli(*args: str) -> dict:
        result = subprocess.run([sys.executable, "-m", "mmscale.cli", *args], cwd=REPO, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    report = cli("export", "--checkpoint", str(base), "--out", str(tmp_path / "int8"), "--quantize", "int8")
    assert report["image_cosine_min"] >= 0.98 and report["text_cosine_min"] >= 0.98, report
    model = load_model(tmp_path / "int8", mlm_head=False)
    assert model.device.type == "cuda" and model.image_mean.device.type == "cuda"
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na blue square\n")
    assert cli("embed", "--checkpoint", str(tmp_path / "int8"), "--texts", str(texts),
               "--out", str(tmp_path / "texts.npy"))["count"] == 2
    from PIL import Image

    Image.new("RGB", (80, 80), (200, 30, 30)).save(tmp_path / "red.png")
    assert "label" in cli("zeroshot", "--checkpoint", str(tmp_path / "int8"), "--image", str(tmp_path / "red.png"),
                          "--classnames", str(corpus["classnames"]))
