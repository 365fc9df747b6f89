"""Compressed exports of tiny models: `--quantize int8-cpu` (PyTorch dynamic int8) and `--quantize nf4`
(bitsandbytes 4-bit) reload with `load_model`, keep every head, stay within cosine 0.99 of the float model
(int8-cpu) and serve the use commands. Speed is measured by tools/bench/compress.py, not asserted here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mmscale.cli import main
from mmscale.data.text import special_token_ids
from mmscale.export.cpu_int8 import WEIGHTS_FILE, CpuInt8Linear
from mmscale.export.quantize import export, sample_inputs
from mmscale.models import ModelConfig, build_model, load_model
from mmscale.shards.synthetic import OBJECT_COLOURS, make_image_folder

THROUGHPUT_KEYS = {"images_per_second_float", "images_per_second_exported", "texts_per_second_float",
                   "texts_per_second_exported"}
ANSWERS = ["red", "green", "blue", "yes", "no"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer) -> dict:
    """A tiny dual encoder with a classifier and a SigLIP bias, a tiny fusion model with a VQA head, images,
    class names."""
    root = tmp_path_factory.mktemp("compress")
    torch.manual_seed(0)
    dual = build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer), logit_bias_init=-5.0, mlm_head=False)
    dual.add_classifier(len(OBJECT_COLOURS))
    dual.save(root / "dual", tokenizer=tokenizer)
    fusion = build_model(ModelConfig(preset="tiny", fusion_layers=4), vocab_size=len(tokenizer), mlm_head=False,
                         token_ids=special_token_ids(tokenizer), vqa_answers=ANSWERS)
    fusion.save(root / "fusion", tokenizer=tokenizer)
    make_image_folder(root / "images", 4, size=80, seed=3)
    (root / "classnames.txt").write_text("\n".join(OBJECT_COLOURS) + "\n")
    return {"root": root, "dual": root / "dual", "fusion": root / "fusion", "images": root / "images",
            "classnames": root / "classnames.txt", "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def dual_int8_cpu(folders) -> tuple[dict, object]:
    """The dual encoder exported by `mmscale export --quantize int8-cpu`: (its report, its folder)."""
    out = folders["root"] / "dual-int8-cpu"
    assert main(["export", "--checkpoint", str(folders["dual"]), "--out", str(out), "--quantize", "int8-cpu"]) == 0
    return json.loads((out / "export_report.json").read_text()), out


def run(capsys, *args: str) -> dict:
    """`mmscale ARGS` in this process; its last output line as JSON."""
    capsys.readouterr()
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def cosines(reference, candidate, tokenizer) -> dict[str, torch.Tensor]:
    images, texts = sample_inputs(reference, tokenizer, count=16, context_length=32)
    with torch.no_grad():
        return {"image": F.cosine_similarity(reference.encode_images(images), candidate.encode_images(images).float()),
                "text": F.cosine_similarity(
                    reference.encode_texts(texts["input_ids"], texts["attention_mask"]),
                    candidate.encode_texts(texts["input_ids"], texts["attention_mask"]).float())}


def check_int8_cpu_folder(report: dict, out) -> None:
    """Smaller than float, int8 values with fp32 per-row scales in safetensors, no float weights file."""
    assert report["quantize"] == "int8-cpu" and report["bytes_exported"] < report["bytes_float32"]
    assert min(report["image_cosine_min"], report["text_cosine_min"]) >= 0.99, report
    assert THROUGHPUT_KEYS <= set(report) and all(report[key] > 0 for key in THROUGHPUT_KEYS)
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "mmscale.json").read_text())["quantize"] == "int8-cpu"
    tensors = load_file(out / WEIGHTS_FILE)
    int8 = [name for name, tensor in tensors.items() if tensor.dtype == torch.int8]
    assert int8 and all(tensors[name.replace(".weight", ".weight_scale")].dtype == torch.float32 for name in int8)


def test_int8_cpu_dual_encoder_reloads_with_its_heads_and_serves_embed_and_zeroshot(folders, dual_int8_cpu, tmp_path,
                                                                                     capsys):
    report, out = dual_int8_cpu
    check_int8_cpu_folder(report, out)
    float_model = load_model(folders["dual"], mlm_head=False, logit_bias_init=0.0).eval()
    exported = load_model(out, mlm_head=False, logit_bias_init=0.0).eval()
    assert isinstance(exported.towers.vision_model.encoder.layers[0].mlp.fc1, CpuInt8Linear)
    assert isinstance(exported.towers.text_model.encoder.layer[0].attention.self.query, CpuInt8Linear)
    assert type(exported.towers.visual_projection) is nn.Linear  # projections stay fp32
    torch.testing.assert_close(exported.classifier.state_dict(), float_model.classifier.state_dict())
    assert exported.logit_bias.item() == -5.0 and exported.logit_scale().item() == float_model.logit_scale().item()
    for kind, cosine in cosines(float_model, exported, folders["tokenizer"]).items():
        assert cosine.min() >= 0.99, (kind, cosine.min())

    images = str(folders["images"] / "*.jpg")
    for folder, name in ((folders["dual"], "float.npy"), (out, "int8.npy")):
        assert run(capsys, "embed", "--checkpoint", str(folder), "--images", images, "--out", str(tmp_path / name))[
            "count"] == 4
    float_rows, int8_rows = np.load(tmp_path / "float.npy"), np.load(tmp_path / "int8.npy")
    assert int8_rows.shape == (4, 128) and (float_rows * int8_rows).sum(axis=1).min() >= 0.99
    answer = run(capsys, "zeroshot", "--checkpoint", str(out), "--image", str(folders["images"] / "000000.jpg"),
                 "--classnames", str(folders["classnames"]))
    assert answer["label"] in OBJECT_COLOURS and 0 < answer["probability"] <= 1


def test_int8_cpu_fusion_model_keeps_its_vqa_and_itm_heads_and_answers(folders, tmp_path, capsys):
    out = tmp_path / "int8-cpu"
    report = export(str(folders["fusion"]), str(out), quantize="int8-cpu")
    check_int8_cpu_folder(report, out)
    assert report["itm_probability_max_difference"] <= 0.02
    float_model, exported = load_model(folders["fusion"], mlm_head=False).eval(), load_model(out, mlm_head=False).eval()
    assert isinstance(exported.towers.text_encoder.encoder.layer[0].crossattention.self.key, CpuInt8Linear)
    assert type(exported.towers.itm_head) is nn.Linear and type(exported.towers.text_proj) is nn.Linear
    assert exported.vqa_answers == ANSWERS
    torch.testing.assert_close(exported.vqa_head.state_dict(), float_model.vqa_head.state_dict())
    assert exported.logit_scale().item() == pytest.approx(float_model.logit_scale().item())
    for kind, cosine in cosines(float_model, exported, folders["tokenizer"]).items():
        assert cosine.min() >= 0.99, (kind, cosine.min())
    images, texts = sample_inputs(float_model, folders["tokenizer"], count=8, context_length=32)
    with torch.no_grad():
        logits = [model.vqa_logits(images, texts["input_ids"], texts["attention_mask"])
                  for model in (float_model, exported)]
    assert F.cosine_similarity(*logits).min() >= 0.99

    answers = run(capsys, "vqa", "--checkpoint", str(out), "--image", str(folders["images"] / "000001.jpg"),
                  "--question", "what colour is the shape")["answers"]
    assert sorted(answer["answer"] for answer in answers) == sorted(ANSWERS)
    assert run(capsys, "embed", "--checkpoint", str(out), "--images", str(folders["images"] / "*.jpg"), "--out",
               str(tmp_path / "fusion.npy"))["count"] == 4


def test_nf4_export_is_smaller_and_reloads_in_transformers_and_mmscale(folders, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "nf4"
    report = export(str(folders["dual"]), str(out), quantize="nf4")
    assert report["quantize"] == "nf4" and report["bytes_exported"] < 0.3 * report["bytes_float32"]
    assert THROUGHPUT_KEYS <= set(report) and all(report[key] > 0 for key in THROUGHPUT_KEYS)
    towers = AutoModel.from_pretrained(out)
    assert type(towers.vision_model.encoder.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert towers.visual_projection.weight.dtype == torch.float16  # kept out of 4-bit
    float_model = load_model(folders["dual"], mlm_head=False, logit_bias_init=0.0).eval()
    exported = load_model(out, mlm_head=False, logit_bias_init=0.0).eval()
    assert exported.logit_bias.item() == -5.0 and exported.classifier is not None
    # 4-bit on random 128-wide layers: the cosine is lower than int8's (0.988 text here); no 0.99 target for nf4.
    for kind, cosine in cosines(float_model, exported, folders["tokenizer"]).items():
        assert cosine.min() >= 0.97, (kind, cosine.min())


def test_int8_cpu_refusals_name_the_fix(folders, dual_int8_cpu, tmp_path, capsys):
    from transformers import AutoModel

    _, out = dual_int8_cpu
    assert main(["export", "--checkpoint", str(folders["dual"]), "--out", str(tmp_path / "x"), "--quantize",
                 "int8-cpu", "--quantize-projections"]) == 2
    assert "int8-cpu keeps the projections" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "again"), "--quantize", "int8"]) == 2
    assert "already quantized (int8-cpu)" in capsys.readouterr().err
    with pytest.raises(OSError, match="model.safetensors"):  # plain transformers refuses rather than misreads int8
        AutoModel.from_pretrained(out)
    assert main(["finetune", "--checkpoint", str(out), "--config", "configs/finetune/lora.yaml",
                 f"data.train={tmp_path}", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "cannot train; start from the float model" in capsys.readouterr().err
    layer = load_model(out, mlm_head=False).towers.vision_model.encoder.layers[0].mlp.fc1
    with pytest.raises(RuntimeError, match="runs on the CPU only.*CUDA_VISIBLE_DEVICES="):
        layer(torch.zeros(2, layer.in_features, device="meta"))
