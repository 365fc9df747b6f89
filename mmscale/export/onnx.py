"""`mmscale export --format onnx`: the image and text encoders of a saved model as ONNX graphs that onnxruntime
runs alone, float or ONNX Runtime dynamic int8, checked against PyTorch on a fixed batch.

Each graph is exactly the model's own function: `image_encoder.onnx` is `encode_images` (uint8 pixels in, the
model's normalization inside the graph, the projected embedding out), `text_encoder.onnx` is `encode_texts`
(token ids and padding mask in), both with a dynamic batch axis and the text with a dynamic length. A fusion
model also gets `fusion_heads.onnx`: its text encoder cross-attending to the image tokens (a second output of its
image graph), then the ITM head (and the VQA head where the model has one). `onnx_export.json` says what a user
needs besides onnxruntime and the tokenizer files: inputs, outputs, image size and preprocessing, normalization,
the temperature and SigLIP bias.

The graphs come from torch's TorchScript exporter (`dynamo=False`): on torch 2.14 it traces these models (SDPA
included, decomposed into MatMul/Softmax at opset 17) and exports in under half the time of the torch.export-based
exporter, which also needs `onnxscript` installed and was tried and works the same here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.export.quantize import adapter_base, load_float, sample_inputs
from mmscale.models.base import ImageTextModel, classifier_input
from mmscale.models.fusion import FusionEncoder

OPSET = 17
IMAGE_GRAPH = "image_encoder.onnx"
TEXT_GRAPH = "text_encoder.onnx"
FUSION_GRAPH = "fusion_heads.onnx"
METADATA_FILE = "onnx_export.json"
REPORT_FILE = "export_report.json"
FLOAT_AGREEMENT = 0.999
"""The least cosine of a float graph's embedding to PyTorch's, on every row of the check batch."""
ONNX_QUANTIZE = {"none": "none", "int8": "int8", "int8-cpu": "int8"}
"""`--quantize` values that have an ONNX meaning: both int8s are ONNX Runtime's dynamic int8 (QInt8 weights)."""


class OnnxExportError(ValueError):
    """A user-facing reason the ONNX export cannot be done or did not agree with PyTorch."""


class ImageEncoderGraph(nn.Module):
    """`encode_images` (uint8 [B, 3, S, S] in); a fusion model's image tokens and a classifier's logits beside it."""

    def __init__(self, model: ImageTextModel):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        if isinstance(model, FusionEncoder):
            tokens = model.image_tokens(pixels)
            outputs = [model.image_features(tokens), tokens]
        else:
            outputs = [model.encode_images(pixels)]
        if model.classifier is not None:
            outputs.append(model.classifier(classifier_input(outputs[0])))
        return tuple(outputs)


class TextEncoderGraph(nn.Module):
    """`encode_texts` (int64 [B, L] token ids and padding mask in)."""

    def __init__(self, model: ImageTextModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_texts(input_ids, attention_mask)


class FusionHeadsGraph(nn.Module):
    """A fusion model's text encoder attending to image tokens, then the ITM head (and the VQA head if any)."""

    def __init__(self, model: FusionEncoder):
        super().__init__()
        self.model = model

    def forward(self, image_tokens: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        first = self.model._text_hidden(input_ids, attention_mask, image_tokens)[:, 0]
        outputs = [self.model.towers.itm_head(first)]
        if self.model.vqa_head is not None:
            outputs.append(self.model.vqa_head(first))
        return tuple(outputs)


def graph_specs(model: ImageTextModel) -> dict[str, dict]:
    """Per graph file: its wrapper, input and output names, and their axes (symbolic names where dynamic)."""
    size, width = model.image_size, model.embedding_dim
    image_outputs = {"image_embedding": ["batch", width]}
    if isinstance(model, FusionEncoder):
        vision = model.towers.config.vision_config
        image_outputs["image_tokens"] = ["batch", 1 + (size // vision.patch_size) ** 2, vision.hidden_size]
    if model.classifier is not None:
        image_outputs["class_logits"] = ["batch", model.classifier.out_features]
    text_inputs = {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    specs = {
        IMAGE_GRAPH: {"module": ImageEncoderGraph(model), "inputs": {"pixels": ["batch", 3, size, size]},
                      "outputs": image_outputs},
        TEXT_GRAPH: {"module": TextEncoderGraph(model), "inputs": text_inputs,
                     "outputs": {"text_embedding": ["batch", width]}},
    }
    if isinstance(model, FusionEncoder):
        outputs = {"itm_logits": ["batch", 2]}
        if model.vqa_head is not None:
            outputs["vqa_logits"] = ["batch", len(model.vqa_answers)]
        specs[FUSION_GRAPH] = {"module": FusionHeadsGraph(model), "outputs": outputs,
                               "inputs": {"image_tokens": image_outputs["image_tokens"], **text_inputs}}
    return specs


def _dynamic_axes(spec: dict) -> dict[str, dict[int, str]]:
    names = spec["inputs"] | spec["outputs"]
    return {name: {axis: size for axis, size in enumerate(shape) if isinstance(size, str)}
            for name, shape in names.items()}


@torch.no_grad()
def export_graphs(model: ImageTextModel, folder: Path, images: torch.Tensor, texts: dict[str, torch.Tensor]) -> None:
    """Trace every graph of `graph_specs(model)` on a batch of two into `folder`."""
    example = {"pixels": images[:2], "input_ids": texts["input_ids"][:2], "attention_mask": texts["attention_mask"][:2]}
    if isinstance(model, FusionEncoder):
        example["image_tokens"] = model.image_tokens(example["pixels"])
    for name, spec in graph_specs(model).items():
        with warnings.catch_warnings():
            # The exporter warns that it is the legacy one, and that the image-size check traces to a constant
            # (it is: the graph takes one image size).
            warnings.simplefilter("ignore")
            torch.onnx.export(spec["module"], tuple(example[key] for key in spec["inputs"]), str(folder / name),
                              input_names=list(spec["inputs"]), output_names=list(spec["outputs"]),
                              dynamic_axes=_dynamic_axes(spec), opset_version=OPSET, dynamo=False)


def quantize_graphs(source: Path, target: Path, names: list[str], *, keep_projections: bool,
                    head_names: tuple[str, ...]) -> None:
    """ONNX Runtime dynamic int8 (QInt8 weights, activations quantized per batch at run time) of each graph;
    the projections' and heads' MatMul/Gemm stay float unless `keep_projections` is False."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a root-logger warning to run its pre-processing first; that pre-processing's symbolic
    # shape inference fails on these graphs ("Incomplete symbolic shape inference") and int8 agrees without it
    # (embedding cosine 0.9997 on `base`). Per-channel weights were 0.9998 but a third slower.
    logging.disable(logging.WARNING)
    try:
        for name in names:
            excluded = []
            if keep_projections:
                nodes = onnx.load(str(source / name), load_external_data=False).graph.node
                # ONNX node names nest modules with slashes: SigLIP's `vision_model.head` is /vision_model/head/...
                excluded = [node.name for node in nodes
                            if any(f"/{head.replace('.', '/')}/" in node.name for head in head_names)]
            quantize_dynamic(str(source / name), str(target / name), weight_type=QuantType.QInt8,
                             nodes_to_exclude=excluded)
    finally:
        logging.disable(logging.NOTSET)


def sessions(folder: Path, names: list[str]) -> dict:
    """onnxruntime CPU sessions of `folder`'s graphs, on as many threads as torch uses (a fair comparison)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return {name: onnxruntime.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
            for name in names}


def run_graph(session, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One onnxruntime run with torch tensors in and out, by output name."""
    wanted = {item.name for item in session.get_inputs()}
    outputs = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items() if name in wanted})
    return {item.name: torch.from_numpy(value) for item, value in zip(session.get_outputs(), outputs)}


@torch.no_grad()
def graph_agreement(model: ImageTextModel, graphs: dict, images: torch.Tensor,
                    texts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine (mean, min) of the graphs' embeddings to the model's on the same batch; for heads, the largest
    difference in probability (ITM P(match), class and VQA softmax)."""
    inputs = {"pixels": images, **texts}
    image = run_graph(graphs[IMAGE_GRAPH], inputs)
    text = run_graph(graphs[TEXT_GRAPH], inputs)
    result = {}
    for kind, ours, theirs in (("image", model.encode_images(images), image["image_embedding"]),
                               ("text", model.encode_texts(texts["input_ids"], texts["attention_mask"]),
                                text["text_embedding"])):
        cosine = F.cosine_similarity(ours.float(), theirs, dim=-1)
        result[f"{kind}_cosine_mean"], result[f"{kind}_cosine_min"] = float(cosine.mean()), float(cosine.min())

    def probability_gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
        return float((ours.float().softmax(-1) - theirs.softmax(-1)).abs().max())

    if "class_logits" in image:
        result["class_probability_max_difference"] = probability_gap(model.classify(images), image["class_logits"])
    if FUSION_GRAPH in graphs:
        heads = run_graph(graphs[FUSION_GRAPH], inputs | {"image_tokens": image["image_tokens"]})
        result["itm_probability_max_difference"] = probability_gap(
            model.itm_logits(model.image_tokens(images), texts["input_ids"], texts["attention_mask"]),
            heads["itm_logits"])
        if "vqa_logits" in heads:
            result["vqa_probability_max_difference"] = probability_gap(
                model.vqa_logits(images, texts["input_ids"], texts["attention_mask"]), heads["vqa_logits"])
    return result


def _per_second(count: int, run, *, repeats: int = 3, budget_s: float = 10.0) -> float:
    """`count` over the best time of `run()` after a warm-up (onnxruntime plans its memory, torch its kernels):
    of `repeats` runs, or fewer once `budget_s` is spent (large models on CPU)."""
    run()
    times = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return count / min(times)


@torch.no_grad()
def throughput(model: ImageTextModel, graphs: dict, images: torch.Tensor, texts: dict[str, torch.Tensor]) -> dict:
    """Images/s and texts/s of torch fp32 and of the graphs on CPU (the whole batch at once, best of 3 runs), on
    torch's thread count (set OMP_NUM_THREADS to compare at another)."""
    count = len(images)
    return {
        "batch": count, "text_length": int(texts["input_ids"].shape[1]), "threads": torch.get_num_threads(),
        "torch_fp32_images_per_s": _per_second(count, lambda: model.encode_images(images)),
        "onnxruntime_images_per_s": _per_second(count, lambda: graphs[IMAGE_GRAPH].run(
            ["image_embedding"], {"pixels": images.numpy()})),
        "torch_fp32_texts_per_s": _per_second(count, lambda: model.encode_texts(**texts)),
        "onnxruntime_texts_per_s": _per_second(count, lambda: graphs[TEXT_GRAPH].run(
            None, {name: tensor.numpy() for name, tensor in texts.items()})),
    }


def metadata(model: ImageTextModel, tokenizer, *, quantize: str) -> dict:
    """What `onnx_export.json` tells a user who has onnxruntime and the tokenizer files only."""
    specs = graph_specs(model)
    scale = float(model.logit_scale().detach())
    types = {"pixels": "uint8", "input_ids": "int64", "attention_mask": "int64"}
    graphs = {name: {"inputs": {key: {"dtype": types.get(key, "float32"), "shape": shape}
                                for key, shape in spec["inputs"].items()},
                     "outputs": {key: {"dtype": "float32", "shape": shape} for key, shape in spec["outputs"].items()}}
              for name, spec in specs.items()}
    text_config = model.towers.config.text_config
    return {
        "format": "mmscale-onnx", "version": 1, "model_type": model.kind,
        "kind": "fusion" if isinstance(model, FusionEncoder) else "dual_encoder", "quantize": quantize,
        "opset": OPSET, "graphs": graphs, "embedding_dim": model.embedding_dim,
        "image_size": model.image_size,
        "image_preprocessing": "RGB, the central square crop resized to image_size x image_size (bilinear, "
                               "antialiased), uint8 [batch, 3, height, width]; the graph normalizes",
        "image_mean": list(model._normalization["image_mean"]), "image_std": list(model._normalization["image_std"]),
        "normalization": "inside image_encoder.onnx: (pixels / 255 - image_mean) / image_std",
        "tokenizer": "tokenizer.json (the `tokenizers` library) or the folder with transformers' AutoTokenizer",
        "pad_token_id": tokenizer.pad_token_id, "max_text_length": text_config.max_position_embeddings,
        "logit_scale": scale, "temperature": 1.0 / scale,
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
        "zero_shot": "logits = logit_scale * normalize(image_embedding) @ normalize(text_embedding).T "
                     "(+ logit_bias for SigLIP models); softmax over texts",
        **({"vqa_answers": model.vqa_answers} if getattr(model, "vqa_answers", None) else {}),
    }


def _check_graph_sizes(model: ImageTextModel) -> None:
    """A clear error for a tower over protobuf's 2 GB limit: torch would write its weights as hundreds of loose
    files beside the graph, which this export does not gather (not done yet for the huge and giant presets)."""
    for tower in model.tower_names:
        size = sum(parameter.numel() * 4 for parameter in getattr(model.towers, tower).parameters())
        if size >= 2**31 - 2**26:
            raise OnnxExportError(f"the {tower} of this model is {size / 2**30:.1f} GiB in fp32, over the 2 GB an ONNX "
                                  "file holds; ONNX export with external weights is not supported yet (use --format "
                                  "transformers, or a smaller preset)")


def _require_runtime() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise OnnxExportError(f"--format onnx needs the onnx and onnxruntime packages ({error}); install them with "
                              "pip install 'mmscale[onnx]'") from None


def _bytes(folder: Path, names: list[str]) -> int:
    return sum((folder / name).stat().st_size for name in names)


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, quantize: str = "none",
                keep_projections: bool = True) -> dict:
    """Write the encoders of `checkpoint` (a model folder or a LoRA adapter folder, merged) as ONNX graphs,
    the tokenizer, `onnx_export.json` and `export_report.json` to `out`; returns the report.

    `quantize`: none (float graphs) or int8/int8-cpu (ONNX Runtime dynamic int8; with `keep_projections` the
    projections and heads stay float). Raises OnnxExportError for nf4, or when a float graph's embeddings
    disagree with PyTorch's (cosine below FLOAT_AGREEMENT), after writing the report that shows it."""
    if quantize not in ONNX_QUANTIZE:
        raise OnnxExportError(f"--quantize {quantize} cannot be written as ONNX (nf4 is a bitsandbytes format "
                              "onnxruntime does not run); with --format onnx use --quantize none or int8, or keep "
                              f"--quantize {quantize} with --format transformers")
    _require_runtime()
    from mmscale.data.text import load_tokenizer

    source, target = Path(checkpoint), Path(out)
    tokenizer = load_tokenizer(adapter_base(source) or source)
    model = load_float(source).float().eval()
    _check_graph_sizes(model)
    images, texts = sample_inputs(model, tokenizer)
    target.mkdir(parents=True, exist_ok=True)
    report = {"source": str(source), "format": "onnx", "quantize": ONNX_QUANTIZE[quantize], "opset": OPSET,
              "exporter": "torch.onnx.export(dynamo=False)"}
    report |= write_graphs(model, target, images, texts, int8=report["quantize"] == "int8",
                           keep_projections=keep_projections)
    if isinstance(model, FusionEncoder):
        report["heads"] = "ITM" + (" and VQA" if model.vqa_head is not None else "") + f" in {FUSION_GRAPH}"
    tokenizer.save_pretrained(str(target))
    (target / METADATA_FILE).write_text(json.dumps(metadata(model, tokenizer, quantize=report["quantize"]),
                                                   indent=2) + "\n")
    (target / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    float_agreement = report.get("float_graph", report)
    worst = min(float_agreement["image_cosine_min"], float_agreement["text_cosine_min"])
    if worst < FLOAT_AGREEMENT:
        raise OnnxExportError(f"the float ONNX graphs in {target} disagree with PyTorch (embedding cosine {worst:.5f} "
                              f"< {FLOAT_AGREEMENT}; {target / REPORT_FILE}); please report it with the model's "
                              "config.json")
    return report


@torch.no_grad()
def write_graphs(model: ImageTextModel, target: Path, images: torch.Tensor, texts: dict[str, torch.Tensor], *,
                 int8: bool, keep_projections: bool) -> dict:
    """Export the graphs to `target` (int8: the float ones to a temporary folder, quantized into `target`); their
    sizes, agreement with `model` on the batch (int8: the float graphs' too, as `float_graph`) and throughput."""
    names = list(graph_specs(model))
    with tempfile.TemporaryDirectory(prefix="mmscale-onnx-") as staging:
        float_folder = Path(staging) if int8 else target
        export_graphs(model, float_folder, images, texts)
        exported = sessions(float_folder, names)
        float_agreement = graph_agreement(model, exported, images, texts)
        result = {"graphs": names, "bytes_float32": _bytes(float_folder, names)}
        if int8:
            quantize_graphs(float_folder, target, names, keep_projections=keep_projections,
                            head_names=model.head_names)
            exported = sessions(target, names)
            result["projections_in_int8"] = not keep_projections
    result["bytes_exported"] = _bytes(target, names)
    result["size_ratio"] = result["bytes_exported"] / result["bytes_float32"]
    if int8:
        result |= graph_agreement(model, exported, images, texts)
        result["float_graph"] = float_agreement
    else:
        result |= float_agreement
    result["throughput"] = throughput(model, exported, images, texts)
    return result
