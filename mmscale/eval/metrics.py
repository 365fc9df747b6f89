"""Retrieval recall and zero-shot accuracy from embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _recall_at(scores: torch.Tensor, ks: tuple[int, ...], groups: torch.Tensor | None = None,
               counted: torch.Tensor | None = None) -> dict[int, float]:
    """Share of rows with a correct column within the top k. Column j is correct for row i when j == i or,
    with `groups`, when both belong to the same group (identical captions are interchangeable: a query
    "a red circle" that finds another image captioned "a red circle" found what it asked for). Only the
    `counted` columns (default: all) take rank places, so copies of one caption count once. Ties count
    for the row."""
    hits = {k: 0 for k in ks}
    for start in range(0, len(scores), 1024):
        rows = scores[start:start + 1024]
        index = torch.arange(start, start + len(rows))
        if groups is None:
            correct = torch.zeros_like(rows, dtype=torch.bool)
            correct[torch.arange(len(rows)), index] = True
        else:
            correct = groups[index][:, None] == groups[None, :]
        best = rows.masked_fill(~correct, float("-inf")).max(dim=1).values
        ahead = (rows > best[:, None]) & ~correct
        if counted is not None:
            ahead &= counted[None, :]
        rank = ahead.sum(dim=1)
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: hits[k] / len(scores) for k in ks}


def _first_of_each(groups: torch.Tensor) -> torch.Tensor:
    """True at the first position of each distinct value."""
    order = torch.argsort(groups, stable=True)
    ordered = groups[order]
    starts = torch.ones(len(groups), dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    first = torch.zeros(len(groups), dtype=torch.bool)
    first[order[starts]] = True
    return first


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), caption_groups: torch.Tensor | None = None) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k, pair i being image i with caption i. With
    `caption_groups` (equal for identical captions) every pair with the same caption is a match, and
    image-to-text ranks distinct captions (copies of a caption are one retrieval result)."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    scores = image @ text.T
    distinct = _first_of_each(caption_groups) if caption_groups is not None else None
    metrics = {f"i2t_r{k}": value for k, value in _recall_at(scores, ks, caption_groups, distinct).items()}
    metrics |= {f"t2i_r{k}": value for k, value in _recall_at(scores.T, ks, caption_groups).items()}
    return metrics


def contrastive_val_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float,
                         batch_size: int) -> float:
    """Mean CLIP loss over consecutive chunks of `batch_size` pairs (open_clip's validation loss)."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    losses, weights = [], []
    for start in range(0, len(image), batch_size):
        logits = logit_scale * image[start:start + batch_size] @ text[start:start + batch_size].T
        labels = torch.arange(len(logits))
        losses.append(float(F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
        weights.append(len(logits))
    return sum(loss * weight for loss, weight in zip(losses, weights)) / max(sum(weights), 1)


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
