"""Released checkpoint formats (issue 30): SigLIP (`SiglipModel` folders) loaded as they are, fine-tuned with LoRA,
saved back in their own format and exported int8. No hub here: small random models of the real classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from releasedkit import save_siglip
from transformers import AutoModel, SiglipModel

from mmscale.config import merge_overrides
from mmscale.models import load_model
from mmscale.models.dual_encoder import SiglipDualEncoder

REPO = Path(__file__).resolve().parents[1]
POSITIONS, SIDE = 16, 32


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory, tokenizer) -> Path:
    """A small random SiglipModel saved as transformers saves one, with a SigLIP image processor (square resize,
    mean/std 0.5) and the session's WordPiece tokenizer."""
    return save_siglip(tmp_path_factory.mktemp("siglip") / "model", tokenizer, side=SIDE, positions=POSITIONS)


def inputs(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images, the pixel values SigLIP's processor makes of them (rescale, mean/std 0.5), caption ids."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (3, 3, SIDE, SIDE), dtype=torch.uint8, generator=generator)
    ids = torch.randint(5, vocab, (3, POSITIONS), generator=generator)
    return images, (images.float() / 255 - 0.5) / 0.5, ids


def reference(model: SiglipModel, pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        output = model(input_ids=ids, pixel_values=pixels)
        return {"image": model.get_image_features(pixel_values=pixels).pooler_output,
                "text": model.get_text_features(input_ids=ids).pooler_output, "logits": output.logits_per_image}


def ours(model, images: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        image = model.encode_images(images)
        text = model.encode_texts(ids, torch.ones_like(ids))
        logits = model.logit_scale() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T + model.logit_bias
    return {"image": image, "text": text, "logits": logits}


def assert_same(actual: dict, expected: dict) -> None:
    for name in expected:
        torch.testing.assert_close(actual[name].float(), expected[name].float(), rtol=1e-4, atol=1e-5, msg=name)


def test_a_siglip_folder_loads_as_it_is_and_saves_back_as_a_siglip_folder(siglip_folder, tmp_path):
    """Embeddings and the sigmoid logits (the towers' own temperature and bias) are SiglipModel's; mmscale's
    save is a SiglipModel folder that plain transformers loads to the same numbers."""
    source = SiglipModel.from_pretrained(siglip_folder).eval()
    images, pixels, ids = inputs(source.config.text_config.vocab_size)
    expected = reference(source, pixels, ids)
    model = load_model(siglip_folder).eval()
    assert isinstance(model, SiglipDualEncoder) and model.mlm_head is None and model.embedding_dim == 64
    assert model.image_mean.flatten().tolist() == [0.5] * 3
    assert_same(ours(model, images, ids), expected)
    saved = model.save(tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["SiglipModel"]
    assert json.loads((saved / "preprocessor_config.json").read_text())["image_processor_type"] == \
        "SiglipImageProcessor"
    reloaded = AutoModel.from_pretrained(saved).eval()
    assert isinstance(reloaded, SiglipModel)
    assert_same(reference(reloaded, pixels, ids), expected)
    assert_same(ours(load_model(saved).eval(), images, ids), expected)


def test_patch_dropout_on_siglip_keeps_a_share_of_every_patch_token_it_has_no_class_token(siglip_folder):
    model = load_model(siglip_folder)
    model.set_patch_dropout(0.5)
    seen = []
    model.towers.vision_model.encoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    images, _, _ = inputs(100)
    model.train()
    model.encode_images(images)
    model.eval()
    model.encode_images(images)
    assert seen == [8, 16]  # 16 patches, no class token: half of them in training, all in eval


def test_a_siglip_start_refuses_an_mlm_head_with_a_clear_error(siglip_folder):
    from mmscale.models.dual_encoder import SiglipDualEncoder as Encoder

    with pytest.raises(ValueError, match="SigLIP text tower.*masked-LM head"):
        Encoder(SiglipModel.from_pretrained(siglip_folder), mlm_head=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "mmscale.cli", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_lora_fine_tuning_of_a_siglip_folder_keeps_its_format_and_exports_int8(siglip_folder, tmp_path):
    """`mmscale finetune --checkpoint <SigLIP folder>` with the shipped LoRA config: SigLIP's loss, caption length
    and padding, and its processor's normalization; final/ is a SiglipModel folder whose embeddings mmscale and
    transformers agree on and the adapters changed; its int8 export keeps the towers' heads float."""
    from mmscale.shards.synthetic import make_synthetic_shards

    shards = make_synthetic_shards(tmp_path / "train", 128, samples_per_shard=64, seed=0, domain="dim")
    run = tmp_path / "run"
    result = cli("finetune", "--checkpoint", str(siglip_folder), "--config", str(REPO / "configs/finetune/lora.yaml"),
                 *merge_overrides(f"data.train={'::'.join(shards)}", f"output_dir={run}", "data.workers=0",
                                  "train.samples=128", "train.global_batch_size=32", "train.progress=false",
                                  "train.tensorboard=false"))
    line = next(line for line in result.stdout.splitlines() if line.startswith("mmscale train: model "))
    assert f"SiglipModel from {siglip_folder}; images {SIDE} px, mean (0.500, 0.500, 0.500)" in line
    assert f"captions of {POSITIONS} tokens padded to that length; loss siglip" in line
    records = [json.loads(text) for text in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(record["loss"] > 0 for record in records if record["kind"] == "train")
    final = run / "final"
    base, tuned = SiglipModel.from_pretrained(siglip_folder).eval(), AutoModel.from_pretrained(final).eval()
    assert isinstance(tuned, SiglipModel)
    images, pixels, ids = inputs(base.config.text_config.vocab_size, seed=2)
    expected = reference(tuned, pixels, ids)
    assert_same(ours(load_model(final).eval(), images, ids), expected)
    assert not torch.allclose(reference(base, pixels, ids)["image"], expected["image"], atol=1e-4)
    assert not torch.equal(tuned.logit_bias, base.logit_bias)  # SigLIP's bias trains with the adapters

    cli("export", "--checkpoint", str(final), "--out", str(tmp_path / "int8"), "--quantize", "int8")
    int8 = AutoModel.from_pretrained(tmp_path / "int8").eval()
    assert type(int8.vision_model.encoder.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    assert int8.text_model.head.weight.dtype == torch.float16  # the towers' heads stay out of int8
    exported = ours(load_model(tmp_path / "int8").eval(), images, ids)
    for name in ("image", "text"):
        assert F.cosine_similarity(exported[name].float(), expected[name]).min() >= 0.98, name


# --- open_clip ---------------------------------------------------------------------------------------------------
OPEN_CLIP_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": SIDE, "layers": 2, "width": 64, "patch_size": 8,
                                                    "head_width": 16},
                    "text_cfg": {"context_length": POSITIONS, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2}}
CAPTIONS = ["a red circle on the left", "Two  BIG squares!", "the character 7"]


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory) -> dict:
    """A small random open_clip CLIP (gelu, as open_clip's non-OpenAI configs) made by open_clip itself from a custom
    config, its weights saved as open_clip saves them (a torch state dict) and the config as a JSON file."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip import factory

    root = tmp_path_factory.mktemp("open_clip")
    config_file = root / "mm-tiny.json"
    config_file.write_text(json.dumps(OPEN_CLIP_CONFIG))
    factory._MODEL_CONFIGS["mm-tiny"] = OPEN_CLIP_CONFIG  # what open_clip.add_model_config does with the folder
    torch.manual_seed(0)
    model = open_clip.create_model("mm-tiny").eval()
    torch.save(model.state_dict(), root / "weights.pt")
    return {"model": model, "weights": root / "weights.pt", "config": config_file,
            "tokens": open_clip.get_tokenizer("mm-tiny")(CAPTIONS)}


def test_an_open_clip_checkpoint_converts_to_a_clip_folder_with_its_embeddings_tokens_and_preprocessing(
        open_clip_checkpoint, tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    out = tmp_path / "converted"
    report = json.loads(cli("convert", "--from-open-clip", "mm-tiny", "--weights", str(open_clip_checkpoint["weights"]),
                            "--out", str(out), "--open-clip-config", str(open_clip_checkpoint["config"]))
                        .stdout.strip().splitlines()[-1])
    assert report["class"] == "CLIPModel"
    source, converted = open_clip_checkpoint["model"], CLIPModel.from_pretrained(out).eval()
    tokens = open_clip_checkpoint["tokens"]
    encoded = AutoTokenizer.from_pretrained(out)(CAPTIONS, padding="max_length", max_length=POSITIONS,
                                                 return_tensors="pt")
    mask = encoded["attention_mask"].bool()
    assert torch.equal(encoded["input_ids"][mask], tokens[mask])  # the same BPE ids, up to the padding token
    processor = CLIPImageProcessor.from_pretrained(out)
    assert processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073]) and processor.resample == 3
    images = torch.randint(0, 256, (2, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    pixels = (images.float() / 255 - torch.tensor(processor.image_mean).view(1, 3, 1, 1)) / \
        torch.tensor(processor.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = {"image": source.encode_image(pixels), "text": source.encode_text(tokens)}
        hf = {"image": converted.get_image_features(pixel_values=pixels).pooler_output,
              "text": converted.get_text_features(input_ids=tokens).pooler_output}
        model = load_model(out).eval()
        mmscale = {"image": model.encode_images(images), "text": model.encode_texts(encoded["input_ids"], mask.long())}
    assert_same(hf, expected)
    assert_same(mmscale, expected)
    torch.testing.assert_close(converted.logit_scale.exp(), source.logit_scale.exp())


def test_open_clip_layouts_that_clip_model_cannot_hold_are_refused_by_name(open_clip_checkpoint, tmp_path):
    from mmscale.models.from_open_clip import ConversionError, convert

    refused = {"coca": OPEN_CLIP_CONFIG | {"multimodal_cfg": {"width": 48}},
               "pooler": OPEN_CLIP_CONFIG | {"vision_cfg": OPEN_CLIP_CONFIG["vision_cfg"] | {"attentional_pool": True}},
               "siglip": OPEN_CLIP_CONFIG | {"init_logit_bias": -10}}
    for name, config in refused.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        with pytest.raises(ConversionError, match={"coca": "CoCa", "pooler": "vision_cfg.attentional_pool=True",
                                                   "siglip": "init_logit_bias=-10"}[name]):
            convert(name, open_clip_checkpoint["weights"], tmp_path / name, config_file=tmp_path / f"{name}.json")
    assert not any((tmp_path / name).exists() for name in refused)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(OPEN_CLIP_CONFIG | {"embed_dim": 16}))
    with pytest.raises(ConversionError, match="text_projection is .* in the weights"):
        convert("wrong", open_clip_checkpoint["weights"], tmp_path / "wrong", config_file=wrong)
    pickled = tmp_path / "code.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": ConversionError("a pickled object")}, pickled)
    with pytest.raises(ConversionError, match="not a tensors-only torch file"):
        convert("mm-tiny", pickled, tmp_path / "pickled", config_file=open_clip_checkpoint["config"])


@pytest.mark.slow
def test_lora_fine_tuning_from_an_open_clip_checkpoint_converts_it_into_the_run_and_exports_int8(
        open_clip_checkpoint, tmp_path):
    """`mmscale finetune --checkpoint open_clip:CONFIG.json:WEIGHTS`: converted into the run's folder, fine-tuned as
    a CLIPModel (CLIP's loss and preprocessing), final/ a CLIPModel folder, exported int8."""
    from transformers import CLIPModel

    from mmscale.shards.synthetic import make_synthetic_shards

    shards = make_synthetic_shards(tmp_path / "train", 128, samples_per_shard=64, seed=0, domain="dim")
    run = tmp_path / "run"
    spec = f"open_clip:{open_clip_checkpoint['config']}:{open_clip_checkpoint['weights']}"
    result = cli("finetune", "--checkpoint", spec, "--config", str(REPO / "configs/finetune/lora.yaml"),
                 *merge_overrides(f"data.train={'::'.join(shards)}", f"output_dir={run}", "data.workers=0",
                                  f"data.context_length={POSITIONS}", "train.samples=128", "train.global_batch_size=32",
                                  "train.progress=false", "train.tensorboard=false"))
    line = next(line for line in result.stdout.splitlines() if line.startswith("mmscale train: model "))
    assert f"CLIPModel from {run / 'open_clip' / 'mm-tiny'}; images {SIDE} px, mean (0.481, 0.458, 0.408)" in line
    assert "loss clip" in line
    tuned = CLIPModel.from_pretrained(run / "final").eval()
    source = open_clip_checkpoint["model"]
    pixels = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert not torch.allclose(tuned.get_image_features(pixel_values=pixels).pooler_output,
                                  source.encode_image(pixels), atol=1e-4)  # the adapters changed the towers
    cli("export", "--checkpoint", str(run / "final"), "--out", str(tmp_path / "int8"), "--quantize", "int8")
    int8 = AutoModel.from_pretrained(tmp_path / "int8").eval()
    assert type(int8.text_model.encoder.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
