"""Compressed exports against the fp32 model on this CPU: bytes, images/s, texts/s and embedding cosine of
`mmscale export --quantize none | int8 | int8-cpu | nf4`, all measured in one run.

A new model of the preset (random weights: speed and bytes do not depend on training) with BERT's 30,522-token
embedding table is saved, exported each way, and every folder is read back with `mmscale.models.load_model`, as
`mmscale embed` reads it. Throughput: one batch of generated images and of captions padded to 64 tokens, the
models taking turns within each round so that other load on the machine falls on all of them alike, the fastest
round per model (the one least disturbed by other jobs on shared cores). Cosines are the export report's (float
against exported, 32 generated pairs). Then `mmscale embed --images` is timed, whole command, on the fp32 folder
and on the int8-cpu folder.

    python tools/bench/compress.py --preset base
    python tools/bench/compress.py --preset tiny --rounds 2 --embed-images 8     # a quick look
    python tools/bench/compress.py --preset base --threads 1                    # one core
    python tools/bench/compress.py --preset base --isa avx2                     # as on an AVX2-only CPU

`--isa avx2` keeps every kernel library of the process (and of the `mmscale embed` it starts) to AVX2 on a newer
CPU: ATen (ATEN_CPU_CAPABILITY), fbgemm (FBGEMM_ENABLE_INSTRUCTIONS), oneDNN (ONEDNN_MAX_CPU_ISA) and MKL
(MKL_ENABLE_INSTRUCTIONS), fp32 and int8 alike: the code an AVX2-only CPU runs (no AVX-512, no VNNI: int8 products
go through the 16-bit pair sums of vpmaddubsw), on this CPU's caches and clock.

The last line is one JSON object: {"cpu", "threads", "preset", "rows": {export: {"bytes", "bytes_ratio",
"images_per_second", "images_speedup", "texts_per_second", "texts_speedup", "image_cosine_min",
"text_cosine_min"}}, "nf4_bytes_by_part", "embed_seconds": {"fp32", "int8-cpu"}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

REPO = Path(__file__).resolve().parents[2]
EXPORTS = ("none", "int8", "int8-cpu", "nf4")
# The variables that keep each CPU kernel library to AVX2 (read when the library loads: set before torch imports).
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_description() -> str:
    """The CPU's model name and the vector/matrix extensions int8 kernels use."""
    model, flags = "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
    described = f"{model} ({', '.join(flag for flag in wanted if flag in flags) or 'no AVX2'})"
    if all(os.environ.get(name) == value for name, value in AVX2_ONLY.items()):
        described += ", kernels kept to AVX2 (--isa avx2)"
    return described


def make_model(folder: Path, preset: str) -> None:
    import random

    import torch

    from mmscale.models import ModelConfig, build_model
    from mmscale.shards.synthetic import draw_sample
    from mmscale.shards.tokenizer_train import train_wordpiece

    rng = random.Random(0)
    captions = [draw_sample(rng)[1] for _ in range(500)]
    tokenizer = train_wordpiece(captions, vocab_size=1000, output_dir=folder.parent / "tokenizer")
    torch.manual_seed(0)
    build_model(ModelConfig(preset=preset), mlm_head=False).save(folder, tokenizer=tokenizer)  # the preset's vocabulary


def best_rates(models: dict, images, texts, rounds: int) -> dict[str, dict[str, float]]:
    """Images/s and texts/s of each model: a warm-up pass each, then `rounds` rounds in which every model runs one
    timed pass of each kind in turn; the fastest round."""
    import torch

    seconds = {name: {"images": [], "texts": []} for name in models}
    passes = {name: {"images": (lambda model=model: model.encode_images(images)),
                     "texts": (lambda model=model: model.encode_texts(texts["input_ids"], texts["attention_mask"]))}
              for name, model in models.items()}
    with torch.no_grad():
        for name in models:
            passes[name]["images"](), passes[name]["texts"]()
        for _ in range(rounds):
            for name in models:
                for kind, run in passes[name].items():
                    start = time.perf_counter()
                    run()
                    seconds[name][kind].append(time.perf_counter() - start)
    count = len(images)
    return {name: {f"{kind}_per_second": count / min(times[kind]) for kind in ("images", "texts")}
            for name, times in seconds.items()}


def nf4_bytes_by_part(folder: Path, head_names: tuple[str, ...]) -> dict[str, int]:
    """Bytes of the nf4 folder's weights: 4-bit layers (with their block scales), embedding tables, projections
    (kept fp16), the rest (norms, biases, temperature)."""
    from safetensors import safe_open

    parts = {"4-bit layers": 0, "embeddings": 0, "projections": 0, "other": 0}
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
        for name in sorted(names):
            tensor = handle.get_tensor(name)
            size = tensor.numel() * tensor.element_size()
            layer = name.split(".weight")[0]
            if any(name.startswith(head + ".") for head in head_names):
                parts["projections"] += size
            elif "embedding" in name:
                parts["embeddings"] += size
            elif not tensor.dtype.is_floating_point or f"{layer}.weight.absmax" in names:
                parts["4-bit layers"] += size
            else:
                parts["other"] += size
    return parts


def time_embed(folder: Path, images: str, out: Path, threads: int) -> float:
    """Seconds of `mmscale embed --images` on `folder`, the whole command (process start and loading included)."""
    environment = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmscale.cli", "embed", "--checkpoint", str(folder), "--images", images,
                    "--out", str(out)], cwd=REPO, env=environment, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def embed_seconds(root: Path, count: int, image_size: int, threads: int) -> dict[str, float]:
    """`mmscale embed` of `count` images on the fp32 and the int8-cpu folder, twice each in turn, the faster."""
    from mmscale.shards.synthetic import make_image_folder

    make_image_folder(root / "images", count, size=image_size, seed=1)
    seconds: dict[str, float] = {}
    for name in ("fp32", "int8-cpu") * 2:
        taken = time_embed(root / name, str(root / "images" / "*.jpg"), root / f"{name}.npy", threads)
        seconds[name] = min(taken, seconds.get(name, taken))
    return seconds


def measure(args, root: Path) -> dict:
    """Build, export and time (see the module docstring), working in `root`; the numbers of the last line."""
    from mmscale.data.text import load_tokenizer
    from mmscale.export.quantize import export, sample_inputs
    from mmscale.models import load_model

    make_model(root / "fp32", args.preset)
    reports = {"fp32": {"image_cosine_min": 1.0, "text_cosine_min": 1.0}}
    for quantize in EXPORTS:
        started = time.perf_counter()
        # The report's own throughput (a few images) is not used here: the rounds below measure every model alike.
        reports[quantize] = export(str(root / "fp32"), str(root / quantize), quantize=quantize, throughput_batch=4)
        print(f"exported {quantize} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    reports["fp32"]["bytes_exported"] = reports["none"]["bytes_float32"]
    models = {name: load_model(root / name, mlm_head=False).eval() for name in ("fp32", *EXPORTS)}
    images, texts = sample_inputs(models["fp32"], load_tokenizer(root / "fp32"), count=args.batch, context_length=64)
    rates = best_rates(models, images, texts, args.rounds)
    rows = {}
    for name, report in reports.items():
        rows[name] = {"bytes": report["bytes_exported"], "bytes_ratio": report["bytes_exported"] /
                      reports["fp32"]["bytes_exported"], **rates[name],
                      "images_speedup": rates[name]["images_per_second"] / rates["fp32"]["images_per_second"],
                      "texts_speedup": rates[name]["texts_per_second"] / rates["fp32"]["texts_per_second"],
                      "image_cosine_min": report["image_cosine_min"], "text_cosine_min": report["text_cosine_min"]}
    embed = embed_seconds(root, args.embed_images, models["fp32"].image_size, args.threads) if args.embed_images else {}
    return {"rows": rows, "nf4_bytes_by_part": nf4_bytes_by_part(root / "nf4", models["fp32"].head_names),
            "embed_seconds": embed}


def print_results(args, results: dict, threads: int) -> None:
    print(f"{args.preset}, {cpu_description()}, {threads} torch threads, batch {args.batch}, "
          f"fastest of {args.rounds} rounds\n")
    print("| export | bytes (MB) | vs fp32 | images/s | vs fp32 | texts/s | vs fp32 | cosine min (image, text) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in results["rows"].items():
        print(f"| {name} | {row['bytes'] / 1e6:.1f} | {row['bytes_ratio']:.3f}x | {row['images_per_second']:.1f} | "
              f"{row['images_speedup']:.2f}x | {row['texts_per_second']:.1f} | {row['texts_speedup']:.2f}x | "
              f"{row['image_cosine_min']:.4f}, {row['text_cosine_min']:.4f} |")
    parts = results["nf4_bytes_by_part"]
    total = sum(parts.values())
    print("\nnf4 weights by part: " + ", ".join(f"{part} {size / 1e6:.1f} MB ({size / total:.0%})"
                                                for part, size in parts.items()))
    if results["embed_seconds"]:
        fp32, int8 = results["embed_seconds"]["fp32"], results["embed_seconds"]["int8-cpu"]
        print(f"`mmscale embed --images` of {args.embed_images} images, whole command: fp32 {fp32:.1f} s, "
              f"int8-cpu {int8:.1f} s ({fp32 / int8:.2f}x)")
    print(json.dumps({"cpu": cpu_description(), "threads": threads, "preset": args.preset} | results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=16, help="images (and captions) per timed pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--embed-images", type=int, default=128, help="images `mmscale embed` embeds (0: skip it)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: run every kernel library as on an AVX2-only CPU (see above)")
    args = parser.parse_args()
    if args.isa == "avx2" and "torch" not in sys.modules:
        os.environ.update(AVX2_ONLY)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mmscale-compress-") as workdir:
        results = measure(args, Path(workdir))
    print_results(args, results, torch.get_num_threads())


if __name__ == "__main__":
    main()
