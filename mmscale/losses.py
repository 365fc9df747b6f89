"""Contrastive (CLIP InfoNCE, SigLIP) and masked-LM losses, and the pretraining objective.

Negatives come from the whole global batch. Features are all-gathered with gradients and each
rank scores only its own rows against every column (open_clip's `local_loss` +
`gather_with_grad`), so the logits are [B_local, B_global] and memory grows linearly with the
number of ranks, not quadratically. Each rank's loss is the mean over its own rows; the mean of
the ranks' losses is the loss of the global batch, and after data-parallel gradient averaging
(DeepSpeed divides by the world size) the parameter gradients are those of the global batch.
SigLIP passes texts round the ring of ranks instead of gathering them (siglip_loss). With gradient
accumulation, the trainer caches every micro-batch's features first (`feature_gradients`, GradCache),
so the negatives are the whole step's, not one micro-batch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from mmscale.data.text import IGNORE_INDEX
from mmscale.models.base import ImageTextModel
from mmscale.models.fusion import FusionEncoder


@dataclass
class LossConfig:
    """What the model is trained to do, and how much each part counts."""

    objective: Literal["contrastive", "classify", "vqa"] = "contrastive"
    """`contrastive` (image-caption pairs, plus MLM when weighted), `classify` (a linear head over image
    embeddings trained on the `.cls` labels) or `vqa` (an answer head on a fusion model, trained on VQA shards
    with soft targets: the `vqa` section)."""
    classes: int = 0
    """Number of classes for loss.objective=classify (labels 0..classes-1; samples without a label are ignored)."""
    contrastive: Literal["auto", "clip", "siglip"] = "auto"
    """Contrastive loss: `clip` (softmax InfoNCE, both directions) or `siglip` (pairwise sigmoid,
    arXiv:2303.15343), both with negatives from the global batch; `auto`: siglip for a model started from a
    SigLIP checkpoint (its own bias and temperature), clip otherwise."""
    contrastive_weight: float = 1.0
    """Weight of the contrastive loss in the total."""
    mlm_weight: float = 0.1
    """Weight of the masked-LM loss in the total; 0 skips the masked text pass (needed for CLIP text towers).
    Heavier MLM swamps the contrastive signal in the shared text tower early on: on rendered characters
    CLIP's loss stayed at ln(batch) for 150 steps at 0.25 and 0.5, and left it at step ~70 at 0.1 as without MLM."""
    itm_weight: float = 1.0
    """Weight of the image-text matching loss (fusion models only: model.fusion_layers > 0; ignored otherwise):
    binary cross-entropy of the ITM head on each pair and one hard negative per image and per caption."""
    itm_label_groups: bool = False
    """Draw no ITM hard negative from a row with the same `.cls` label (besides identical captions): for captions
    templated from the label, as classification data has them, where "the character 7" and "a printed 7" say the
    same and would otherwise be drawn as each other's negative. Off where the caption says more than the label."""
    itm_negatives: Literal["micro_batch", "global"] = "micro_batch"
    """Where ITM hard negatives are drawn from: `micro_batch`, the rank's own micro-batch (ALBEF and BLIP
    pretraining), or `global`, every rank's pairs of the micro-batch (BLIP's retrieval fine-tuning): three more
    gathers per micro-batch, one of them the image tokens with gradient, and captions of one length on every rank
    (set data.pad_to_longest=false)."""
    siglip_bias_init: float = -10.0
    """Initial SigLIP logit bias (the paper's -10 keeps the first steps from being swamped by negatives)."""
    whole_batch_negatives: bool = True
    """With gradient accumulation, score every pair against the whole global batch (all micro-batches of
    all ranks), as one big batch would: each step first encodes all its micro-batches without gradients
    (one extra image + text forward per micro-batch, about a third more compute), then recomputes each
    with gradients against the cached rest (GradCache, open_clip's --accum-freq). Off: each micro-batch's
    negatives are only the micro batch x world size pairs of that micro-batch."""

    def __post_init__(self):
        if self.objective == "classify" and self.classes < 2:
            raise ValueError(f"loss.objective=classify needs loss.classes >= 2, got {self.classes}")
        if min(self.contrastive_weight, self.mlm_weight, self.itm_weight) < 0:
            raise ValueError(f"loss weights must be >= 0, got loss.contrastive_weight={self.contrastive_weight}, "
                             f"loss.mlm_weight={self.mlm_weight}, loss.itm_weight={self.itm_weight}")


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher, beside the student's own losses (contrastive objective)."""

    teacher: str = ""
    """A model folder mmscale loads (an mmscale final/ or export, float or int8; a CLIP or BLIP ITM folder) that
    reads the student's tokens (the same tokenizer); empty: no teacher."""
    weight: float = 1.0
    """Weight of the KL divergence from the teacher's image-text similarity distribution over the global batch to
    the student's, images to texts and texts to images averaged (open_clip's --distill, TinyCLIP's affinity
    mimicking)."""
    feature_weight: float = 0.0
    """Weight of 1 - cosine between the student's embeddings (through a learned linear map where the widths
    differ) and the teacher's, images and texts averaged."""

    def __post_init__(self):
        if min(self.weight, self.feature_weight) < 0:
            raise ValueError(f"distill weights must be >= 0, got distill.weight={self.weight}, "
                             f"distill.feature_weight={self.feature_weight}")


@dataclass
class LossOutput(ModelOutput):
    """The total loss to backpropagate and each part of it, for logging (a `ModelOutput`, a dict, so
    that ZeRO-3 finds the tensors in it)."""

    total: torch.Tensor | None = None
    contrastive: torch.Tensor | None = None
    mlm: torch.Tensor | None = None
    classification: torch.Tensor | None = None
    itm: torch.Tensor | None = None
    """Image-text matching cross-entropy (fusion models)."""
    vqa: torch.Tensor | None = None
    """VQA answer loss: binary cross-entropy against the soft scores, summed over answers (fusion models)."""
    distill: torch.Tensor | None = None
    """KL divergence of the student's image-text similarities from the teacher's (distill.teacher)."""
    distill_feature: torch.Tensor | None = None
    """1 - cosine of the student's embeddings to the teacher's (distill.feature_weight)."""
    logit_scale: torch.Tensor | None = None
    """1/temperature used in this step (detached)."""
    image_features: torch.Tensor | None = None
    """Normalized image features (the feature pass of whole-batch negatives only)."""
    text_features: torch.Tensor | None = None
    """Normalized text features (the feature pass only)."""
    logit_bias: torch.Tensor | None = None
    """SigLIP's bias used in this step (detached; the feature pass only)."""


def _rank_and_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows. On CUDA tensors
    (NCCL) that is one reduce_scatter; gloo has none, so CPU tensors all-reduce the (small) feature
    gradient and slice. The choice follows the tensor's device, as the process group's backend does
    (`cpu:gloo,cuda:nccl`)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        rank, world = _rank_and_world(group)
        ctx.rank, ctx.world = rank, world
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(gathered, tensor.contiguous(), group=group)
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if grad.device.type == "cuda":
            own = grad.new_empty((grad.shape[0] // ctx.world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(own, grad, group=ctx.group)
            return own, None
        summed = grad.clone()
        dist.all_reduce(summed, group=ctx.group)
        return summed.chunk(ctx.world)[ctx.rank], None


def gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's `tensor` concatenated in rank order, differentiable; `tensor` itself with one
    process. Every rank must pass the same shape (training batches are always full)."""
    if _rank_and_world(group)[1] == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, group)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, *, group=None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over normalized features, this rank's rows against the global batch."""
    rank, _ = _rank_and_world(group)
    all_images, all_texts = gather_with_grad(image, group), gather_with_grad(text, group)
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    image_loss = F.cross_entropy(logit_scale * image @ all_texts.T, labels)
    text_loss = F.cross_entropy(logit_scale * text @ all_images.T, labels)
    return (image_loss + text_loss) / 2


def distill_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, teacher_image: torch.Tensor,
                 teacher_text: torch.Tensor, teacher_scale: torch.Tensor, *, group=None) -> torch.Tensor:
    """KL(teacher || student) of each of this rank's rows' softmax over the global batch, with each model's own
    temperature, images to texts and texts to images averaged (normalized features; the teacher's without
    gradient). Zero where the student's similarities are the teacher's."""
    all_images, all_texts = gather_with_grad(image, group), gather_with_grad(text, group)
    with torch.no_grad():
        teacher_images, teacher_texts = gather_with_grad(teacher_image, group), gather_with_grad(teacher_text, group)
        targets = [F.log_softmax(teacher_scale * teacher_image @ teacher_texts.T, dim=-1),
                   F.log_softmax(teacher_scale * teacher_text @ teacher_images.T, dim=-1)]
    students = [F.log_softmax(logit_scale * image @ all_texts.T, dim=-1),
                F.log_softmax(logit_scale * text @ all_images.T, dim=-1)]
    return sum(F.kl_div(student, target, reduction="batchmean", log_target=True)
               for student, target in zip(students, targets)) / 2


class Teacher(nn.Module):
    """A frozen model whose image-text similarities (and embeddings) a student learns from. It is kept out of
    the module DeepSpeed trains (no gradients, no optimizer state, not in checkpoints): `objective.teacher`
    returns it; `feature_maps` (the learned maps from the student's embedding width to the teacher's) are the
    objective's own, trained and checkpointed. Under ZeRO-3 it is an inference engine of its own, partitioned
    across the ranks (mmscale.train.engine.place_teacher): everything it reads happens inside `forward`."""

    def __init__(self, model: ImageTextModel):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized float image and text features and 1/temperature of a batch (images resized to the
        teacher's size where the student's differ)."""
        size = self.model.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False)
            images = resized.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else resized
        image = F.normalize(self.model.encode_images(images).float(), dim=-1)
        text = F.normalize(self.model.encode_texts(input_ids, attention_mask).float(), dim=-1)
        return image, text, self.model.logit_scale().float()


def _neighbour_exchange(tensor: torch.Tensor, send_to: int, receive_from: int, group) -> torch.Tensor:
    """Send `tensor` to one rank and receive a tensor of the same shape from another, as one batch of
    point-to-point operations (NCCL and gloo both run them)."""
    received = torch.empty_like(tensor)
    global_rank = (lambda rank: rank) if group is None else (lambda rank: dist.get_global_rank(group, rank))
    operations = [dist.P2POp(dist.isend, tensor.contiguous(), global_rank(send_to), group=group),
                  dist.P2POp(dist.irecv, received, global_rank(receive_from), group=group)]
    for request in dist.batch_isend_irecv(operations):
        request.wait()
    return received


class _NeighbourExchangeWithGrad(torch.autograd.Function):
    """Pass a tensor one rank to the right round the ring; its gradient goes back one rank to the left."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        rank, world = _rank_and_world(group)
        ctx.group, ctx.left, ctx.right = group, (rank - 1) % world, (rank + 1) % world
        return _neighbour_exchange(tensor, ctx.right, ctx.left, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _neighbour_exchange(grad, ctx.left, ctx.right, ctx.group), None


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                group=None) -> torch.Tensor:
    """SigLIP: a binary decision for every image-text pair of the global batch, summed and divided
    by the global batch size. Texts travel round the ring of ranks (big_vision's and open_clip's
    neighbour exchange): a rank scores its images against its own texts, then against each other
    rank's as they pass, holding [B_local, B_local] logits at a time and never the gathered batch;
    the gradients of the visiting texts travel back the same way. Every rank's batch has the same size."""
    _, world = _rank_and_world(group)

    def pairs(texts: torch.Tensor, matching: bool) -> torch.Tensor:
        logits = logit_scale * image @ texts.T + logit_bias
        signs = -torch.ones_like(logits)
        if matching:
            signs.diagonal().fill_(1.0)
        return -F.logsigmoid(signs * logits).sum()

    total = pairs(text, matching=True)
    visiting = text
    for _ in range(world - 1):
        visiting = _NeighbourExchangeWithGrad.apply(visiting, group)
        total = total + pairs(visiting, matching=False)
    return total / image.shape[0]


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy summed over the masked positions (`logits` holds just those rows; rows whose target
    is IGNORE_INDEX are padding), divided by `tokens`, or by this batch's count of masked tokens. The
    trainer passes the global batch's count divided by micro-batches x ranks, so that after DeepSpeed's
    averaging over both the loss is the mean over every masked token of the step (a token-weighted mean,
    not a mean of per-batch means). A batch without any masked token gives 0, still connected to the
    head so every rank runs the same modules (ZeRO-3 gathers parameters collectively). The counts stay
    on the device: no host sync."""
    summed = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / (tokens if tokens is not None else (targets != IGNORE_INDEX).sum().clamp(min=1))


def itm_labels(rows: int, device: torch.device) -> torch.Tensor:
    """The classes of a fused ITM batch of 3 x `rows`: the pairs match (1), the two hard-negative blocks do not (0)."""
    labels = torch.zeros(3 * rows, dtype=torch.long, device=device)
    labels[:rows] = 1
    return labels


def itm_loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Image-text matching cross-entropy over [3B, 2] logits (B pairs, B images with a hard-negative caption, B
    captions with a hard-negative image: ALBEF/BLIP's 1:2 batch), averaged over the rows that count (`weights`,
    0 for a negative whose batch had no candidate). Counted on the device: no host sync."""
    labels = itm_labels(len(logits) // 3, logits.device)
    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_row * weights).sum() / weights.sum().clamp(min=1.0)


def contrastive_loss(config: LossConfig, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None) -> torch.Tensor:
    """`config.contrastive` over normalized features, this rank's rows against the global batch."""
    if config.contrastive == "siglip":
        return siglip_loss(image, text, logit_scale, logit_bias)
    return clip_loss(image, text, logit_scale)


@dataclass
class FeatureGradients:
    """What the feature pass of a step leaves for the gradient pass: the step's contrastive loss on this
    rank (over all its micro-batches' features against the global batch's) and its gradients with
    respect to this rank's features and the temperature and bias it used."""

    loss: torch.Tensor
    image: torch.Tensor
    """[accumulation x micro batch, D]: every rank's loss terms, summed (the gathers' backward)."""
    text: torch.Tensor
    logit_scale: torch.Tensor
    """This rank's loss only; DeepSpeed's averaging over ranks makes it the global batch's."""
    logit_bias: torch.Tensor | None


def feature_gradients(config: LossConfig, passes: list[LossOutput]) -> FeatureGradients:
    """The contrastive loss of the whole step from the feature pass's outputs of its micro-batches (no
    gradients in them), and its gradient with respect to each feature: one big batch's loss, at the cost
    of holding [accumulation x micro batch, global batch] logits at once for CLIP."""
    image = torch.cat([out.image_features for out in passes]).detach().requires_grad_()
    text = torch.cat([out.text_features for out in passes]).detach().requires_grad_()
    scale = passes[0].logit_scale.detach().float().requires_grad_()
    bias = passes[0].logit_bias
    bias = bias.detach().float().requires_grad_() if bias is not None else None
    with torch.enable_grad():
        loss = contrastive_loss(config, image, text, scale, bias)
        loss.backward()
    return FeatureGradients(loss=loss.detach(), image=image.grad, text=text.grad, logit_scale=scale.grad,
                            logit_bias=bias.grad if bias is not None else None)


class PretrainingObjective(nn.Module):
    """The dual encoder and its losses as one module: the module handed to `deepspeed.initialize`.
    The whole loss, temperature included, is computed inside `forward`, where ZeRO-3 has the
    parameters gathered (PITFALLS.md 3)."""

    def __init__(self, model: ImageTextModel, config: LossConfig):
        super().__init__()
        if config.mlm_weight > 0 and model.mlm_head is None:
            raise ValueError("loss.mlm_weight > 0 but the model has no MLM head (CLIP text towers are causal and "
                             "take none); set loss.mlm_weight=0 or model.mlm_head=true")
        if config.contrastive == "siglip" and model.logit_bias is None:
            raise ValueError("loss.contrastive=siglip needs a model built with a logit bias "
                             "(build_model(..., logit_bias_init=loss.siglip_bias_init))")
        self.model = model
        self.config = config
        self.itm = isinstance(model, FusionEncoder) and config.itm_weight > 0  # image-text matching is trained
        self.distill: DistillConfig | None = None
        self._teacher: Teacher | None = None

    @property
    def teacher(self) -> Teacher | None:
        return self._teacher

    def attach_teacher(self, teacher: ImageTextModel, config: DistillConfig) -> None:
        """Learn from `teacher` (frozen) beside the own losses; call before deepspeed.initialize (the feature maps
        train). The teacher is no submodule, so the student's engine neither casts, partitions, trains nor saves
        it: place it with mmscale.train.engine.place_teacher once the student's engine exists."""
        self.distill = config
        object.__setattr__(self, "_teacher", Teacher(teacher))
        if config.feature_weight > 0:
            width, teacher_width = self.model.embedding_dim, teacher.embedding_dim
            dtype = self.model._input_dtype()  # the model's own (a new ZeRO-3 model is built in the training dtype)
            self.feature_maps = nn.ModuleDict({kind: nn.Linear(width, teacher_width, bias=False, dtype=dtype)
                                               if width != teacher_width else nn.Identity()
                                               for kind in ("image", "text")})

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mlm_input_ids: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, mlm_positions: torch.Tensor | None = None,
                mlm_targets: torch.Tensor | None = None, *, features_only: bool = False,
                feature_gradients: tuple[torch.Tensor, ...] | None = None, accumulation: int = 1,
                mlm_tokens: torch.Tensor | None = None) -> LossOutput:
        """The losses of one micro-batch. Three uses:

        - plain: the contrastive loss of this micro-batch against every rank's, plus MLM;
        - `features_only=True` (run without gradients): the normalized features, temperature and bias,
          for `feature_gradients` over all micro-batches of the step;
        - `feature_gradients=(image, text, logit_scale, logit_bias)` (this micro-batch's slices of a
          FeatureGradients): `total` is a surrogate whose gradient, after DeepSpeed's averaging over
          `accumulation` micro-batches and the ranks, is the whole step's contrastive gradient (GradCache),
          plus MLM; `contrastive` is then 0 (the caller has the step's loss).

        `mlm_tokens`: the MLM loss's divisor (see mlm_loss). A fusion model adds its ITM loss (over this
        micro-batch's pairs and hard negatives) and conditions the MLM on the image, in every use but the
        feature pass."""
        use_mlm = self.config.mlm_weight > 0 and not features_only
        if use_mlm and (mlm_input_ids is None or (mlm_labels is None and mlm_positions is None)):
            raise ValueError("loss.mlm_weight > 0 needs masked captions; data.mlm_probability is 0")
        if features_only:
            # Through the model's own forward, without masked captions: the same random draws (patch dropout)
            # when the trainer replays the generator state for the gradient pass, and the same modules in the same
            # order, a prefix of the gradient pass's (ZeRO-3 keeps its module trace and prefetching).
            out = self.model(images, input_ids, attention_mask)
            bias = out.logit_bias
            return LossOutput(image_features=F.normalize(out.image_features.float(), dim=-1),
                              text_features=F.normalize(out.text_features.float(), dim=-1),
                              logit_scale=out.logit_scale.float().detach(),
                              logit_bias=bias.float().detach() if bias is not None else None)
        if not use_mlm:
            mlm_input_ids = mlm_labels = mlm_positions = mlm_targets = None
        extra = {}
        if self.itm:
            gather = gather_with_grad if self.config.itm_negatives == "global" and dist.is_initialized() else None
            extra = {"itm": True, "itm_groups": labels if self.config.itm_label_groups else None,
                     "itm_gather": gather}
        out = self.model(images, input_ids, attention_mask, mlm_input_ids, mlm_labels,
                         mlm_positions=mlm_positions, mlm_targets=mlm_targets, **extra)
        image = F.normalize(out.image_features.float(), dim=-1)
        text = F.normalize(out.text_features.float(), dim=-1)
        scale = out.logit_scale.float()
        bias = out.logit_bias.float() if out.logit_bias is not None else None
        if feature_gradients is None:
            contrastive = contrastive_loss(self.config, image, text, scale, bias)
            weighted = self.config.contrastive_weight * contrastive
        else:
            image_grad, text_grad, scale_grad, bias_grad = feature_gradients
            surrogate = accumulation * ((image * image_grad).sum() + (text * text_grad).sum()) + scale * scale_grad
            if bias is not None:
                surrogate = surrogate + bias * bias_grad
            contrastive = scale.new_zeros(())
            weighted = self.config.contrastive_weight * surrogate
        mlm = mlm_loss(out.mlm_logits, out.mlm_targets, mlm_tokens) if use_mlm else scale.new_zeros(())
        total = weighted + self.config.mlm_weight * mlm
        itm = None
        if self.itm:
            itm = itm_loss(out.itm_logits, out.itm_weights)
            total = total + self.config.itm_weight * itm
        distill = feature = None
        if self._teacher is not None:
            distill, feature = self._distillation(out, image, text, scale, images, input_ids, attention_mask)
            total = total + self.distill.weight * distill + self.distill.feature_weight * feature
        return LossOutput(total=total, contrastive=contrastive, mlm=mlm, itm=itm, logit_scale=scale.detach(),
                          distill=distill, distill_feature=feature)

    def _distillation(self, out, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, images: torch.Tensor,
                      input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's losses of this micro-batch: the similarity KL over the global batch (every rank's rows,
        gathered as the contrastive loss gathers them) and the feature cosine (0 when not weighted)."""
        teacher_image, teacher_text, teacher_scale = self._teacher(images, input_ids, attention_mask)
        distill = distill_loss(image, text, scale, teacher_image, teacher_text, teacher_scale)
        feature = scale.new_zeros(())
        if self.distill.feature_weight > 0:
            maps = self.feature_maps
            dtype = next(maps["image"].parameters(), out.image_features).dtype
            mapped_image = maps["image"](out.image_features.to(dtype)).float()
            mapped_text = maps["text"](out.text_features.to(dtype)).float()
            feature = 1 - (F.cosine_similarity(mapped_image, teacher_image, dim=-1).mean()
                           + F.cosine_similarity(mapped_text, teacher_text, dim=-1).mean()) / 2
        return distill, feature


def check_labels(labels: torch.Tensor, classes: int) -> None:
    """Refuse `.cls` labels outside 0..classes-1 (-1, no label, is fine). Called on the CPU batch before it
    moves to the device, where reading the maximum back would stall the step."""
    bad = labels[(labels >= classes) | (labels < -1)]
    if len(bad):
        raise ValueError(f"label {int(bad[0])} is out of range for loss.classes={classes} (labels are 0..{classes - 1}, "
                         "-1 for none)")


class ClassificationObjective(nn.Module):
    """Cross-entropy of the model's linear head over normalized image embeddings against `.cls` labels
    (-1, no label, is ignored); the text tower is not used. The labels' range is checked on the CPU
    (`check_labels`, by the training loop)."""

    def __init__(self, model: ImageTextModel, config: LossConfig):
        super().__init__()
        if model.classifier is None or model.classifier.out_features != config.classes:
            model.add_classifier(config.classes)
        self.model = model
        self.config = config

    def forward(self, images: torch.Tensor, labels: torch.Tensor, **unused) -> LossOutput:
        logits = self.model.classify(images).float()
        loss = F.cross_entropy(logits, labels, ignore_index=-1)
        zero = loss.new_zeros(())
        return LossOutput(total=loss, contrastive=zero, mlm=zero, classification=loss)


class VqaObjective(nn.Module):
    """VQA fine-tuning of a fusion model: its answer head's logits over the answer list against the soft scores
    (`answer_targets`, mmscale.data.vqa), binary cross-entropy summed over the answers and averaged over the
    questions (as ViLT and the bottom-up VQA models train); a question none of whose answers is in the list has
    all-zero targets and still counts (it teaches "none of these")."""

    def __init__(self, model: ImageTextModel, config: LossConfig):
        super().__init__()
        if not isinstance(model, FusionEncoder) or model.vqa_head is None:
            raise ValueError("loss.objective=vqa needs a fusion model with an answer head (build_model(..., "
                             "vqa_answers=...)); a dual encoder cannot answer: pretrain with model.fusion_layers > 0")
        self.model = model
        self.config = config

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_targets: torch.Tensor, **unused) -> LossOutput:
        logits = self.model.vqa_logits(images, input_ids, attention_mask).float()
        loss = F.binary_cross_entropy_with_logits(logits, answer_targets.float(), reduction="sum") / len(logits)
        zero = loss.new_zeros(())
        return LossOutput(total=loss, contrastive=zero, mlm=zero, vqa=loss)
