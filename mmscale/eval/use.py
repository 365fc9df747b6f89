"""Using a saved model (float or int8 export): `mmscale embed`, `mmscale zeroshot`, `mmscale match`,
`mmscale export`."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import torch

from mmscale.atomic import atomic_write
from mmscale.data.tars import SampleRejected
from mmscale.data.text import CaptionEncoder, load_tokenizer
from mmscale.data.transforms import decode_and_crop
from mmscale.eval.embed import class_embeddings
from mmscale.eval.metrics import read_lines, read_templates
from mmscale.models import DualEncoder, load_model
from mmscale.models.fusion import FusionEncoder

MAX_PIXELS = 89_478_485


def serving_device(model) -> torch.device:
    """Where to run `model`: the GPU where there is one, unless the model runs on the CPU alone (int8-cpu)."""
    return torch.device("cuda" if torch.cuda.is_available() and not model.cpu_only else "cpu")


def read_image(path: str, size: int) -> torch.Tensor:
    """A uint8 [3, size, size] center crop of an image file, or an error naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise FileNotFoundError(f"image {path}: {error.strerror or error}") from error
    try:
        return decode_and_crop(data, Path(path).suffix.lstrip(".").lower(), size=size, max_pixels=MAX_PIXELS)
    except SampleRejected as error:
        raise ValueError(f"image {path}: cannot be read as an image ({error})") from None


def model_and_tokenizer(checkpoint: str) -> tuple[DualEncoder, object]:
    model = load_model(checkpoint, mlm_head=False).eval()
    if model.device.type != "cuda":  # int8 towers place themselves, and the wrapper follows them
        model = model.to(serving_device(model))
    return model, load_tokenizer(checkpoint)


@torch.no_grad()
def embed_command(args) -> int:
    """Embeddings of images (a glob) or texts (a file, one per line) to .npy or .parquet."""
    model, tokenizer = model_and_tokenizer(args.checkpoint)
    device = model.device
    if args.images:
        names = sorted(glob.glob(args.images, recursive=True))
        if not names:
            raise FileNotFoundError(f"--images {args.images}: no file matches")
        chunks = []
        for start in range(0, len(names), args.batch_size):
            batch = torch.stack([read_image(name, model.image_size) for name in names[start:start + args.batch_size]])
            chunks.append(model.encode_images(batch.to(device)).float().cpu())
    else:
        names = read_lines(args.texts, "texts")
        encoder = CaptionEncoder(tokenizer, mlm_probability=0.0, **model.caption_settings(args.context_length))
        chunks = []
        for start in range(0, len(names), args.batch_size):
            encoded = encoder.encode(names[start:start + args.batch_size])
            chunks.append(model.encode_texts(encoded["input_ids"].to(device),
                                             encoded["attention_mask"].to(device)).float().cpu())
    embeddings = torch.nn.functional.normalize(torch.cat(chunks), dim=-1).numpy()
    _write_embeddings(Path(args.out), names, embeddings)
    print(json.dumps({"out": args.out, "count": len(names), "dim": int(embeddings.shape[1])}))
    return 0


def _write_embeddings(path: Path, names: list[str], embeddings: np.ndarray) -> None:
    """L2-normalized embeddings: .npy (rows in input order) or .parquet (a `source` and an `embedding` column)."""
    if path.suffix not in (".npy", ".parquet"):
        raise ValueError(f"--out {path}: write .npy or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        if path.suffix == ".npy":
            np.save(handle, embeddings)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"source": names, "embedding": [row.tolist() for row in embeddings]}), handle)


@torch.no_grad()
def zeroshot_command(args) -> int:
    """The classes of one image, most likely first, with softmax probabilities at the model's scale."""
    model, tokenizer = model_and_tokenizer(args.checkpoint)
    device = model.device
    names = read_lines(args.classnames, "classnames")
    classes = class_embeddings(model, tokenizer, names, read_templates(args.templates), device=device,
                               context_length=args.context_length)
    image = model.encode_images(read_image(args.image, model.image_size)[None].to(device)).float().cpu()
    scores = torch.nn.functional.normalize(image, dim=-1) @ classes.T * float(model.logit_scale())
    probabilities = scores.softmax(dim=-1)[0]
    ranked = probabilities.argsort(descending=True)[: args.top]
    for index in ranked.tolist():
        print(f"{probabilities[index]:7.2%}  {names[index]}")
    print(json.dumps({"label": names[ranked[0]], "probability": float(probabilities[ranked[0]])}))
    return 0


@torch.no_grad()
def match_command(args) -> int:
    """P(match) of one image with each text by a fusion model's ITM head, one line per text in the file's
    order, then one JSON object."""
    model, tokenizer = model_and_tokenizer(args.checkpoint)
    if not isinstance(model, FusionEncoder):
        raise ValueError(f"{args.checkpoint} is a dual encoder ({model.kind}) without an ITM head; matching needs a "
                         "fusion model: train one with model.fusion_layers > 0, or give a BLIP ITM folder")
    texts = read_lines(args.texts, "texts")
    encoder = CaptionEncoder(tokenizer, mlm_probability=0.0, **model.caption_settings(args.context_length))
    tokens = model.image_tokens(read_image(args.image, model.image_size)[None].to(model.device))
    probabilities = []
    for start in range(0, len(texts), args.batch_size):
        encoded = encoder.encode(texts[start:start + args.batch_size])
        logits = model.itm_logits(tokens.expand(len(encoded["input_ids"]), -1, -1),
                                  encoded["input_ids"].to(model.device), encoded["attention_mask"].to(model.device))
        probabilities += logits.float().softmax(dim=-1)[:, 1].tolist()
    for text, probability in zip(texts, probabilities):
        print(f"{probability:.4f}  {text}")
    best = max(range(len(texts)), key=probabilities.__getitem__)
    print(json.dumps({"probabilities": probabilities, "best": texts[best], "best_probability": probabilities[best]}))
    return 0


def export_command(args) -> int:
    """Export (and optionally evaluate before and after), printing the report."""
    if args.format == "onnx":
        return _export_onnx_command(args)
    from mmscale.export.quantize import export

    report = export(args.checkpoint, args.out, quantize=args.quantize,
                    keep_projections=not args.quantize_projections,
                    evaluate_fn=evaluator_on_data(args) if args.data else None)
    print(json.dumps(report))
    return 0


def _export_onnx_command(args) -> int:
    """`--format onnx`: the encoders as ONNX graphs checked with onnxruntime, printing the report."""
    from mmscale.export.onnx import export_onnx

    if args.data:
        raise ValueError("--data evaluates transformers exports; with --format onnx, export_report.json gives the "
                         "graphs' embedding agreement with PyTorch instead (leave --data out)")
    report = export_onnx(args.checkpoint, args.out, quantize=args.quantize,
                         keep_projections=not args.quantize_projections)
    print(json.dumps(report))
    return 0


def evaluator_on_data(args):
    """Zero-shot / retrieval on `--data`, for the float and the exported model alike."""
    from mmscale.data.config import DataConfig
    from mmscale.data.loader import build_loader
    from mmscale.eval.embed import evaluate

    def evaluate_model(model):
        tokenizer = load_tokenizer(args.out)  # export writes the tokenizer there before it evaluates
        data = DataConfig(image_size=model.image_size, **model.caption_settings(args.context_length), workers=0,
                          mlm_probability=0.0)
        loader = build_loader(data, spec=args.data, tokenizer=tokenizer, batch_size=64, train=False,
                              rank=0, world_size=1)
        return evaluate(model, loader, tokenizer=tokenizer, device=model.device,
                        context_length=args.context_length, batch_size=64, classnames=args.classnames,
                        templates=args.templates)

    return evaluate_model
