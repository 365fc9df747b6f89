"""Training setup on one process: shipped configs, batch layout, DeepSpeed config filling, schedule, eval metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mmscale.config import load_config
from mmscale.eval.metrics import read_templates, retrieval_metrics, zeroshot_accuracy
from mmscale.models import ModelConfig, build_model
from mmscale.train.config import TrainConfig, TrainRunConfig
from mmscale.train.engine import batch_layout, deepspeed_config, lr_lambda, parameter_groups

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIGS = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def test_the_real_configs_are_shipped():
    assert {path.stem for path in PRETRAIN_CONFIGS} >= {"tiny", "base", "large", "huge", "giant", "tiny_fusion", "base_fusion"}


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_pretrain_config_loads_and_fits_its_model(path):
    config = load_config(TrainRunConfig, path)
    sizes = config.model.sizes(vocab_size=30522)
    assert config.data.image_size == sizes.image_size
    assert config.data.context_length <= sizes.text_max_positions
    assert (REPO / config.train.deepspeed).is_file()
    layout = batch_layout(config.train, world_size=8 if path.stem != "tiny" else 2)
    ds, _ = deepspeed_config(config.train, layout)
    assert ds["train_batch_size"] == config.train.global_batch_size
    assert config.train.samples // config.train.global_batch_size > config.train.warmup_steps


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json"])
def test_shipped_deepspeed_configs_get_batch_and_precision_filled(name):
    train = TrainConfig(global_batch_size=64, micro_batch_size=8, precision="bf16",
                        deepspeed=str(REPO / "configs" / "deepspeed" / name))
    ds, notes = deepspeed_config(train, batch_layout(train, world_size=2))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 4)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert any("gradient_accumulation_steps=4" in note for note in notes)


def test_batch_layout_derives_accumulation_or_says_what_does_not_fit():
    assert batch_layout(TrainConfig(global_batch_size=64), 2).accumulation == 1
    assert batch_layout(TrainConfig(global_batch_size=64, micro_batch_size=8), 2).accumulation == 4
    with pytest.raises(ValueError, match="not a multiple of the 3 processes; process counts that fit it: 1, 2, 4, 8$"):
        batch_layout(TrainConfig(global_batch_size=64), 3)
    with pytest.raises(ValueError, match="pick train.micro_batch_size dividing 32"):
        batch_layout(TrainConfig(global_batch_size=64, micro_batch_size=5), 2)


def test_deepspeed_config_refuses_conflicts_and_its_own_optimizer(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 3}}))
    train = TrainConfig(global_batch_size=64, deepspeed=str(path))
    with pytest.raises(ValueError, match="train_batch_size=32 disagrees with train"):
        deepspeed_config(train, batch_layout(train, 2))
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="remove the 'optimizer' section"):
        deepspeed_config(train, batch_layout(train, 2))
    with pytest.raises(FileNotFoundError, match="no such file"):
        deepspeed_config(TrainConfig(deepspeed=str(tmp_path / "missing.json")), batch_layout(train, 2))


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    factor = lr_lambda(TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10), total_steps=110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    values = [factor(step) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_weight_decay_on_norms_biases_and_temperature():
    model = build_model(ModelConfig(preset="tiny"), vocab_size=100)
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.towers.logit_scale) in no_decay_ids
    assert id(model.towers.text_model.embeddings.LayerNorm.weight) in no_decay_ids
    assert id(model.towers.visual_projection.weight) not in no_decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len({id(p) for p in model.parameters()})


def test_vision_lr_scale_gives_the_image_tower_groups_of_its_own_that_the_schedule_scales():
    model = build_model(ModelConfig(preset="tiny"), vocab_size=100)
    vision = model.towers.vision_model
    groups = parameter_groups(model, weight_decay=0.1, lr=1e-3, scaled=vision.parameters(), lr_scale=0.1)
    assert [group.get("lr") for group in groups] == [None, None, pytest.approx(1e-4), pytest.approx(1e-4)]
    assert [group["weight_decay"] for group in groups] == [0.1, 0.0, 0.1, 0.0]
    vision_ids = {id(p) for p in vision.parameters()}
    assert {id(p) for group in groups[2:] for p in group["params"]} == vision_ids
    assert not vision_ids & {id(p) for group in groups[:2] for p in group["params"]}
    assert sum(len(group["params"]) for group in groups) == len({id(p) for p in model.parameters()})
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(TrainConfig(lr=1e-3, warmup_steps=10), 100))
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5])
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    assert len(parameter_groups(model, 0.1, lr=1e-3, scaled=vision.parameters())) == 2  # scale 1: one rate
    with pytest.raises(ValueError, match="vision_lr_scale"):
        TrainConfig(vision_lr_scale=-1)


def test_retrieval_recall_counts_the_rank_of_the_true_pair():
    image = torch.eye(4)
    text = torch.eye(4)[[0, 1, 3, 2]]  # captions 2 and 3 swapped
    metrics = retrieval_metrics(image, text, ks=(1, 2))
    assert metrics["i2t_r1"] == 0.5 and metrics["i2t_r2"] == 1.0 and metrics["t2i_r1"] == 0.5
    assert retrieval_metrics(image, image, ks=(1,))["i2t_r1"] == 1.0


def test_retrieval_counts_an_identically_captioned_pair_as_a_match():
    """Pairs 0 and 1 share a caption; caption 0's best image is image 1: a match for that caption, not a miss."""
    image = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    strict = retrieval_metrics(image, text, ks=(1,))
    assert strict["t2i_r1"] == pytest.approx(1 / 3) and strict["i2t_r1"] == pytest.approx(1 / 3)
    grouped = retrieval_metrics(image, text, ks=(1,), caption_groups=torch.tensor([7, 7, 9]))
    assert grouped["t2i_r1"] == 1.0 and grouped["i2t_r1"] == 1.0
    other = retrieval_metrics(image, text, ks=(1,), caption_groups=torch.tensor([7, 8, 9]))
    assert other == strict



def test_image_to_text_recall_ranks_distinct_captions():
    """Captions 1-3 are one text three times, ranked above image 0's own caption: one place, not three."""
    text = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    image = torch.tensor([[0.8, 0.2], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])  # closer to captions 1-3 than to 0
    groups = torch.tensor([1, 2, 2, 2])
    assert retrieval_metrics(image, text, ks=(2,))["i2t_r2"] == 0.75  # each copy takes a place: image 0 ranks 4th
    assert retrieval_metrics(image, text, ks=(2,), caption_groups=groups)["i2t_r2"] == 1.0  # 2nd distinct caption


def test_retrieval_counts_another_caption_of_the_same_image_as_a_match():
    """COCO style: pairs 0 and 1 are one image with two captions; image 0's best caption is caption 1."""
    image = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert retrieval_metrics(image, text, ks=(1,))["i2t_r1"] == pytest.approx(2 / 3)
    grouped = retrieval_metrics(image, text, ks=(1,), image_groups=torch.tensor([4, 4, 5]))
    assert grouped["i2t_r1"] == 1.0 and grouped["t2i_r1"] == 1.0


def test_retrieval_by_label_counts_a_result_with_the_query_label_and_never_an_unlabelled_one():
    """Templated captions: pairs 0 and 1 are two images of class 3 with different templates, and image 0's best
    caption is pair 1's; pairs 2 and 3 have no label (-1), which never matches another unlabelled pair."""
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    text = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 0.6, -0.8], [0.0, 0.0, 1.0]])
    labels = torch.tensor([3, 3, -1, -1])
    strict = retrieval_metrics(image, text, ks=(1,))
    assert strict == {"i2t_r1": 0.0, "t2i_r1": 0.0}
    by_label = retrieval_metrics(image, text, ks=(1,), label_groups=labels)
    assert by_label == {"i2t_r1": 0.5, "t2i_r1": 0.5}  # pairs 0 and 1 are found, the unlabelled ones are not


def test_retrieval_of_nan_embeddings_is_a_miss_not_a_hit():
    image = torch.full((3, 2), float("nan"))
    assert retrieval_metrics(image, torch.eye(3, 2), ks=(1,)) == {"i2t_r1": 0.0, "t2i_r1": 0.0}


def test_caption_groups_are_equal_exactly_for_identical_captions():
    from mmscale.eval.embed import caption_groups

    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 5, 6, 102, 0], [101, 5, 7, 102, 0], [101, 5, 6, 102, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0]] * 4)
    groups = caption_groups(ids, mask)
    assert groups[0] == groups[1] == groups[3] and groups[0] != groups[2]  # padding is not part of the caption


def test_zeroshot_accuracy_uses_labelled_images_only():
    classes = torch.eye(3)
    images = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    labels = torch.tensor([0, 1, 0, -1])
    result = zeroshot_accuracy(images, labels, classes)
    assert result["top1"] == pytest.approx(2 / 3) and result["top5"] == 1.0
    with pytest.raises(ValueError, match="has no class name"):
        zeroshot_accuracy(images, torch.tensor([0, 1, 7, -1]), classes)


def test_templates_need_exactly_one_placeholder(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}\nno placeholder\n")
    with pytest.raises(ValueError, match="exactly one"):
        read_templates(str(path))
    assert read_templates("") == ["a photo of a {}."]


def test_a_save_that_crashed_half_way_is_cleared_and_latest_kept(tmp_path):
    from mmscale.train.checkpoints import latest_tag, remove_incomplete

    root = tmp_path / "checkpoints"
    for tag in ("step00000010", "step00000020", "step00000030"):
        (root / tag).mkdir(parents=True)
    (root / "latest").write_text("step00000020")  # step 30 was being written when the job died
    (root / ".latest.tmp").write_text("step00000030")
    remove_incomplete(root)
    assert latest_tag(root) == "step00000020"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step00000010", "step00000020"]


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse2 avx avx2 fma", "fp32"),  # AVX2 only: bf16 would be emulated
    ("fpu avx2 avx512f avx512_bf16", "bf16"),
    ("fpu avx2 amx_bf16 amx_tile", "bf16"),
])
def test_auto_precision_on_cpu_follows_native_bf16(flags, expected):
    from mmscale.train.precision import resolve_precision

    precision, reason = resolve_precision("auto", cuda=False, cpuinfo=f"processor : 0\nflags\t\t: {flags}\n")
    assert precision == expected and reason.startswith("auto:")
    assert resolve_precision("bf16", cuda=False, cpuinfo="flags : avx2") == ("bf16", "set by train.precision")


def test_auto_precision_is_filled_into_the_deepspeed_config():
    from mmscale.train.precision import resolve_precision

    ds, notes = deepspeed_config(TrainConfig(global_batch_size=8), batch_layout(TrainConfig(global_batch_size=8), 2))
    chosen = resolve_precision("auto")[0]
    assert ds["bf16"]["enabled"] == (chosen == "bf16") and ds["fp16"]["enabled"] == (chosen == "fp16")
    assert f"precision={chosen}" in notes


def test_image_size_follows_the_model_unless_set():
    from mmscale.train.loop import _check_fit

    model = build_model(ModelConfig(preset="tiny"), vocab_size=100, mlm_head=False)
    config = TrainRunConfig()
    _check_fit(config, model)
    assert config.data.image_size == 64
    config.data.image_size = 224
    with pytest.raises(ValueError, match="set data.image_size=64"):
        _check_fit(config, model)


def test_cpu_ranks_share_the_cores_unless_told(monkeypatch):
    import os

    from mmscale.train.engine import cpu_threads_per_rank

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's count of ranks on this node
    assert cpu_threads_per_rank() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_SIZE", str(4 * cores))
    assert cpu_threads_per_rank() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads_per_rank() == 3


def test_process_group_serves_cpu_and_cuda_tensors_on_gpu_machines():
    from mmscale.train.engine import process_group_backend

    assert process_group_backend(cuda=True) == "cpu:gloo,cuda:nccl"  # CPU objects/counters keep a backend
    assert process_group_backend(cuda=False) == "gloo"


@pytest.mark.parametrize("name", ["keep_checkpoints", "save_every_steps", "log_every_steps", "max_bad_steps"])
def test_checkpoint_and_logging_intervals_must_be_positive(name):
    with pytest.raises(ValueError, match=rf"train.{name} must be >= 1, got 0"):
        TrainConfig(**{name: 0})


def test_cpu_peak_memory_is_the_ranks_own_not_its_launchers(tmp_path):
    """A rank started by a big process (a launcher, pytest) reports its own peak RSS: exec keeps the
    parent's ru_maxrss, so that number would be the launcher's."""
    import subprocess
    import sys

    child = "from mmscale.train.metrics import memory_gib; print(memory_gib()['cpu_rss_gib'])"
    parent = (f"import subprocess, sys\nheld = bytearray(3 * 2**29)\nheld[::4096] = b'x' * len(held[::4096])\n"
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, "
              f"check=True).stdout)")
    reported = float(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True,
                                    env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).stdout)
    assert 0.05 < reported < 1.3, reported
