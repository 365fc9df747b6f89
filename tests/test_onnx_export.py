"""`mmscale export --format onnx`: the encoders as ONNX graphs that onnxruntime runs alone and that give the
model's own embeddings, float and int8, for dual encoders and fusion models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmscale.models import ModelConfig, build_model

onnxruntime = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle on the left", "a small blue square", "green triangle on top of a yellow star",
            "an image of a large purple circle with a orange background", "star", "a photo showing a small red square"]


def session(path: Path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def cosine(ours: torch.Tensor, theirs: np.ndarray) -> float:
    return float(F.cosine_similarity(ours.float(), torch.from_numpy(theirs), dim=-1).min())


def texts_of(tokenizer, count: int, length: int) -> dict[str, torch.Tensor]:
    """`count` captions padded to exactly `length` tokens (some shorter, so the mask matters)."""
    encoded = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(count)], padding="max_length",
                        truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny graphs gain nothing from a second thread, and on a busy 2-core machine torch's OpenMP threads wait on
    each other (an export's speed measurement took 10 s instead of 1): one thread, here and in the CLI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny dual encoder and a tiny fusion model (with a VQA head), saved as mmscale checkpoints."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer)).save(root / "dual", tokenizer=tokenizer)
    token_ids = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
    build_model(ModelConfig(preset="tiny", fusion_layers=4), vocab_size=len(tokenizer), token_ids=token_ids,
                vqa_answers=["red", "blue", "two"]).save(root / "fusion", tokenizer=tokenizer)
    return {"dual": root / "dual", "fusion": root / "fusion", "root": root}


@pytest.fixture(scope="module")
def float_export(saved) -> tuple[Path, dict]:
    from mmscale.export.onnx import export_onnx

    out = saved["root"] / "dual-onnx"
    return out, export_onnx(saved["dual"], out, quantize="none")


def test_float_graphs_give_the_models_embeddings_at_any_batch_size_and_text_length(saved, float_export, tokenizer):
    from mmscale.export.quantize import load_float

    out, report = float_export
    model = load_float(saved["dual"]).eval()
    assert report["quantize"] == "none" and report["size_ratio"] == 1.0
    assert min(report["image_cosine_min"], report["text_cosine_min"]) >= 0.999
    assert {"torch_fp32_images_per_s", "onnxruntime_images_per_s", "torch_fp32_texts_per_s",
            "onnxruntime_texts_per_s"} <= set(report["throughput"])
    assert json.loads((out / "export_report.json").read_text()) == report
    images_graph, texts_graph = session(out / "image_encoder.onnx"), session(out / "text_encoder.onnx")
    generator = torch.Generator().manual_seed(1)
    for batch, length in ((1, 8), (7, 21)):  # traced at batch 2, checked at 32: neither of these
        images = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8, generator=generator)
        texts = texts_of(tokenizer, batch, length)
        (image_embedding,) = images_graph.run(None, {"pixels": images.numpy()})
        (text_embedding,) = texts_graph.run(None, {name: tensor.numpy() for name, tensor in texts.items()})
        with torch.no_grad():
            assert cosine(model.encode_images(images), image_embedding) >= 0.999
            assert cosine(model.encode_texts(**texts), text_embedding) >= 0.999


def test_the_folder_is_enough_for_zero_shot_with_onnxruntime_and_tokenizers(saved, float_export):
    """What the README shows: tokenizer.json through `tokenizers`, graphs through onnxruntime, the temperature from
    onnx_export.json give the PyTorch model's image-to-text probabilities."""
    from tokenizers import Tokenizer

    from mmscale.export.quantize import load_float

    out, _ = float_export
    meta = json.loads((out / "onnx_export.json").read_text())
    assert meta["image_size"] == 64 and meta["graphs"]["image_encoder.onnx"]["inputs"]["pixels"]["dtype"] == "uint8"
    assert list(meta["graphs"]["text_encoder.onnx"]["inputs"]) == ["input_ids", "attention_mask"]
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=meta["pad_token_id"])
    encodings = tokenizer.encode_batch(CAPTIONS)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    image = session(out / "image_encoder.onnx").run(None, {"pixels": images.numpy()})[0]
    text = session(out / "text_encoder.onnx").run(None, {"input_ids": ids, "attention_mask": mask})[0]
    image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text))
    onnx_probabilities = torch.from_numpy(meta["logit_scale"] * image @ text.T).softmax(-1)

    model = load_float(saved["dual"]).eval()
    with torch.no_grad():
        ours = F.normalize(model.encode_images(images), dim=-1) @ F.normalize(
            model.encode_texts(torch.from_numpy(ids), torch.from_numpy(mask)), dim=-1).T
        probabilities = (model.logit_scale() * ours).softmax(-1)
    assert torch.allclose(onnx_probabilities, probabilities, atol=1e-4)


def test_cli_int8_onnx_export_is_smaller_and_close_to_the_float_model(saved, tokenizer):
    from mmscale.export.quantize import load_float

    out = saved["root"] / "dual-int8"
    env = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "mmscale.cli", "export", "--checkpoint", str(saved["dual"]),
                             "--out", str(out), "--format", "onnx", "--quantize", "int8"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == json.loads((out / "export_report.json").read_text())
    assert report["quantize"] == "int8" and report["size_ratio"] < 0.5
    assert min(report["float_graph"]["image_cosine_min"], report["float_graph"]["text_cosine_min"]) >= 0.999
    assert min(report["image_cosine_min"], report["text_cosine_min"]) >= 0.99
    assert {"tokenizer.json", "onnx_export.json"} <= {path.name for path in out.iterdir()}

    model = load_float(saved["dual"]).eval()
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    texts = texts_of(tokenizer, 5, 12)
    with torch.no_grad():
        assert cosine(model.encode_images(images), session(out / "image_encoder.onnx").run(
            None, {"pixels": images.numpy()})[0]) >= 0.99
        assert cosine(model.encode_texts(**texts), session(out / "text_encoder.onnx").run(
            None, {name: tensor.numpy() for name, tensor in texts.items()})[0]) >= 0.99


def test_fusion_model_exports_its_encoders_and_its_itm_and_vqa_heads(saved, tokenizer):
    from mmscale.export.onnx import export_onnx
    from mmscale.export.quantize import load_float

    out = saved["root"] / "fusion-onnx"
    report = export_onnx(saved["fusion"], out, quantize="none")
    assert min(report["image_cosine_min"], report["text_cosine_min"]) >= 0.999
    assert report["itm_probability_max_difference"] < 1e-4 and report["vqa_probability_max_difference"] < 1e-4
    assert json.loads((out / "onnx_export.json").read_text())["vqa_answers"] == ["red", "blue", "two"]

    model = load_float(saved["fusion"]).eval()
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    texts = texts_of(tokenizer, 3, 10)
    image_embedding, image_tokens = session(out / "image_encoder.onnx").run(None, {"pixels": images.numpy()})
    (text_embedding,) = session(out / "text_encoder.onnx").run(
        None, {name: tensor.numpy() for name, tensor in texts.items()})
    itm_logits, _ = session(out / "fusion_heads.onnx").run(
        None, {"image_tokens": image_tokens, **{name: tensor.numpy() for name, tensor in texts.items()}})
    with torch.no_grad():
        assert cosine(model.encode_images(images), image_embedding) >= 0.999
        assert cosine(model.encode_texts(**texts), text_embedding) >= 0.999
        matches = model.itm_scores(images, texts["input_ids"], texts["attention_mask"])
    assert torch.allclose(torch.from_numpy(itm_logits).softmax(-1)[:, 1], matches, atol=1e-4)


def test_nf4_cannot_be_written_as_onnx(saved, tmp_path, capsys):
    from mmscale.cli import main

    code = main(["export", "--checkpoint", str(saved["dual"]), "--out", str(tmp_path / "x"), "--format", "onnx",
                 "--quantize", "nf4"])
    assert code == 2
    error = capsys.readouterr().err
    assert "--quantize nf4 cannot be written as ONNX" in error and "--format transformers" in error
    assert not (tmp_path / "x").exists()
