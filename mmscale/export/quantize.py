"""`mmscale export`: merge adapters, quantize linear layers (int8 LLM.int8 or 4-bit NF4 with bitsandbytes, or
int8-cpu with PyTorch's dynamic int8), and say what it cost in `export_report.json`.

An int8/nf4 output is a consolidated checkpoint (mmscale.models.checkpoint) whose `config.json` carries
transformers' bitsandbytes quantization config, so `AutoModel.from_pretrained(out)` rebuilds the
`Linear8bitLt`/`Linear4bit` layers by itself, on CPU or GPU. Layers kept out of the low-bit format (the
projections unless asked, embeddings and norms always) are stored in fp16. An int8-cpu output is read by
`mmscale.models.load_model` only (export/cpu_int8.py says why and how). The report has the sizes, the
embedding agreement with the float model and both models' CPU images/s and texts/s.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmscale.atomic import atomic_write
from mmscale.export import cpu_int8
from mmscale.models import load_model
from mmscale.models.base import ImageTextModel
from mmscale.models.checkpoint import MMSCALE_FILE, SAFE_LOADING, CheckpointError, saved_meta, saved_quantization, wrap_like
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


def load_float(checkpoint: str | os.PathLike, *, keep_mlm_head: bool = False) -> ImageTextModel:
    """A float model from a checkpoint folder, or from a PEFT adapter folder merged into its base; `keep_mlm_head`
    brings a saved MLM head along (serving needs none)."""
    folder = Path(checkpoint)
    base = adapter_base(folder)
    if base is None:
        return load_model(folder, mlm_head=keep_mlm_head and _saved(folder, "mlm_head"),
                          logit_bias_init=0.0 if _saved(folder, "logit_bias") else None)
    from peft import PeftModel

    from mmscale.finetune.lora import load_adapter_heads

    model = load_model(base, mlm_head=keep_mlm_head and _saved(base, "mlm_head"),
                       logit_bias_init=0.0 if _saved(base, "logit_bias") else None)
    model.towers = PeftModel.from_pretrained(model.towers, folder, local_files_only=True).merge_and_unload()
    load_adapter_heads(model, folder)
    return model


def _saved(folder: Path, head: str) -> bool:
    """Whether an mmscale checkpoint keeps this head (`mlm_head`, `logit_bias`: load_model then reads its values)."""
    return bool(saved_meta(folder).get(head))


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def quantize_int8(model: ImageTextModel, float_towers: Path, *, keep_projections: bool = True) -> ImageTextModel:
    """`model` with its linear layers in int8 (bitsandbytes LLM.int8), the rest in fp16, read back from
    `float_towers` (where `model.towers` was saved); its classification and VQA heads stay float."""
    from transformers import BitsAndBytesConfig

    skipped = list(model.head_names) if keep_projections else []
    return _bitsandbytes(model, float_towers, BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skipped))


def quantize_nf4(model: ImageTextModel, float_towers: Path, *, keep_projections: bool = True) -> ImageTextModel:
    """`model` with its linear layers in 4-bit NormalFloat (bitsandbytes NF4 with double-quantized block scales,
    QLoRA's format, arXiv:2305.14314), computing in fp16, the rest in fp16, read back from `float_towers`; its
    classification and VQA heads stay float. Runs on CPU too (bitsandbytes' slower fallback there)."""
    from transformers import BitsAndBytesConfig

    skipped = list(model.head_names) if keep_projections else []
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float16, llm_int8_skip_modules=skipped)
    return _bitsandbytes(model, float_towers, config)


def _bitsandbytes(model: ImageTextModel, float_towers: Path, config) -> ImageTextModel:
    extra = {"attn_implementation": FUSION_ATTENTION} if isinstance(model, FusionEncoder) else {}
    towers = type(model.towers).from_pretrained(float_towers, quantization_config=config, dtype=torch.float16,
                                                **SAFE_LOADING, **extra)
    wrapped = wrap_like(model, towers, mlm_head=False, copy_heads=True)
    if model.logit_bias is not None:  # wrap_like starts a new one at 0
        wrapped.logit_bias.data.copy_(model.logit_bias.data)
    return wrapped


def quantize_cpu_int8(model: ImageTextModel) -> ImageTextModel:
    """A copy of `model` whose towers' linear layers are PyTorch dynamic int8 (export/cpu_int8.py), except the
    projections and the ITM head; everything else (temperature, SigLIP bias, classification and VQA heads,
    embeddings, norms) stays as it is, in fp32."""
    quantized = copy.deepcopy(model).cpu().float().eval()
    cpu_int8.quantize_towers(quantized.towers, keep=model.head_names)
    return quantized


def save_cpu_int8(float_model: ImageTextModel, quantized: ImageTextModel, folder: Path, *, tokenizer) -> None:
    """Write `quantized` (quantize_cpu_int8 of `float_model`) as an int8-cpu checkpoint: the float checkpoint
    (config, processor, tokenizer, heads), then the int8 weights, then the marker in mmscale.json, then the
    float weights removed. A crash at any point leaves a folder that loads: float before the marker, int8 after."""
    float_model.save(folder, tokenizer=tokenizer)
    cpu_int8.save_towers(quantized.towers, folder)
    meta = saved_meta(folder) | {"quantize": cpu_int8.QUANTIZE}
    with atomic_write(folder / MMSCALE_FILE) as handle:
        handle.write((json.dumps(meta, indent=2) + "\n").encode())
    for path in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        if path.name != cpu_int8.WEIGHTS_FILE:
            path.unlink(missing_ok=True)


@torch.no_grad()
def throughput(model: ImageTextModel, images: torch.Tensor, texts: dict[str, torch.Tensor], *,
               batches: int = 3) -> dict[str, float]:
    """Images and texts per second of `model` on its device over the given batch: one warm-up pass, then the
    median of `batches` timed passes, with torch's CPU threads as set (`torch.get_num_threads()`)."""
    device = model.device
    pixels = images.to(device)
    input_ids, attention_mask = texts["input_ids"].to(device), texts["attention_mask"].to(device)

    def per_second(run, count: int) -> float:
        run()
        seconds = []
        for _ in range(batches):
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        return count / statistics.median(seconds)

    return {"images_per_second": per_second(lambda: model.encode_images(pixels), len(pixels)),
            "texts_per_second": per_second(lambda: model.encode_texts(input_ids, attention_mask), len(input_ids))}


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
    texts = CaptionEncoder(tokenizer, mlm_probability=0.0, **model.caption_settings(context_length)).encode(
        [caption for _, caption, _ in drawn])
    return images, texts


def export(checkpoint: str, out: str, *, quantize: str, keep_projections: bool = True, evaluate_fn=None,
           throughput_batch: int = 16) -> dict:
    """Write the exported model to `out` with `export_report.json`; returns the report.

    `evaluate_fn(model) -> dict`, when given, scores the float and the exported model alike. Throughput is
    measured on `throughput_batch` generated images and captions."""
    from mmscale.data.text import load_tokenizer

    source = Path(checkpoint)
    refuse_quantized(adapter_base(source) or source)
    if quantize == cpu_int8.QUANTIZE and not keep_projections:
        raise ValueError("--quantize-projections: int8-cpu keeps the projections and the ITM head in fp32 (mmscale "
                         "reads the input dtype from them, and they are under 1% of the compute); leave it out")
    tokenizer = load_tokenizer(adapter_base(source) or source)
    float_model = load_float(source).eval()
    target = Path(out)
    with tempfile.TemporaryDirectory(prefix="mmscale-float-") as staging:
        float_model.towers.save_pretrained(staging, safe_serialization=True)  # measured, and bitsandbytes' source
        float_bytes = folder_bytes(Path(staging))
        exported = float_model
        if quantize in ("int8", "nf4"):
            quantize_fn = quantize_int8 if quantize == "int8" else quantize_nf4
            exported = quantize_fn(float_model, Path(staging), keep_projections=keep_projections).eval()
    if quantize == cpu_int8.QUANTIZE:
        exported = quantize_cpu_int8(float_model)
        save_cpu_int8(float_model, exported, target, tokenizer=tokenizer)
    else:
        exported.save(target, tokenizer=tokenizer)
    images, texts = sample_inputs(float_model, tokenizer)
    report = {"source": str(source), "quantize": quantize, "bytes_float32": float_bytes,
              "bytes_exported": folder_bytes(target), "projections_in_int8": not keep_projections}
    report["size_ratio"] = report["bytes_exported"] / report["bytes_float32"]
    report |= embedding_agreement(float_model, exported, images, texts)
    report |= _throughputs(float_model, exported, images[:throughput_batch],
                           {name: texts[name][:throughput_batch] for name in ("input_ids", "attention_mask")})
    if evaluate_fn is not None:
        report["eval_float"] = evaluate_fn(float_model)
        report["eval_exported"] = evaluate_fn(exported)
    (target / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _throughputs(float_model: ImageTextModel, exported: ImageTextModel, images: torch.Tensor,
                 texts: dict[str, torch.Tensor]) -> dict:
    """The report's `images_per_second_float`, `..._exported`, `texts_per_second_float`, `..._exported`, and what
    they were measured with."""
    report = {}
    for name, model in (("float", float_model), ("exported", exported)):
        rates = throughput(model, images, texts)
        report |= {f"images_per_second_{name}": rates["images_per_second"],
                   f"texts_per_second_{name}": rates["texts_per_second"]}
    return report | {"throughput_batch_size": len(images), "torch_threads": torch.get_num_threads(),
                     "exported_device": str(exported.device)}


def refuse_quantized(folder: Path) -> None:
    """An already quantized folder cannot be exported again: its float weights are gone."""
    quantized = saved_quantization(folder)
    if not quantized and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        quantized = (config.get("quantization_config") or {}).get("quant_method")
    if quantized:
        raise CheckpointError(f"{folder} is already quantized ({quantized}); export from the float model it came "
                              "from (the run's final/)")
