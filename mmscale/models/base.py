"""What every mmscale model kind shares: image input (uint8 in, normalized here in fp32), FLIP patch dropout, the
bounded temperature, an optional classification head, and the output the losses read.

A kind (dual_encoder.DualEncoder, fusion.FusionEncoder) holds its Hugging Face model as `towers` and says where
its image tower, projections and temperature are; this base class does the rest the same way for all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

# OpenAI CLIP's normalization, used by new models (released checkpoints bring their own).
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


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
    itm_logits: torch.Tensor | None = None
    """Image-text matching logits [3B, 2] (fusion models): B positives, then B images with a hard-negative
    caption, then B captions with a hard-negative image; None without fusion."""
    itm_weights: torch.Tensor | None = None
    """[3B] 1 for every ITM row that counts (0 for a negative row whose batch had no candidate)."""


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


class ImageTextModel(nn.Module):
    """The shared part of every model kind. A subclass sets `self.towers` (a Hugging Face model with a
    `vision_model` whose `embeddings` output [B, 1 + patches, D]) and implements `logit_scale_parameter`,
    `embedding_dim`, `_input_dtype`, `encode_images` and `encode_texts`."""

    tower_names: tuple[str, str] = ("vision_model", "text_model")
    """The attribute names of the image and text towers inside `towers`."""
    head_names: tuple[str, ...] = ("visual_projection", "text_projection")
    class_tokens: int = 1
    """Tokens the image tower's embeddings put before the patches (a class token; SigLIP has none)."""
    bias_in_towers: bool = False
    """Whether `logit_bias` is a parameter of the towers themselves (SiglipModel's), saved with them."""
    cpu_only: bool = False
    """True for towers whose layers run on the CPU alone (an `--quantize int8-cpu` export): callers keep it there."""
    """The small full-rank layers of `towers` on top of the towers (LoRA trains them whole; int8 keeps them float)."""

    def __init__(self, *, max_logit_scale: float, image_mean, image_std):
        super().__init__()
        self.max_logit_scale = max_logit_scale
        self.classifier: nn.Linear | None = None
        self.patch_dropout = 0.0
        self._patch_dropout_hook = None
        self._normalization = {"image_mean": tuple(map(float, image_mean)), "image_std": tuple(map(float, image_std))}
        self.pruned_heads: dict[str, dict[int, list[int]]] = {}
        """Attention heads `mmscale prune` removed, {"vision"|"text": {layer: [heads]}} (mmscale.models.pruning)."""
        self.pruned_head_hooks: list = []
        for name, values in self._normalization.items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _follow_placed_towers(self, *modules: nn.Module | None) -> None:
        """Towers that placed themselves (bitsandbytes int8 on the current CUDA device) take `modules` and the
        normalization along; then the normalization is made fp32 (keep_normalization_fp32)."""
        placed = next((p.device for p in self.towers.parameters() if p.device.type not in ("cpu", "meta")), None)
        if placed is not None:
            for module in modules:
                if isinstance(module, nn.Parameter):
                    module.data = module.data.to(placed)
                elif module is not None:
                    module.to(placed)
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
        return self.towers.config.model_type

    @property
    def logit_scale_parameter(self) -> nn.Parameter:
        """The learned log temperature (log of 1/temperature), wherever the kind keeps it."""
        raise NotImplementedError

    @property
    def embedding_dim(self) -> int:
        """Width of the shared image-text embedding."""
        raise NotImplementedError

    def _input_dtype(self) -> torch.dtype:
        """The dtype the image tower's input is cast to (that of the float layers after it)."""
        raise NotImplementedError

    fixed_caption_length: int | None = None
    """The one caption length the model reads (SigLIP: its text positions, every caption padded to them); None:
    captions of any length up to the tower's, padded to the batch's longest."""

    def caption_settings(self, context_length: int) -> dict:
        """CaptionEncoder / DataConfig settings (context_length, pad_to_longest) for captions this model reads:
        `context_length` padded to the batch's longest, or the model's fixed length."""
        fixed = self.fixed_caption_length
        return {"context_length": fixed or context_length, "pad_to_longest": fixed is None}

    def save(self, folder, *, tokenizer=None):
        """Write a consolidated checkpoint that plain `transformers` loads (mmscale.models.checkpoint)."""
        from mmscale.models.checkpoint import save_model

        return save_model(self, folder, tokenizer=tokenizer)

    def set_pruned_heads(self, pruned: dict) -> None:
        """Keep these attention heads at zero from now on (mmscale.models.pruning); {} for none."""
        from mmscale.models import pruning

        self.pruned_heads = pruning.pruned_heads_of(pruning.tower_layers(self), pruned) if pruned else {}
        pruning.keep_heads_removed(self)

    def set_patch_dropout(self, fraction: float) -> None:
        """FLIP's patch dropout (arXiv:2212.00794): in training, each image keeps a random (1 - fraction)
        of its patch tokens, after the position embeddings, and always its class token (where it has one). A
        forward hook on the image tower's embeddings does it, so the towers stay plain `transformers` modules
        and the saved folder is unchanged; in eval (`model.eval()`) every patch is used."""
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
        patches = tokens[:, self.class_tokens:]
        keep = self.kept_patches(patches.shape[1])
        # A random permutation per image (argsort of uniform noise), its first `keep` positions: no host sync.
        chosen = torch.rand(patches.shape[:2], device=tokens.device).argsort(dim=1)[:, :keep]
        kept = patches.gather(1, chosen.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([tokens[:, :self.class_tokens], kept], dim=1)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] images as the normalized float input of the image tower; float input is
        taken as already normalized (Hugging Face processor output)."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} px but the image tower takes "
                             f"{self.image_size}x{self.image_size}; set data.image_size={self.image_size}")
        if images.dtype == torch.uint8:
            images = (images.float() / 255.0 - self.image_mean) / self.image_std
        return images.to(self._input_dtype())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings [B, D], not normalized."""
        raise NotImplementedError

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings [B, D], not normalized."""
        raise NotImplementedError

    def add_classifier(self, classes: int) -> nn.Linear:
        """A new linear head over normalized image embeddings (for `loss.objective=classify`)."""
        self.classifier = nn.Linear(self.embedding_dim, classes, device=self.image_mean.device)
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
        clamp the gradient there is zero and a temperature that crossed the bound could never come back.
        A scalar, also where the parameter is SigLIP's [1]: the losses (and GradCache's surrogate) stay 0-dim."""
        return clamp_returnable(self.logit_scale_parameter, math.log(self.max_logit_scale)).exp().reshape(())

    def _require_mlm_head(self) -> None:
        if self.mlm_head is None:
            raise ValueError("this model has no MLM head; set loss.mlm_weight=0 (or build it with model.mlm_head=true)")

    @staticmethod
    def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The [B, L] padding mask as the additive [B, 1, 1, L] mask eager and SDPA attention take, which
        transformers uses as given. Handed the [B, L] mask, transformers first asks whether it has any
        padding at all (`mask.all()`), a blocking device-to-host read in every training step."""
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
