"""Evaluation spread over real gloo ranks (1, 2 and 3, unequal shares, one rank with none): each rank scores
its own queries and the reduced metrics equal the single-process ones on the whole set."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from distkit import free_port, save_from_every_rank

from mmscale.eval.metrics import retrieval_metrics, zeroshot_accuracy

KS = (1, 2, 5)


def whole_set() -> dict[str, torch.Tensor]:
    """40 pairs, COCO-like: every image has 4 captions (4 pairs share its pixels and features), two captions
    appear twice word for word, and noisy features so that rankings are far from perfect."""
    generator = torch.Generator().manual_seed(0)
    count, dim = 40, 8
    pictures = torch.arange(count) // 4
    captions = torch.arange(count) + 1000
    captions[[21, 33]] = captions[[2, 5]]  # the same words under other images
    centres = torch.randn(count // 4, dim, generator=generator)
    images = centres[pictures]
    texts = centres[pictures] + 1.5 * torch.randn(count, dim, generator=generator)
    texts[[21, 33]] = texts[[2, 5]]
    classes = F.normalize(torch.randn(6, dim, generator=generator), dim=-1)
    labels = (pictures % 3).masked_fill(torch.arange(count) % 7 == 3, -1)  # 3-4 images a class, some without one
    return {"images": images, "texts": texts, "caption_groups": captions, "image_groups": pictures,
            "labels": labels, "classes": classes}


def reference() -> dict[str, float]:
    data = whole_set()
    by_label = retrieval_metrics(data["images"], data["texts"], KS, caption_groups=data["caption_groups"],
                                 image_groups=data["image_groups"], label_groups=data["labels"])
    return (retrieval_metrics(data["images"], data["texts"], KS, caption_groups=data["caption_groups"],
                              image_groups=data["image_groups"])
            | {f"label_{name}": value for name, value in by_label.items()}
            | zeroshot_accuracy(data["images"], data["labels"], data["classes"]))


def _rank_main(rank: int, world: int, shares: list[int], port: int, results: str) -> None:
    import mmscale.eval.shared as shared

    shared.CHUNK, shared.QUERY_BLOCK = 5, 3  # many chunks and blocks, each chunk keeps a result's copies whole
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = whole_set()
        mine = slice(sum(shares[:rank]), sum(shares[:rank + 1]))
        metrics = shared.shared_retrieval_metrics(data["images"][mine], data["texts"][mine], KS,
                                                  caption_groups=data["caption_groups"][mine],
                                                  image_groups=data["image_groups"][mine])
        by_label = shared.shared_retrieval_metrics(data["images"][mine], data["texts"][mine], KS,
                                                   caption_groups=data["caption_groups"][mine],
                                                   image_groups=data["image_groups"][mine],
                                                   label_groups=data["labels"][mine])
        metrics |= {f"label_{name}": value for name, value in by_label.items()}
        metrics |= shared.shared_zeroshot_accuracy(data["images"][mine], data["labels"][mine], data["classes"])
        save_from_every_rank(metrics, results)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("shares", [[40], [13, 27], [9, 0, 31]], ids=["1-rank", "2-ranks", "3-ranks"])
def test_metrics_over_ranks_equal_the_single_process_ones(tmp_path, shares):
    results = tmp_path / "metrics.pt"
    mp.spawn(_rank_main, args=(len(shares), shares, free_port(), str(results)), nprocs=len(shares), join=True)
    expected = reference()
    assert 0 < expected["i2t_r1"] < expected["i2t_r5"] < 1 and 0 < expected["t2i_r1"] < 1  # not a trivial set
    assert expected["t2i_r1"] < expected["label_t2i_r1"] < 1  # labels find more, and not everything
    for metrics in torch.load(results):
        assert metrics == pytest.approx(expected, rel=1e-6)  # counts: one query more or less moves them by >= 1/40


def test_one_process_without_a_group_scores_like_the_reference():
    from mmscale.eval.shared import shared_retrieval_metrics, shared_zeroshot_accuracy

    data = whole_set()
    metrics = shared_retrieval_metrics(data["images"], data["texts"], KS, caption_groups=data["caption_groups"],
                                       image_groups=data["image_groups"])
    by_label = shared_retrieval_metrics(data["images"], data["texts"], KS, caption_groups=data["caption_groups"],
                                        image_groups=data["image_groups"], label_groups=data["labels"])
    metrics |= {f"label_{name}": value for name, value in by_label.items()}
    metrics |= shared_zeroshot_accuracy(data["images"], data["labels"], data["classes"])
    assert metrics == pytest.approx(reference(), rel=1e-6)
    nan_texts = data["texts"].clone()
    nan_texts[0] = float("nan")  # a NaN score is a miss, never a hit
    assert shared_retrieval_metrics(data["images"], nan_texts, KS)["t2i_r5"] == pytest.approx(
        retrieval_metrics(data["images"], nan_texts, KS)["t2i_r5"])
