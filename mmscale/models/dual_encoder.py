"""The dual encoder: `transformers` towers and projections, plus mmscale's MLM head and SigLIP bias.

The towers are a Hugging Face `VisionTextDualEncoderModel` (image tower + BERT-style text
tower + projections + `logit_scale`) or a `CLIPModel`, kept as they are so a consolidated
checkpoint is a folder `transformers.AutoModel` loads. mmscale adds what transformers has no
place for: the masked-LM head on the text tower and, for the SigLIP loss, a logit bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    BertConfig,
    CLIPVisionConfig,
    PreTrainedModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from mmscale.data.text import IGNORE_INDEX, masked_positions
from mmscale.models.config import ModelConfig, ModelSizes
from mmscale.models.init import init_towers

# OpenAI CLIP's normalization, used by new models (released checkpoints bring their own).
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class MaskedLMHead(nn.Module):
    """BERT's MLM head (dense, activation, LayerNorm, decoder) with the decoder weight tied to the
    text tower's word embeddings. The tied weight is registered on `decoder`, so under ZeRO-3 it is
    gathered when the decoder runs, like any parameter of the module that uses it."""

    def __init__(self, *, width: int, vocab_size: int, activation: str, layer_norm_eps: float,
                 word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.activation = ACT2FN[activation]
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.decoder = nn.Linear(width, vocab_size)
        self.decoder.weight = word_embeddings.weight
        self.reset_parameters()

    def reset_parameters(self):
        """BERT's initialization of the head's own weights (the tied decoder weight is the embedding's)."""
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)
        self.norm.reset_parameters()
        nn.init.zeros_(self.decoder.bias)

    @classmethod
    def for_text_tower(cls, text_model: PreTrainedModel) -> MaskedLMHead:
        """A new head that fits `text_model` (any BERT-style encoder config)."""
        config = text_model.config
        return cls(width=config.hidden_size, vocab_size=config.vocab_size,
                   activation=getattr(config, "hidden_act", "gelu"),
                   layer_norm_eps=getattr(config, "layer_norm_eps", 1e-12),
                   word_embeddings=text_model.get_input_embeddings())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.activation(self.dense(hidden_states))))


@dataclass
class DualEncoderOutput(ModelOutput):
    """What one forward pass gives the losses. A `ModelOutput` (a dict) so that ZeRO-3 finds the
    tensors in it and hooks their backward."""

    image_features: torch.Tensor | None = None
    """Projected image embeddings [B, D], not normalized (what `get_image_features` returns)."""
    text_features: torch.Tensor | None = None
    """Projected text embeddings [B, D], not normalized."""
    logit_scale: torch.Tensor | None = None
    """exp(learned log scale), clamped to the configured maximum: 1/temperature."""
    logit_bias: torch.Tensor | None = None
    """SigLIP's learnable bias; None for models without one."""
    mlm_logits: torch.Tensor | None = None
    """Vocabulary logits at the masked positions only [M, V]; None without MLM inputs."""
    mlm_targets: torch.Tensor | None = None
    """The original token ids at those positions [M]."""


class _ClampReturnable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, bound: float) -> torch.Tensor:
        ctx.save_for_backward(value)
        ctx.bound = bound
        return value.clamp(max=bound)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (value,) = ctx.saved_tensors
        # Above the bound, pass only the gradient that lowers the value (gradient descent goes against
        # grad: grad > 0 lowers it); the one that would raise it further is zeroed, as a clamp's is.
        return torch.where((value <= ctx.bound) | (grad > 0), grad, torch.zeros_like(grad)), None


def clamp_returnable(value: torch.Tensor, bound: float) -> torch.Tensor:
    """`value.clamp(max=bound)` whose gradient above the bound still pulls the value back down (no host sync)."""
    return _ClampReturnable.apply(value, bound)


def classifier_input(image_features: torch.Tensor) -> torch.Tensor:
    """What the classification head reads: normalized image embeddings times sqrt(dim)."""
    return torch.nn.functional.normalize(image_features, dim=-1) * image_features.shape[-1] ** 0.5


class DualEncoder(nn.Module):
    """Image tower + text tower + projections + temperature (the Hugging Face `towers`), an optional
    MLM head and an optional SigLIP logit bias. Images go in as uint8 and are normalized here, on
    the device they train on."""

    def __init__(self, towers: PreTrainedModel, *, mlm_head: bool, logit_bias_init: float | None = None,
                 max_logit_scale: float = 100.0, image_mean=CLIP_IMAGE_MEAN, image_std=CLIP_IMAGE_STD):
        super().__init__()
        self.towers = towers
        if mlm_head and towers.config.text_config.model_type == "clip_text_model":
            raise ValueError("a CLIP text tower is causal and cannot take a masked-LM head; set model.mlm_head=false "
                             "and loss.mlm_weight=0")
        self.mlm_head = MaskedLMHead.for_text_tower(towers.text_model) if mlm_head else None
        self.logit_bias_init = logit_bias_init
        self.logit_bias = None if logit_bias_init is None else nn.Parameter(torch.tensor(float(logit_bias_init)))
        self.max_logit_scale = max_logit_scale
        self.classifier: nn.Linear | None = None
        self.patch_dropout = 0.0
        self._patch_dropout_hook = None
        self._normalization = {"image_mean": tuple(map(float, image_mean)), "image_std": tuple(map(float, image_std))}
        for name, values in self._normalization.items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # Towers that placed themselves (bitsandbytes int8 on the current CUDA device) take the rest along.
        placed = next((p.device for p in towers.parameters() if p.device.type not in ("cpu", "meta")), None)
        if placed is not None:
            if self.mlm_head is not None:
                self.mlm_head.to(placed)
            if self.logit_bias is not None:
                self.logit_bias.data = self.logit_bias.data.to(placed)
            self.image_mean, self.image_std = self.image_mean.to(placed), self.image_std.to(placed)
        self.keep_normalization_fp32()

    @property
    def device(self) -> torch.device:
        """Where the towers' weights are, and so where inputs go."""
        return next(self.towers.parameters()).device

    def keep_normalization_fp32(self) -> None:
        """`image_mean`/`image_std` as the exact fp32 values the model was built with, on their device. Built
        under ZeRO-3's `zero.Init` every floating tensor is created in the training dtype, and `module.bfloat16()`
        casts buffers: bf16 would normalize with 0.48046875 for 0.48145466, in training and in the saved image
        processor. Called by `_apply` (every cast and move) and after ZeRO-3 construction."""
        for name, values in self._normalization.items():
            device = getattr(self, name).device
            setattr(self, name, torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if hasattr(self, "_normalization"):
            self.keep_normalization_fp32()
        return self

    @property
    def image_size(self) -> int:
        return self.towers.config.vision_config.image_size

    @property
    def kind(self) -> str:
        """The Hugging Face model type of the towers: `vision-text-dual-encoder` or `clip`."""
        return self.towers.config.model_type

    def save(self, folder, *, tokenizer=None):
        """Write a consolidated checkpoint that `transformers.AutoModel` loads (mmscale.models.checkpoint)."""
        from mmscale.models.checkpoint import save_model

        return save_model(self, folder, tokenizer=tokenizer)

    def zero3_external_parameters(self) -> list[nn.Parameter]:
        """Parameters this module's forward reads although another module owns them: ZeRO-3 gathers
        a parameter only around its owner's forward, and `logit_scale` belongs to the towers, whose own
        forward is never called (PITFALLS.md 3). Register these with
        `deepspeed.zero.register_external_parameter(model, p)`."""
        return [self.towers.logit_scale]

    def set_patch_dropout(self, fraction: float) -> None:
        """FLIP's patch dropout (arXiv:2212.00794): in training, each image keeps a random (1 - fraction)
        of its patch tokens, after the position embeddings, and always its class token. A forward hook on
        the image tower's embeddings does it, so the towers stay plain `transformers` modules and the
        saved folder is unchanged; in eval (`model.eval()`) every patch is used."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"patch dropout must be in [0, 1), got {fraction}")
        if self._patch_dropout_hook is not None:
            self._patch_dropout_hook.remove()
            self._patch_dropout_hook = None
        self.patch_dropout = fraction
        if fraction > 0:
            embeddings = getattr(self.towers.vision_model, "embeddings", None)
            if embeddings is None:
                raise ValueError(f"patch dropout needs an image tower with an `embeddings` module; "
                                 f"{type(self.towers.vision_model).__name__} has none")
            self._patch_dropout_hook = embeddings.register_forward_hook(self._drop_patches)

    def kept_patches(self, patches: int) -> int:
        """How many of `patches` patch tokens a training image keeps under patch dropout."""
        return max(1, int(patches * (1.0 - self.patch_dropout)))

    def _drop_patches(self, module: nn.Module, inputs, tokens: torch.Tensor) -> torch.Tensor:
        if not self.training or self.patch_dropout <= 0:
            return tokens
        patches = tokens[:, 1:]
        keep = self.kept_patches(patches.shape[1])
        # A random permutation per image (argsort of uniform noise), its first `keep` positions: no host sync.
        chosen = torch.rand(patches.shape[:2], device=tokens.device).argsort(dim=1)[:, :keep]
        kept = patches.gather(1, chosen.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([tokens[:, :1], kept], dim=1)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] images as the normalized float input of the image tower; float input is
        taken as already normalized (Hugging Face processor output)."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} px but the image tower takes "
                             f"{self.image_size}x{self.image_size}; set data.image_size={self.image_size}")
        dtype = self.towers.visual_projection.weight.dtype
        if images.dtype == torch.uint8:
            images = (images.float() / 255.0 - self.image_mean) / self.image_std
        return images.to(dtype)

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

    def add_classifier(self, classes: int) -> nn.Linear:
        """A new linear head over normalized image embeddings (for `loss.objective=classify`)."""
        self.classifier = nn.Linear(self.towers.config.projection_dim, classes, device=self.image_mean.device)
        return self.classifier

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits from the linear head over normalized image embeddings, scaled to unit variance per
        coordinate (the input scale nn.Linear's initialization assumes)."""
        if self.classifier is None:
            raise ValueError("this model has no classification head; fine-tune with loss.objective=classify first")
        return self.classifier(classifier_input(self.encode_images(images)).to(self.classifier.weight.dtype))

    def logit_scale(self) -> torch.Tensor:
        """1/temperature, at most max_logit_scale. Bounded here rather than by editing the parameter in
        place after each step, because the optimizer's fp32 master copy (ZeRO) would overwrite such an edit,
        and by `clamp_returnable`, whose gradient still lowers a parameter above the bound: with a plain
        clamp the gradient there is zero and a temperature that crossed the bound could never come back."""
        return clamp_returnable(self.towers.logit_scale, math.log(self.max_logit_scale)).exp()

    def mlm_logits(self, mlm_input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   mlm_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets at the masked positions of [B, L] `mlm_labels` only: the vocabulary
        projection is the largest matmul of the text side, and 85% of positions have nothing to
        predict. (The training forward gets the positions from the loader, without a host sync.)"""
        self._require_mlm_head()
        hidden = self.towers.text_model(input_ids=mlm_input_ids, attention_mask=attention_mask).last_hidden_state
        masked = mlm_labels != IGNORE_INDEX
        return self.mlm_head(hidden[masked]), mlm_labels[masked]

    def _require_mlm_head(self) -> None:
        if self.mlm_head is None:
            raise ValueError("this model has no MLM head; set loss.mlm_weight=0 (or build it with model.mlm_head=true)")

    def _text_attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The [B, L] padding mask as the additive [B, 1, 1, L] mask eager and SDPA attention take, which
        transformers uses as given. Handed the [B, L] mask, transformers first asks whether it has any
        padding at all (`mask.all()`), a blocking device-to-host read in every training step."""
        if self.towers.text_model.config._attn_implementation not in ("eager", "sdpa"):
            return attention_mask  # flash attention unpads with the [B, L] mask itself
        dtype = self.towers.text_model.embeddings.word_embeddings.weight.dtype
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

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
