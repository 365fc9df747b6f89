"""Contrastive losses with global negatives: 3 real gloo ranks against one process on the global batch."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from distkit import free_port, save_from_every_rank

from mmscale.data.text import IGNORE_INDEX
from mmscale.losses import clip_loss, mlm_loss, siglip_loss

WORLD, LOCAL, DIM = 3, 4, 8


def global_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"image": F.normalize(torch.randn(WORLD * LOCAL, DIM, generator=generator), dim=-1),
            "text": F.normalize(torch.randn(WORLD * LOCAL, DIM, generator=generator), dim=-1),
            "scale": torch.tensor(5.0), "bias": torch.tensor(-2.0)}


def loss_and_gradients(kind: str, batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The loss on `rows` of the global batch (all of it with one process) and its gradients."""
    leaves = {name: tensor[rows].clone().requires_grad_() if tensor.dim() else tensor.clone().requires_grad_()
              for name, tensor in batch.items()}
    if kind == "clip":
        loss = clip_loss(leaves["image"], leaves["text"], leaves["scale"])
    else:
        loss = siglip_loss(leaves["image"], leaves["text"], leaves["scale"], leaves["bias"])
    loss.backward()
    return {"loss": loss.detach()} | {name: leaf.grad for name, leaf in leaves.items() if leaf.grad is not None}


def _rank_main(rank: int, port: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        outcome = {kind: loss_and_gradients(kind, global_batch(), rows) for kind in ("clip", "siglip")}
        save_from_every_rank(outcome, results)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict]:
    results = tmp_path_factory.mktemp("losses") / "ranks.pt"
    mp.spawn(_rank_main, args=(free_port(), str(results)), nprocs=WORLD, join=True)
    return torch.load(results)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_three_ranks_equal_one_process_on_the_global_batch(per_rank, kind):
    """CLIP through the gathered features, SigLIP through the ring (texts passed rank to rank, never
    gathered): both give the loss and gradients of one process on the whole batch."""
    single = loss_and_gradients(kind, global_batch(), slice(None))
    ranks = [outcome[kind] for outcome in per_rank]
    # The ranks' mean loss is the global loss.
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(single["loss"].item(), rel=1e-6)
    for rank, outcome in enumerate(ranks):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        # A rank's feature gradient covers every rank's loss terms; data-parallel averaging (the
        # division by the world size that DeepSpeed applies) turns it into the global gradient.
        for name in ("image", "text"):
            torch.testing.assert_close(outcome[name] / WORLD, single[name][rows], rtol=1e-5, atol=1e-7)
    for name in ("scale", "bias") if kind == "siglip" else ("scale",):
        averaged = torch.stack([r[name] for r in ranks]).mean()
        torch.testing.assert_close(averaged, single[name], rtol=1e-5, atol=1e-7)


def test_clip_loss_is_the_symmetric_cross_entropy_of_the_similarity_matrix():
    batch = global_batch()
    logits = batch["scale"] * batch["image"] @ batch["text"].T
    labels = torch.arange(len(logits))
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert clip_loss(batch["image"], batch["text"], batch["scale"]).item() == pytest.approx(expected.item(), rel=1e-6)
    aligned = clip_loss(batch["image"], batch["image"], torch.tensor(100.0))
    assert aligned.item() < 0.01


def test_siglip_loss_scores_every_pair_once():
    batch = global_batch()
    logits = batch["scale"] * batch["image"] @ batch["text"].T + batch["bias"]
    n = len(logits)
    expected = -sum(F.logsigmoid(logits[i, j] * (1.0 if i == j else -1.0)) for i in range(n) for j in range(n)) / n
    loss = siglip_loss(batch["image"], batch["text"], batch["scale"], batch["bias"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert math.isfinite(loss.item())


@pytest.mark.slow
def test_gather_with_grad_backward_equals_the_single_process_gradient():
    """Two gloo ranks through the same harness the GPU check runs on NCCL (tests/test_gpu.py): each rank's
    feature gradient, after the gather's backward, is the single-process gradient of its rows."""
    from distkit import gather_grad_check

    assert gather_grad_check(2, "cpu") == []


def test_classification_labels_out_of_range_are_refused_on_the_cpu():
    from mmscale.losses import check_labels

    check_labels(torch.tensor([0, 2, -1]), 3)
    with pytest.raises(ValueError, match=r"label 3 is out of range for loss.classes=3"):
        check_labels(torch.tensor([0, 3, -1]), 3)


def test_mlm_loss_with_the_step_token_count_is_the_mean_over_every_masked_token():
    """Two micro-batches with 3 and 9 masked tokens (and padding rows): divided by the step's count per
    micro-batch, their mean (what DeepSpeed's averaging makes of them) is the mean over all 12 tokens."""
    generator = torch.Generator().manual_seed(1)
    logits = [torch.randn(5, 11, generator=generator), torch.randn(10, 11, generator=generator)]
    targets = [torch.tensor([1, 2, 3, IGNORE_INDEX, IGNORE_INDEX]), torch.tensor([4] * 9 + [IGNORE_INDEX])]
    per_micro_batch = torch.tensor(12 / 2)
    step = sum(mlm_loss(l, t, per_micro_batch) for l, t in zip(logits, targets)) / 2
    every_token = F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=IGNORE_INDEX)
    assert step.item() == pytest.approx(every_token.item(), rel=1e-6)
    mean_of_means = sum(mlm_loss(l, t) for l, t in zip(logits, targets)) / 2  # what it was before
    assert mean_of_means.item() != pytest.approx(every_token.item(), rel=1e-3)
