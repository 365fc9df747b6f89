"""Retrieval re-ranked by image-text matching: `mmscale eval retrieval --rerank K`.

ALBEF's and BLIP's evaluation (arXiv:2107.07651 section 4, arXiv:2201.12086 section 5.1): the contrastive
similarities pick each query's top K results, the fusion model's ITM head scores those K pairs, and they are
re-ordered by BLIP's score, the ITM head's "match" logit plus the pair's contrastive cosine (BLIP's
`evaluation()` in train_retrieval.py: `score + topk_sim`; ALBEF ranks by the ITM score alone, and the cosine
breaks its near-ties); the results below the top K keep their contrastive order. The conventions are those
of mmscale.eval.metrics.retrieval_metrics: pair j is a correct result for query i when it has the same
caption or the same image (with `match_labels`, also the same `.cls` label), copies of a caption (of an image)
are one result, and ties count for the query.
With K = 1 nothing moves, and the re-ranked recall is the contrastive one.

Memory stays bounded by the number of pairs: the data is read twice (once for the embeddings and the
captions, once more for the images, each image's tokens computed once for all the ITM pairs that need it),
no image is held, and the ITM pairs run `batch_size` at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmscale.eval.embed import caption_groups, image_groups
from mmscale.eval.metrics import same_label

QUERY_BLOCK = 256
KS = (1, 5, 10)
MISS = torch.iinfo(torch.int64).max
"""The rank of a query whose scores are NaN: never within any k."""


@dataclass
class Pairs:
    """What the first pass keeps of every pair: its normalized features, which caption and which image it has
    (indices into the distinct ones), its caption's tokens and its `.cls` label (-1 for none)."""

    image_features: torch.Tensor
    text_features: torch.Tensor
    caption_index: torch.Tensor
    image_index: torch.Tensor
    image_digests: torch.Tensor
    """The distinct images' digests (mmscale.eval.embed.image_groups), sorted: image_index points into it."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


@dataclass
class Candidates:
    """Each query's top-K contrastive results and where its first correct result ranks contrastively."""

    result: torch.Tensor
    """[queries, K] the result (distinct caption or image index) of each candidate."""
    correct: torch.Tensor
    """[queries, K] whether the candidate is a correct result for the query."""
    valid: torch.Tensor
    """[queries, K] False where there were fewer than K results."""
    rank: torch.Tensor
    """[queries] wrong results scored above the query's best correct one (MISS for a NaN score)."""
    similarity: torch.Tensor
    """[queries, K] each candidate's contrastive score (its best copy's cosine; -inf where not valid)."""


@torch.no_grad()
def embed_pairs(model, batches, *, device: torch.device, context_length: int) -> Pairs:
    """First pass: features, caption and image identities, and caption tokens (padded to `context_length`)."""
    images, texts, captions, pictures, ids, masks, labels = [], [], [], [], [], [], []
    for batch in batches:
        images.append(F.normalize(model.encode_images(batch["images"].to(device)).float(), dim=-1).cpu())
        texts.append(F.normalize(model.encode_texts(batch["input_ids"].to(device),
                                                    batch["attention_mask"].to(device)).float(), dim=-1).cpu())
        captions.append(caption_groups(batch["input_ids"], batch["attention_mask"]))
        pictures.append(image_groups(batch["images"]))
        padding = (0, context_length - batch["input_ids"].shape[1])
        ids.append(F.pad(batch["input_ids"], padding))
        masks.append(F.pad(batch["attention_mask"], padding))
        labels.append(batch.get("labels", torch.full((len(batch["input_ids"]),), -1)).long().cpu())
    if not images:
        raise ValueError("the evaluation data has no pairs to re-rank")
    _, caption_index = torch.unique(torch.cat(captions), return_inverse=True)
    image_digests, image_index = torch.unique(torch.cat(pictures), return_inverse=True)
    return Pairs(torch.cat(images), torch.cat(texts), caption_index, image_index, image_digests, torch.cat(ids),
                 torch.cat(masks), torch.cat(labels))


def top_candidates(queries: torch.Tensor, keys: torch.Tensor, *, correct_of, results: torch.Tensor,
                   k: int) -> Candidates:
    """The top `k` results of each query by contrastive score, a result's score being its best copy's.

    `correct_of(rows) -> [len(rows), keys]` marks each query's correct keys; `results[j]` is key j's result. A
    result with both correct and wrong copies enters as two candidates (its correct and its wrong part, which
    the ITM head scores alike). Ties go to the correct candidate, as retrieval_metrics counts ties for the query:
    wrong scores are nudged down by one float64 step, far below the float32 scores' spacing."""
    count = int(results.max()) + 1
    kept = min(k, 2 * count)
    parts = []
    for start in range(0, len(queries), QUERY_BLOCK):
        scores = queries[start:start + QUERY_BLOCK] @ keys.T
        correct = correct_of(torch.arange(start, start + len(scores)))
        best = scores.masked_fill(~correct, float("-inf")).max(dim=1).values
        index = results.expand(len(scores), -1)
        usable = scores.masked_fill(scores.isnan(), float("-inf")).double()
        right = usable.new_full((len(scores), count), float("-inf")).scatter_reduce(
            1, index, usable.masked_fill(~correct, float("-inf")), reduce="amax")
        wrong = usable.new_full((len(scores), count), float("-inf")).scatter_reduce(
            1, index, usable.masked_fill(correct, float("-inf")), reduce="amax")
        rank = (wrong > best[:, None].double()).sum(dim=1).masked_fill(best.isnan(), MISS)
        nudged = torch.nextafter(wrong, torch.tensor(float("-inf"), dtype=torch.float64))
        values, chosen = torch.cat([right, nudged], dim=1).topk(kept, dim=1)
        is_correct = (chosen < count) & ~best.isnan()[:, None]  # a NaN query stays a miss after re-ranking
        parts.append((chosen % count, is_correct, values > float("-inf"), rank, values.float()))
    return Candidates(*(torch.cat(column) for column in zip(*parts)))


def reranked_recall(candidates: Candidates, itm: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Recall@k after re-ordering each query's candidates by `itm` ([queries, K] re-ranking scores): a query whose
    candidates include a correct one ranks by the wrong candidates that beat its best correct one (ties count
    for the query); any other keeps its contrastive rank, which is K or more."""
    correct = candidates.correct & candidates.valid
    best = itm.masked_fill(~correct, float("-inf")).max(dim=1).values
    beaten = ((itm > best[:, None]) & ~candidates.correct & candidates.valid).sum(dim=1)
    rank = torch.where(correct.any(dim=1), beaten, candidates.rank).masked_fill(best.isnan(), MISS)
    return {k: float((rank < k).double().mean()) for k in ks}


@torch.no_grad()
def itm_match_logits(model, batches, pairs: Pairs, jobs: torch.Tensor, *, device: torch.device,
                     batch_size: int) -> torch.Tensor:
    """Second pass: the ITM head's "match" logit of each job (distinct image x captions + distinct caption, sorted), each image's
    tokens computed once, when the pass first reaches it, and its pairs scored `batch_size` at a time."""
    captions = int(pairs.caption_index.max()) + 1
    job_image, job_caption = jobs // captions, jobs % captions
    first_pair = torch.full((captions,), len(pairs.caption_index)).scatter_reduce(
        0, pairs.caption_index, torch.arange(len(pairs.caption_index)), reduce="amin")
    images = torch.arange(len(pairs.image_digests))
    starts, ends = torch.searchsorted(job_image, images), torch.searchsorted(job_image, images, right=True)
    pending = ends > starts
    scores = torch.full((len(jobs),), float("nan"))
    for batch in batches:
        digests = image_groups(batch["images"])
        index = torch.searchsorted(pairs.image_digests, digests).clamp(max=len(images) - 1)
        if not torch.equal(pairs.image_digests[index], digests):
            raise ValueError("the evaluation data changed between the two passes of --rerank (an image the first "
                             "pass did not see); re-rank data that stays put while it is read")
        new, rows = _first_rows(index, pending)
        if not len(new):
            continue
        tokens = model.image_tokens(batch["images"][rows].to(device))
        job_index = torch.cat([torch.arange(starts[image], ends[image]) for image in new.tolist()])
        token_row = torch.repeat_interleave(torch.arange(len(new)), ends[new] - starts[new])
        for start in range(0, len(job_index), batch_size):
            chunk = slice(start, start + batch_size)
            pair = first_pair[job_caption[job_index[chunk]]]
            length = int(pairs.attention_mask[pair].sum(dim=1).max())
            logits = model.itm_logits(tokens[token_row[chunk].to(device)], pairs.input_ids[pair, :length].to(device),
                                      pairs.attention_mask[pair, :length].to(device))
            scores[job_index[chunk]] = logits.float()[:, 1].cpu()
        pending[new] = False
    if pending.any():
        raise ValueError(f"the evaluation data changed between the two passes of --rerank ({int(pending.sum())} "
                         "images of the first pass were not read again); re-rank data that stays put")
    return scores


def _first_rows(index: torch.Tensor, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct pending images of a batch (their indices) and the first batch row holding each."""
    new = [(image, row) for row, image in enumerate(index.tolist()) if pending[image]]
    seen: dict[int, int] = {}
    for image, row in new:
        seen.setdefault(image, row)
    return torch.tensor(list(seen), dtype=torch.long), torch.tensor(list(seen.values()), dtype=torch.long)


def rerank_metrics(model, make_batches, *, k: int, device: torch.device, context_length: int,
                   batch_size: int, match_labels: bool = False) -> dict[str, float]:
    """`rerank_i2t_r{1,5,10}` and `rerank_t2i_r{1,5,10}` of a fusion model on the pairs of `make_batches()`
    (called twice: one pass for the embeddings, one for the images), and `rerank_itm_pairs`, the distinct
    image-caption pairs the ITM head scored. `match_labels`: a result with the query's `.cls` label is correct."""
    pairs = embed_pairs(model, make_batches(), device=device, context_length=context_length)

    def correct_of(rows: torch.Tensor) -> torch.Tensor:
        correct = ((pairs.caption_index[rows][:, None] == pairs.caption_index[None, :])
                   | (pairs.image_index[rows][:, None] == pairs.image_index[None, :]))
        return correct | same_label(pairs.labels[rows], pairs.labels) if match_labels else correct

    i2t = top_candidates(pairs.image_features, pairs.text_features, correct_of=correct_of,
                         results=pairs.caption_index, k=k)
    t2i = top_candidates(pairs.text_features, pairs.image_features, correct_of=correct_of,
                         results=pairs.image_index, k=k)
    captions = int(pairs.caption_index.max()) + 1
    job_of = torch.cat([(pairs.image_index[:, None] * captions + i2t.result).flatten(),
                        (t2i.result * captions + pairs.caption_index[:, None]).flatten()])
    valid = torch.cat([i2t.valid.flatten(), t2i.valid.flatten()])
    jobs, inverse = torch.unique(job_of[valid], return_inverse=True)
    scores = itm_match_logits(model, make_batches(), pairs, jobs, device=device, batch_size=batch_size)
    itm = torch.full((len(job_of),), float("nan"))
    itm[valid] = scores[inverse]
    i2t_itm, t2i_itm = itm.split([i2t.valid.numel(), t2i.valid.numel()])
    i2t_score, t2i_score = i2t_itm.view_as(i2t.valid) + i2t.similarity, t2i_itm.view_as(t2i.valid) + t2i.similarity
    return ({f"rerank_i2t_r{n}": value for n, value in reranked_recall(i2t, i2t_score).items()}
            | {f"rerank_t2i_r{n}": value for n, value in reranked_recall(t2i, t2i_score).items()}
            | {"rerank_itm_pairs": len(jobs)})
