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

from mmscale.config import merge_overrides
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
    from mmscale.shards.synthetic import OBJECT_COLOURS, make_synthetic_shards
    from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece

    root = tmp_path_factory.mktemp("finetune")
    make_synthetic_shards(root / "train", 256, samples_per_shard=64, seed=0, domain="dim")
    make_synthetic_shards(root / "val", 64, samples_per_shard=64, seed=1, domain="dim")
    tokenizer = train_wordpiece(iter_captions(str(root / "train")), vocab_size=200, output_dir=root / "tokenizer")
    torch.manual_seed(0)
    build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer)).save(root / "base", tokenizer=tokenizer)
    (root / "classnames.txt").write_text("\n".join(OBJECT_COLOURS) + "\n")
    return {"train": root / "train", "val": root / "val", "base": root / "base", "classnames": root / "classnames.txt"}


def finetune(checkpoint: str, data: dict, output: Path, *extra: str) -> subprocess.CompletedProcess:
    """`mmscale finetune` with small settings; `extra` overrides replace defaults of the same key (the CLI
    refuses a key given twice)."""
    return cli("finetune", "--checkpoint", checkpoint, "--config", str(LORA), *merge_overrides(
        f"data.train={data['train']}", f"output_dir={output}", "data.workers=0", "train.samples=128",
        "train.global_batch_size=32", "train.progress=false", "train.tensorboard=false", "train.log_every_steps=1",
        *extra))


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
    # The temperature trains outside the adapters; the adapter folder keeps it beside them, and with it PEFT's
    # model gives final/'s image-text logits.
    from safetensors.torch import load_file

    temperature = load_file(adapter / "mmscale_temperature.safetensors")["logit_scale"]
    assert not torch.equal(temperature, base.logit_scale.detach().reshape(()))  # it trained
    with torch.no_grad():
        adapted.base_model.model.logit_scale.copy_(temperature)
        torch.testing.assert_close(adapted(input_ids=ids, pixel_values=pixels).logits_per_image,
                                   merged(input_ids=ids, pixel_values=pixels).logits_per_image, rtol=1e-4, atol=1e-4)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["grad_norm"] > 0 for r in records)
    # `mmscale export` of the adapter folder merges it into its base: the same model as final/, temperature too.
    cli("export", "--checkpoint", str(adapter), "--out", str(tmp_path / "exported"), "--quantize", "none")
    exported = AutoModel.from_pretrained(tmp_path / "exported")
    with torch.no_grad():
        torch.testing.assert_close(exported.get_image_features(pixel_values=pixels).pooler_output,
                                   merged.get_image_features(pixel_values=pixels).pooler_output, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(exported.logit_scale, merged.logit_scale)


@pytest.mark.slow
def test_bf16_lora_saves_the_fp32_base_and_master_adapters(data, tmp_path):
    """A bf16 run trains a bf16 copy of the model: `final/` and the adapter must still be the fp32 base plus the
    optimizer's fp32 adapter weights, not the rounded module (bf16 keeps 8 bits of mantissa)."""
    from peft import PeftModel
    from safetensors import safe_open

    finetune(str(data["base"]), data, tmp_path / "run", "train.precision=bf16", "train.samples=64")
    adapter, final = tmp_path / "run" / "adapter", tmp_path / "run" / "final"
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        adapters = {name: weights.get_tensor(name) for name in weights.keys()}
    assert {tensor.dtype for tensor in adapters.values()} == {torch.float32}
    # the optimizer's fp32 masters, not the bf16 module's values widened to fp32
    assert any(not torch.equal(tensor, tensor.bfloat16().float()) for tensor in adapters.values())
    base = AutoModel.from_pretrained(data["base"]).eval()
    merged = AutoModel.from_pretrained(final).eval()
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(merged.get_image_features(pixel_values=pixels).pooler_output,
                                   adapted.get_image_features(pixel_values=pixels).pooler_output, rtol=1e-4, atol=1e-5)
    frozen = "vision_model.encoder.layers.0.mlp.fc1.weight"  # no adapter there: the base's own fp32 values
    torch.testing.assert_close(merged.state_dict()[frozen], AutoModel.from_pretrained(data["base"]).state_dict()[frozen],
                               rtol=0, atol=0)


def test_eight_bit_adamw_and_gradient_checkpointing_train(data, tmp_path):
    """The fine-tuning run with both: losses finite and the merged weights moved away from the base."""
    from safetensors.torch import load_file

    finetune(str(data["base"]), data, tmp_path / "run", "train.samples=64", "train.optimizer=adamw8bit",
             "train.gradient_checkpointing=true")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    base, tuned = load_file(data["base"] / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    moved = [name for name in base if not torch.equal(base[name], tuned[name])]
    assert any("vision_model" in name for name in moved) and any("text_model" in name for name in moved)


def _objective_and_batch(data: dict, tokenizer_dir: Path, *, dropout: float = 0.0):
    from mmscale.data.config import DataConfig
    from mmscale.data.loader import build_loader
    from mmscale.data.text import load_tokenizer
    from mmscale.losses import LossConfig, PretrainingObjective

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", dropout=dropout), vocab_size=len(load_tokenizer(tokenizer_dir)))
    objective = PretrainingObjective(model, LossConfig(mlm_weight=0.5)).train()
    loader = build_loader(DataConfig(workers=0, image_size=64, context_length=32, shuffle_buffer=0), spec=str(data["val"]),
                          tokenizer=load_tokenizer(tokenizer_dir), batch_size=16, train=True, epochs=1)
    batch = next(iter(loader))
    return objective, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in ("labels",)}


def test_gradient_checkpointing_gives_the_same_gradients(data):
    """The trainer's checkpointing (non-reentrant, both towers) recomputes activations in the backward pass: the
    gradients of one real batch (CLIP + MLM, dropout on) equal those without it."""
    from mmscale.train.loop import enable_gradient_checkpointing

    gradients = []
    for checkpointing in (False, True):
        objective, batch = _objective_and_batch(data, data["base"], dropout=0.1)
        if checkpointing:
            enable_gradient_checkpointing(objective.model)
            assert objective.model.towers.vision_model.is_gradient_checkpointing
        torch.manual_seed(1)
        objective(**batch).total.backward()
        gradients.append({n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 20
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_eight_bit_adamw_keeps_uint8_state_and_moves_the_weights(data):
    """train.optimizer=adamw8bit as the trainer makes it: after a step on a real batch every matrix of 4,096+
    elements (bitsandbytes' threshold for 8-bit state) has uint8 moments, and every trained parameter moved."""
    from mmscale.train.config import TrainConfig
    from mmscale.train.engine import make_optimizer, parameter_groups

    objective, batch = _objective_and_batch(data, data["base"])
    optimizer = make_optimizer(parameter_groups(objective, 0.1), TrainConfig(optimizer="adamw8bit", lr=1e-3), {})
    before = {n: p.detach().clone() for n, p in objective.named_parameters()}
    objective(**batch).total.backward()
    optimizer.step()
    large = [p for p in objective.parameters() if p.numel() >= 4096]
    assert large and all(optimizer.state[p]["state1"].dtype == torch.uint8 and
                         optimizer.state[p]["state2"].dtype == torch.uint8 for p in large)
    stuck = [n for n, p in objective.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
             and torch.equal(p.detach(), before[n])]
    assert not stuck, stuck[:5]


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
    unmatched = build_model(ModelConfig(preset="tiny"), vocab_size=100, mlm_head=False)
    with pytest.raises(ValueError, match=r"LoRA targets matched no module of the vision tower .*set "
                                         r"lora.vision_targets to some of its linear layers' names: .*q_proj"):
        apply_lora(unmatched, LoraSettings(enabled=True, vision_targets=["query_typo"]))


def test_minilm_text_tower_with_a_tiny_vit_finetunes_end_to_end(data, minilm_dir, tmp_path):
    """A released BERT (MiniLM) and a new ViT as the towers: 12 LoRA steps lower the contrastive loss (first
    three steps' mean against the last three's) and move both towers' weights away from their sources."""
    vit = tmp_path / "vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128)).save_pretrained(vit)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    finetune(f"{vit},{minilm_dir}", data, tmp_path / "run", "train.samples=384", "train.warmup_steps=2")
    final = tmp_path / "run" / "final"
    model = AutoModel.from_pretrained(final)
    assert model.text_model.config.hidden_size == 384 and model.vision_model.config.image_size == 32
    assert AutoTokenizer.from_pretrained(final).vocab_size == 30522  # MiniLM's own tokenizer went along
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
    def moved(source: dict, tuned: dict) -> list[str]:
        return [name for name, value in source.items() if name in tuned and not torch.allclose(tuned[name], value)]

    vision_moved = moved(ViTModel.from_pretrained(vit).state_dict(), model.vision_model.state_dict())
    text_moved = moved(AutoModel.from_pretrained(minilm_dir).state_dict(), model.text_model.state_dict())
    assert vision_moved and text_moved, (len(vision_moved), len(text_moved))


def held_out_pairs(val: Path, count: int = 48) -> tuple[list, list[str]]:
    """The first `count` images (PIL, RGB) and captions of held-out shards, read without mmscale's loader."""
    import io

    from PIL import Image

    from mmscale.data.tars import iter_raw_samples, sample_caption, sample_image_bytes, spec_urls

    raws = [raw for url in spec_urls(str(val)) for raw in iter_raw_samples(url)][:count]
    return ([Image.open(io.BytesIO(sample_image_bytes(raw)[1])).convert("RGB") for raw in raws],
            [sample_caption(raw) for raw in raws])


def zeroshot_top1(checkpoint: Path, trained: dict) -> float:
    return json.loads(cli("eval", "zeroshot", "--checkpoint", str(checkpoint), "--data", str(trained["val"]),
                          "--classnames", str(trained["classnames"]), "--context-length", "32", "--workers", "0")
                      .stdout.strip().splitlines()[-1])["top1"]


def test_int8_export_of_a_trained_model_reloads_with_the_float_models_embeddings_and_accuracy(trained_tiny, tmp_path):
    """The int8 folder, reloaded by transformers (AutoModel, the folder's own processor and tokenizer) and by
    mmscale (load_model, uint8 images), gives per-pair cosine >= 0.98 to the float model's embeddings of held-out
    images and captions, and held-out zero-shot top-1 within 0.03 of the float model's, which is far above chance
    (1/6). Tolerances: int8 LLM.int8 matmuls on 64-dim layers keep cosines above 0.99 here; 0.98 leaves margin."""
    import torch.nn.functional as F
    from transformers import AutoImageProcessor

    from mmscale.models import load_model

    final, out = trained_tiny["final"], tmp_path / "int8"
    report = json.loads(cli("export", "--checkpoint", str(final), "--out", str(out), "--quantize", "int8")
                        .stdout.strip().splitlines()[-1])
    assert report["size_ratio"] <= 0.30
    images, captions = held_out_pairs(trained_tiny["val"])
    pixels = AutoImageProcessor.from_pretrained(out)(images=images, return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(out)(captions, padding=True, truncation=True, max_length=32,
                                                return_tensors="pt")
    float_hf, int8_hf = AutoModel.from_pretrained(final).eval(), AutoModel.from_pretrained(out).eval()
    assert type(int8_hf.vision_model.encoder.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    assert int8_hf.visual_projection.weight.dtype == torch.float16  # kept out of int8
    uint8 = torch.stack([torch.from_numpy(np.asarray(image.resize((64, 64)))).permute(2, 0, 1) for image in images])
    float_mm, int8_mm = load_model(final).eval(), load_model(out).eval()
    with torch.no_grad():
        pairs = {
            "hf image": (float_hf.get_image_features(pixel_values=pixels).pooler_output,
                         int8_hf.get_image_features(pixel_values=pixels).pooler_output),
            "hf text": (float_hf.get_text_features(**tokens).pooler_output,
                        int8_hf.get_text_features(**tokens).pooler_output),
            "mmscale image": (float_mm.encode_images(uint8), int8_mm.encode_images(uint8)),
            "mmscale text": (float_mm.encode_texts(tokens["input_ids"], tokens["attention_mask"]),
                             int8_mm.encode_texts(tokens["input_ids"], tokens["attention_mask"])),
        }
    for name, (reference, exported) in pairs.items():
        cosine = F.cosine_similarity(reference.float(), exported.float())
        assert cosine.min() >= 0.98, (name, cosine.min())
    # Not a comparison of chance with chance: the float model has learned the classes.
    float_top1, int8_top1 = zeroshot_top1(final, trained_tiny), zeroshot_top1(out, trained_tiny)
    assert float_top1 >= 0.6 and abs(int8_top1 - float_top1) <= 0.03, (float_top1, int8_top1)


def test_int8_export_serves_the_use_commands(data, tmp_path):
    out = tmp_path / "int8"
    report = json.loads(cli("export", "--checkpoint", str(data["base"]), "--out", str(out), "--quantize", "int8",
                            "--data", str(data["val"]), "--classnames", str(data["classnames"]),
                            "--context-length", "32").stdout.strip().splitlines()[-1])
    assert report == json.loads((out / "export_report.json").read_text())
    assert {"top1"} <= set(report["eval_float"]) and {"top1"} <= set(report["eval_exported"])
    images = tmp_path / "images"
    from mmscale.shards.synthetic import make_image_folder

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


def test_classification_head_fine_tunes_on_labels_and_is_saved(trained_tiny, data, tmp_path):
    """A linear head on the trained tiny model, fine-tuned (LoRA + head) on labelled shards of the shifted (dim)
    domain: the loss falls, held-out top-1 is far above chance (1/6), the head trains (the engine's checkpoints of
    steps 8 and 16 differ in it) and final/ holds the head the engine ended with (read without mmscale)."""
    from mmscale.models import load_model

    finetune(str(trained_tiny["final"]), data, tmp_path / "run", "loss.objective=classify", "loss.classes=6",
             f"data.val={data['val']}", "train.samples=512", "train.save_every_steps=8")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train, evaluation = records[:-1], records[-1]
    assert len(train) == 16 and all(r["contrastive_loss"] == 0 for r in train)
    losses = [r["classification_loss"] for r in train]
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses  # 1.93 -> 1.42 in the runs that set it
    assert evaluation["kind"] == "eval" and evaluation["classifier_top1"] >= 0.5, evaluation
    model = load_model(tmp_path / "run" / "final").eval()
    assert model.classifier is not None and model.classifier.out_features == 6
    def engine_head(step: int) -> dict:
        """The head in the training engine's own checkpoint of `step`, read without mmscale."""
        state = torch.load(tmp_path / "run" / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt",
                           map_location="cpu", weights_only=False)["module"]
        return {name.rsplit(".", 1)[-1]: value for name, value in state.items() if "classifier" in name}

    halfway, last = engine_head(8), engine_head(16)
    assert set(last) == {"weight", "bias"} and not torch.allclose(halfway["weight"], last["weight"])  # it trains
    for name, value in last.items():  # final/ holds the head the engine ended with: its fp32 masters, of which a
        # 16-bit engine module holds the rounded copy
        torch.testing.assert_close(getattr(model.classifier, name).float().to(value.dtype), value, msg=name)
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


def test_lora_fine_tunes_a_blip_itm_folder_into_one_transformers_loads(data, tmp_path):
    """`mmscale finetune --checkpoint` on a BlipForImageTextRetrieval folder (transformers' class, random weights,
    saved as released BLIP ITM folders are): a fusion model trained with CLIP + ITM through LoRA adapters on its
    self- and cross-attention; final/ is a BlipForImageTextRetrieval whose ITM scores are those of the base with
    the PEFT adapter."""
    from peft import PeftModel
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    tokenizer = AutoTokenizer.from_pretrained(data["base"])
    torch.manual_seed(0)
    config = BlipConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16, "initializer_range": 0.02},
        image_text_hidden_size=16)
    config.architectures = ["BlipForImageTextRetrieval"]
    blip = tmp_path / "blip-itm"
    BlipForImageTextRetrieval(config).save_pretrained(blip, safe_serialization=True)
    BlipProcessor(BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer).save_pretrained(blip)
    result = finetune(str(blip), data, tmp_path / "run")
    assert "LoRA r=8 trains" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 4 and all(r["itm_loss"] > 0 and r["grad_norm"] > 0 for r in train)
    final, info = BlipForImageTextRetrieval.from_pretrained(tmp_path / "run" / "final", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    adapted = PeftModel.from_pretrained(BlipForImageTextRetrieval.from_pretrained(blip), tmp_path / "run" / "adapter")
    pixels, ids = torch.randn(3, 3, 64, 64), torch.randint(5, len(tokenizer), (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(final.eval()(input_ids=ids, pixel_values=pixels).itm_score,
                                   adapted.eval()(input_ids=ids, pixel_values=pixels).itm_score, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(BlipForImageTextRetrieval.from_pretrained(blip).eval()(
            input_ids=ids, pixel_values=pixels).itm_score, final(input_ids=ids, pixel_values=pixels).itm_score, atol=1e-4)
