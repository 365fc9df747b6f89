"""Building dual encoders from a preset or a folder, and the consolidated checkpoint format.

A checkpoint folder is a Hugging Face model folder first: `config.json` + `model.safetensors`
(a `VisionTextDualEncoderModel` or `CLIPModel`), the tokenizer and the image processor, so
`transformers.AutoModel.from_pretrained(folder)` gives the same embeddings as mmscale. Beside
them `mmscale.json` says what mmscale adds and `mmscale_heads.safetensors` holds it (the MLM
head without its tied decoder weight, the SigLIP bias). Weights are read from safetensors only
and no folder's code is ever run (`trust_remote_code=False`), so untrusted folders are safe.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionModel,
    PreTrainedModel,
    SiglipImageProcessor,
    SiglipModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)

from mmscale.atomic import temporary_folder
from mmscale.models.base import ImageTextModel
from mmscale.models.config import ModelConfig, resolve_attention
from mmscale.models.dual_encoder import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    NO_MLM_HEAD,
    DualEncoder,
    dual_encoder,
    new_towers,
)
from mmscale.models.fusion import ATTENTION as FUSION_ATTENTION
from mmscale.models.fusion import FusionEncoder, new_fusion_towers
from mmscale.models.pruning import zero_pruned_heads

MMSCALE_FILE = "mmscale.json"
HEADS_FILE = "mmscale_heads.safetensors"
CPU_INT8_WEIGHTS = "model_int8_cpu.safetensors"  # mmscale.export.cpu_int8.WEIGHTS_FILE
FORMAT = "mmscale-dual-encoder"
FORMAT_VERSION = 1
EXPECTED = ("a Hugging Face CLIPModel, SiglipModel, VisionTextDualEncoderModel or BlipForImageTextRetrieval folder, or "
            "an mmscale checkpoint (for a separate vision model and text encoder set model.vision_from and "
            "model.text_from)")
_TOWER_CLASSES = {"clip": CLIPModel, "siglip": SiglipModel, "vision-text-dual-encoder": VisionTextDualEncoderModel,
                  "blip": BlipForImageTextRetrieval}
# BLIP folders of other classes hold no ITM head or contrastive projections, or a decoder as their text side.
_BLIP_REFUSED = {
    "BlipForQuestionAnswering": "a BLIP VQA model (its text side answers by generation; no ITM head or contrastive "
                                "projections)",
    "BlipForConditionalGeneration": "a BLIP captioning model (a text decoder, no text encoder, ITM head or projections)",
    "BlipModel": "a BLIP contrastive-only model (no ITM head; its text model is not the cross-attending encoder)",
}
# Every from_pretrained in mmscale takes these: weights from safetensors only (a pickle can run code), no
# folder's own Python (`auto_map`), no hub downloads.
SAFE_LOADING = {"use_safetensors": True, "trust_remote_code": False, "local_files_only": True}


class CheckpointError(ValueError):
    """A model folder that is missing, of the wrong kind or unsafe to read; the message says what was expected."""


def build_model(config: ModelConfig, *, vocab_size: int | None = None, mlm_head: bool | None = None,
                logit_bias_init: float | None = None, token_ids: dict[str, int] | None = None,
                vqa_answers: list[str] | None = None) -> ImageTextModel:
    """The model `config` asks for: new from its preset (a fusion model with model.fusion_layers), or started
    from `model.init_from`, or from `model.vision_from` + `model.text_from`.

    `vocab_size` (the tokenizer's) sizes a new text tower and `token_ids` (its pad/cls/sep ids) go in a new
    fusion model's config; `mlm_head` (default `model.mlm_head`) adds an MLM head where the text tower is
    bidirectional; `logit_bias_init` adds SigLIP's bias (a checkpoint's own bias wins); `vqa_answers` gives a
    fusion model a VQA answer head over that list where it has none or one over another list (a dual encoder
    is refused: VQA needs the text to attend to the image)."""
    want_mlm = config.mlm_head if mlm_head is None else mlm_head
    if config.attention == "auto":
        config = dataclasses.replace(config, attention=resolve_attention(
            "auto", cuda=torch.cuda.is_available(), fusion=bool(config.fusion_layers)))
    if config.init_from:
        model = load_model(config.init_from, mlm_head=want_mlm, logit_bias_init=logit_bias_init,
                           attention=config.attention, logit_scale_init=1 / config.temperature_init)
        if config.fusion_layers and not isinstance(model, FusionEncoder):
            raise CheckpointError(f"model.fusion_layers={config.fusion_layers} but model.init_from {config.init_from} "
                                  f"holds a dual encoder ({model.kind}); a fusion model starts new or from a "
                                  "BlipForImageTextRetrieval folder (set model.fusion_layers=0 to fine-tune it as is)")
    elif config.fusion_layers:
        towers = new_fusion_towers(config.sizes(vocab_size=vocab_size), config, token_ids=token_ids)
        model = FusionEncoder(towers, mlm_head=want_mlm, logit_scale_init=1 / config.temperature_init,
                              logit_bias_init=logit_bias_init, max_logit_scale=config.max_logit_scale)
    else:
        if vqa_answers:
            raise CheckpointError("VQA needs a fusion model (questions attending to the image): set "
                                  "model.fusion_layers > 0 for a new model, or start from a fusion checkpoint")
        if config.vision_from:
            towers = _towers_from_pair(config)
            mean, std = _image_normalization(Path(config.vision_from))
        else:
            towers = new_towers(config.sizes(vocab_size=vocab_size), config)
            mean, std = CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
        model = DualEncoder(towers, mlm_head=want_mlm, logit_bias_init=logit_bias_init,
                            max_logit_scale=config.max_logit_scale, image_mean=mean, image_std=std)
    if vqa_answers:
        if not isinstance(model, FusionEncoder):
            raise CheckpointError(f"VQA needs a fusion model (questions attending to the image), but model.init_from "
                                  f"{config.init_from} holds a dual encoder ({model.kind}) without model.fusion_layers; "
                                  "pretrain one with model.fusion_layers > 0 (configs/pretrain/tiny_fusion.yaml) or start "
                                  "from a BlipForImageTextRetrieval folder")
        if model.vqa_answers != list(vqa_answers):
            model.add_vqa_head(vqa_answers)
    model.set_patch_dropout(config.patch_dropout)
    return model


def load_model(folder: str | os.PathLike, *, mlm_head: bool = True, logit_bias_init: float | None = None,
               attention: str = "sdpa", logit_scale_init: float = 1 / 0.07) -> ImageTextModel:
    """A dual encoder from a CLIPModel, VisionTextDualEncoderModel or mmscale dual-encoder folder; a fusion
    model (fusion.FusionEncoder) from a BlipForImageTextRetrieval or mmscale fusion folder.

    An mmscale checkpoint brings back its MLM head, SigLIP bias and (fusion) temperature. `mlm_head` adds a
    new head where there is none and the text tower can take one (not CLIP's causal tower); `logit_bias_init`
    adds a SigLIP bias where there is none; `logit_scale_init` is the temperature of a BLIP folder, which
    keeps none. Heads the caller does not ask for are left out."""
    folder = Path(folder)
    kind = _model_type(folder)
    if kind == "blip":
        attention = FUSION_ATTENTION
    extras = _read_extras(folder)
    meta = extras.pop("meta", {})
    if meta.get("quantize") == "int8-cpu":  # PyTorch dynamic int8 layers, which transformers has no format for
        from mmscale.export.cpu_int8 import load_towers

        towers = load_towers(folder, _TOWER_CLASSES[kind], attention=attention)
    else:
        towers = _TOWER_CLASSES[kind].from_pretrained(folder, attn_implementation=attention, **SAFE_LOADING)
    mean, std = (meta["image_mean"], meta["image_std"]) if meta else _image_normalization(folder)
    bias = None if logit_bias_init is None else float(extras.get("logit_bias", logit_bias_init))
    settings = {"max_logit_scale": meta.get("max_logit_scale", 100.0), "image_mean": mean, "image_std": std}
    if kind == "blip":
        scale = float(extras["logit_scale"].exp()) if "logit_scale" in extras else logit_scale_init
        model = FusionEncoder(towers, mlm_head=mlm_head, logit_scale_init=scale, logit_bias_init=bias, **settings)
    else:
        takes_head = towers.config.text_config.model_type not in NO_MLM_HEAD
        model = dual_encoder(towers, mlm_head=mlm_head and takes_head, logit_bias_init=bias, **settings)
    model.cpu_only = meta.get("quantize") == "int8-cpu"
    if meta.get("pruned_heads"):
        model.set_pruned_heads(meta["pruned_heads"])
    if meta.get("vqa_answers") and isinstance(model, FusionEncoder):
        model.add_vqa_head(list(meta["vqa_answers"]))
        model.vqa_head.load_state_dict({name.removeprefix("vqa_head."): tensor for name, tensor in extras.items()
                                        if name.startswith("vqa_head.")})
    if meta.get("classes"):
        model.add_classifier(int(meta["classes"]))
        model.classifier.load_state_dict({"weight": extras["classifier.weight"], "bias": extras["classifier.bias"]})
    if model.mlm_head is not None and meta.get("mlm_head"):
        head = {name.removeprefix("mlm_head."): tensor for name, tensor in extras.items() if name.startswith("mlm_head.")}
        model.mlm_head.load_state_dict(head | {"decoder.weight": model.mlm_head.decoder.weight})
    return model


def wrap_like(model: ImageTextModel, towers, *, mlm_head: bool, copy_heads: bool = False) -> ImageTextModel:
    """A model of `model`'s kind and settings (temperature, SigLIP bias, normalization, the VQA answer list) around
    other `towers` (a skeleton, or the same weights in int8). `copy_heads`: the classification and VQA heads come
    along with their weights (in float; whole, not ZeRO-3 partitions); else the VQA head is a new one."""
    settings = {"mlm_head": mlm_head, "logit_bias_init": 0.0 if model.logit_bias is not None else None,
                "max_logit_scale": model.max_logit_scale, "image_mean": model.image_mean.flatten().tolist(),
                "image_std": model.image_std.flatten().tolist()}
    if isinstance(model, FusionEncoder):
        parameter = model.logit_scale_parameter  # its current value, unless ZeRO-3 holds only a partition of it
        scale = model.logit_scale_init if hasattr(parameter, "ds_id") else float(parameter.detach().float().exp())
        wrapped = FusionEncoder(towers, logit_scale_init=scale, vqa_answers=model.vqa_answers, **settings)
    else:
        wrapped = dual_encoder(towers, **settings)
    if model.pruned_heads:
        wrapped.set_pruned_heads(model.pruned_heads)
    if copy_heads:
        for name in ("classifier", "vqa_head"):
            head = getattr(model, name, None)
            if head is not None:
                setattr(wrapped, name, copy.deepcopy(head).float().to(wrapped.image_mean.device))
    return wrapped


def skeleton_like(model: ImageTextModel) -> ImageTextModel:
    """A whole (unpartitioned) model with `model`'s architecture and settings, to load consolidated
    weights into. Build it where no ZeRO-3 `HfDeepSpeedConfig` is alive (PITFALLS.md 4)."""
    skeleton = wrap_like(model, type(model.towers)(model.towers.config), mlm_head=model.mlm_head is not None)
    if model.classifier is not None:
        skeleton.add_classifier(model.classifier.out_features)
    return skeleton


def save_model(model: ImageTextModel, folder: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write `model` as a consolidated checkpoint (see the module docstring), atomically: a crash
    mid-way leaves any earlier folder of that name as it was."""
    folder = Path(folder)
    with staged_folder(folder) as staging:
        _write_checkpoint(model, staging, tokenizer=tokenizer)
    return folder


@contextlib.contextmanager
def staged_folder(folder: Path):
    """A new folder beside `folder` to fill; on success it replaces `folder` (atomically: a crash mid-way leaves any
    earlier folder of that name as it was), on an error it is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_folder(folder)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, folder)


def _write_checkpoint(model: ImageTextModel, staging: Path, *, tokenizer) -> None:
    zero_pruned_heads(model)
    model.towers.save_pretrained(staging, safe_serialization=True)
    fusion = isinstance(model, FusionEncoder)
    if fusion:
        _write_blip_processor(model, staging, tokenizer=tokenizer)
    else:
        _write_processor(model, staging, tokenizer=tokenizer)
    heads = {}
    if fusion:
        heads["logit_scale"] = model.logit_scale_log.detach().clone().float()
    if model.mlm_head is not None:
        heads |= {f"mlm_head.{name}": tensor.detach().contiguous() for name, tensor in model.mlm_head.state_dict().items()
                  if name != "decoder.weight"}
    if model.logit_bias is not None and not model.bias_in_towers:
        heads["logit_bias"] = model.logit_bias.detach().clone()
    if getattr(model, "vqa_head", None) is not None:
        heads |= {f"vqa_head.{name}": tensor.detach().contiguous() for name, tensor in model.vqa_head.state_dict().items()}
    if model.classifier is not None:
        heads |= {f"classifier.{name}": tensor.detach().contiguous() for name, tensor in model.classifier.state_dict().items()}
    save_file(heads, staging / HEADS_FILE)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "towers": model.kind, "mlm_head": model.mlm_head is not None,
            "logit_bias": model.logit_bias is not None, "max_logit_scale": model.max_logit_scale,
            "classes": model.classifier.out_features if model.classifier is not None else 0,
            "image_mean": model.image_mean.flatten().tolist(), "image_std": model.image_std.flatten().tolist()}
    if model.pruned_heads:
        meta["pruned_heads"] = model.pruned_heads
    if fusion:
        meta["fusion_layers"] = model.fusion_layers
        if model.vqa_head is not None:
            meta["vqa_answers"] = model.vqa_answers
    (staging / MMSCALE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _write_blip_processor(model: FusionEncoder, staging: Path, *, tokenizer) -> None:
    """BLIP's processor: a square resize to the model's side (bilinear, as the loader resizes), no crop, the
    model's mean/std; `BlipProcessor` leaves token_type_ids out, as BLIP's text encoder takes none."""
    image_processor = BlipImageProcessor(
        size={"height": model.image_size, "width": model.image_size}, resample=2,
        image_mean=model.image_mean.flatten().tolist(), image_std=model.image_std.flatten().tolist(),
    )
    if tokenizer is not None:
        BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(staging)
    else:
        image_processor.save_pretrained(staging)


def _write_processor(model: DualEncoder, staging: Path, *, tokenizer) -> None:
    common = {"image_mean": model.image_mean.flatten().tolist(), "image_std": model.image_std.flatten().tolist(),
                     "resample": 2}  # bilinear, as the loader resizes
    if model.kind == "siglip":  # SigLIP's: a square resize, no crop
        image_processor = SiglipImageProcessor(size={"height": model.image_size, "width": model.image_size},
                                               **common)
    else:
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": model.image_size}, crop_size={"height": model.image_size, "width": model.image_size},
            **common)
    if tokenizer is not None and model.kind == "vision-text-dual-encoder":
        VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(staging)
    else:
        image_processor.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)


def model_kind(folder: str | os.PathLike) -> str:
    """The transformers model type of a model folder (`clip`, `vision-text-dual-encoder`, `blip`), checked as
    load_model checks it."""
    return _model_type(Path(folder))


def saved_meta(folder: str | os.PathLike) -> dict:
    """What an mmscale checkpoint's mmscale.json says ({} for a folder without one: a transformers folder)."""
    meta = Path(folder) / MMSCALE_FILE
    return _read_json(meta) if meta.is_file() else {}


def saved_vqa_answers(folder: str | os.PathLike) -> list[str]:
    """The answer list of an mmscale fusion checkpoint's VQA head ([] for any other folder)."""
    return list(saved_meta(folder).get("vqa_answers") or [])


def saved_quantization(folder: str | os.PathLike) -> str:
    """How an exported mmscale folder is quantized (`int8-cpu`), or "" (float, or a transformers quantization
    config that `from_pretrained` reads)."""
    return str(saved_meta(folder).get("quantize") or "")


def image_size_of(folder: str | os.PathLike) -> int:
    """The image side a model folder's vision tower takes (a CLIP, dual-encoder, ViT or mmscale folder)."""
    config = _hf_config(Path(folder))
    vision = config.get("vision_config", config)
    if "image_size" not in vision:
        raise CheckpointError(f"{folder} has no image size in its config.json; expected a vision or dual-encoder model")
    return int(vision["image_size"])


def text_positions_of(folder: str | os.PathLike) -> int:
    """How many caption tokens a model folder's text tower takes (its position embeddings)."""
    config = _hf_config(Path(folder))
    return int(config.get("text_config", config)["max_position_embeddings"])


def replace_folder(staging: Path, folder: Path) -> None:
    if not folder.exists():
        staging.rename(folder)
        return
    holder = temporary_folder(folder)  # our own fresh folder, so the old one never moves onto a planted name
    folder.rename(holder / folder.name)
    staging.rename(folder)
    shutil.rmtree(holder, ignore_errors=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from error


def _hf_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder}: no such folder; expected {EXPECTED}")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a model folder (no config.json); expected {EXPECTED}")
    return _read_json(folder / "config.json")


def _check_weights(folder: Path) -> None:
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return
    if (folder / CPU_INT8_WEIGHTS).is_file():  # an `mmscale export --quantize int8-cpu` folder (load_model reads it)
        return
    if any(folder.glob("pytorch_model*.bin")):
        raise CheckpointError(f"{folder} has only pickle weights (pytorch_model.bin), which can run code when "
                              "loaded; mmscale reads safetensors only: convert them where you trust the file "
                              "(`AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`)")
    raise CheckpointError(f"{folder} has a config.json but no model.safetensors")


def _model_type(folder: Path) -> str:
    config = _hf_config(folder)
    model_type = config.get("model_type")
    if model_type not in _TOWER_CLASSES:
        raise CheckpointError(f"{folder} holds a {model_type!r} model; expected {EXPECTED}")
    if model_type == "blip":
        architectures = config.get("architectures") or []
        refused = next((_BLIP_REFUSED[name] for name in architectures if name in _BLIP_REFUSED), None)
        if refused or "BlipForImageTextRetrieval" not in architectures:
            raise CheckpointError(f"{folder} holds {refused or 'a BLIP model of class ' + str(architectures)}; mmscale's "
                                  "fusion model starts from a BlipForImageTextRetrieval folder (BLIP's ITM checkpoints, "
                                  "e.g. Salesforce/blip-itm-base-coco)")
    _check_weights(folder)
    return model_type


def _read_extras(folder: Path) -> dict:
    """mmscale's heads and metadata, if `folder` is an mmscale checkpoint ({} otherwise)."""
    if not (folder / MMSCALE_FILE).is_file():
        return {}
    meta = _read_json(folder / MMSCALE_FILE)
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder / MMSCALE_FILE}: format {meta.get('format')!r} version {meta.get('version')} "
                              f"is not one this mmscale reads ({FORMAT} <= {FORMAT_VERSION})")
    if not (folder / HEADS_FILE).is_file():
        raise CheckpointError(f"{folder} is an mmscale checkpoint without {HEADS_FILE}; it was not written completely")
    return {"meta": meta} | load_file(folder / HEADS_FILE)


def _image_normalization(folder: Path) -> tuple[list[float], list[float]]:
    """Mean and std from the folder's image processor config (its own file, or inside the processor
    config as transformers 5 writes it); CLIP's when it has none."""
    config = {}
    if (folder / "preprocessor_config.json").is_file():
        config = _read_json(folder / "preprocessor_config.json")
    elif (folder / "processor_config.json").is_file():
        config = _read_json(folder / "processor_config.json").get("image_processor", {})
    return config.get("image_mean", list(CLIP_IMAGE_MEAN)), config.get("image_std", list(CLIP_IMAGE_STD))


def _load_vision(folder: Path, attention: str) -> PreTrainedModel:
    model_type = _hf_config(folder).get("model_type")
    _check_weights(folder)
    if model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(folder, attn_implementation=attention, **SAFE_LOADING)
    model = AutoModel.from_pretrained(folder, attn_implementation=attention, **SAFE_LOADING)
    if not hasattr(model.config, "image_size"):
        raise CheckpointError(f"model.vision_from {folder} holds a {model_type!r} model, not a vision model "
                              "(expected ViT, CLIP or CLIP vision)")
    return model


def _load_text(folder: Path, attention: str) -> PreTrainedModel:
    model_type = _hf_config(folder).get("model_type")
    _check_weights(folder)
    model = AutoModel.from_pretrained(folder, attn_implementation=attention, **SAFE_LOADING)
    if hasattr(model.config, "image_size") or getattr(model.config, "is_decoder", False):
        raise CheckpointError(f"model.text_from {folder} holds a {model_type!r} model, not a text encoder "
                              "(expected a BERT-style encoder such as BERT, RoBERTa or MiniLM)")
    return model


def _towers_from_pair(config: ModelConfig) -> VisionTextDualEncoderModel:
    vision = _load_vision(Path(config.vision_from), config.attention)
    text = _load_text(Path(config.text_from), config.attention)
    sizes = config.sizes()
    towers_config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision.config, text.config, projection_dim=sizes.projection_dim,
        logit_scale_init_value=math.log(1 / config.temperature_init),
    )
    return VisionTextDualEncoderModel(towers_config, vision_model=vision, text_model=text)
