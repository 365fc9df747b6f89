#!/usr/bin/env python3
"""Loader throughput: the mmscale loader against open_clip's PIL pipeline, same shards, one run.

    python tools/bench/loader.py [--data SPEC] [--tokenizer DIR] [--samples N]

Without --data it writes photo-like JPEG shards (320-512 px, about 38 KB each) to a
temporary folder. Both pipelines read the same tars once per measurement and produce
batches of 224-px images plus token ids, in one process on one thread:
- baseline (open_clip's way): webdataset -> PIL decode -> RandomResizedCrop(224, bicubic)
  -> ToTensor -> Normalize, captions tokenized per batch with the same tokenizer;
- like for like: the same PIL path with bilinear resampling and uint8 out (PILToTensor), which is
  what mmscale's loader delivers (it normalizes on the device), so its ratio is the loader's own gain;
- mmscale: `build_loader` with data.workers=0 (uint8 images, tokens and MLM masks).
Then the mmscale loader with 1, 2 and 4 dataloader workers, and for reference bare PIL
decoding of the same tars (no crop, no batching). Prints a table and, last, one
JSON line with the one-thread numbers and their ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmscale.data.config import DataConfig  # noqa: E402
from mmscale.data.loader import UnusableData, build_loader  # noqa: E402
from mmscale.data.tars import ShardError, spec_urls, tar_member, write_json_atomically  # noqa: E402
from mmscale.data.text import CaptionEncoder, load_tokenizer  # noqa: E402

BATCH_SIZE = 64
SUBJECTS = "dog cat car tree house boat bird flower mountain street beach bicycle".split()
PLACES = "in a park|on a beach|at night|in the snow|next to a river|in a city|under a blue sky".split("|")


def photo_like_jpeg(rng: np.random.Generator) -> bytes:
    """A JPEG with photo statistics: smooth structure, edges and sensor-like noise."""
    from PIL import Image, ImageFilter

    width, height = (int(v) for v in rng.integers(320, 513, size=2))
    field = rng.normal(size=(height // 24 + 2, width // 24 + 2, 3))
    field = ((field - field.min()) / np.ptp(field) * 255).astype(np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image).astype(np.float32) + rng.normal(scale=13, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=87)
    return buffer.getvalue()


def write_photo_shards(folder: Path, *, samples: int, per_shard: int = 250) -> str:
    """Photo-like shards with captions and sizes.json; returns their spec."""
    rng = np.random.default_rng(0)
    sizes, names = {}, []
    for shard_index, start in enumerate(range(0, samples, per_shard)):
        name = f"photo-{shard_index:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for index in range(start, min(start + per_shard, samples)):
                caption = f"a photo of a {rng.choice(SUBJECTS)} {rng.choice(PLACES)}"
                tar.addfile(*tar_member(f"{index:09d}.jpg", photo_like_jpeg(rng)))
                tar.addfile(*tar_member(f"{index:09d}.txt", caption.encode()))
        sizes[name] = min(start + per_shard, samples) - start
        names.append(name)
    write_json_atomically(folder / "sizes.json", sizes)
    return f"{folder}/photo-{{000000..{len(names) - 1:06d}}}.tar"


def pil_pipeline(spec: str, encoder: CaptionEncoder):
    """open_clip's training data path, batches of normalized float images plus token ids."""
    from torchvision import transforms

    return _webdataset_batches(spec, encoder, transforms.Compose([
        transforms.RandomResizedCrop(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ]))


def pil_uint8_pipeline(spec: str, encoder: CaptionEncoder):
    """Like for like with mmscale's loader: the same PIL path, but bilinear resampling and uint8 images out
    (normalized later, on the device), so the ratio shows the loader's own gain, not the float conversion's."""
    from torchvision import transforms

    return _webdataset_batches(spec, encoder, transforms.Compose([
        transforms.RandomResizedCrop(224, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.PILToTensor(),
    ]))


def _webdataset_batches(spec: str, encoder: CaptionEncoder, preprocess):
    """webdataset -> PIL decode -> `preprocess` -> batches, captions tokenized per batch."""
    import webdataset as wds

    skip = wds.ignore_and_continue  # open_clip's loader logs and goes on past a bad sample
    dataset = (wds.WebDataset(spec_urls(spec), shardshuffle=False, empty_check=False, handler=skip)
               .decode("pilrgb", handler=skip).to_tuple("jpg;png;jpeg;webp", "txt", handler=skip)
               .map_tuple(preprocess, lambda text: text, handler=skip)
               .batched(BATCH_SIZE, partial=True))
    for images, captions in dataset:
        yield {"images": images, **encoder.encode(list(captions))}


def bare_decode(spec: str):
    """Reading the tars and decoding each JPEG with PIL, nothing else: the calibration row. A sample
    without an image or with one PIL cannot decode (a truncated JPEG) is passed over, as both loaders do."""
    from PIL import Image

    from mmscale.data.tars import iter_raw_samples, sample_image_bytes

    for url in spec_urls(spec):
        for raw in iter_raw_samples(url):
            found = sample_image_bytes(raw)
            try:
                image = Image.open(io.BytesIO(found[1])).convert("RGB") if found else None
            except (OSError, ValueError, Image.DecompressionBombError):
                image = None
            if image is not None:
                yield {"images": [image]}


def mmscale_loader(spec: str, tokenizer, workers: int):
    """The mmscale training loader with the baseline's crop range and no shuffle buffer."""
    config = DataConfig(workers=workers, image_size=224, crop_scale=(0.08, 1.0), shuffle_buffer=0, context_length=64)
    return build_loader(config, spec=spec, tokenizer=tokenizer, batch_size=BATCH_SIZE, train=True, epochs=1)


class RowSkipped(Exception):
    """A row this data cannot run, with the reason printed in its place."""


def measure(batches) -> tuple[float, int]:
    """Steady-state samples/s, timed from the first batch (worker start-up is not counted); data of one
    batch is timed from the start."""
    opened = time.perf_counter()
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise RowSkipped(f"the data holds fewer good samples than one batch of {BATCH_SIZE}")
    delivered = len(first["images"])
    start, timed = time.perf_counter(), 0
    for batch in iterator:
        timed += len(batch["images"])
    if not timed:
        return delivered / (time.perf_counter() - opened), delivered
    return timed / (time.perf_counter() - start), delivered + timed


def best_of(repeats: int, *makers) -> list[tuple[float, int] | str]:
    """Best samples/s of each pipeline over `repeats` rounds; rounds alternate between the
    pipelines, so a slow spell on a shared machine hits them alike. A pipeline that cannot run
    on this data gives the reason instead (the others go on)."""
    results: list[list | str] = [[] for _ in makers]
    for _ in range(repeats):
        for index, make in enumerate(makers):
            if isinstance(results[index], str):
                continue
            try:
                results[index].append(measure(make()))
            except (RowSkipped, ValueError, UnusableData, ShardError) as error:
                results[index] = str(error)
    return [result if isinstance(result, str) else (max(rate for rate, _ in result), result[-1][1])
            for result in results]


def tokenizer_for(spec: str, folder: Path):
    from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece

    train_wordpiece(iter_captions(spec), vocab_size=2000, output_dir=folder)
    return load_tokenizer(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="shard spec to read; default: generate photo-like shards")
    parser.add_argument("--tokenizer", help="HF tokenizer folder; default: train one on the captions")
    parser.add_argument("--samples", type=int, default=2000, help="samples to generate without --data")
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement (best is kept)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts for the scaling rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")  # 4 workers on 2 cores is the point
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        spec = args.data or write_photo_shards(scratch, samples=args.samples)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else tokenizer_for(spec, scratch / "tokenizer")
        encoder = CaptionEncoder(tokenizer, context_length=64, mlm_probability=0.0)
        loaders = []

        def ours():
            loaders.append(mmscale_loader(spec, tokenizer, 0))
            return loaders[-1]

        bare, pil, pil_uint8, ours_result = best_of(
            args.repeats, lambda: bare_decode(spec), lambda: pil_pipeline(spec, encoder),
            lambda: pil_uint8_pipeline(spec, encoder), ours)
        skipped = dict(loaders[-1].skipped) if loaders else {}
        rows = [("bare PIL decode (reference)", "1 thread", bare), ("PIL pipeline (open_clip)", "1 thread", pil),
                ("PIL, bilinear, uint8 out", "1 thread", pil_uint8), ("mmscale loader", "1 thread", ours_result)]
        for workers in (int(w) for w in args.workers.split(",")):
            [result] = best_of(args.repeats, lambda workers=workers: mmscale_loader(spec, tokenizer, workers))
            rows.append(("mmscale loader", f"{workers} workers", result))
    print(f"\n{'pipeline':28s} {'processes':>10s} {'samples/s':>10s} {'vs PIL':>7s} {'vs like':>7s} {'samples':>8s}")
    for name, processes, result in rows:
        if isinstance(result, str):
            print(f"{name:28s} {processes:>10s} skipped: {result}")
            continue
        rate, count = result
        ours_row = name.startswith("mmscale")
        versus = f"{rate / pil[0]:6.2f}x" if ours_row and not isinstance(pil, str) else ""
        like = f"{rate / pil_uint8[0]:6.2f}x" if ours_row and not isinstance(pil_uint8, str) else ""
        print(f"{name:28s} {processes:>10s} {rate:10.1f} {versus:>7s} {like:>7s} {count:8d}")
    print(f"({os.cpu_count()} cores; 224-px images, batch {BATCH_SIZE}; samples/s timed from the first batch; 'vs PIL': "
          "against open_clip's pipeline (bicubic, float normalized on the CPU); 'vs like': against the same PIL path "
          "with bilinear resampling and uint8 out, what mmscale itself delivers)")
    measured = not isinstance(ours_result, str) and not isinstance(pil, str)
    print(json.dumps({"mmscale_samples_per_s": round(ours_result[0], 1) if measured else None,
                      "pil_samples_per_s": round(pil[0], 1) if not isinstance(pil, str) else None,
                      "ratio": round(ours_result[0] / pil[0], 3) if measured else None,
                      "pil_uint8_samples_per_s": round(pil_uint8[0], 1) if not isinstance(pil_uint8, str) else None,
                      "ratio_like_for_like": round(ours_result[0] / pil_uint8[0], 3)
                      if measured and not isinstance(pil_uint8, str) else None,
                      "delivered": ours_result[1] if not isinstance(ours_result, str) else 0, "skipped": skipped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
