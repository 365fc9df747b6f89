"""Evaluation metrics over embeddings spread across ranks: each rank scores its own queries, on its
device, and only counts are reduced.

Retrieval passes candidates round the ring of ranks (each rank holds its own queries and one other
rank's candidates at a time, scored `CHUNK` candidates by `QUERY_BLOCK` queries at once), never the
gathered set. Copies of one caption (or image) are one retrieval result, ranked by its best-scoring
copy (mmscale.eval.metrics.retrieval_metrics, the single-process reference these equal): the candidates
are first handed to an owner rank by their result group, so that every copy of a result is scored in
the same chunk. With one process the same code runs without any collective.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmscale.eval.metrics import same_label
from mmscale.losses import _neighbour_exchange, _rank_and_world

CHUNK = 4096
"""Candidates scored at once (a result's copies are never split, so a chunk can be longer)."""
QUERY_BLOCK = 1024


def rank_sizes(count: int, device: torch.device) -> list[int]:
    """Every rank's `count` (one small all_gather; a list on the host)."""
    rank, world = _rank_and_world(None)
    if world == 1:
        return [count]
    local = torch.tensor([count], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local)
    return [int(size) for size in torch.cat(sizes).tolist()]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """`values` summed over the ranks (float64 on the device: NCCL takes no CPU tensors)."""
    if _rank_and_world(None)[1] == 1:
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def _ring(tensors: tuple[torch.Tensor, ...], sizes: list[int]) -> Iterator[tuple[torch.Tensor, ...]]:
    """Every rank's `tensors` in turn (this rank's first, then the one from its left, ...), passed round
    the ring of ranks; rows are padded to the longest rank's and cut back to each rank's `sizes`."""
    rank, world = _rank_and_world(None)
    yield tensors
    if world == 1:
        return
    longest = max(sizes)
    visiting = tuple(F.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - len(t))) for t in tensors)
    for hop in range(1, world):
        visiting = tuple(_neighbour_exchange(t, (rank + 1) % world, (rank - 1) % world, None) for t in visiting)
        yield tuple(t[:sizes[(rank - hop) % world]] for t in visiting)


def _owned(candidates: tuple[torch.Tensor, ...], result: int, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """The candidates whose result group (column `result` of the id tensors) this rank owns (group mod
    world size), gathered from every rank round the ring and sorted by group, so a result's copies are
    contiguous and on one rank."""
    rank, world = _rank_and_world(None)
    pieces = []
    for visiting in _ring(candidates, sizes):
        mine = torch.remainder(visiting[1][:, result], world) == rank
        pieces.append(tuple(t[mine] for t in visiting))
    features, ids = (torch.cat([piece[i] for piece in pieces]) for i in range(2))
    order = torch.argsort(ids[:, result], stable=True)
    return features[order], ids[order]


def _group_chunks(groups: torch.Tensor, size: int) -> Iterator[slice]:
    """Slices of about `size` rows of sorted `groups` that never split a group."""
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    start = end = 0
    for count in counts.tolist():
        end += count
        if end - start >= size:
            yield slice(start, end)
            start = end
    if end > start:
        yield slice(start, end)


def _correct(query_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """[queries, candidates]: the same caption, the same image (a pair has its own caption and image) or the
    same label (column 3: -1 where labels are not matched)."""
    return ((query_ids[:, None, 1] == candidate_ids[None, :, 1])
            | (query_ids[:, None, 2] == candidate_ids[None, :, 2])
            | same_label(query_ids[:, 3], candidate_ids[:, 3]))


def _recall(queries: torch.Tensor, query_ids: torch.Tensor, candidates: tuple[torch.Tensor, torch.Tensor],
            result: int, sizes: list[int], ks: tuple[int, ...]) -> list[float]:
    """Per k, how many of this rank's queries have a correct result within the top k (summed later).

    One pass: per query, the best correct score so far and the `max(ks)` highest wrong results so far (a
    result's score is its best copy's, final within a chunk since chunks hold whole results). A query ranks
    r-th with r < max(ks) exactly when fewer than max(ks) wrong results beat its best, and those are then
    all among the kept ones."""
    owned = _owned(candidates, result, sizes)
    owned_sizes = rank_sizes(len(owned[0]), queries.device)
    keep = max(ks)
    best = torch.full((len(queries),), float("-inf"), device=queries.device)
    top_wrong = torch.full((len(queries), keep), float("-inf"), device=queries.device)
    for features, ids in _ring(owned, owned_sizes):
        for chunk in _group_chunks(ids[:, result], CHUNK):
            _, group = torch.unique_consecutive(ids[chunk, result], return_inverse=True)
            results = int(group.max()) + 1
            for start in range(0, len(queries), QUERY_BLOCK):
                rows = slice(start, start + QUERY_BLOCK)
                scores = queries[rows] @ features[chunk].T
                correct = _correct(query_ids[rows], ids[chunk])
                # max() propagates NaN: a query with a NaN correct score gets a NaN best, a miss below.
                best[rows] = torch.maximum(best[rows], scores.masked_fill(~correct, float("-inf")).max(dim=1).values)
                wrong = scores.masked_fill(correct | scores.isnan(), float("-inf"))  # NaN never beats a best
                per_result = wrong.new_full((len(wrong), results), float("-inf")).scatter_reduce(
                    1, group.expand(len(wrong), -1), wrong, reduce="amax")
                merged = torch.cat([top_wrong[rows], per_result], dim=1)
                top_wrong[rows] = merged.topk(min(keep, merged.shape[1]), dim=1).values
    above = (top_wrong > best[:, None]).sum(dim=1).masked_fill(best.isnan(), keep)
    return [float((above < k).sum()) for k in ks]


def shared_retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                             ks: tuple[int, ...] = (1, 5, 10), *, caption_groups: torch.Tensor | None = None,
                             image_groups: torch.Tensor | None = None,
                             label_groups: torch.Tensor | None = None) -> dict[str, float]:
    """`retrieval_metrics` of the pairs spread over the ranks, each rank passing its own pairs (any
    number, none included); every rank gets the same result. A collective."""
    device = image_features.device
    count = len(image_features)
    sizes = rank_sizes(count, device)
    rank, _ = _rank_and_world(None)
    pair = torch.arange(count, device=device) + sum(sizes[:rank])
    captions = caption_groups.to(device) if caption_groups is not None else pair
    pictures = image_groups.to(device) if image_groups is not None else pair
    labels = label_groups.to(device) if label_groups is not None else torch.full_like(pair, -1)
    ids = torch.stack([pair, captions, pictures, labels], dim=1)  # [pair, caption group, image group, label]
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    i2t = _recall(image, ids, (text, ids), 1, sizes, ks)  # copies of a caption are one result
    t2i = _recall(text, ids, (image, ids), 2, sizes, ks)
    hits = all_reduce_sum(i2t + t2i, device)
    total = max(sum(sizes), 1)
    return ({f"i2t_r{k}": hit / total for k, hit in zip(ks, hits[:len(ks)])}
            | {f"t2i_r{k}": hit / total for k, hit in zip(ks, hits[len(ks):])})


def _zeroshot_top(image_features: torch.Tensor, labels: torch.Tensor,
                  class_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's labelled images: their labels and their (up to) 5 nearest classes, nearest first."""
    device = image_features.device
    labels = labels.to(device)
    labelled = labels >= 0
    scores = (F.normalize(image_features[labelled].float(), dim=-1)
              @ F.normalize(class_embeddings.to(device).float(), dim=-1).T)
    return labels[labelled], scores.topk(min(5, scores.shape[1]), dim=1).indices


def shared_zeroshot_accuracy(image_features: torch.Tensor, labels: torch.Tensor,
                             class_embeddings: torch.Tensor) -> dict[str, float]:
    """`zeroshot_accuracy` of the images spread over the ranks: each scores its own, the counts are summed."""
    device = image_features.device
    labels = labels.to(device)
    largest = labels.max().to(torch.float64) if len(labels) else torch.tensor(-1.0, dtype=torch.float64, device=device)
    if _rank_and_world(None)[1] > 1:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    truth, top = _zeroshot_top(image_features, labels, class_embeddings)
    truth = truth[:, None]
    count, top1, top5 = all_reduce_sum([float(len(truth)), float((top[:, :1] == truth).any(dim=1).sum()),
                                        float((top == truth).any(dim=1).sum())], device)
    if not count:
        raise ValueError("no image in the evaluation data has a label (.cls); zero-shot accuracy needs them")
    if int(largest) >= len(class_embeddings):
        raise ValueError(f"a label ({int(largest)}) has no class name: the classnames file has "
                         f"{len(class_embeddings)} lines")
    return {"top1": top1 / count, "top5": top5 / count}


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's `rows` (any number each, none included; the other dimensions alike) concatenated in rank
    order, on every rank (one all_gather, padded to the longest rank's; a collective). With one process,
    `rows` itself."""
    if _rank_and_world(None)[1] == 1:
        return rows
    sizes = rank_sizes(len(rows), rows.device)
    padded = F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, max(max(sizes), 1) - len(rows)))
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])


def shared_zeroshot_predictions(image_features: torch.Tensor, labels: torch.Tensor,
                                class_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The label and the top-1 class of every labelled image of every rank, in rank order, on every rank
    (a collective): the input of a per-class report (mmscale.eval.report), whose accuracy is then exactly
    shared_zeroshot_accuracy's top1. Two int64 per image are gathered (1.6 MB for 100k images), where
    reduced per-class counts would not give the confusion matrix of the most frequent classes."""
    truth, top = _zeroshot_top(image_features, labels, class_embeddings)
    pairs = all_gather_rows(torch.stack([truth.to(torch.int64), top[:, 0].to(torch.int64)], dim=1))
    return pairs[:, 0], pairs[:, 1]
