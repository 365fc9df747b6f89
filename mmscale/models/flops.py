"""Training FLOPs per sample, counted from the shapes of the model's matmuls (used for MFU).

Counts multiply-adds as 2 FLOPs, as PaLM's MFU definition and `torch.utils.flop_counter` do;
norms, softmax and activations are left out (a few percent). The backward pass costs twice the
forward for every matmul (gradients for inputs and for weights), except the patch embedding,
whose input (the image) needs no gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmscale.models.base import ImageTextModel


def _encoder_forward(*, tokens: int, width: int, layers: int, mlp_width: int) -> int:
    """One pre-norm transformer stack: QKV + output projection + MLP, and the two attention matmuls."""
    per_layer = 2 * tokens * width * (4 * width + 2 * mlp_width) + 4 * tokens * tokens * width
    return layers * per_layer


def _cross_attention_forward(*, tokens: int, image_tokens: int, width: int, image_width: int, layers: int) -> int:
    """BLIP's cross-attention in every text layer: query and output projections on the text, key and value
    projections of the image tokens, and the two attention matmuls (text x image)."""
    per_layer = 2 * tokens * width * 2 * width + 2 * image_tokens * image_width * 2 * width + 4 * tokens * image_tokens * width
    return layers * per_layer


def _fusion_flops(model: ImageTextModel, *, context_length: int, masked_tokens: float, image_tokens: int,
                  itm: bool) -> float:
    """Forward FLOPs of a fusion model's fused text passes per pair: 3 ITM rows (the pair and its two hard
    negatives) when ITM trains, 1 masked caption when MLM does, each a text-encoder pass with cross-attention,
    plus the ITM and MLM heads. (The vision projection and contrastive text pass are counted as a dual encoder's.)"""
    text, vision = model.towers.config.text_config, model.towers.config.vision_config
    fused_pass = _encoder_forward(tokens=context_length, width=text.hidden_size, layers=text.num_hidden_layers,
                                  mlp_width=text.intermediate_size)
    fused_pass += _cross_attention_forward(tokens=context_length, image_tokens=image_tokens, width=text.hidden_size,
                                           image_width=vision.hidden_size, layers=text.num_hidden_layers)
    total = 0.0
    if itm:
        total += 3 * (fused_pass + 2 * text.hidden_size * 2)
    if masked_tokens > 0 and model.mlm_head is not None:
        total += fused_pass + masked_tokens * 2 * text.hidden_size * (text.hidden_size + text.vocab_size)
    return total


def training_flops_per_sample(model: ImageTextModel, *, context_length: int, masked_tokens: float = 0.0,
                              contrastive_batch_size: int = 1, itm: bool = False) -> float:
    """Forward + backward FLOPs for one image-caption pair.

    `context_length` is the padded caption length (data.context_length, or the mean length of the
    batches when they are padded to their longest caption); patch dropout (`model.patch_dropout`)
    shortens the image tower's sequence;
    `masked_tokens` the mean MLM-masked tokens per caption (0 without MLM: then the masked text pass
    is not counted); `contrastive_batch_size` the number of candidates each row is scored against
    (the global batch for CLIP and SigLIP with global negatives); `itm` whether a fusion model trains image-text
    matching (three fused text passes per pair)."""
    config = model.towers.config
    vision, text = config.vision_config, config.text_config
    projection = model.embedding_dim
    patches = (vision.image_size // vision.patch_size) ** 2
    patch_embedding = 2 * patches * 3 * vision.patch_size ** 2 * vision.hidden_size
    kept = model.kept_patches(patches) if model.patch_dropout else patches  # the image tower's tokens in training
    image_side = _encoder_forward(tokens=kept + 1, width=vision.hidden_size, layers=vision.num_hidden_layers,
                                  mlp_width=vision.intermediate_size)
    image_side += 2 * vision.hidden_size * projection
    if getattr(model.towers.vision_model, "pooler", None) is not None:  # ViTModel: dense + tanh on [CLS]
        image_side += 2 * vision.hidden_size ** 2
    text_pass = _encoder_forward(tokens=context_length, width=text.hidden_size, layers=text.num_hidden_layers,
                                 mlp_width=text.intermediate_size)
    if getattr(getattr(model.towers, "text_model", None), "pooler", None) is not None:  # BERT: dense + tanh on [CLS]
        text_pass += 2 * text.hidden_size ** 2
    text_side = text_pass + 2 * text.hidden_size * projection
    if model.kind == "blip":  # the masked captions go through the fused pass, with the ITM rows
        text_side += _fusion_flops(model, context_length=context_length, masked_tokens=masked_tokens,
                                   image_tokens=kept + 1, itm=itm)
    elif masked_tokens > 0 and model.mlm_head is not None:
        text_side += text_pass + masked_tokens * 2 * text.hidden_size * (text.hidden_size + text.vocab_size)
    # Each rank scores its images against every text and its texts against every image.
    logits = 2 * 2 * contrastive_batch_size * projection
    return 3 * (image_side + text_side + logits) + 2 * patch_embedding


def vqa_flops_per_sample(model: ImageTextModel, *, context_length: int) -> float:
    """Forward + backward FLOPs for one question of VQA fine-tuning (a fusion model): the image tower, one text
    pass of the question cross-attending to the image tokens, and the answer head (no contrastive pass)."""
    config = model.towers.config
    vision, text = config.vision_config, config.text_config
    patches = (vision.image_size // vision.patch_size) ** 2
    patch_embedding = 2 * patches * 3 * vision.patch_size ** 2 * vision.hidden_size
    kept = model.kept_patches(patches) if model.patch_dropout else patches
    image_side = _encoder_forward(tokens=kept + 1, width=vision.hidden_size, layers=vision.num_hidden_layers,
                                  mlp_width=vision.intermediate_size)
    fused = _encoder_forward(tokens=context_length, width=text.hidden_size, layers=text.num_hidden_layers,
                             mlp_width=text.intermediate_size)
    fused += _cross_attention_forward(tokens=context_length, image_tokens=kept + 1, width=text.hidden_size,
                                      image_width=vision.hidden_size, layers=text.num_hidden_layers)
    width, answers = text.hidden_size, model.vqa_head.answers if model.vqa_head is not None else 0
    head = 2 * width * 2 * width + 2 * 2 * width * answers
    return 3 * (image_side + fused + head) + 2 * patch_embedding
