"""Consolidated checkpoints: what mmscale saves, plain `transformers` loads with the same embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    BertModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionModel,
    VisionTextDualEncoderModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from mmscale.models import CheckpointError, ModelConfig, build_model, load_model

VOCAB = 400


def images(count: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def assert_round_trip(model, folder, tokenizer) -> None:
    """Save `model`; then `transformers` alone (AutoModel + the saved processor and tokenizer) must
    give mmscale's embeddings, and mmscale's own reload must give its MLM logits and SigLIP bias."""
    model.eval()
    model.save(folder, tokenizer=tokenizer)
    hf = AutoModel.from_pretrained(folder).eval()
    assert type(hf) is type(model.towers)
    pixels = images(3, model.image_size)
    pil_images = [Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())) for image in pixels]
    pixel_values = AutoImageProcessor.from_pretrained(folder)(images=pil_images, return_tensors="pt")["pixel_values"]
    captions = ["a red circle on the left", "two blue squares", "a photo"]
    text = AutoTokenizer.from_pretrained(folder)(captions, padding="max_length", max_length=16, truncation=True,
                                                 return_tensors="pt")
    reloaded = load_model(folder, logit_bias_init=0.0 if model.logit_bias is not None else None).eval()
    with torch.no_grad():
        ours_images = model.encode_images(pixels)
        torch.testing.assert_close(hf.get_image_features(pixel_values=pixel_values).pooler_output, ours_images,
                                   rtol=0, atol=1e-5)
        ours_texts = model.encode_texts(text["input_ids"], text["attention_mask"])
        theirs_texts = hf.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        torch.testing.assert_close(theirs_texts.pooler_output, ours_texts, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded.encode_images(pixels), ours_images, rtol=0, atol=1e-5)
        assert (reloaded.mlm_head is None) == (model.mlm_head is None)
        if model.mlm_head is not None:
            labels = text["input_ids"].clone()
            torch.testing.assert_close(reloaded.mlm_logits(text["input_ids"], text["attention_mask"], labels),
                                       model.mlm_logits(text["input_ids"], text["attention_mask"], labels))
            assert reloaded.mlm_head.decoder.weight is reloaded.towers.text_model.get_input_embeddings().weight
        if model.logit_bias is not None:
            assert reloaded.logit_bias.item() == model.logit_bias.item()
    assert not list(folder.parent.glob(f".{folder.name}.*")), "staging folders left behind"


def test_tiny_round_trips_through_automodel(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer), logit_bias_init=-10.0)
    with torch.no_grad():  # a trained-looking head, so a reload that re-initializes it would show
        model.mlm_head.decoder.bias.normal_()
        model.logit_bias.fill_(-7.25)
    assert_round_trip(model, tmp_path / "final", tokenizer)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "final"), VisionTextDualEncoderModel)


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path, tokenizer):
    first = build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer))
    first.save(tmp_path / "final", tokenizer=tokenizer)
    torch.manual_seed(1)
    second = build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer))
    second.save(tmp_path / "final", tokenizer=tokenizer)
    reloaded = load_model(tmp_path / "final")
    assert torch.equal(reloaded.towers.visual_projection.weight, second.towers.visual_projection.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.mark.slow
def test_base_round_trips_through_automodel(tmp_path, tokenizer):
    model = build_model(ModelConfig(preset="base"), vocab_size=len(tokenizer))
    assert_round_trip(model, tmp_path / "final", tokenizer)


@pytest.fixture
def clip_folder(tmp_path):
    """A tiny Hugging Face CLIPModel folder, as a released CLIP checkpoint is laid out."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=32,
    )
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                       image_std=[0.25] * 3, resample=2).save_pretrained(folder)
    return folder


def test_clip_folder_builds_without_mlm_and_round_trips(clip_folder, tmp_path, tokenizer):
    model = build_model(ModelConfig(init_from=str(clip_folder)))
    assert model.kind == "clip" and model.mlm_head is None
    assert model.image_mean.flatten().tolist() == [0.5] * 3  # the checkpoint's own normalization
    original = CLIPModel.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        pixel_values = (images(2, 32).float() / 255 - 0.5) / 0.25
        torch.testing.assert_close(model.eval().encode_images(images(2, 32)),
                                   original.get_image_features(pixel_values=pixel_values).pooler_output)
    assert_round_trip(model, tmp_path / "final", tokenizer)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "final"), CLIPModel)


@pytest.fixture
def vit_folder(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "vit"
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_minilm_and_a_vit_pair_round_trips(vit_folder, minilm_dir, tmp_path):
    model = build_model(ModelConfig(vision_from=str(vit_folder), text_from=str(minilm_dir), projection_dim=64))
    released = BertModel.from_pretrained(minilm_dir)
    for name, tensor in released.state_dict().items():  # the released weights, not a re-initialization
        torch.testing.assert_close(model.towers.text_model.state_dict()[name], tensor, rtol=0, atol=0)
    assert model.mlm_head is not None and model.image_mean.flatten().tolist() == [0.5] * 3
    assert_round_trip(model, tmp_path / "final", AutoTokenizer.from_pretrained(minilm_dir))


def test_clip_vision_tower_pairs_with_a_bert_text_tower(clip_folder, minilm_dir, tmp_path):
    model = build_model(ModelConfig(vision_from=str(clip_folder), text_from=str(minilm_dir)))
    assert isinstance(model.towers.vision_model, CLIPVisionModel)
    assert_round_trip(model, tmp_path / "final", AutoTokenizer.from_pretrained(minilm_dir))


def test_wrong_or_missing_folders_say_what_was_expected(tmp_path, minilm_dir, vit_folder):
    with pytest.raises(CheckpointError, match="no such folder; expected a Hugging Face CLIPModel"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model folder .no config.json."):
        load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="holds a 'bert' model; .*set model.vision_from and model.text_from"):
        load_model(minilm_dir)
    with pytest.raises(CheckpointError, match="not a text encoder"):
        build_model(ModelConfig(vision_from=str(vit_folder), text_from=str(vit_folder)))
    with pytest.raises(CheckpointError, match="not a vision model"):
        build_model(ModelConfig(vision_from=str(minilm_dir), text_from=str(minilm_dir)))


def test_pickle_weights_are_refused(clip_folder):
    state = CLIPModel.from_pretrained(clip_folder).state_dict()
    (clip_folder / "model.safetensors").unlink()
    torch.save(state, clip_folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        load_model(clip_folder)


def test_loading_a_folder_never_runs_its_code(clip_folder, tmp_path):
    marker = tmp_path / "code-ran"
    (clip_folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((clip_folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (clip_folder / "config.json").write_text(json.dumps(config))
    model = load_model(clip_folder)
    assert model.kind == "clip" and not marker.exists()


def test_a_checkpoint_missing_its_heads_file_is_reported(tmp_path, tokenizer):
    build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer)).save(tmp_path / "final")
    (tmp_path / "final" / "mmscale_heads.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not written completely"):
        load_model(tmp_path / "final")
