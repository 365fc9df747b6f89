"""Knowledge distillation (distill.teacher): the similarity KL, the teacher's checks, a 2-rank ZeRO-3 student."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from mmscale.losses import DistillConfig, LossConfig, distill_loss


def test_distill_loss_is_the_kl_from_the_teachers_similarities_and_trains_only_the_student():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    assert distill_loss(image, text, scale, image, text, scale).item() == pytest.approx(0.0, abs=1e-6)
    student_image = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    student_text = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    teacher_image, teacher_text = image.clone().requires_grad_(), text.clone().requires_grad_()
    loss = distill_loss(student_image, student_text, torch.tensor(5.0), teacher_image, teacher_text, scale)
    teacher = [F.softmax(scale * image @ text.T, -1), F.softmax(scale * text @ image.T, -1)]
    student = [F.log_softmax(5.0 * student_image @ student_text.T, -1),
               F.log_softmax(5.0 * student_text @ student_image.T, -1)]
    expected = sum((p * (p.log() - q)).sum(-1).mean() for p, q in zip(teacher, student)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0
    loss.backward()
    assert student_image.grad.abs().sum() > 0 and student_text.grad.abs().sum() > 0
    assert teacher_image.grad is None and teacher_text.grad is None


def test_a_teacher_that_reads_other_tokens_or_another_objective_is_refused(trained_tiny, tokenizer):
    from mmscale.data.text import load_tokenizer
    from mmscale.train.loop import load_teacher

    own = load_tokenizer(trained_tiny["tokenizer"])
    assert load_teacher(str(trained_tiny["final"]), own, LossConfig()).image_size == 64
    with pytest.raises(ValueError, match="another tokenizer than the student's"):
        load_teacher(str(trained_tiny["final"]), tokenizer, LossConfig())
    with pytest.raises(ValueError, match="loss.objective=contrastive"):
        load_teacher(str(trained_tiny["final"]), own, LossConfig(objective="vqa"))
    with pytest.raises(ValueError, match="distill weights must be >= 0"):
        DistillConfig(weight=-1.0)


@pytest.mark.slow
def test_a_two_layer_student_learns_the_teachers_similarities_on_two_zero3_ranks(trained_tiny, tmp_path):
    """A 2-layer student of `tiny` (another projection width) distilled from the session's trained tiny on 2 ranks
    under ZeRO-3: the KL to the teacher (over the gathered global batch) and the feature loss are logged and fall,
    and final/ is the student alone (no teacher, no feature maps)."""
    from test_train import REPO, launch_ranks, metrics, run_overrides

    from mmscale.models import load_model

    corpus = {"train": trained_tiny["run"].parent / "train", "tokenizer": trained_tiny["tokenizer"]}
    output = tmp_path / "student"
    # zero3.json keeps tensors under 100,000 values whole on every rank, which is all of tiny's: split what is
    # over 1,000 here, so that the teacher is partitioned as a large one would be.
    ds_config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
    (tmp_path / "zero3.json").write_text(json.dumps(ds_config))
    code, log = launch_ranks(2, run_overrides(
        corpus, output, "train.samples=640", "train.lr=2e-3", "model.vision_layers=2", "model.text_layers=2",
        "model.projection_dim=48", f"distill.teacher={trained_tiny['final']}", "distill.feature_weight=0.5",
        f"train.deepspeed={tmp_path / 'zero3.json'}"))
    assert code == 0, log[-3000:]
    held = re.findall(r"distillation teacher partitioned \(ZeRO-3 inference\): rank (\d) holds ([\d,]+) of ([\d,]+)",
                      log)
    assert sorted(rank for rank, _, _ in held) == ["0", "1"], log[-3000:]
    for _, part, whole in held:
        assert int(part.replace(",", "")) < 0.6 * int(whole.replace(",", ""))
    records = metrics(output)
    assert len(records) == 20 and all(r["distill_loss"] > 0 and r["distill_feature_loss"] > 0 for r in records)
    first, last = records[:4], records[-4:]
    assert sum(r["distill_loss"] for r in last) < 0.8 * sum(r["distill_loss"] for r in first), records
    assert sum(r["distill_feature_loss"] for r in last) < sum(r["distill_feature_loss"] for r in first)
    student = load_model(output / "final", mlm_head=False)
    assert student.embedding_dim == 48 and student.towers.config.vision_config.num_hidden_layers == 2
    assert not any("feature_maps" in name or "teacher" in name for name in student.state_dict())
    assert "distill_loss" in (output / "report.md").read_text()
    assert json.loads((output / "final" / "mmscale.json").read_text())
