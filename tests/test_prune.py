"""Structured pruning (`mmscale prune`): MLP neurons come out of the saved transformers model (a smaller
`intermediate_size`), removed attention heads are zero and stay zero through fine-tuning, importance picks the units
that carry least, and the report says what it cost. Speed and recovery are measured by tools/bench/prune.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from mmscale.cli import main
from mmscale.export.prune import calibrate, prune_model
from mmscale.finetune.lora import LoraSettings, apply_lora, merge_adapter
from mmscale.losses import LossConfig, PretrainingObjective
from mmscale.models import ModelConfig, build_model, load_model
from mmscale.models.pruning import KEY, MLP_IN, MLP_OUT, OUTPUT, QUERY, VALUE, tower_layers


@pytest.fixture(scope="module")
def pruned(trained_tiny, tmp_path_factory) -> dict:
    """The session's trained tiny model pruned by 25% of heads and 25% of MLP neurons, calibrated on its
    held-out shards, with zero-shot before and after: (report, folder)."""
    out = tmp_path_factory.mktemp("pruned") / "model"
    assert main(["prune", "--checkpoint", str(trained_tiny["final"]), "--out", str(out), "--heads", "0.25",
                 "--mlp", "0.25", "--data", str(trained_tiny["val"]), "--calibration", "96",
                 "--classnames", str(trained_tiny["classnames"])]) == 0
    return {"report": json.loads((out / "prune_report.json").read_text()), "folder": out}


def removed_rows(layer, heads: list[int]) -> list[torch.Tensor]:
    width = layer.head_width
    rows = [slice(head * width, (head + 1) * width) for head in heads]
    weights = [layer.part(index).weight for index in (QUERY, KEY, VALUE)]
    return [weight[row] for weight in weights for row in rows] + [layer.part(OUTPUT).weight[:, row] for row in rows]


def test_pruned_folder_is_a_smaller_plain_transformers_model(pruned, trained_tiny):
    folder, report = pruned["folder"], pruned["report"]
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"]["intermediate_size"] == 384 and config["text_config"]["intermediate_size"] == 384
    plain = AutoModel.from_pretrained(folder)
    ours = load_model(folder, mlm_head=False).eval()
    images = torch.randint(0, 256, (4, 3, ours.image_size, ours.image_size), dtype=torch.uint8)
    ids = torch.randint(5, 60, (4, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(plain.get_image_features(pixel_values=ours.pixel_values(images)).pooler_output,
                              ours.encode_images(images), atol=1e-5)
        assert torch.allclose(plain.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
                              ours.encode_texts(ids, mask), atol=1e-5)
    before, after = report["parameters_before"], report["parameters_after"]
    assert after["stored"] < before["stored"] and after["nonzero"] < after["stored"]
    assert report["bytes_after"] < report["bytes_before"]
    assert report["importance"] == "calibration (96 pairs)"
    for side in ("vision", "text"):
        assert report["removed"][side] == {"layers": 4, "heads_per_layer": 4, "heads_removed_per_layer": 1,
                                           "mlp_width_before": 512, "mlp_width_after": 384}
    assert 0 < report["eval_after"]["top1"] and report["eval_before"]["top1"] > 1 / 6
    assert report["images_per_second_after"] > 0 and -1 <= report["image_cosine_min"] <= 1


def test_removed_heads_are_zero_listed_and_one_per_layer(pruned):
    model = load_model(pruned["folder"], mlm_head=False)
    meta = json.loads((pruned["folder"] / "mmscale.json").read_text())
    assert {side: len(layers) for side, layers in meta["pruned_heads"].items()} == {"vision": 4, "text": 4}
    for side, layers in tower_layers(model).items():
        for index, layer in enumerate(layers):
            heads = model.pruned_heads[side][index]
            assert len(heads) == 1
            assert all(not part.any() for part in removed_rows(layer, heads))
            kept = [head for head in range(4) if head not in heads]
            assert all(part.abs().sum() > 0 for part in removed_rows(layer, kept))


def test_importance_removes_the_units_that_carry_nothing(tokenizer):
    """A neuron whose output column is zero and a head whose output columns are zero carry nothing: both the
    weight and the calibrated importance remove exactly those."""
    for calibrated in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer), mlm_head=False).eval()
        layers = tower_layers(model)
        silent = {}
        with torch.no_grad():
            for side, tower in layers.items():
                for index, layer in enumerate(tower):
                    neurons = [(7 * index + 3 * (side == "text") + offset) % 512 for offset in range(128)]
                    head = (index + (side == "text")) % 4
                    layer.part(MLP_OUT).weight[:, neurons] = 0
                    layer.part(OUTPUT).weight[:, head * 32:(head + 1) * 32] = 0
                    silent[side, index] = (layer.part(MLP_IN).weight[[n for n in range(512) if n not in neurons]].clone(),
                                           head)
        importance = None
        if calibrated:
            batch = {"images": torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8),
                     "input_ids": torch.randint(5, 60, (8, 10)), "attention_mask": torch.ones(8, 10, dtype=torch.long)}
            importance, seen = calibrate(model, layers, [batch, batch], samples=12)
            assert seen == 12
        prune_model(model, heads=0.25, mlp=0.25, importance=importance)
        for (side, index), (kept_rows, head) in silent.items():
            layer = tower_layers(model)[side][index]
            assert torch.equal(layer.part(MLP_IN).weight, kept_rows), (calibrated, side, index)
            assert model.pruned_heads[side][index] == [head]


def _train_steps(model, steps: int = 3) -> None:
    objective = PretrainingObjective(model, LossConfig(mlm_weight=0.0)).train()
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(5, 60, (8, 10), generator=generator)
        images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=generator)
        objective(images, ids, torch.ones_like(ids)).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("lora", [False, True])
def test_fine_tuning_keeps_removed_heads_at_zero(pruned, tmp_path, lora):
    model = load_model(pruned["folder"], mlm_head=False)
    if lora:
        apply_lora(model, LoraSettings(enabled=True, rank=4, vision_targets=["q_proj", "v_proj", "out_proj"]))
    _train_steps(model, steps=4)
    if lora:
        merge_adapter(model)
    model.save(tmp_path / "tuned")
    tuned = load_model(tmp_path / "tuned", mlm_head=False)
    assert tuned.pruned_heads == model.pruned_heads
    for side, layers in tower_layers(tuned).items():
        for index, layer in enumerate(layers):
            assert all(not part.any() for part in removed_rows(layer, tuned.pruned_heads[side][index]))


def test_without_the_mask_lora_grows_removed_heads_back(pruned):
    """The control for the test above. An all-zero head is a fixed point of full fine-tuning (no gradient reaches
    it), but adapters on both its values and the output projection move it once the output adapter has learned
    something; so mmscale masks it."""
    model = load_model(pruned["folder"], mlm_head=False)
    heads = model.pruned_heads
    model.set_pruned_heads({})
    apply_lora(model, LoraSettings(enabled=True, rank=4, vision_targets=["q_proj", "v_proj", "out_proj"]))
    _train_steps(model, steps=4)
    merge_adapter(model)
    layer = tower_layers(model)["vision"][0]
    value_rows = removed_rows(layer, heads["vision"][0])[2]
    assert value_rows.abs().max() > 0


def test_prune_refuses_what_it_cannot_do(tmp_path, tokenizer, capsys):
    model = build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer), mlm_head=False)
    model.save(tmp_path / "model", tokenizer=tokenizer)
    cases = {("--heads", "0.1"): "rounds to none", ("--mlp", "1.0"): "must be in [0, 1)",
             ("--heads", "0"): "nothing to remove"}
    for flags, message in cases.items():
        capsys.readouterr()
        assert main(["prune", "--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "out"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "int8cpu"),
                 "--quantize", "int8-cpu"]) == 0
    capsys.readouterr()
    assert main(["prune", "--checkpoint", str(tmp_path / "int8cpu"), "--out", str(tmp_path / "out"),
                 "--mlp", "0.25"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_pruned_model_serves_and_exports_like_any_other(pruned, trained_tiny, tmp_path, capsys):
    """`mmscale eval`, `embed`, `zeroshot` and an int8-cpu export of the pruned folder, which keeps its heads zero."""
    from mmscale.shards.synthetic import make_image_folder

    folder, classnames = str(pruned["folder"]), str(trained_tiny["classnames"])
    make_image_folder(tmp_path / "images", 3, size=load_model(folder, mlm_head=False).image_size, seed=2)
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--checkpoint", folder, "--data", str(trained_tiny["val"]),
                 "--classnames", classnames]) == 0
    assert _last_json(capsys)["top1"] == pytest.approx(pruned["report"]["eval_after"]["top1"])
    assert main(["zeroshot", "--checkpoint", folder, "--image", str(tmp_path / "images" / "000000.jpg"),
                 "--classnames", classnames]) == 0
    assert 0 < _last_json(capsys)["probability"] <= 1
    assert main(["export", "--checkpoint", folder, "--out", str(tmp_path / "int8cpu"), "--quantize", "int8-cpu"]) == 0
    exported = json.loads((tmp_path / "int8cpu" / "export_report.json").read_text())
    assert min(exported["image_cosine_min"], exported["text_cosine_min"]) >= 0.99
    for name in (folder, str(tmp_path / "int8cpu")):
        assert main(["embed", "--checkpoint", name, "--images", str(tmp_path / "images" / "*.jpg"),
                     "--out", str(tmp_path / f"{Path(name).name}.npy")]) == 0
    rows = [np.load(tmp_path / f"{name}.npy") for name in ("model", "int8cpu")]
    assert rows[0].shape == (3, rows[0].shape[1]) and (rows[0] * rows[1]).sum(axis=1).min() >= 0.99
