"""`mmscale export`: merge adapters, quantize linear layers to int8 (LLM.int8, bitsandbytes), and say
what it cost in `export_report.json`.

The output is a consolidated checkpoint (mmscale.models.checkpoint) whose `config.json` carries
transformers' bitsandbytes quantization config, so `AutoModel.from_pretrained(out)` rebuilds the
`Linear8bitLt` layers by itself, on CPU or GPU. Layers kept out of int8 (the projections unless
asked, embeddings and norms always) are stored in fp16.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from mmscale.models import load_model
from mmscale.models.base import ImageTextModel
from mmscale.models.checkpoint import SAFE_LOADING, CheckpointError, wrap_like
from mmscale.models.fusion import ATTENTION as FUSION_ATTENTION
from mmscale.models.fusion import FusionEncoder


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_base(folder: Path) -> Path | None:
    """The base model folder a PEFT adapter folder names, or None when `folder` is not an adapter.

    An adapter is read from `adapter_model.safetensors` only, as models are (SAFE_LOADING): PEFT would
    otherwise fall back to unpickling `adapter_model.bin`, which can run code."""
    if not (folder / "adapter_config.json").is_file():
        return None
    _check_adapter_weights(folder)
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if not Path(base).is_dir():
        raise CheckpointError(f"adapter {folder} names base model {base!r}, which is not a folder here; "
                              "export the run's final/ instead (adapters already merged)")
    return Path(base)


def _check_adapter_weights(folder: Path) -> None:
    if (folder / ADAPTER_WEIGHTS).is_file():
        return
    if (folder / "adapter_model.bin").is_file():
        raise CheckpointError(
            f"adapter {folder} has only pickle weights (adapter_model.bin), which can run code when loaded; "
            f"mmscale reads {ADAPTER_WEIGHTS} only: convert it where you trust the file (load it with "
            "`PeftModel.from_pretrained(base, folder)` and `.save_pretrained(folder, safe_serialization=True)`)")
    raise CheckpointError(f"adapter {folder} has an adapter_config.json but no {ADAPTER_WEIGHTS}")


def load_float(checkpoint: str | os.PathLike) -> ImageTextModel:
    """A float model from a checkpoint folder, or from a PEFT adapter folder merged into its base."""
    folder = Path(checkpoint)
    base = adapter_base(folder)
    if base is None:
        return load_model(folder, mlm_head=False)
    from peft import PeftModel

    from mmscale.finetune.lora import load_adapter_heads

    model = load_model(base, mlm_head=False)
    model.towers = PeftModel.from_pretrained(model.towers, folder, local_files_only=True).merge_and_unload()
    load_adapter_heads(model, folder)
    return model


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def quantize_int8(model: ImageTextModel, float_towers: Path, *, keep_projections: bool = True) -> ImageTextModel:
    """`model` with its linear layers in int8 (bitsandbytes LLM.int8), the rest in fp16, read back from
    `float_towers` (where `model.towers` was saved); its classification and VQA heads stay float."""
    from transformers import BitsAndBytesConfig

    skipped = list(model.head_names) if keep_projections else []
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skipped)
    extra = {"attn_implementation": FUSION_ATTENTION} if isinstance(model, FusionEncoder) else {}
    towers = type(model.towers).from_pretrained(float_towers, quantization_config=config, dtype=torch.float16,
                                                **SAFE_LOADING, **extra)
    return wrap_like(model, towers, mlm_head=False, copy_heads=True)


@torch.no_grad()
def embedding_agreement(reference: ImageTextModel, candidate: ImageTextModel, images: torch.Tensor,
                        texts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean and minimum cosine similarity of the two models' embeddings on the same inputs."""
    result = {}

    def embeddings(model: ImageTextModel) -> dict[str, torch.Tensor]:  # inputs on the model's device (int8: CUDA)
        device = model.device
        return {"image": model.encode_images(images.to(device)).float().cpu(),
                "text": model.encode_texts(texts["input_ids"].to(device),
                                           texts["attention_mask"].to(device)).float().cpu()}

    ours_all, theirs_all = embeddings(reference), embeddings(candidate)
    for kind in ("image", "text"):
        cosine = F.cosine_similarity(ours_all[kind], theirs_all[kind], dim=-1)
        result[f"{kind}_cosine_mean"] = float(cosine.mean())
        result[f"{kind}_cosine_min"] = float(cosine.min())
    if isinstance(reference, FusionEncoder):  # the ITM head's P(match) of each pair, float against exported
        def matches(model: FusionEncoder) -> torch.Tensor:
            device = model.device
            return model.itm_scores(images.to(device), texts["input_ids"].to(device),
                                    texts["attention_mask"].to(device)).float().cpu()

        result["itm_probability_max_difference"] = float((matches(reference) - matches(candidate)).abs().max())
    return result


def sample_inputs(model: ImageTextModel, tokenizer, *, count: int = 32, context_length: int = 64) -> tuple:
    """A fixed batch of generated shape images and their captions, when no evaluation data is given."""
    import random

    import numpy as np

    from mmscale.shards.synthetic import draw_sample
    from mmscale.data.text import CaptionEncoder

    rng = random.Random(0)
    drawn = [draw_sample(rng, model.image_size) for _ in range(count)]
    images = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image, _, _ in drawn])
    texts = CaptionEncoder(tokenizer, context_length=context_length, mlm_probability=0.0).encode(
        [caption for _, caption, _ in drawn])
    return images, texts


def export(checkpoint: str, out: str, *, quantize: str, keep_projections: bool = True, evaluate_fn=None) -> dict:
    """Write the exported model to `out` with `export_report.json`; returns the report.

    `evaluate_fn(model) -> dict`, when given, scores the float and the exported model alike."""
    from mmscale.data.text import load_tokenizer

    source = Path(checkpoint)
    tokenizer = load_tokenizer(adapter_base(source) or source)
    float_model = load_float(source).eval()
    target = Path(out)
    with tempfile.TemporaryDirectory(prefix="mmscale-float-") as staging:
        float_model.towers.save_pretrained(staging, safe_serialization=True)  # measured, and int8's source
        float_bytes = folder_bytes(Path(staging))
        exported = float_model
        if quantize == "int8":
            exported = quantize_int8(float_model, Path(staging), keep_projections=keep_projections).eval()
    exported.save(target, tokenizer=tokenizer)
    images, texts = sample_inputs(float_model, tokenizer)
    report = {"source": str(source), "quantize": quantize, "bytes_float32": float_bytes,
              "bytes_exported": folder_bytes(target), "projections_in_int8": not keep_projections}
    report["size_ratio"] = report["bytes_exported"] / report["bytes_float32"]
    report |= embedding_agreement(float_model, exported, images, texts)
    if evaluate_fn is not None:
        report["eval_float"] = evaluate_fn(float_model)
        report["eval_exported"] = evaluate_fn(exported)
    (target / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
