"""Retrieval recall and zero-shot accuracy from embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _recall_at(queries: torch.Tensor, keys: torch.Tensor, ks: tuple[int, ...], *, same_pair, results: torch.Tensor
               ) -> dict[int, float]:
    """Share of queries with a correct key within the top k results.

    `same_pair(index) -> [len(index), N]` marks the correct keys of the queries at `index`; `results[j]` names
    the retrieval result key j belongs to (copies of one caption, or of one image, are one result, ranked by
    its best-scoring copy). Ties count for the query; a query whose scores are NaN is a miss. Scores are
    computed 1,024 queries at a time, so memory grows with N, not N^2.
    """
    hits = {k: 0 for k in ks}
    _, result_index = torch.unique(results, return_inverse=True)
    result_count = int(result_index.max()) + 1 if len(results) else 0
    for start in range(0, len(queries), 1024):
        rows = queries[start:start + 1024] @ keys.T
        correct = same_pair(torch.arange(start, start + len(rows)))
        best = rows.masked_fill(~correct, float("-inf")).max(dim=1).values
        wrong = torch.full((len(rows), result_count), float("-inf")).scatter_reduce(
            1, result_index.expand(len(rows), -1), rows.masked_fill(correct, float("-inf")), reduce="amax")
        rank = (wrong > best[:, None]).sum(dim=1).masked_fill(best.isnan(), len(keys))
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: hits[k] / len(queries) for k in ks}


def same_label(query_labels: torch.Tensor, key_labels: torch.Tensor) -> torch.Tensor:
    """[queries, keys]: both have a `.cls` label (>= 0) and it is the same."""
    return (query_labels[:, None] == key_labels[None, :]) & (query_labels[:, None] >= 0)


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10),
                      *, caption_groups: torch.Tensor | None = None, image_groups: torch.Tensor | None = None,
                      label_groups: torch.Tensor | None = None) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k, pair i being image i with caption i.

    `caption_groups` / `image_groups` (equal for identical captions / images) make pair j a match for pair
    i when it has the same caption or the same image, as COCO-style evaluation counts any of an image's
    five captions: an image found through another of its captions, or a caption repeated word for word,
    is what the query asked for. Copies of a caption (of an image) then take one rank place.

    `label_groups` (each pair's `.cls` label, -1 for none) also make pair j a match when it has pair i's label:
    category-level retrieval (metric learning's Recall@K), for captions that are templates of a label, where
    which template a caption used is nowhere in its image.
    """
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    count = len(image)

    def same_pair(index: torch.Tensor) -> torch.Tensor:
        correct = torch.zeros(len(index), count, dtype=torch.bool)
        correct[torch.arange(len(index)), index] = True
        for groups in (caption_groups, image_groups):
            if groups is not None:
                correct |= groups[index][:, None] == groups[None, :]
        if label_groups is not None:
            correct |= same_label(label_groups[index], label_groups)
        return correct

    pairs = torch.arange(count)
    caption_results = caption_groups if caption_groups is not None else pairs
    image_results = image_groups if image_groups is not None else pairs
    metrics = {f"i2t_r{k}": v for k, v in _recall_at(image, text, ks, same_pair=same_pair,
                                                     results=caption_results).items()}
    metrics |= {f"t2i_r{k}": v for k, v in _recall_at(text, image, ks, same_pair=same_pair,
                                                      results=image_results).items()}
    return metrics


def contrastive_val_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float,
                         batch_size: int, *, mean: bool = True) -> float | tuple[float, float]:
    """Mean CLIP loss over consecutive chunks of `batch_size` pairs (open_clip's validation loss), weighted
    by chunk size; with mean=False the (weighted sum, pairs) to combine across ranks, each rank chunking
    its own pairs."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    losses, weights = [], []
    for start in range(0, len(image), batch_size):
        logits = logit_scale * image[start:start + batch_size] @ text[start:start + batch_size].T
        labels = torch.arange(len(logits), device=logits.device)
        losses.append(float(F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
        weights.append(len(logits))
    total = sum(loss * weight for loss, weight in zip(losses, weights))
    return total / max(sum(weights), 1) if mean else (total, float(sum(weights)))


def zeroshot_accuracy(image_features: torch.Tensor, labels: torch.Tensor,
                      class_embeddings: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 accuracy of nearest class embedding, over images with a label (>= 0)."""
    labelled = labels >= 0
    if not labelled.any():
        raise ValueError("no image in the evaluation data has a label (.cls); zero-shot accuracy needs them")
    if int(labels.max()) >= len(class_embeddings):
        raise ValueError(f"a label ({int(labels.max())}) has no class name: the classnames file has "
                         f"{len(class_embeddings)} lines")
    scores = F.normalize(image_features[labelled].float(), dim=-1) @ F.normalize(class_embeddings.float(), dim=-1).T
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    truth = labels[labelled][:, None]
    return {"top1": float((top[:, :1] == truth).any(dim=1).float().mean()),
            "top5": float((top == truth).any(dim=1).float().mean())}


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty stripped lines of a text file, or an error naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError as error:
        raise FileNotFoundError(f"{what} file {path}: {error.strerror or error}") from error
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    return lines


def read_templates(path: str) -> list[str]:
    """Prompt templates, each with one `{}` for the class name."""
    templates = read_lines(path, "templates") if path else list(DEFAULT_TEMPLATES)
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one {{}} for the class name")
    return templates
