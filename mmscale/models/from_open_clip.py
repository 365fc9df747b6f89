"""open_clip checkpoints as transformers `CLIPModel` folders (`mmscale convert --from-open-clip`).

An open_clip checkpoint is a state dict plus the name of a model config (open_clip's `model_configs/*.json`:
`embed_dim`, `vision_cfg`, `text_cfg`, optional `quick_gelu` and `preprocess_cfg`). The standard CLIP layout of
those configs maps one to one onto `CLIPModel`, as transformers' own conversion script maps OpenAI's weights:
each residual block's fused `in_proj` splits into q/k/v, `c_fc`/`c_proj` become `fc1`/`fc2`, the projections
are transposed. The tokenizer (open_clip's BPE, the one OpenAI's CLIP uses) is written as a `CLIPTokenizer`
and the preprocessing (size, mean/std, interpolation) as a `CLIPImageProcessor`. Layouts `CLIPModel` has no
place for (attentional pooling, CoCa's decoder, timm or Hugging Face towers, layer scale, a SigLIP bias...)
are refused, naming what is in the way. The weights are read as safetensors or as a tensors-only torch file
(`torch.load(weights_only=True)`, which runs no code).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

from mmscale.models.base import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

START, END = "<|startoftext|>", "<|endoftext|>"
RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}
PREFIX = "open_clip:"  # model.init_from=open_clip:MODEL_NAME:FILE (MODEL_NAME: a config name or its JSON file)
# Settings (of the config's top level, vision_cfg or text_cfg) whose non-default values CLIPModel cannot represent.
_DEFAULTS = {
    "top": {"multimodal_cfg": None, "custom_text": False, "init_logit_bias": None},
    "vision_cfg": {"timm_model_name": None, "attentional_pool": False, "ls_init_value": None, "no_ln_pre": False,
                   "pos_embed_type": "learnable", "pool_type": "tok", "final_ln_after_pool": False, "block_type": None,
                   "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                   "scale_attn": False, "scale_fc": False, "act_kwargs": None, "norm_kwargs": None},
    "text_cfg": {"hf_model_name": None, "embed_cls": False, "no_causal_mask": False, "pool_type": "argmax",
                 "proj_type": "linear", "proj_bias": False, "ls_init_value": None, "block_type": None,
                 "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                 "scale_attn": False, "scale_fc": False, "act_kwargs": None, "norm_kwargs": None,
                 "use_pad_mask": False, "tokenizer_kwargs": None, "hf_tokenizer_name": None},
}


class ConversionError(ValueError):
    """An open_clip model or checkpoint that cannot become a CLIPModel; the message says what is in the way."""


def model_config(name: str, config_file: str | os.PathLike | None = None) -> dict:
    """open_clip's config of model `name`: from `config_file` (its JSON), from `name` itself where it is the path
    of such a file (NAME.json), or from the installed open_clip."""
    if not config_file and name.endswith(".json"):
        config_file = name
    if config_file:
        try:
            return json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConversionError(f"open_clip model config {config_file}: unreadable ({error})") from None
    try:
        import open_clip
    except ImportError:
        raise ConversionError(f"open_clip model {name!r}: open_clip is not installed to name its config; pip install "
                              "open-clip-torch, or give the model's JSON (open_clip/model_configs/NAME.json) with "
                              "--open-clip-config") from None
    config = open_clip.get_model_config(name)
    if config is None:
        raise ConversionError(f"open_clip has no model config named {name!r} (open_clip.list_models() lists them)")
    return config


def check_representable(config: dict, name: str) -> None:
    """Refuse the layouts CLIPModel has no place for, naming each setting in the way."""
    found = []
    for section, defaults in _DEFAULTS.items():
        values = config if section == "top" else config.get(section, {})
        for key, default in defaults.items():
            if values.get(key, default) not in (default, None):
                found.append(f"{key}={values[key]!r}" if section == "top" else f"{section}.{key}={values[key]!r}")
    if not found:
        return
    what = "CoCa (a captioning decoder)" if "multimodal_cfg" in config else "a layout CLIPModel cannot hold"
    raise ConversionError(f"open_clip model {name!r} is {what}: {', '.join(found)}; mmscale converts the standard "
                          "CLIP layout (class-token ViT, causal text transformer pooled at the end token, linear "
                          "projections)")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's tensors from a safetensors file or a tensors-only torch file (an open_clip training checkpoint's
    `state_dict`, with DDP's `module.` prefix, included)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  # an unpickler refusal or a corrupt file: say which file
            raise ConversionError(f"--weights {path}: not a tensors-only torch file or safetensors ({error})") from None
    state = state.get("state_dict", state)
    return {key.removeprefix("module."): value for key, value in state.items()}


def clip_config(config: dict, state: dict[str, torch.Tensor]):
    """The transformers CLIPConfig of an open_clip config (sizes checked against the weights)."""
    from transformers import CLIPConfig

    vision, text = config["vision_cfg"], config["text_cfg"]
    activation = "quick_gelu" if config.get("quick_gelu") else "gelu"
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ConversionError("a ResNet image tower (vision_cfg.layers is a list) has no CLIPModel equivalent")
    vision_width = vision["width"]
    vision_config = {"hidden_size": vision_width, "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),
                     "num_hidden_layers": vision["layers"],
                     "num_attention_heads": vision_width // vision.get("head_width", 64),
                     "image_size": vision["image_size"], "patch_size": vision["patch_size"], "hidden_act": activation,
                     "layer_norm_eps": 1e-5, "projection_dim": config["embed_dim"]}
    text_config = {"hidden_size": text["width"], "intermediate_size": int(text["width"] * text.get("mlp_ratio", 4.0)),
                   "num_hidden_layers": text["layers"], "num_attention_heads": text["heads"],
                   "vocab_size": text.get("vocab_size", 49408), "max_position_embeddings": text.get("context_length", 77),
                   "hidden_act": activation, "layer_norm_eps": 1e-5, "projection_dim": config["embed_dim"],
                   "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}
    expected = {"visual.conv1.weight": (vision_width, 3, vision["patch_size"], vision["patch_size"]),
                "token_embedding.weight": (text_config["vocab_size"], text["width"]),
                "text_projection": (text["width"], config["embed_dim"])}
    for key, shape in expected.items():
        if key not in state:
            raise ConversionError(f"the weights have no {key}: not an open_clip CLIP checkpoint of this layout")
        if tuple(state[key].shape) != shape:
            raise ConversionError(f"{key} is {tuple(state[key].shape)} in the weights but {shape} in the model "
                                  "config: the weights are of another model")
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=config["embed_dim"])


def _blocks(state: dict, source: str, target: str, layers: int) -> dict[str, torch.Tensor]:
    converted = {}
    for layer in range(layers):
        old, new = f"{source}.resblocks.{layer}", f"{target}.encoder.layers.{layer}"
        for name, tensor in zip(("q_proj", "k_proj", "v_proj"), state[f"{old}.attn.in_proj_weight"].chunk(3)):
            converted[f"{new}.self_attn.{name}.weight"] = tensor
        for name, tensor in zip(("q_proj", "k_proj", "v_proj"), state[f"{old}.attn.in_proj_bias"].chunk(3)):
            converted[f"{new}.self_attn.{name}.bias"] = tensor
        for old_name, new_name in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                   ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for kind in ("weight", "bias"):
                converted[f"{new}.{new_name}.{kind}"] = state[f"{old}.{old_name}.{kind}"]
    return converted


def clip_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """open_clip's CLIP weights under CLIPModel's names."""
    converted = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],  # (sic: transformers' name)
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
        "logit_scale": state["logit_scale"].reshape(()),
    }
    converted |= _blocks(state, "transformer", "text_model", config.text_config.num_hidden_layers)
    converted |= _blocks(state, "visual.transformer", "vision_model", config.vision_config.num_hidden_layers)
    return {key: value.float().contiguous() for key, value in converted.items()}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table (open_clip's SimpleTokenizer and CLIPTokenizer share it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    characters, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def write_tokenizer(folder: Path, context_length: int) -> None:
    """open_clip's BPE (the vocabulary file open_clip ships, OpenAI's) as CLIPTokenizer's vocab.json and
    merges.txt, with the same 49,408 ids: SimpleTokenizer's table, built as SimpleTokenizer builds it."""
    from transformers import CLIPTokenizer

    try:
        from open_clip.tokenizer import default_bpe
    except ImportError:
        raise ConversionError("the tokenizer comes from open_clip's BPE vocabulary file: pip install "
                              "open-clip-torch") from None
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    characters = list(_bytes_to_unicode().values())
    vocabulary = characters + [character + "</w>" for character in characters]
    vocabulary += ["".join(merge.split()) for merge in merges] + [START, END]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocabulary)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=context_length,
                              bos_token=START, eos_token=END, unk_token=END, pad_token=END)
    tokenizer.save_pretrained(folder)


def convert(name: str, weights: str | os.PathLike, out: str | os.PathLike, *,
            config_file: str | os.PathLike | None = None) -> Path:
    """Write open_clip model `name` with `weights` as a CLIPModel folder at `out` (atomically): weights, tokenizer,
    image processor. Returns the folder."""
    from transformers import CLIPImageProcessor, CLIPModel

    from mmscale.models.checkpoint import staged_folder

    config = model_config(name, config_file)
    check_representable(config, name)
    state = read_state_dict(weights)
    hf_config = clip_config(config, state)
    converted = clip_state_dict(state, hf_config)
    model = CLIPModel(hf_config)
    missing = set(model.state_dict()) - set(converted) - {"text_model.embeddings.position_ids",
                                                           "vision_model.embeddings.position_ids"}
    if missing:
        raise ConversionError(f"the conversion leaves {len(missing)} CLIPModel weights unset: {sorted(missing)[:5]}")
    model.load_state_dict(converted, strict=False)
    out = Path(out)
    with staged_folder(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        preprocess = config.get("preprocess_cfg", {})
        side = config["vision_cfg"]["image_size"]
        interpolation = preprocess.get("interpolation", "bicubic")
        if preprocess.get("resize_mode", "shortest") != "shortest" or interpolation not in RESAMPLE:
            raise ConversionError(f"open_clip preprocessing {preprocess} has no CLIPImageProcessor equivalent")
        CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                           resample=RESAMPLE[interpolation], image_mean=list(preprocess.get("mean", CLIP_IMAGE_MEAN)),
                           image_std=list(preprocess.get("std", CLIP_IMAGE_STD))).save_pretrained(staging)
        write_tokenizer(staging, config["text_cfg"].get("context_length", 77))
        (staging / "open_clip_source.json").write_text(json.dumps({"model": name, "weights": str(weights),
                                                                    "config": config}, indent=2) + "\n")
    return out


def converted_source(spec: str, output_dir: str | os.PathLike) -> Path:
    """The CLIPModel folder of `model.init_from=open_clip:MODEL_NAME:FILE`: converted into the run's folder
    (`OUTPUT/open_clip/MODEL_NAME`), or the conversion already there of the same file (a resumed run)."""
    name, _, weights = spec.removeprefix(PREFIX).partition(":")
    if not name or not weights:
        raise ConversionError(f"model.init_from={spec}: expected open_clip:MODEL_NAME:FILE")
    folder = Path(output_dir) / "open_clip" / Path(name).name.removesuffix(".json")
    source = folder / "open_clip_source.json"
    if source.is_file() and json.loads(source.read_text()).get("weights") == str(weights):
        return folder
    return convert(name, weights, folder)
