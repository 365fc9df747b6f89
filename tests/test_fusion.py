"""The fusion model kind (issue 27): hard negatives, the BLIP layout against transformers' own class, the saved
folder, the losses and their cost. Training on ranks is in tests/test_train.py (parametrized by model kind)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

from mmscale.data.text import CaptionEncoder, masked_positions
from mmscale.losses import LossConfig, PretrainingObjective, itm_loss
from mmscale.models import CheckpointError, ModelConfig, build_model, load_model, training_flops_per_sample
from mmscale.models.fusion import FusionEncoder
from mmscale.models.heads import hard_negatives

CAPTIONS = ["a red circle on a gray background", "a blue square on a white background", "a green star",
            "a red circle on a gray background", "a small yellow triangle", "a purple cross on a dark background"]


def test_hard_negatives_never_pick_the_pair_or_an_identical_caption():
    torch.manual_seed(0)
    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 8, 3], [2, 5, 6, 3], [2, 9, 9, 3], [2, 7, 8, 3]])
    for _ in range(50):
        features = torch.randn(5, 8), torch.randn(5, 8)
        negatives = hard_negatives(*features, ids, torch.tensor(10.0))
        for row in range(5):
            assert not torch.equal(ids[negatives.text_index[row]], ids[row])
            assert not torch.equal(ids[negatives.image_index[row]], ids[row])
    assert negatives.text_valid.tolist() == [1.0] * 5


def test_hard_negatives_skip_captions_of_the_same_label():
    """Where the shards have `.cls` labels, a caption of the same label is no negative ("the character 7" is true
    of the image of "a printed 7"); -1 (no label) excludes nothing more."""
    torch.manual_seed(0)
    ids = torch.tensor([[2, 5, 3], [2, 6, 3], [2, 7, 3], [2, 8, 3]])
    groups = torch.tensor([0, 0, 1, -1])
    picked = set()
    for _ in range(200):
        negatives = hard_negatives(torch.randn(4, 8), torch.randn(4, 8), ids, torch.tensor(10.0), groups=groups)
        for row, (text, image) in enumerate(zip(negatives.text_index.tolist(), negatives.image_index.tolist())):
            assert text != row and image != row
            if groups[row] >= 0:
                assert groups[text] != groups[row] and groups[image] != groups[row]
            picked.add((row, text))
    assert (3, 0) in picked and (3, 1) in picked  # no label: every other row is a candidate


def test_hard_negatives_follow_the_masked_softmax_of_the_similarities():
    """Gumbel-max draws have BLIP's distribution: softmax(scale x similarity) over the allowed rows."""
    torch.manual_seed(1)
    image, text = torch.randn(4, 6), torch.randn(4, 6)
    ids = torch.arange(4)[:, None].repeat(1, 3)
    scale = torch.tensor(3.0)
    logits = scale * torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    expected = logits.masked_fill(torch.eye(4, dtype=torch.bool), float("-inf")).softmax(dim=1)
    counts = torch.zeros(4, 4)
    torch.manual_seed(2)
    for _ in range(4000):
        chosen = hard_negatives(image, text, ids, scale).text_index
        counts[torch.arange(4), chosen] += 1
    observed = counts / counts.sum(dim=1, keepdim=True)
    assert torch.allclose(observed, expected, atol=0.03), (observed, expected)
    assert counts.diagonal().sum() == 0


def test_a_batch_of_identical_captions_has_no_negative_and_weight_zero():
    ids = torch.tensor([[2, 5, 3]] * 3)
    negatives = hard_negatives(torch.randn(3, 4), torch.randn(3, 4), ids, torch.tensor(5.0))
    assert negatives.text_valid.tolist() == [0.0, 0.0, 0.0] and negatives.image_valid.tolist() == [0.0, 0.0, 0.0]
    logits = torch.randn(9, 2)
    weights = torch.cat([torch.ones(3), negatives.text_valid, negatives.image_valid])
    positives_only = torch.nn.functional.cross_entropy(logits[:3], torch.ones(3, dtype=torch.long))
    torch.testing.assert_close(itm_loss(logits, weights), positives_only)


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory, tokenizer):
    """A small random BlipForImageTextRetrieval (transformers' class, its own init) saved with a BlipProcessor, as a
    released BLIP ITM folder is."""
    torch.manual_seed(0)
    config = BlipConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "initializer_range": 0.02},
        image_text_hidden_size=16)
    config.architectures = ["BlipForImageTextRetrieval"]
    model = BlipForImageTextRetrieval(config).eval()
    folder = tmp_path_factory.mktemp("blip") / "itm"
    model.save_pretrained(folder, safe_serialization=True)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                                                 image_std=[0.2, 0.25, 0.3]), tokenizer)
    processor.save_pretrained(folder)
    return folder


def _inputs(tokenizer, size: int, rows: int = 4):
    encoded = CaptionEncoder(tokenizer, context_length=16, mlm_probability=0.0).encode(CAPTIONS[:rows])
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (rows, 3, size, size), dtype=np.uint8))
    return images, encoded["input_ids"], encoded["attention_mask"]


def _hf_scores(hf: BlipForImageTextRetrieval, pixel_values, ids, mask):
    with torch.no_grad():
        itm = hf(input_ids=ids, pixel_values=pixel_values, attention_mask=mask).itm_score.softmax(-1)[:, 1]
        itc = hf(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, use_itm_head=False).itm_score
    return itm, itc


def _our_scores(model: FusionEncoder, images, ids, mask):
    with torch.no_grad():
        itm = model.itm_scores(images, ids, mask)
        image = torch.nn.functional.normalize(model.encode_images(images), dim=-1)
        text = torch.nn.functional.normalize(model.encode_texts(ids, mask), dim=-1)
    return itm, image @ text.T


def test_a_blip_itm_folder_starts_a_fusion_model_that_scores_as_transformers_does(blip_folder, tokenizer):
    model = build_model(ModelConfig(init_from=str(blip_folder))).eval()
    assert isinstance(model, FusionEncoder) and model.fusion_layers == 2 and model.mlm_head is not None
    assert model.image_mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])  # the folder's processor
    assert float(model.logit_scale().detach()) == pytest.approx(1 / 0.07)  # BLIP folders keep no temperature
    hf = BlipForImageTextRetrieval.from_pretrained(blip_folder).eval()
    images, ids, mask = _inputs(tokenizer, 32)
    ours, theirs = _our_scores(model, images, ids, mask), _hf_scores(hf, model.pixel_values(images), ids, mask)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


def test_a_saved_fusion_model_loads_in_transformers_and_gives_the_same_scores(blip_folder, tokenizer, tmp_path):
    """After training steps (weights no longer BLIP's) the folder is a plain BlipForImageTextRetrieval with its
    BlipProcessor: the processor's pixels and ids give mmscale's ITM probabilities and ITC similarities; mmscale's
    heads come back bit for bit."""
    model = build_model(ModelConfig(init_from=str(blip_folder), temperature_init=0.05))
    objective = PretrainingObjective(model, LossConfig(mlm_weight=0.5))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    images, ids, mask = _inputs(tokenizer, 32, rows=6)
    encoder = CaptionEncoder(tokenizer, context_length=16, mlm_probability=0.3)
    for step in range(3):
        batch = encoder.encode_and_mask(CAPTIONS, seed=step)
        positions, targets = masked_positions(batch["mlm_labels"])
        out = objective(images, batch["input_ids"], batch["attention_mask"], batch["mlm_input_ids"],
                        mlm_positions=positions, mlm_targets=targets)
        out.total.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(out.itm) > 0 and float(out.mlm) > 0
    model.eval().save(tmp_path / "final", tokenizer=tokenizer)
    hf, info = BlipForImageTextRetrieval.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    processor = BlipProcessor.from_pretrained(tmp_path / "final")
    pictures = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    inputs = processor(images=pictures, text=CAPTIONS, padding=True, return_tensors="pt")
    assert "token_type_ids" not in inputs
    theirs = _hf_scores(hf.eval(), inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    ours = _our_scores(model, images, inputs["input_ids"], inputs["attention_mask"])
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
    reloaded = load_model(tmp_path / "final")
    assert isinstance(reloaded, FusionEncoder)
    assert torch.equal(reloaded.logit_scale_log, model.logit_scale_log.detach())
    for name, tensor in model.mlm_head.state_dict().items():
        assert torch.equal(reloaded.mlm_head.state_dict()[name], tensor), name


@pytest.mark.parametrize("architecture,named", [("BlipForQuestionAnswering", "VQA"),
                                                 ("BlipForConditionalGeneration", "captioning"),
                                                 ("BlipModel", "contrastive-only")])
def test_other_blip_folders_are_refused_with_the_reason(blip_folder, tmp_path, architecture, named):
    import json
    import shutil

    folder = tmp_path / architecture
    shutil.copytree(blip_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": [architecture]}))
    with pytest.raises(CheckpointError, match=f"{named}.*BlipForImageTextRetrieval"):
        load_model(folder)


def test_fusion_layers_must_cover_the_text_tower_and_attention_is_eager():
    with pytest.raises(ValueError, match=r"fusion_layers=2 but the text tower has 4 layers.*model.fusion_layers=4"):
        ModelConfig(preset="tiny", fusion_layers=2)
    with pytest.raises(ValueError, match="eager only"):
        ModelConfig(preset="tiny", fusion_layers=4, attention="sdpa")
    assert ModelConfig(preset="tiny", fusion_layers=2, text_layers=2).fusion_layers == 2


@pytest.fixture(scope="module")
def tiny_fusion(tokenizer):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", fusion_layers=4), vocab_size=len(tokenizer),
                       token_ids={"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id,
                                  "sep": tokenizer.sep_token_id})


def test_the_fusion_objective_trains_itm_and_image_conditioned_mlm(tiny_fusion, tokenizer):
    """At init the ITM loss is the 1:2 prior's (ln 3 - 2/3 ln 2 = 0.64); its gradient reaches the cross-attention,
    and the MLM logits depend on the image while the contrastive text features do not."""
    objective = PretrainingObjective(tiny_fusion, LossConfig(mlm_weight=0.1, itm_weight=1.0))
    encoder = CaptionEncoder(tokenizer, context_length=16, mlm_probability=0.3)
    batch = encoder.encode_and_mask(CAPTIONS * 2, seed=0)
    positions, targets = masked_positions(batch["mlm_labels"])
    images = torch.randint(0, 256, (12, 3, 64, 64), dtype=torch.uint8)
    out = objective(images, batch["input_ids"], batch["attention_mask"], batch["mlm_input_ids"],
                    mlm_positions=positions, mlm_targets=targets)
    prior = math.log(3) - 2 / 3 * math.log(2)
    assert float(out.itm) == pytest.approx(prior, abs=0.1)
    assert float(out.total) == pytest.approx(float(out.contrastive + 0.1 * out.mlm + out.itm), rel=1e-5)
    out.total.backward()
    cross = tiny_fusion.towers.text_encoder.encoder.layer[0].crossattention.self.key.weight
    assert cross.grad is not None and cross.grad.abs().sum() > 0
    tiny_fusion.zero_grad()
    with torch.no_grad():
        flipped = images.flip(0)
        first = tiny_fusion.mlm_logits(batch["mlm_input_ids"], batch["attention_mask"], batch["mlm_labels"], images=images)[0]
        second = tiny_fusion.mlm_logits(batch["mlm_input_ids"], batch["attention_mask"], batch["mlm_labels"],
                                        images=flipped)[0]
        assert not torch.allclose(first, second)
        features = tiny_fusion(images, batch["input_ids"], batch["attention_mask"]).text_features
        torch.testing.assert_close(features, tiny_fusion(flipped, batch["input_ids"], batch["attention_mask"]).text_features)


TOP_MODULES = ("towers.text_encoder", "towers.text_proj", "towers.vision_model", "towers.vision_proj",
               "towers.itm_head", "mlm_head")


def test_the_feature_pass_is_a_prefix_of_the_full_forward(tiny_fusion, tokenizer):
    """GradCache replays a micro-batch: its feature pass (no ITM, no MLM) must run the same modules first, in the
    same order, so ZeRO-3 keeps its module trace."""
    order = []
    hooks = [module.register_forward_pre_hook(lambda module, args, name=name: order.append(name))
             for name, module in tiny_fusion.named_modules() if name in TOP_MODULES]
    try:
        encoder = CaptionEncoder(tokenizer, context_length=16, mlm_probability=0.3)
        batch = encoder.encode_and_mask(CAPTIONS, seed=0)
        positions, targets = masked_positions(batch["mlm_labels"])
        images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
        with torch.no_grad():
            tiny_fusion(images, batch["input_ids"], batch["attention_mask"])
            features_only, order[:] = list(order), []
            tiny_fusion(images, batch["input_ids"], batch["attention_mask"], batch["mlm_input_ids"],
                        mlm_positions=positions, mlm_targets=targets, itm=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert features_only == ["towers.text_encoder", "towers.text_proj", "towers.vision_model", "towers.vision_proj"]
    assert order == features_only + ["towers.text_encoder", "towers.itm_head", "mlm_head"]


def test_flop_count_matches_torch_flop_counter_with_fusion(tokenizer):
    """training_flops_per_sample counts the fusion model's passes (contrastive text and image, three ITM rows and
    the masked captions with cross-attention, the heads) as torch's own counter does."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", fusion_layers=4), vocab_size=len(tokenizer))
    objective = PretrainingObjective(model, LossConfig(mlm_weight=0.1, itm_weight=1.0))
    ids = torch.randint(5, len(tokenizer), (8, 64))
    labels = torch.full_like(ids, -100)
    labels[:, 1:11] = ids[:, 1:11]
    masked = ids.clone()
    masked[:, 1:11] = 4
    positions, targets = masked_positions(labels)
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        objective(images, ids, torch.ones_like(ids), masked, mlm_positions=positions, mlm_targets=targets).total.backward()
    predicted = 8 * training_flops_per_sample(model, context_length=64, masked_tokens=10, contrastive_batch_size=8,
                                              itm=True)
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.10)
    dual = build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer))
    assert predicted / 8 > 1.8 * training_flops_per_sample(dual, context_length=64, masked_tokens=10,
                                                           contrastive_batch_size=8)


def test_lora_adapts_self_and_cross_attention_and_merges_to_the_adapters_scores(blip_folder, tokenizer, tmp_path):
    from mmscale.finetune.lora import LoraSettings, apply_lora, merge_adapter, save_adapter

    model = build_model(ModelConfig(init_from=str(blip_folder)))
    trainable, total = apply_lora(model, LoraSettings(enabled=True, rank=4))
    adapted = {name.split(".lora_A")[0] for name, _ in model.towers.named_modules() if name.endswith("lora_A")}
    for part in ("crossattention.self.key", "crossattention.self.value", "crossattention.output.dense",
                 "attention.self.query", "attention.output.dense", "self_attn.qkv", "self_attn.projection"):
        assert any(name.endswith(part) for name in adapted), part
    assert 0 < trainable < total and model.logit_scale_parameter.requires_grad
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("itm_head" in name for name in trained) and any("text_proj" in name for name in trained)
    with torch.no_grad():  # move the adapters off zero, so merging has something to fold in
        for name, parameter in model.towers.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    images, ids, mask = _inputs(tokenizer, 32)
    model.eval()
    adapter_scores = _our_scores(model, images, ids, mask)
    save_adapter(model, tmp_path / "adapter", base=str(blip_folder))
    merged = merge_adapter(model)
    for mine, reference in zip(_our_scores(merged, images, ids, mask), adapter_scores):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
    assert isinstance(merged.towers, BlipForImageTextRetrieval)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(BlipForImageTextRetrieval.from_pretrained(blip_folder), tmp_path / "adapter")
    with torch.no_grad():
        hf_itm = reloaded.eval()(input_ids=ids, pixel_values=merged.pixel_values(images),
                                 attention_mask=mask).itm_score.softmax(-1)[:, 1]
    torch.testing.assert_close(hf_itm, adapter_scores[0], rtol=1e-4, atol=1e-5)


def test_int8_export_keeps_the_itm_head_and_the_scores_close(blip_folder, tokenizer, tmp_path):
    """bitsandbytes LLM.int8 on CPU: the towers' linear layers in int8 (the fused qkv and the cross-attention's
    keys and values included), the projections and ITM head in fp16; plain transformers reloads it."""
    from mmscale.export.quantize import export

    model = build_model(ModelConfig(init_from=str(blip_folder)))
    model.save(tmp_path / "float", tokenizer=tokenizer)
    report = export(str(tmp_path / "float"), str(tmp_path / "int8"), quantize="int8")
    assert report["image_cosine_min"] > 0.98 and report["text_cosine_min"] > 0.98, report
    assert report["itm_probability_max_difference"] < 0.05, report
    import bitsandbytes as bnb

    hf = BlipForImageTextRetrieval.from_pretrained(tmp_path / "int8")
    layer = hf.text_encoder.encoder.layer[0]
    assert isinstance(layer.crossattention.self.key, bnb.nn.Linear8bitLt)
    assert isinstance(hf.vision_model.encoder.layers[0].self_attn.qkv, bnb.nn.Linear8bitLt)
    assert not isinstance(hf.itm_head, bnb.nn.Linear8bitLt)
    reloaded = load_model(tmp_path / "int8")
    assert isinstance(reloaded, FusionEncoder)
    assert float(reloaded.logit_scale().detach()) == pytest.approx(float(model.logit_scale().detach()), rel=1e-3)


def test_the_readme_snippet_loads_a_saved_fusion_model_with_the_classes_it_names(tiny_fusion, tokenizer, tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                   if "BlipForImageTextRetrieval" in block)
    tiny_fusion.eval().save(tmp_path / "final", tokenizer=tokenizer)
    pixels = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    namespace = {"image": Image.fromarray(pixels)}
    with torch.no_grad():
        exec(snippet.replace('"run/final"', repr(str(tmp_path / "final"))), namespace)  # noqa: S102
        encoded = CaptionEncoder(tokenizer, context_length=32, mlm_probability=0.0).encode(
            ["a red circle on a gray background"])
        expected = tiny_fusion.itm_scores(torch.from_numpy(pixels).permute(2, 0, 1)[None], encoded["input_ids"],
                                          encoded["attention_mask"])
    torch.testing.assert_close(namespace["p_match"], expected, rtol=1e-4, atol=1e-5)
    assert namespace["cosine"].shape == (1, 1)


ZERO3_FUSION_BUILD = """
import json, math
import deepspeed, torch
from mmscale.losses import LossConfig
from mmscale.models import ModelConfig
from mmscale.train.config import TrainConfig
from mmscale.train.engine import batch_layout, build_objective, deepspeed_config, init_distributed
init_distributed()
train = TrainConfig(precision="fp32", deepspeed="configs/deepspeed/zero3.json", global_batch_size=2, steps=1)
config, _ = deepspeed_config(train, batch_layout(train, 1))
model = build_objective(ModelConfig(preset="tiny", fusion_layers=4), LossConfig(), config, vocab_size=100).model
parameters = dict(model.named_parameters())
report = {"partitioned": all(hasattr(p, "ds_id") for p in parameters.values())}
with deepspeed.zero.GatheredParameters(list(parameters.values())):
    report["finite"] = all(bool(torch.isfinite(p).all()) for p in parameters.values())
    report["class_std"] = float(model.towers.vision_model.embeddings.class_embedding.std())
    report["position_std"] = float(model.towers.vision_model.embeddings.position_embedding.std())
    report["cross_key_std"] = float(model.towers.text_encoder.encoder.layer[0].crossattention.self.key.weight.std())
    report["itm_std"] = float(model.towers.itm_head.weight.std())
    report["logit_scale"] = float(model.logit_scale_log.exp())
print(json.dumps(report))
"""


@pytest.mark.slow
def test_a_fusion_model_built_under_zero3_gets_mmscales_initialization():
    """Built partitioned (zero.Init), then initialized once gathered: open_clip's scheme on BLIP's modules, not
    BLIP's own (its ViT's class and position embeddings at std 1e-10), every value finite, the temperature set."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mmscale.train.engine import free_port

    result = subprocess.run([sys.executable, "-c", ZERO3_FUSION_BUILD], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=300,
                            env=os.environ | {"MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built["partitioned"] and built["finite"]
    assert built["class_std"] == pytest.approx(128 ** -0.5, rel=0.5)
    assert built["position_std"] == pytest.approx(128 ** -0.5, rel=0.2)
    assert built["cross_key_std"] == pytest.approx(128 ** -0.5, rel=0.2)  # unit gain from the image width
    assert built["itm_std"] == pytest.approx(0.02, rel=0.5)
    assert built["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


def _global_negatives_rank(rank: int, port: int, vocab_size: int, batch: dict, results: str) -> None:
    """One of two gloo ranks, each with one pair of `batch`: ITM-only loss with loss.itm_negatives=global, and the
    gradients of the parameters it reaches."""
    import os

    import torch.distributed as dist
    from distkit import save_from_every_rank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(preset="tiny", fusion_layers=4), vocab_size=vocab_size)
        objective = PretrainingObjective(model, LossConfig(contrastive_weight=0.0, mlm_weight=0.0, itm_weight=1.0,
                                                           itm_negatives="global"))
        mine = slice(rank, rank + 1)
        out = objective(batch["images"][mine], batch["input_ids"][mine], batch["attention_mask"][mine])
        out.total.backward()
        save_from_every_rank({"loss": out.itm.detach(), "grads": _itm_gradients(model)}, results)
    finally:
        dist.destroy_process_group()


def _itm_gradients(model: FusionEncoder) -> dict[str, torch.Tensor]:
    """Gradients of a vision, a cross-attention, a text and the ITM head's weights."""
    towers = model.towers
    return {name: parameter.grad.clone() for name, parameter in (
        ("patch", towers.vision_model.embeddings.patch_embedding.weight),
        ("cross", towers.text_encoder.encoder.layer[1].crossattention.self.key.weight),
        ("words", towers.text_encoder.embeddings.word_embeddings.weight),
        ("itm", towers.itm_head.weight))}


@pytest.mark.slow
def test_global_negatives_on_two_ranks_equal_one_process_on_both_pairs(tokenizer, tmp_path):
    """loss.itm_negatives=global with one pair per rank: each pair's only candidate is the other rank's, as in one
    process with both pairs and micro-batch negatives. The mean loss and the summed gradients (the image tokens'
    gather sends each rank's share back to the image's own rank) equal that process's."""
    import torch.multiprocessing as mp
    from distkit import free_port

    encoder = CaptionEncoder(tokenizer, context_length=16, mlm_probability=0.0, pad_to_longest=False)
    batch = dict(encoder.encode_and_mask(CAPTIONS[:2], seed=0))
    batch["images"] = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    results = tmp_path / "ranks.pt"
    mp.spawn(_global_negatives_rank, args=(free_port(), len(tokenizer), batch, str(results)), nprocs=2, join=True)
    ranks = torch.load(results)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", fusion_layers=4), vocab_size=len(tokenizer))
    objective = PretrainingObjective(model, LossConfig(contrastive_weight=0.0, mlm_weight=0.0, itm_weight=1.0))
    out = objective(batch["images"], batch["input_ids"], batch["attention_mask"])
    out.total.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, out.itm.detach(), rtol=1e-5, atol=1e-6)
    for name, expected in _itm_gradients(model).items():
        assert expected.abs().sum() > 0, name
        torch.testing.assert_close((ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2, expected,
                                   rtol=1e-4, atol=1e-7, msg=name)


def test_global_itm_negatives_ask_for_one_caption_length_on_every_rank():
    from mmscale.config import ConfigError, load_config
    from mmscale.train.config import TrainRunConfig

    with pytest.raises(ConfigError, match="set data.pad_to_longest=false"):
        load_config(TrainRunConfig, overrides=["loss.itm_negatives=global"])
    config = load_config(TrainRunConfig, overrides=["loss.itm_negatives=global", "data.pad_to_longest=false"])
    assert config.loss.itm_negatives == "global"
