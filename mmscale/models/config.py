"""The `model` config section and the named presets it starts from.

A preset fixes every size; any size field set in the config overrides the preset's value,
so `model.preset=base model.text_layers=6` is ViT-B/16 with a 6-layer text tower.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSizes:
    """Every size of a dual encoder: what a preset fixes and the FLOP count reads."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_width: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_width: int
    text_max_positions: int
    vocab_size: int
    projection_dim: int


# ViT widths follow the CLIP/OpenCLIP image towers of the same name (B/16, L/14, H/14, bigG/14);
# text towers follow BERT-base/large and OpenCLIP's text widths for H and bigG.
PRESETS: dict[str, ModelSizes] = {
    "tiny": ModelSizes(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                       vision_mlp_width=512, text_width=128, text_layers=4, text_heads=4, text_mlp_width=512,
                       text_max_positions=128, vocab_size=8192, projection_dim=128),
    "base": ModelSizes(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                       vision_mlp_width=3072, text_width=768, text_layers=12, text_heads=12, text_mlp_width=3072,
                       text_max_positions=512, vocab_size=30522, projection_dim=512),
    "large": ModelSizes(image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                        vision_mlp_width=4096, text_width=1024, text_layers=24, text_heads=16, text_mlp_width=4096,
                        text_max_positions=512, vocab_size=30522, projection_dim=768),
    "huge": ModelSizes(image_size=224, patch_size=14, vision_width=1280, vision_layers=32, vision_heads=16,
                       vision_mlp_width=5120, text_width=1024, text_layers=24, text_heads=16, text_mlp_width=4096,
                       text_max_positions=512, vocab_size=30522, projection_dim=1024),
    "giant": ModelSizes(image_size=224, patch_size=14, vision_width=1664, vision_layers=48, vision_heads=16,
                        vision_mlp_width=8192, text_width=1280, text_layers=32, text_heads=20, text_mlp_width=5120,
                        text_max_positions=512, vocab_size=30522, projection_dim=1280),
}


@dataclass
class ModelConfig:
    """Which dual encoder to build: a preset with optional size overrides, or a checkpoint."""

    preset: str = "tiny"
    """Size preset: tiny (64 px, CPU tests), base (ViT-B/16 + BERT-base), large (ViT-L/14 + BERT-large),
    huge (ViT-H/14 class), giant (ViT-bigG/14 class, 2.5 B parameters)."""
    init_from: str = ""
    """Start from this folder instead of a new model: a Hugging Face CLIPModel, SiglipModel,
    VisionTextDualEncoderModel or BlipForImageTextRetrieval folder, or an mmscale checkpoint (`final/`); or
    `open_clip:MODEL_NAME:FILE`, an open_clip checkpoint converted to a CLIPModel folder under output_dir/open_clip/."""
    vision_from: str = ""
    """Start the image tower from this Hugging Face vision folder (ViT, CLIP or CLIP vision); needs model.text_from."""
    text_from: str = ""
    """Start the text tower from this Hugging Face encoder folder (BERT-style); needs model.vision_from."""
    image_size: int | None = None
    """Image side in pixels (null: the preset's)."""
    patch_size: int | None = None
    """ViT patch side in pixels (null: the preset's)."""
    vision_width: int | None = None
    """Image tower hidden size (null: the preset's)."""
    vision_layers: int | None = None
    """Image tower transformer layers (null: the preset's)."""
    vision_heads: int | None = None
    """Image tower attention heads (null: the preset's)."""
    vision_mlp_width: int | None = None
    """Image tower MLP hidden size (null: the preset's)."""
    text_width: int | None = None
    """Text tower hidden size (null: the preset's)."""
    text_layers: int | None = None
    """Text tower transformer layers (null: the preset's)."""
    text_heads: int | None = None
    """Text tower attention heads (null: the preset's)."""
    text_mlp_width: int | None = None
    """Text tower MLP hidden size (null: the preset's)."""
    text_max_positions: int | None = None
    """Longest text the position table holds, in tokens (null: the preset's); must be >= data.context_length."""
    vocab_size: int | None = None
    """Text vocabulary size (null: the tokenizer's size; the preset's when there is no tokenizer)."""
    projection_dim: int | None = None
    """Size of the shared image-text embedding (null: the preset's)."""
    fusion_layers: int = 0
    """Text layers that cross-attend to the image's patch tokens (BLIP's layout: a fusion model trained with
    image-text matching and image-conditioned MLM, saved as a `BlipForImageTextRetrieval`). 0: a dual encoder.
    BLIP's text encoder cross-attends in every layer, so N must equal the text layers (model.text_layers or the
    preset's). With model.init_from the folder's kind decides (a BLIP ITM folder is a fusion model)."""
    mlm_head: bool = True
    """Give the text tower a masked-LM head tied to its word embeddings (not possible on causal CLIP text towers)."""
    temperature_init: float = 0.07
    """Initial softmax temperature; the learnable logit scale starts at 1/temperature (SigLIP uses 0.1)."""
    max_logit_scale: float = 100.0
    """Upper bound on the logit scale (1/temperature), applied inside forward as CLIP does."""
    dropout: float = 0.0
    """Dropout in both towers (CLIP-style pretraining uses none)."""
    patch_dropout: float = 0.0
    """Fraction of the image tower's patch tokens dropped at random in training (FLIP, arXiv:2212.00794):
    0.5 halves the image tower's work per sample; never applied in eval, and saved models do not carry it."""
    attention: str = "auto"
    """Attention implementation passed to transformers: sdpa, eager or flash_attention_2; auto: sdpa,
    except eager when training in bf16/fp16 on a CPU (see resolve_attention)."""
    quantize_base: str = ""
    """QLoRA: hold the frozen base's transformer-layer linear layers in bitsandbytes int8 (LLM.int8) or nf4 (4-bit
    NormalFloat) while LoRA adapters train over them; needs lora.enabled=true and model.init_from (or
    model.vision_from + model.text_from). Heads, embeddings and norms stay float; final/ merges the adapters into
    the float base. Empty: a float base."""

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        if bool(self.vision_from) != bool(self.text_from):
            raise ValueError("model.vision_from and model.text_from go together: set both or neither")
        if self.init_from and self.vision_from:
            raise ValueError("set model.init_from or model.vision_from + model.text_from, not both")
        if not 0 < self.temperature_init:
            raise ValueError(f"model.temperature_init must be > 0, got {self.temperature_init}")
        if self.max_logit_scale < 1 / self.temperature_init:
            raise ValueError(f"model.max_logit_scale ({self.max_logit_scale}) is below 1/model.temperature_init "
                             f"({1 / self.temperature_init:g})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"model.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.quantize_base not in ("", "int8", "nf4"):
            raise ValueError(f"model.quantize_base {self.quantize_base!r} is unknown; choose int8 or nf4, or leave it "
                             "empty for a float base")
        if self.quantize_base and not (self.init_from or self.vision_from):
            raise ValueError(f"model.quantize_base={self.quantize_base} quantizes a pretrained base that stays "
                             "frozen, and a new model has none: set model.init_from (mmscale finetune --checkpoint) "
                             "or leave model.quantize_base empty")
        if self.fusion_layers:
            if self.vision_from:
                raise ValueError("model.fusion_layers builds a BLIP model, which model.vision_from + model.text_from "
                                 "cannot start; start from a BLIP ITM folder (model.init_from) or a new model")
            if self.attention not in ("auto", "eager"):
                raise ValueError(f"model.attention={self.attention}: BLIP's attention (model.fusion_layers > 0) is "
                                 "eager only; set model.attention=auto or eager")
            layers = self.text_layers or PRESETS[self.preset].text_layers
            if self.fusion_layers != layers and not self.init_from:
                raise ValueError(f"model.fusion_layers={self.fusion_layers} but the text tower has {layers} layers: "
                                 "BLIP's text encoder cross-attends in every layer, so set both to the same number "
                                 f"(model.fusion_layers={layers}, or model.text_layers={self.fusion_layers})")

    def sizes(self, *, vocab_size: int | None = None) -> ModelSizes:
        """The preset's sizes with this config's overrides; `vocab_size` (the tokenizer's) fills an unset
        model.vocab_size."""
        overrides = {field.name: getattr(self, field.name) for field in dataclasses.fields(ModelSizes)
                     if getattr(self, field.name) is not None}
        if "vocab_size" not in overrides and vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        sizes = dataclasses.replace(PRESETS[self.preset], **overrides)
        for tower in ("vision", "text"):
            width, heads = getattr(sizes, f"{tower}_width"), getattr(sizes, f"{tower}_heads")
            if width % heads:
                raise ValueError(f"model.{tower}_width ({width}) must be a multiple of model.{tower}_heads ({heads})")
        if sizes.image_size % sizes.patch_size:
            raise ValueError(f"model.image_size ({sizes.image_size}) must be a multiple of model.patch_size "
                             f"({sizes.patch_size})")
        return sizes


def resolve_attention(requested: str, *, precision: str = "fp32", cuda: bool = False, fusion: bool = False) -> str:
    """The attention implementation for `model.attention=requested` (itself unless `auto`): sdpa, except
    eager in bf16/fp16 on a CPU. PyTorch's CPU flash-attention kernel is slow in 16-bit at the short
    sequences of image-text towers: on one core of an AMX Xeon, forward + backward of 32 x 4 heads x 65
    tokens x 32 took 20.3 ms in bf16 against 6.7 ms for eager attention (4.7 ms against 5.4 ms in fp32),
    and tiny's whole training step 147 ms against 91 ms (docs/benchmarks.md)."""
    if requested != "auto":
        return requested
    if fusion:  # BLIP's attention is eager only (models/fusion.py)
        return "eager"
    return "eager" if not cuda and precision in ("bf16", "fp16") else "sdpa"
