"""LoRA (PEFT) on the towers of a dual encoder or fusion model, with whole-tower locking (LiT) and full-rank heads.

LoRA goes on the Hugging Face towers (`model.towers`, a CLIPModel, VisionTextDualEncoderModel or
BlipForImageTextRetrieval), so the adapter is saved in PEFT's own format and `peft.PeftModel.from_pretrained(
<the base's transformers class>.from_pretrained(base), adapter)` reloads it. The projections (and a fusion model's
ITM head) train fully (PEFT's `modules_to_save`, so they are in the adapter too) and so does the temperature.
A fusion model's cross-attention layers get adapters as its self-attention does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmscale.models.base import ImageTextModel
from mmscale.models.pruning import keep_heads_removed

# Attention projections by tower type: CLIP/ViT-style towers and BERT-style encoders.
DEFAULT_TARGETS = {
    "clip_vision_model": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "clip_text_model": ["q_proj", "k_proj", "v_proj", "out_proj"],
    # transformers 5 names ViT's projections q_proj/k_proj/v_proj/o_proj; 4.x query/key/value/attention.output.dense
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "attention.output.dense"],
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense"],
    # SigLIP: the encoder layers' attention (not `head.attention.out_proj`, the image head's pooling, trained whole)
    "siglip_vision_model": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
    "siglip_text_model": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
    # BLIP (fusion models): the ViT's fused qkv; the text encoder's self- and cross-attention (query/key/value match
    # both; `attention.output.dense` does not match `crossattention.output.dense`, so it is named too).
    "blip_vision_model": ["qkv", "projection"],
    "blip_text_model": ["query", "key", "value", "attention.output.dense", "crossattention.output.dense"],
}


@dataclass
class LoraSettings:
    """Parameter-efficient fine-tuning: which weights train and how."""

    enabled: bool = False
    """Fine-tune with LoRA adapters instead of training every weight."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input; it stores a copy of every adapted layer's input (measured: +1 GiB peak on
    base at batch 16), so it is off unless asked."""
    vision_targets: list[str] = field(default_factory=list)
    """Module name suffixes in the image tower that get adapters (empty: the attention projections of
    the tower's type, e.g. q_proj/k_proj/v_proj/out_proj for CLIP, query/key/value/attention.output.dense for ViT)."""
    text_targets: list[str] = field(default_factory=list)
    """Module name suffixes in the text tower that get adapters (empty: the attention projections of its type)."""
    lock_vision: bool = False
    """Freeze the whole image tower, no adapters (LiT: locked-image tuning)."""
    lock_text: bool = False
    """Freeze the whole text tower, no adapters."""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.lock_vision and self.lock_text:
            raise ValueError("lora.lock_vision and lora.lock_text together leave only the projections to train; "
                             "unlock one tower")


def _targets(model: ImageTextModel, settings: LoraSettings) -> str:
    """A regex over module names: the chosen suffixes inside each unlocked tower."""
    patterns = []
    vision, text = model.tower_names
    for tower, locked, chosen in ((vision, settings.lock_vision, settings.vision_targets),
                                  (text, settings.lock_text, settings.text_targets)):
        if locked:
            continue
        model_type = getattr(model.towers, tower).config.model_type
        suffixes = chosen or DEFAULT_TARGETS.get(model_type)
        side = "vision" if tower == vision else "text"
        if not suffixes:
            raise ValueError(f"no default LoRA targets for a {model_type!r} {side} tower; set "
                             f"lora.{side}_targets to module name suffixes")
        alternatives = "|".join(suffix.replace(".", r"\.") for suffix in suffixes)
        patterns.append(rf"{tower}\..*\.({alternatives})")
    return rf"^({'|'.join(patterns)})$"


def apply_lora(model: ImageTextModel, settings: LoraSettings) -> tuple[int, int]:
    """Wrap `model.towers` in a PEFT LoRA model; returns (trainable, total) parameter counts."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=_targets(model, settings),
                        modules_to_save=list(model.head_names))
    model.towers = get_peft_model(model.towers, config)
    _check_every_tower_adapted(model, settings)
    keep_heads_removed(model)  # on the adapted value projections, so the adapters cannot grow removed heads back
    model.logit_scale_parameter.requires_grad_(True)
    if model.mlm_head is not None:  # the head is tied to the (frozen) embeddings; its own layers train
        for name, parameter in model.mlm_head.named_parameters():
            parameter.requires_grad_(name != "decoder.weight")
    if model.logit_bias is not None:
        model.logit_bias.requires_grad_(True)
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def _check_every_tower_adapted(model: ImageTextModel, settings: LoraSettings) -> None:
    """A target list that matches no module of a tower would leave it frozen without a word: refuse it."""
    vision, text = model.tower_names
    for tower, locked in ((vision, settings.lock_vision), (text, settings.lock_text)):
        module = getattr(model.towers.base_model.model, tower)
        if locked or any("lora_A" in name for name, _ in module.named_modules()):
            continue
        linear = sorted({name.rsplit(".", 1)[-1] for name, child in module.named_modules()
                         if isinstance(child, torch.nn.Linear)})
        side = "vision" if tower == vision else "text"
        raise ValueError(f"LoRA targets matched no module of the {side} tower ({module.config.model_type}); set "
                         f"lora.{side}_targets to some of its linear layers' names: {', '.join(linear)}")


def is_adapted(model: ImageTextModel) -> bool:
    from peft import PeftModel

    return isinstance(model.towers, PeftModel)


VQA_HEAD_FILE = "mmscale_vqa_head.safetensors"
TEMPERATURE_FILE = "mmscale_temperature.safetensors"


def save_adapter(model: ImageTextModel, folder: Path, *, base: str) -> None:
    """The adapter in PEFT's format, naming `base` (the checkpoint it was trained on). What trains outside the
    adapters goes beside it: the temperature (TEMPERATURE_FILE: `logit_scale`, the log of 1 / temperature as CLIP
    keeps it, and a SigLIP `logit_bias` where the model has one), which PEFT does not save, and a VQA answer
    head, which lives beside the towers and trains whole (VQA_HEAD_FILE, its answer list in the metadata)."""
    from safetensors.torch import save_file

    model.towers.peft_config["default"].base_model_name_or_path = base
    model.towers.save_pretrained(folder, safe_serialization=True)  # the only adapter format export reads
    temperature = {"logit_scale": model.logit_scale_parameter.detach().float().reshape(()).clone()}
    if model.logit_bias is not None:
        temperature["logit_bias"] = model.logit_bias.detach().float().reshape(()).clone()
    save_file(temperature, Path(folder) / TEMPERATURE_FILE)
    head = getattr(model, "vqa_head", None)
    if head is not None:
        save_file({name: tensor.detach().float().contiguous() for name, tensor in head.state_dict().items()},
                  Path(folder) / VQA_HEAD_FILE, metadata={"answers": json.dumps(model.vqa_answers)})


def load_adapter_heads(model: ImageTextModel, folder: Path) -> None:
    """What save_adapter wrote beside an adapter (its temperature, a VQA answer head), onto `model` (the merged
    base)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    temperature = Path(folder) / TEMPERATURE_FILE
    if temperature.is_file():
        values = load_file(temperature)
        with torch.no_grad():
            model.logit_scale_parameter.copy_(values["logit_scale"].reshape(model.logit_scale_parameter.shape))
            if "logit_bias" in values:
                if model.logit_bias is None:
                    model.logit_bias = torch.nn.Parameter(values["logit_bias"].clone())
                else:
                    model.logit_bias.copy_(values["logit_bias"])
    path = Path(folder) / VQA_HEAD_FILE
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as handle:
        answers = json.loads((handle.metadata() or {}).get("answers", "[]"))
    if not answers or not hasattr(model, "add_vqa_head"):
        raise ValueError(f"{path}: a VQA head without its answer list, or beside a base that is not a fusion model")
    model.add_vqa_head(answers)
    model.vqa_head.load_state_dict(load_file(path))


def merge_adapter(model: ImageTextModel) -> ImageTextModel:
    """Fold the LoRA updates into the tower weights, leaving plain Hugging Face towers."""
    model.towers = model.towers.merge_and_unload()
    keep_heads_removed(model)
    return model
