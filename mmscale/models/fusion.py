"""The fusion encoder: BLIP's image-text matching model, with mmscale's temperature and masked-LM head.

The whole Hugging Face model is a `BlipForImageTextRetrieval` (docs/design/fusion.md): a ViT (`vision_model`),
a BERT-style text encoder whose every layer can cross-attend to the image's patch tokens (`text_encoder`),
the two contrastive projections and a two-way ITM head on the first token. The text encoder runs twice: without
image tokens for the contrastive features (cross-attention skipped, bidirectional self-attention), and with
them for image-text matching and the image-conditioned masked-LM, so a BLIP ITM folder starts a fusion model
as it is, and a saved one is what `BlipForImageTextRetrieval.from_pretrained` loads. mmscale adds what that
class has no place for (BLIP's own temperature was dropped by Hugging Face's conversion): a learned log scale,
the MLM head tied to the word embeddings, and optionally SigLIP's bias, saved in mmscale_heads.safetensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipTextConfig, BlipVisionConfig

from mmscale.data.text import IGNORE_INDEX, masked_positions
from mmscale.models.base import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, DualEncoderOutput, ImageTextModel
from mmscale.models.config import ModelConfig, ModelSizes
from mmscale.models.heads import MaskedLMHead, NegativePool, VqaHead, hard_negatives
from mmscale.models.init import init_towers

# BLIP's attention is eager only: its text encoder adds the mask and multiplies by hand, and transformers
# declares no SDPA/flash support for any BLIP class.
ATTENTION = "eager"


def blip_config(sizes: ModelSizes, config: ModelConfig, *, token_ids: dict[str, int] | None = None) -> BlipConfig:
    """The Hugging Face config of a new fusion model of `sizes`: every text layer cross-attends (BLIP's text
    encoder is built so), the contrastive projections are `projection_dim` wide. `token_ids`: the tokenizer's
    pad/cls/sep ids, so the saved config names tokens the vocabulary has."""
    token_ids = token_ids or {}
    pad, cls, sep = token_ids.get("pad", 0), token_ids.get("cls", 0), token_ids.get("sep", 0)
    text = BlipTextConfig(
        vocab_size=sizes.vocab_size, hidden_size=sizes.text_width, encoder_hidden_size=sizes.vision_width,
        intermediate_size=sizes.text_mlp_width, num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads, max_position_embeddings=sizes.text_max_positions,
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
        pad_token_id=pad, bos_token_id=cls, eos_token_id=sep, sep_token_id=sep, is_decoder=True,
    )
    vision = BlipVisionConfig(
        hidden_size=sizes.vision_width, intermediate_size=sizes.vision_mlp_width,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads, image_size=sizes.image_size,
        patch_size=sizes.patch_size, attention_dropout=config.dropout,
    )
    blip = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      image_text_hidden_size=sizes.projection_dim, projection_dim=sizes.projection_dim)
    blip.architectures = ["BlipForImageTextRetrieval"]
    return blip


def new_fusion_towers(sizes: ModelSizes, config: ModelConfig, *,
                      token_ids: dict[str, int] | None = None) -> BlipForImageTextRetrieval:
    """A freshly initialized BLIP ITM model with open_clip's initialization (mmscale.models.init); under an
    active ZeRO-3 `HfDeepSpeedConfig` it is built partitioned and the trainer initializes it once gathered."""
    towers = BlipForImageTextRetrieval._from_config(blip_config(sizes, config, token_ids=token_ids),
                                                     attn_implementation=ATTENTION)
    if not any(hasattr(parameter, "ds_id") for parameter in towers.parameters()):
        init_towers(towers)
    return towers


def select_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[index]` (rows may repeat) as a one-hot matmul, whose backward sums each row's gradients in a fixed
    order: the backward of advanced indexing (`index_put_` with accumulation) is not deterministic on CPU, and a
    hard negative drawn by several rows made a resumed run drift from the uninterrupted one (1e-4 in a step)."""
    picks = nn.functional.one_hot(index, tensor.shape[0]).to(tensor.dtype)
    return (picks @ tensor.reshape(tensor.shape[0], -1)).view(len(index), *tensor.shape[1:])


class FusionEncoder(ImageTextModel):
    """BLIP's image-text matching model (`towers`, a `BlipForImageTextRetrieval`) plus a learned temperature,
    an optional MLM head and an optional SigLIP bias. The contrastive features are BLIP's ITC features exactly
    (`vision_proj` of the image's first token, `text_proj` of the caption's first token without the image);
    the ITM logits are the saved model's `itm_score`."""

    tower_names = ("vision_model", "text_encoder")
    head_names = ("vision_proj", "text_proj", "itm_head")

    def __init__(self, towers: BlipForImageTextRetrieval, *, mlm_head: bool, logit_scale_init: float = 1 / 0.07,
                 logit_bias_init: float | None = None, max_logit_scale: float = 100.0,
                 image_mean=CLIP_IMAGE_MEAN, image_std=CLIP_IMAGE_STD, vqa_answers: list[str] | None = None):
        super().__init__(max_logit_scale=max_logit_scale, image_mean=image_mean, image_std=image_std)
        self.towers = towers
        self.vqa_answers: list[str] = []
        self.vqa_head: VqaHead | None = None
        if vqa_answers:
            self.add_vqa_head(vqa_answers)
        self.logit_scale_init = float(logit_scale_init)
        # [] like CLIP's logit_scale (deepspeed 0.19.7 handles 0-dim parameters; PITFALLS.md 1).
        self.logit_scale_log = nn.Parameter(torch.tensor(math.log(self.logit_scale_init)))
        self.mlm_head = MaskedLMHead.for_text_tower(towers.text_encoder) if mlm_head else None
        self.logit_bias_init = logit_bias_init
        self.logit_bias = None if logit_bias_init is None else nn.Parameter(torch.tensor(float(logit_bias_init)))
        self._follow_placed_towers(self.mlm_head, self.logit_bias, self.logit_scale_log)

    @property
    def logit_scale_parameter(self) -> nn.Parameter:
        return self.logit_scale_log

    def add_vqa_head(self, answers: list[str]) -> VqaHead:
        """A new answer classifier over `answers` (the answer list, saved with the model) on the fused first token."""
        self.vqa_answers = list(answers)
        self.vqa_head = VqaHead(width=self.towers.config.text_config.hidden_size, answers=len(answers))
        self._follow_placed_towers(self.vqa_head)
        return self.vqa_head

    def vqa_logits(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, answers] logits of each question (`input_ids`) about its image: the question's tokens attend to the
        image's tokens in every text layer, the head reads the first token (as the ITM head does)."""
        if self.vqa_head is None:
            raise ValueError("this model has no VQA answer head; fine-tune it on VQA shards first "
                             "(mmscale finetune --config configs/finetune/vqa.yaml)")
        hidden = self._text_hidden(input_ids, attention_mask, self.image_tokens(images))
        return self.vqa_head(hidden[:, 0].to(self.vqa_head.dense.weight.dtype))

    @property
    def embedding_dim(self) -> int:
        return self.towers.config.image_text_hidden_size

    @property
    def fusion_layers(self) -> int:
        """Text layers that cross-attend to the image (all of them, in BLIP's text encoder)."""
        return self.towers.config.text_config.num_hidden_layers

    def _input_dtype(self) -> torch.dtype:
        return self.towers.vision_proj.weight.dtype

    def zero3_external_parameters(self) -> list[nn.Parameter]:
        """None: the temperature is this module's own parameter, gathered around its forward."""
        return []

    def reset_extra_parameters(self) -> None:
        """mmscale's own parameters at their initial values (after ZeRO-3 construction)."""
        self.logit_scale_log.data.fill_(math.log(self.logit_scale_init))

    def _text_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.additive_mask(attention_mask, self.towers.text_encoder.embeddings.word_embeddings.weight.dtype)

    def _text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The text encoder's last hidden states [B, L, W]; with `image_tokens` [B, P, V] every layer
        cross-attends to them (all of them: BLIP's ITM passes an all-ones image mask)."""
        return self.towers.text_encoder(input_ids=input_ids, attention_mask=self._text_mask(attention_mask),
                                        encoder_hidden_states=image_tokens).last_hidden_state

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's output tokens [B, 1 + patches, V] (after its final LayerNorm): what the text
        cross-attends to, and whose first token is the contrastive image feature's input."""
        return self.towers.vision_model(pixel_values=self.pixel_values(images)).last_hidden_state

    def image_features(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The contrastive image features of `image_tokens` (image_tokens' output): for callers that need both
        without running the image tower twice."""
        return self.towers.vision_proj(image_tokens[:, 0])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings, not normalized: BLIP's ITC image feature before its normalization."""
        return self.image_features(self.image_tokens(images))

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings, not normalized: BLIP's ITC text feature (no image) before its normalization."""
        return self.towers.text_proj(self._text_hidden(input_ids, attention_mask)[:, 0])

    def itm_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] matching logits of row-aligned image tokens and captions (the saved model's `itm_score`)."""
        return self.towers.itm_head(self._text_hidden(input_ids, attention_mask, image_tokens)[:, 0])

    def itm_scores(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """P(image i matches caption i) [B]: softmax of the ITM logits, the "match" class."""
        return self.itm_logits(self.image_tokens(images), input_ids, attention_mask).float().softmax(-1)[:, 1]

    def mlm_logits(self, mlm_input_ids: torch.Tensor, attention_mask: torch.Tensor, mlm_labels: torch.Tensor, *,
                   images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets at the masked positions of [B, L] `mlm_labels`, the masked captions attending to
        `images` (without images: the text encoder alone, as the contrastive features are made)."""
        self._require_mlm_head()
        tokens = None if images is None else self.image_tokens(images)
        hidden = self._text_hidden(mlm_input_ids, attention_mask, tokens)
        masked = mlm_labels != IGNORE_INDEX
        return self.mlm_head(hidden[masked]), mlm_labels[masked]

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mlm_input_ids: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None, *,
                mlm_positions: torch.Tensor | None = None, mlm_targets: torch.Tensor | None = None,
                itm: bool = False, itm_groups: torch.Tensor | None = None,
                itm_gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> DualEncoderOutput:
        """Contrastive features and temperature; with `itm`, ITM logits of each pair and its two hard negatives
        (mmscale.models.heads.hard_negatives, never one of the same `itm_groups` label), drawn from this batch's
        rows, or with `itm_gather` (every rank's rows of a tensor, in rank order, gradients flowing back to their
        rank: mmscale.losses.gather_with_grad) from every rank's: the captions must then have one length on every
        rank. With masked captions, MLM logits of the captions attending to their images. ITM and MLM share one
        fused text-encoder pass over [captions | hard-negative captions... ] of 3B (+B) rows.

        Modules run in one order (text encoder, text_proj, vision, vision_proj, then the fused text pass, the
        ITM head, the MLM head): the forward without ITM and MLM (GradCache's feature pass) is a prefix of the
        full one, so ZeRO-3 keeps its module trace."""
        text_features = self.encode_texts(input_ids, attention_mask)
        tokens = self.image_tokens(images)
        image_features = self.image_features(tokens)
        scale = self.logit_scale()
        out = DualEncoderOutput(image_features=image_features, text_features=text_features, logit_scale=scale,
                                logit_bias=self.logit_bias)
        fused_ids, fused_masks, fused_tokens = [], [], []
        if itm:
            pool, pool_masks, pool_tokens = None, attention_mask, tokens
            if itm_gather is not None:
                pool, pool_masks = self._global_pool(itm_gather, image_features, text_features, input_ids,
                                                     attention_mask, itm_groups)
                pool_tokens = itm_gather(tokens)
            negatives = hard_negatives(image_features, text_features, input_ids, scale.detach(), groups=itm_groups,
                                       pool=pool)
            pool_ids = input_ids if pool is None else pool.input_ids
            fused_ids += [input_ids, pool_ids[negatives.text_index], input_ids]
            fused_masks += [attention_mask, pool_masks[negatives.text_index], attention_mask]
            fused_tokens += [tokens, tokens, select_rows(pool_tokens, negatives.image_index)]
            out.itm_weights = torch.cat([torch.ones_like(negatives.text_valid), negatives.text_valid,
                                         negatives.image_valid])
        if mlm_input_ids is not None:
            self._require_mlm_head()
            if mlm_positions is None:
                mlm_positions, mlm_targets = (tensor.to(input_ids.device) for tensor in masked_positions(mlm_labels))
            fused_ids.append(mlm_input_ids)
            fused_masks.append(attention_mask)
            fused_tokens.append(tokens)
        if not fused_ids:
            return out
        hidden = self._text_hidden(torch.cat(fused_ids), torch.cat(fused_masks), torch.cat(fused_tokens))
        batch = input_ids.shape[0]
        if itm:
            out.itm_logits = self.towers.itm_head(hidden[:3 * batch, 0])
        if mlm_input_ids is not None:
            masked = hidden[len(hidden) - batch:]
            out.mlm_logits = self.mlm_head(masked.reshape(-1, masked.shape[-1]).index_select(0, mlm_positions))
            out.mlm_targets = mlm_targets
        return out

    @staticmethod
    def _global_pool(gather: Callable[[torch.Tensor], torch.Tensor], image_features: torch.Tensor,
                     text_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     groups: torch.Tensor | None) -> tuple[NegativePool, torch.Tensor]:
        """Every rank's pairs as a NegativePool, and their attention masks: two gathers (the features, then the
        captions, masks and labels as one integer tensor), neither with gradient."""
        width, length = image_features.shape[1], input_ids.shape[1]
        features = gather(torch.cat([image_features, text_features], dim=1).detach())
        columns = [input_ids, attention_mask.to(input_ids.dtype)]
        if groups is not None:
            columns.append(groups.to(input_ids.dtype)[:, None])
        integers = gather(torch.cat(columns, dim=1))
        pool = NegativePool(image_features=features[:, :width], text_features=features[:, width:],
                            input_ids=integers[:, :length],
                            groups=integers[:, 2 * length] if groups is not None else None)
        return pool, integers[:, length:2 * length].to(attention_mask.dtype)
