"""LoRA fine-tuning through the training loop, int8 export, and the commands that use a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, ViTConfig, ViTImageProcessor, ViTModel

from mmscale.finetune.lora import LoraSettings, apply_lora
from mmscale.models import ModelConfig, build_model

pytestmark = pytest.mark.slow  # each test runs mmscale in a subprocess
REPO = Path(__file__).resolve().parents[1]
LORA = REPO / "configs" / "finetune" / "lora.yaml"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "mmscale.cli", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from mmscale.data.synthetic import OBJECT_COLOURS, make_synthetic_shards
    from mmscale.data.tokenizer_train import iter_captions, train_wordpiece

    root = tmp_path_factory.mktemp("finetune")
    make_synthetic_shards(root / "train", 256, samples_per_shard=64, seed=0, domain="dim")
    make_synthetic_shards(root / "val", 64, samples_per_shard=64, seed=1, domain="dim")
    tokenizer = train_wordpiece(iter_captions(str(root / "train")), vocab_size=200, output_dir=root / "tokenizer")
    torch.manual_seed(0)
    build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer)).save(root / "base", tokenizer=tokenizer)
    (root / "classnames.txt").write_text("\n".join(OBJECT_COLOURS) + "\n")
    return {"train": root / "train", "val": root / "val", "base": root / "base", "classnames": root / "classnames.txt"}


def finetune(checkpoint: str, data: dict, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("finetune", "--checkpoint", checkpoint, "--config", str(LORA), f"data.train={data['train']}",
               f"output_dir={output}", "data.workers=0", "train.samples=128", "train.global_batch_size=32",
               "train.progress=false", "train.tensorboard=false", "train.log_every_steps=1", *extra)


def test_lora_adapter_reloads_with_peft_and_the_merged_model_reproduces_it(data, tmp_path):
    from peft import PeftModel

    result = finetune(str(data["base"]), data, tmp_path / "run", "lora.dropout=0.0")
    assert "LoRA r=8 trains" in result.stdout
    adapter, final = tmp_path / "run" / "adapter", tmp_path / "run" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    base = AutoModel.from_pretrained(data["base"]).eval()
    pixels = torch.randn(3, 3, 64, 64)
    ids = torch.randint(5, base.config.text_config.vocab_size, (3, 16))
    with torch.no_grad():
        before = base.get_image_features(pixel_values=pixels).pooler_output
    adapted = PeftModel.from_pretrained(base, adapter).eval()  # injects the adapter into `base` itself
    merged = AutoModel.from_pretrained(final).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.get_image_features(pixel_values=pixels).pooler_output,
                                   adapted.get_image_features(pixel_values=pixels).pooler_output, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged.get_text_features(input_ids=ids).pooler_output,
                                   adapted.get_text_features(input_ids=ids).pooler_output, rtol=1e-4, atol=1e-5)
        # ...and the adapter changed something: it is not the base model.
        assert not torch.allclose(before, merged.get_image_features(pixel_values=pixels).pooler_output, atol=1e-4)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["grad_norm"] > 0 for r in records)
    # `mmscale export` of the adapter folder merges it into its base: the same model as final/.
    cli("export", "--checkpoint", str(adapter), "--out", str(tmp_path / "exported"), "--quantize", "none")
    with torch.no_grad():
        torch.testing.assert_close(AutoModel.from_pretrained(tmp_path / "exported").get_image_features(
            pixel_values=pixels).pooler_output, merged.get_image_features(pixel_values=pixels).pooler_output,
            rtol=1e-4, atol=1e-5)


def test_eight_bit_adamw_and_gradient_checkpointing_train(data, tmp_path):
    finetune(str(data["base"]), data, tmp_path / "run", "train.samples=64", "train.optimizer=adamw8bit",
             "train.gradient_checkpointing=true")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_default_lora_on_base_trains_under_two_percent():
    with torch.device("meta"):
        model = build_model(ModelConfig(preset="base"), mlm_head=False)
        trainable, total = apply_lora(model, LoraSettings(enabled=True))
    assert trainable / total <= 0.02
    locked = build_model(ModelConfig(preset="tiny"), vocab_size=100, mlm_head=False)
    apply_lora(locked, LoraSettings(enabled=True, lock_vision=True))
    assert not any(p.requires_grad for name, p in locked.towers.named_parameters()
                   if "vision_model" in name)  # LiT: the image tower is frozen whole, no adapters
    assert locked.towers.base_model.model.visual_projection.modules_to_save["default"].weight.requires_grad


def test_minilm_text_tower_with_a_tiny_vit_finetunes_end_to_end(data, minilm_dir, tmp_path):
    vit = tmp_path / "vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128)).save_pretrained(vit)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    finetune(f"{vit},{minilm_dir}", data, tmp_path / "run", "train.samples=64")
    final = tmp_path / "run" / "final"
    model = AutoModel.from_pretrained(final)
    assert model.text_model.config.hidden_size == 384 and model.vision_model.config.image_size == 32
    assert AutoTokenizer.from_pretrained(final).vocab_size == 30522  # MiniLM's own tokenizer went along


def test_int8_export_loads_in_transformers_and_serves_the_use_commands(data, tmp_path):
    out = tmp_path / "int8"
    report = json.loads(cli("export", "--checkpoint", str(data["base"]), "--out", str(out), "--quantize", "int8",
                            "--data", str(data["val"]), "--classnames", str(data["classnames"]),
                            "--context-length", "32").stdout.strip().splitlines()[-1])
    assert report["size_ratio"] <= 0.30 and report["image_cosine_min"] >= 0.99 and report["text_cosine_min"] >= 0.99
    assert report == json.loads((out / "export_report.json").read_text())
    assert abs(report["eval_float"]["top1"] - report["eval_exported"]["top1"]) <= 0.05
    reloaded = AutoModel.from_pretrained(out)
    assert type(reloaded.vision_model.encoder.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    assert reloaded.visual_projection.weight.dtype == torch.float16  # kept out of int8
    images = tmp_path / "images"
    from mmscale.data.synthetic import make_image_folder

    make_image_folder(images, 3, size=80, seed=2)
    cli("embed", "--checkpoint", str(out), "--images", str(images / "*.jpg"), "--out", str(tmp_path / "e.npy"))
    embeddings = np.load(tmp_path / "e.npy")
    assert embeddings.shape == (3, 128) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-3)
    (tmp_path / "texts.txt").write_text("a red circle on a blue background\na green square\n")
    cli("embed", "--checkpoint", str(out), "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "t.parquet"))
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "t.parquet").num_rows == 2
    retrieval = json.loads(cli("eval", "retrieval", "--checkpoint", str(out), "--data", str(data["val"]),
                               "--context-length", "32").stdout.strip().splitlines()[-1])
    assert retrieval["samples"] == 64 and 0 <= retrieval["i2t_r1"] <= 1
    answer = json.loads(cli("zeroshot", "--checkpoint", str(out), "--image", str(images / "000000.jpg"),
                            "--classnames", str(data["classnames"])).stdout.strip().splitlines()[-1])
    assert answer["label"] in data["classnames"].read_text().split() and 0 < answer["probability"] <= 1
    (images / "broken.jpg").write_bytes(b"not an image")
    failed = cli("zeroshot", "--checkpoint", str(out), "--image", str(images / "broken.jpg"), "--classnames",
                 str(data["classnames"]), check=False)
    assert failed.returncode == 2 and "broken.jpg: cannot be read as an image" in failed.stderr
    missing = cli("embed", "--checkpoint", str(tmp_path / "nowhere"), "--texts", str(tmp_path / "texts.txt"), "--out",
                  str(tmp_path / "x.npy"), check=False)
    assert missing.returncode == 2 and "no such folder" in missing.stderr


def test_classification_head_fine_tunes_on_labels_and_is_saved(data, tmp_path):
    from mmscale.models import load_model

    finetune(str(data["base"]), data, tmp_path / "run", "loss.objective=classify", "loss.classes=6",
             f"data.val={data['val']}")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train, evaluation = records[:-1], records[-1]
    assert all(r["classification_loss"] > 0 and r["contrastive_loss"] == 0 for r in train)
    assert evaluation["kind"] == "eval" and 0 <= evaluation["classifier_top1"] <= 1
    model = load_model(tmp_path / "run" / "final").eval()
    assert model.classifier is not None and model.classifier.out_features == 6
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert model.classify(images).shape == (2, 6)
    with pytest.raises(ValueError, match="loss.classes >= 2"):
        from mmscale.losses import LossConfig

        LossConfig(objective="classify")


def test_lora_fine_tuning_resumes_exactly_after_a_kill(data, tmp_path):
    common = ("train.samples=256", "train.save_every_steps=4", "lora.dropout=0.0")
    finetune(str(data["base"]), data, tmp_path / "straight", *common)
    env = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                        "MMSCALE_KILL_AFTER_CHECKPOINT": "0:4"}
    killed = subprocess.run([sys.executable, "-m", "mmscale.cli", "finetune", "--checkpoint", str(data["base"]),
                             "--config", str(LORA), f"data.train={data['train']}", f"output_dir={tmp_path / 'resumed'}",
                             "data.workers=0", "train.global_batch_size=32", "train.progress=false",
                             "train.tensorboard=false", "train.log_every_steps=1", *common],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and not (tmp_path / "resumed" / "final").exists()
    result = finetune(str(data["base"]), data, tmp_path / "resumed", *common)
    assert "resumed from" in result.stdout and "at step 4" in result.stdout

    def losses(run: str) -> dict[int, float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {record["step"]: record["loss"] for record in map(json.loads, lines)}

    assert losses("resumed") == pytest.approx(losses("straight"), rel=1e-6)
    assert sorted(losses("straight")) == list(range(1, 9))
