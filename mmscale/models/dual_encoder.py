"""The dual encoder: `transformers` towers and projections, plus mmscale's MLM head and SigLIP bias.

The towers are a Hugging Face `VisionTextDualEncoderModel` (image tower + BERT-style text
tower + projections + `logit_scale`) or a `CLIPModel`, kept as they are so a consolidated
checkpoint is a folder `transformers.AutoModel` loads. mmscale adds what transformers has no
place for: the masked-LM head on the text tower and, for the SigLIP loss, a logit bias.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import (
    BertConfig,
    CLIPVisionConfig,
    PreTrainedModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)

from mmscale.data.text import IGNORE_INDEX, masked_positions
from mmscale.models.base import (  # noqa: F401  # re-exported: their import path before models/base.py
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    DualEncoderOutput,
    ImageTextModel,
    clamp_returnable,
    classifier_input,
)
from mmscale.models.config import ModelConfig, ModelSizes
from mmscale.models.heads import MaskedLMHead
from mmscale.models.init import init_towers


# Text towers without a masked-LM head, and why.
NO_MLM_HEAD = {"clip_text_model": "a CLIP text tower is causal",
               "siglip_text_model": "a SigLIP text tower is read at its last position only (no MLM head is released)"}


class DualEncoder(ImageTextModel):
    """Image tower + text tower + projections + temperature (the Hugging Face `towers`), an optional
    MLM head and an optional SigLIP logit bias. Images go in as uint8 and are normalized here, on
    the device they train on."""

    def __init__(self, towers: PreTrainedModel, *, mlm_head: bool, logit_bias_init: float | None = None,
                 max_logit_scale: float = 100.0, image_mean=CLIP_IMAGE_MEAN, image_std=CLIP_IMAGE_STD):
        super().__init__(max_logit_scale=max_logit_scale, image_mean=image_mean, image_std=image_std)
        self.towers = towers
        text_type = towers.config.text_config.model_type
        if mlm_head and text_type in NO_MLM_HEAD:
            raise ValueError(f"{NO_MLM_HEAD[text_type]} and cannot take a masked-LM head; set model.mlm_head=false "
                             "and loss.mlm_weight=0")
        self.mlm_head = MaskedLMHead.for_text_tower(towers.text_model) if mlm_head else None
        self.logit_bias_init = logit_bias_init
        self._add_logit_bias(logit_bias_init)
        self._follow_placed_towers(self.mlm_head, self.logit_bias)

    def _add_logit_bias(self, init: float | None) -> None:
        """SigLIP's bias as mmscale's own parameter (None without one); towers that keep one have it already."""
        self.logit_bias = None if init is None else nn.Parameter(torch.tensor(float(init)))

    @property
    def logit_scale_parameter(self) -> nn.Parameter:
        return self.towers.logit_scale

    @property
    def embedding_dim(self) -> int:
        return self.towers.config.projection_dim

    def _input_dtype(self) -> torch.dtype:
        return self.towers.visual_projection.weight.dtype

    def zero3_external_parameters(self) -> list[nn.Parameter]:
        """Parameters this module's forward reads although another module owns them: ZeRO-3 gathers
        a parameter only around its owner's forward, and `logit_scale` belongs to the towers, whose own
        forward is never called (PITFALLS.md 3). Register these with
        `deepspeed.zero.register_external_parameter(model, p)`."""
        return [self.towers.logit_scale]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings, not normalized: `get_image_features` of the saved model."""
        return self.towers.get_image_features(pixel_values=self.pixel_values(images)).pooler_output

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings, not normalized: `get_text_features` of the saved model. A BERT-style tower
        gets the additive 4-D mask (_text_attention_mask: no host sync); CLIP's causal tower builds its own."""
        if hasattr(self.towers.text_model, "embeddings") and hasattr(self.towers.text_model.embeddings,
                                                                     "word_embeddings"):
            attention_mask = self._text_attention_mask(attention_mask)
        return self.towers.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def mlm_logits(self, mlm_input_ids: torch.Tensor, attention_mask: torch.Tensor, mlm_labels: torch.Tensor, *,
                   images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets at the masked positions of [B, L] `mlm_labels` only: the vocabulary
        projection is the largest matmul of the text side, and 85% of positions have nothing to
        predict. (The training forward gets the positions from the loader, without a host sync.)
        `images` are not read: a dual encoder's text tower never sees the image (fusion.FusionEncoder's does)."""
        self._require_mlm_head()
        hidden = self.towers.text_model(input_ids=mlm_input_ids, attention_mask=attention_mask).last_hidden_state
        masked = mlm_labels != IGNORE_INDEX
        return self.mlm_head(hidden[masked]), mlm_labels[masked]

    def _text_attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The [B, L] padding mask as the additive [B, 1, 1, L] mask eager and SDPA attention take, which
        transformers uses as given (ImageTextModel.additive_mask); flash attention unpads with the [B, L] mask."""
        if self.towers.text_model.config._attn_implementation not in ("eager", "sdpa"):
            return attention_mask
        return self.additive_mask(attention_mask, self.towers.text_model.embeddings.word_embeddings.weight.dtype)

    def encode_texts_and_masked(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                mlm_input_ids: torch.Tensor, mlm_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected text embeddings of the clean captions, MLM logits at `mlm_positions` of the masked
        ones) from one text-tower pass over both as a single batch of 2B: under ZeRO-3 the tower's weights
        are gathered once per step instead of twice, and the matmuls are twice as tall. The embeddings are
        what `get_text_features` gives (the saved model's), row for row."""
        features, masked = self._texts_and_masked_hidden(input_ids, attention_mask, mlm_input_ids, mlm_positions)
        return features, self.mlm_head(masked)

    def _texts_and_masked_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                 mlm_input_ids: torch.Tensor, mlm_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_texts_and_masked before the MLM head: the text features and the masked positions' hidden states."""
        self._require_mlm_head()
        batch = input_ids.shape[0]
        both = self.towers.text_model(input_ids=torch.cat([input_ids, mlm_input_ids]),
                                      attention_mask=self._text_attention_mask(torch.cat([attention_mask, attention_mask])))
        features = self.towers.text_projection(both.pooler_output[:batch])
        hidden = both.last_hidden_state[batch:]
        return features, hidden.reshape(-1, hidden.shape[-1]).index_select(0, mlm_positions)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mlm_input_ids: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None, *,
                mlm_positions: torch.Tensor | None = None, mlm_targets: torch.Tensor | None = None) -> DualEncoderOutput:
        """Features of both towers and, with masked captions, MLM logits. The masked positions come as
        flat indices (`mlm_positions`, `mlm_targets`: mmscale.data.text.masked_positions, made by the
        loader) or, slower, as [B, L] `mlm_labels`, from which they are computed here."""
        masked = None
        if mlm_input_ids is None:
            text_features = self.encode_texts(input_ids, attention_mask)
        else:
            if mlm_positions is None:
                mlm_positions, mlm_targets = (tensor.to(input_ids.device) for tensor in masked_positions(mlm_labels))
            text_features, masked = self._texts_and_masked_hidden(input_ids, attention_mask, mlm_input_ids,
                                                                   mlm_positions)
        # Modules run in one order, the MLM head last: a forward without masked captions (GradCache's feature
        # pass) is then a prefix of one with them, and ZeRO-3 keeps its recorded module trace (and prefetching)
        # across both instead of invalidating it at every pass.
        image_features = self.encode_images(images)
        mlm_logits = None if masked is None else self.mlm_head(masked)
        return DualEncoderOutput(
            image_features=image_features,
            text_features=text_features,
            logit_scale=self.logit_scale(),
            logit_bias=self.logit_bias,
            mlm_logits=mlm_logits,
            mlm_targets=mlm_targets,
        )


class SiglipDualEncoder(DualEncoder):
    """SigLIP's towers (transformers `SiglipModel`, SigLIP 2 checkpoints of that class included) as they are: no
    projection layers (each tower ends in its own head: attention pooling over the patch tokens, a linear layer
    over the last text position), the temperature and the sigmoid loss's bias kept by the towers as [1]
    parameters, no class token. Captions go in without an attention mask, padded to the text tower's length:
    SigLIP was trained that way (its processor returns no mask) and pools the last position, padding or not."""

    head_names = ("vision_model.head", "text_model.head")
    class_tokens = 0
    bias_in_towers = True

    def _add_logit_bias(self, init: float | None) -> None:
        pass  # the towers' own

    @property
    def logit_bias(self) -> nn.Parameter:
        return self.towers.logit_bias

    @property
    def logit_scale_parameter(self) -> nn.Parameter:
        return self.towers.logit_scale

    @property
    def embedding_dim(self) -> int:
        return self.towers.config.text_config.projection_size

    @property
    def fixed_caption_length(self) -> int:
        return self.towers.config.text_config.max_position_embeddings

    def _input_dtype(self) -> torch.dtype:
        return self.towers.vision_model.embeddings.patch_embedding.weight.dtype

    def zero3_external_parameters(self) -> list[nn.Parameter]:
        return [self.towers.logit_scale, self.towers.logit_bias]

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`get_text_features` of the saved model, as SigLIP's processor calls it: without the padding mask."""
        return self.towers.get_text_features(input_ids=input_ids).pooler_output

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                mlm_input_ids: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None, *,
                mlm_positions: torch.Tensor | None = None, mlm_targets: torch.Tensor | None = None) -> DualEncoderOutput:
        if mlm_input_ids is not None:
            self._require_mlm_head()  # there is none: the error says how to train without
        return DualEncoderOutput(image_features=self.encode_images(images),
                                 text_features=self.encode_texts(input_ids, attention_mask),
                                 logit_scale=self.logit_scale(), logit_bias=self.logit_bias.reshape(()))


def dual_encoder(towers: PreTrainedModel, **settings) -> DualEncoder:
    """The dual encoder around `towers`: SiglipDualEncoder for a `SiglipModel`, DualEncoder for the others."""
    return (SiglipDualEncoder if towers.config.model_type == "siglip" else DualEncoder)(towers, **settings)


def towers_config(sizes: ModelSizes, config: ModelConfig) -> VisionTextDualEncoderConfig:
    """The Hugging Face config of new towers: a CLIP-style ViT (pre-norm, class token, post-norm
    pooling) and a BERT encoder."""
    vision = CLIPVisionConfig(
        image_size=sizes.image_size, patch_size=sizes.patch_size, hidden_size=sizes.vision_width,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
        intermediate_size=sizes.vision_mlp_width, hidden_act="gelu", attention_dropout=config.dropout,
        projection_dim=sizes.projection_dim,
    )
    text = BertConfig(
        vocab_size=sizes.vocab_size, hidden_size=sizes.text_width, num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads, intermediate_size=sizes.text_mlp_width,
        max_position_embeddings=sizes.text_max_positions, hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
    )
    return VisionTextDualEncoderConfig.from_vision_text_configs(
        vision, text, projection_dim=sizes.projection_dim, logit_scale_init_value=math.log(1 / config.temperature_init),
    )


def new_towers(sizes: ModelSizes, config: ModelConfig) -> VisionTextDualEncoderModel:
    """Freshly initialized towers, with open_clip's initialization (mmscale.models.init). `_from_config`
    is the constructor that honours an active `HfDeepSpeedConfig` (ZeRO-3 partitioned construction,
    PITFALLS.md 2); partitioned towers are initialized by the trainer once gathered."""
    towers = VisionTextDualEncoderModel._from_config(towers_config(sizes, config), attn_implementation=config.attention)
    if not any(hasattr(parameter, "ds_id") for parameter in towers.parameters()):
        init_towers(towers)
    return towers
