"""Embedding a validation pass, on one process or across ranks in lockstep.

Under ZeRO-3 every forward pass gathers parameters collectively, so every rank must run the
same number of them. A finite pass gives ranks different batch counts; a rank that has run out
runs a one-sample placeholder batch (and drops its output) until all ranks are done.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmscale.data.text import CaptionEncoder
from mmscale.eval.fusion import FusionValidation
from mmscale.eval.metrics import contrastive_val_loss, read_lines, read_templates
from mmscale.eval.shared import (all_reduce_sum, rank_sizes, shared_retrieval_metrics, shared_zeroshot_accuracy,
                                 shared_zeroshot_predictions)
from mmscale.models import DualEncoder
from mmscale.models.dual_encoder import classifier_input
from mmscale.models.fusion import FusionEncoder


@dataclass
class Embedded:
    """This rank's share of a pass's embeddings, on the evaluation device."""

    images: torch.Tensor
    texts: torch.Tensor
    labels: torch.Tensor
    caption_groups: torch.Tensor
    """int64 per pair, equal for identical captions (same token ids)."""
    image_groups: torch.Tensor
    """int64 per pair, equal for identical images (same pixels), e.g. the five captions of a COCO image."""


def _digests(rows) -> torch.Tensor:
    """A 64-bit digest per row: equal contents, equal numbers, on any rank."""
    digests = [hashlib.blake2b(row.contiguous().numpy().tobytes(), digest_size=8).digest() for row in rows]
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests], dtype=torch.int64)


def caption_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Equal numbers for equal captions (their tokens, padding left out)."""
    return _digests(row[mask.bool()] for row, mask in zip(input_ids.cpu(), attention_mask.cpu()))


def image_groups(images: torch.Tensor) -> torch.Tensor:
    """Equal numbers for equal images (their uint8 pixels as the eval loader crops them)."""
    return _digests(images.cpu())


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def placeholder_batch(model: DualEncoder, context_length: int) -> dict:
    return {"images": torch.zeros(1, 3, model.image_size, model.image_size, dtype=torch.uint8),
            "input_ids": torch.zeros(1, context_length, dtype=torch.long),
            "attention_mask": torch.ones(1, context_length, dtype=torch.long)}


def lockstep(batches, *, device: torch.device, placeholder: dict, max_samples: int = 0):
    """(batch, real) for each batch of this rank's share (up to `max_samples` samples), then, across ranks,
    (placeholder, False) until every rank has run out: every rank runs as many forward passes (ZeRO-3's gathers)."""
    iterator, seen, across_ranks = iter(batches), 0, distributed()
    while True:
        batch = next(iterator, None) if not max_samples or seen < max_samples else None
        if across_ranks:
            pending = torch.tensor([batch is not None], dtype=torch.int32, device=device)
            dist.all_reduce(pending, op=dist.ReduceOp.MAX)
            if not pending.item():
                return
        elif batch is None:
            return
        if batch is None:
            yield placeholder, False
        else:
            seen += len(batch["images"])
            yield batch, True


def _encode(model, inputs: dict, *, device: torch.device, fusion: FusionValidation | None,
            counted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features of one batch; with `fusion`, the image tokens are computed once and serve its
    ITM and MLM counts too (the image features are `encode_images`', the projection of their first token)."""
    images = inputs["images"].to(device, non_blocking=True)
    if fusion is None:
        image = model.encode_images(images)
        return image, model.encode_texts(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
    text = model.encode_texts(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
    tokens = model.image_tokens(images)
    image = model.image_features(tokens)
    fusion.add_batch(inputs, image_tokens=tokens, image_features=image, text_features=text,
                     captions=caption_groups(inputs["input_ids"], inputs["attention_mask"]), counted=counted)
    return image, text


@torch.no_grad()
def embed_pass(model: DualEncoder, batches, *, device: torch.device, context_length: int,
               max_samples: int = 0, fusion: FusionValidation | None = None) -> Embedded:
    """Image and caption embeddings (and `.cls` labels) of this rank's share of one pass over `batches`,
    on `device`, where mmscale.eval.shared scores them without gathering them. `fusion` (a fusion model's)
    also counts ITM and MLM predictions of every batch."""
    images, texts, labels, captions, pictures = [], [], [], [], []
    for batch, real in lockstep(batches, device=device, placeholder=placeholder_batch(model, context_length),
                                max_samples=max_samples):
        image, text = _encode(model, batch, device=device, fusion=fusion, counted=real)
        if real:
            images.append(image.float())
            texts.append(text.float())
            labels.append(batch.get("labels", torch.full((len(image),), -1)).to(device))
            captions.append(caption_groups(batch["input_ids"], batch["attention_mask"]).to(device))
            pictures.append(image_groups(batch["images"]).to(device))
    width = model.embedding_dim
    empty = (torch.empty(0, width, device=device), torch.empty(0, width, device=device),
             *(torch.empty(0, dtype=torch.int64, device=device) for _ in range(3)))
    return Embedded(*(torch.cat(parts) if parts else blank
                      for parts, blank in zip((images, texts, labels, captions, pictures), empty)))


@torch.no_grad()
def class_embeddings(model: DualEncoder, tokenizer, classnames: list[str], templates: list[str], *,
                     device: torch.device, context_length: int) -> torch.Tensor:
    """One embedding per class: the normalized mean of its normalized template embeddings (CLIP's
    prompt ensembling). Every rank computes all of them, so forward passes stay in lockstep."""
    encoder = CaptionEncoder(tokenizer, mlm_probability=0.0, **model.caption_settings(context_length))
    prompts = [template.format(name) for name in classnames for template in templates]
    embeddings = []
    for start in range(0, len(prompts), 256):
        encoded = encoder.encode(prompts[start:start + 256])
        features = model.encode_texts(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))
        embeddings.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
    per_class = torch.cat(embeddings).view(len(classnames), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(per_class, dim=-1)


@torch.no_grad()
def _classifier_accuracy(model: DualEncoder, embedded: Embedded, device: torch.device) -> float:
    """Top-1 accuracy of the classification head on the labelled images of every rank (collective)."""
    features = classifier_input(embedded.images)
    logits = model.classifier(features.to(device, dtype=model.classifier.weight.dtype)).float()
    labelled = embedded.labels >= 0
    count, correct = all_reduce_sum([float(labelled.sum()),
                                     float((logits[labelled].argmax(dim=1) == embedded.labels[labelled]).sum())], device)
    return correct / count if count else float("nan")


def current_logit_scale(model: DualEncoder) -> float:
    """The current 1/temperature; under ZeRO-3 the parameter is gathered first (collective)."""
    parameter = model.logit_scale_parameter
    if not hasattr(parameter, "ds_id"):
        return float(model.logit_scale().detach())
    import deepspeed

    with deepspeed.zero.GatheredParameters([parameter]):
        return float(model.logit_scale().detach())


def _write_zeroshot_report(folder: str, embedded: Embedded, classes: torch.Tensor, names: list[str]) -> None:
    """Every rank's (label, top-1 class) pairs, gathered (a collective), as a per-class report by rank 0."""
    from mmscale.eval.report import write_report

    truth, predicted = shared_zeroshot_predictions(embedded.images, embedded.labels, classes)
    if not distributed() or dist.get_rank() == 0:
        write_report(folder, truth.cpu(), predicted.cpu(), names, title="Zero-shot classification")


def evaluate(model: DualEncoder, batches, *, tokenizer, device: torch.device, context_length: int,
             batch_size: int, classnames: str = "", templates: str = "", max_samples: int = 0,
             itm_label_groups: bool = False, match_labels: bool = False, report: str = "") -> dict[str, float]:
    """Validation loss, retrieval recall@1/5/10 (`match_labels`: a result with the query's `.cls` label counts,
    mmscale.eval.metrics.retrieval_metrics), with class names zero-shot top-1/top-5, and for a fusion model ITM
    accuracy (`itm_label_groups`: no hard negative of the same `.cls` label, as loss.itm_label_groups) and
    (with an MLM head) image-conditioned MLM accuracy (mmscale.eval.fusion). With class names, `report` (a
    folder) gets the zero-shot per-class report and confusion PNG (mmscale.eval.report.write_report), written
    by rank 0 from every rank's predictions."""
    was_training = model.training
    model.eval()
    try:
        fusion = (FusionValidation(model, tokenizer, label_groups=itm_label_groups)
                  if isinstance(model, FusionEncoder) else None)
        embedded = embed_pass(model, batches, device=device, context_length=context_length, max_samples=max_samples,
                              fusion=fusion)
        samples = sum(rank_sizes(len(embedded.images), device))
        metrics = {"samples": float(samples)} | (fusion.metrics(device) if fusion is not None else {})
        if classnames:
            names = read_lines(classnames, "classnames")
            classes = class_embeddings(model, tokenizer, names, read_templates(templates), device=device,
                                       context_length=context_length)
            metrics |= shared_zeroshot_accuracy(embedded.images, embedded.labels, classes)
            if report:
                _write_zeroshot_report(report, embedded, classes, names)
        if model.classifier is not None and samples:
            metrics["classifier_top1"] = _classifier_accuracy(model, embedded, device)
        if samples:
            loss, pairs = contrastive_val_loss(embedded.images, embedded.texts, current_logit_scale(model), batch_size,
                                               mean=False)
            loss, pairs = all_reduce_sum([loss, pairs], device)
            metrics["val_loss"] = loss / pairs
            metrics |= shared_retrieval_metrics(embedded.images, embedded.texts, caption_groups=embedded.caption_groups,
                                                image_groups=embedded.image_groups,
                                                label_groups=embedded.labels if match_labels else None)
        return metrics
    finally:
        model.train(was_training)
