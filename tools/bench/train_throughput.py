"""Training throughput and MFU of a preset: mmscale's DeepSpeed engine per ZeRO stage, with and without
torch.compile and patch dropout, against plain PyTorch, in one process and one run.

Every variant trains the same model on the same synthetic batches (random uint8 images, random
captions with 15% MLM masking, CLIP + masked-LM), so the numbers are the model and engine alone, not
the loader. The baseline is a plain PyTorch loop: autocast, torch AdamW (fused on GPU), no
partitioning. A variant is `plain|zero0|zero1|zero2|zero3`, optionally `+compile` and `+pd<P>`
(patch dropout P; its FLOPs count the patches it keeps).

    python tools/bench/train_throughput.py --preset base --batch auto --peak-tflops 989      # one H100/H200
    python tools/bench/train_throughput.py --preset tiny --batch 32 --steps 5 --variants plain,zero2,zero3

Prints a markdown table; the last line is one JSON object with every variant's samples/s and MFU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mmscale.data.text import IGNORE_INDEX, masked_positions  # noqa: E402
from mmscale.losses import LossConfig, PretrainingObjective  # noqa: E402
from mmscale.models import ModelConfig, build_model, training_flops_per_sample  # noqa: E402
from mmscale.train.config import TrainConfig  # noqa: E402
from mmscale.train.engine import (  # noqa: E402
    batch_layout,
    build_objective,
    deepspeed_config,
    init_distributed,
    make_optimizer,
    parameter_groups,
)
from mmscale.train.precision import resolve_precision  # noqa: E402

VOCAB, CONTEXT, MASKED = 30522, 64, 0.15
DEFAULT_VARIANTS = "plain,plain+compile,zero1,zero2,zero3,zero1+compile,zero3+compile,zero1+pd0.5,zero3+pd0.5"


@dataclass(frozen=True)
class Variant:
    engine: str
    """plain, or zeroN (N = 0..3): DeepSpeed with configs/deepspeed/zeroN.json."""
    compile: bool = False
    patch_dropout: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Variant:
        engine, *options = text.split("+")
        if engine != "plain" and engine not in {f"zero{stage}" for stage in range(4)}:
            raise SystemExit(f"unknown variant {text!r}: start with plain or zero0..zero3")
        variant = cls(engine)
        for option in options:
            if option == "compile":
                variant = replace(variant, compile=True)
            elif option.startswith("pd"):
                variant = replace(variant, patch_dropout=float(option[2:]))
            else:
                raise SystemExit(f"unknown option {option!r} in variant {text!r} (compile, pd<P>)")
        return variant

    def __str__(self) -> str:
        return self.engine + "+compile" * self.compile + (f"+pd{self.patch_dropout:g}" if self.patch_dropout else "")


def synthetic_batch(batch: int, image_size: int, device: torch.device, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, VOCAB, (batch, CONTEXT), generator=generator)
    masked = torch.rand(batch, CONTEXT, generator=generator) < MASKED
    positions, targets = masked_positions(torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX)))
    return {name: tensor.to(device) for name, tensor in {
        "images": torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=generator),
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "mlm_input_ids": torch.where(masked, torch.full_like(input_ids, 103), input_ids),
        "mlm_positions": positions, "mlm_targets": targets,
    }.items()}


def timed(step, batches: list[dict], warmup: int) -> float:
    """Seconds per step over the batches after `warmup` steps."""
    for batch in batches[:warmup]:
        step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def profile_step(step, batch: dict, path: Path, rows: int = 20) -> list[dict]:
    """One more step under torch.profiler: its Chrome trace at `path` (.json) and the `rows` operators with the
    most host time, with their call counts (per-parameter host work shows as counts in the hundreds)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(path))
    events = sorted(profiler.key_averages(), key=lambda event: -event.self_cpu_time_total)[:rows]
    return [{"op": event.key, "calls": event.count, "self_cpu_ms": round(event.self_cpu_time_total / 1e3, 3),
             "device_ms": round(getattr(event, "self_device_time_total", 0) / 1e3, 3)} for event in events]


def plain_step(model_config: ModelConfig, variant: Variant, device: torch.device, precision: str):
    """(step function, model) of the plain PyTorch loop."""
    objective = PretrainingObjective(build_model(model_config, vocab_size=VOCAB), LossConfig()).to(device)
    if variant.compile:
        objective.compile()
    optimizer = torch.optim.AdamW(parameter_groups(objective, 0.2), lr=1e-4, fused=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(batch):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = objective(**batch).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, objective.model


def deepspeed_step(model_config: ModelConfig, variant: Variant, batch: int, precision: str):
    """(step function, model) of mmscale's engine under the variant's ZeRO stage."""
    import deepspeed

    train = TrainConfig(global_batch_size=batch, precision=precision,
                        deepspeed=str(REPO / "configs" / "deepspeed" / f"{variant.engine}.json"))
    ds_config, _ = deepspeed_config(train, batch_layout(train, 1))
    objective = build_objective(model_config, LossConfig(), ds_config, vocab_size=VOCAB)
    optimizer = make_optimizer(parameter_groups(objective, 0.2), train, ds_config)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds_config)
    if variant.compile:
        engine.compile()

    def step(batch):
        engine.backward(engine(**batch).total)
        engine.step()

    return step, objective.model


def measure(variant: Variant, model_config: ModelConfig, batches: list[dict], warmup: int, device: torch.device,
            precision: str, profile_dir: Path | None = None) -> tuple[float, float, list | None]:
    """(seconds per step, training FLOPs per sample, the profiled step's top operators or None) of one variant;
    frees its model afterwards."""
    config = replace(model_config, patch_dropout=variant.patch_dropout)
    torch.manual_seed(0)
    size = len(batches[0]["images"])
    step, model = (plain_step(config, variant, device, precision) if variant.engine == "plain"
                   else deepspeed_step(config, variant, size, precision))
    seconds = timed(step, batches, warmup)
    profiled = profile_step(step, batches[-1], profile_dir / f"{variant}.json") if profile_dir else None
    flops = training_flops_per_sample(model, context_length=CONTEXT, masked_tokens=MASKED * CONTEXT,
                                      contrastive_batch_size=size)
    del step, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return seconds, flops, profiled


def largest_batch(model_config: ModelConfig, device: torch.device, precision: str, candidates: list[int]) -> int:
    """The largest candidate batch with which a plain PyTorch step fits in device memory (the ZeRO stages
    hold at most as much per device on one GPU), with one candidate of margin."""
    fitting = None
    step, _ = plain_step(model_config, Variant("plain"), device, precision)
    image_size = model_config.sizes().image_size
    for size in sorted(candidates):
        try:
            step(synthetic_batch(size, image_size, device, 0))
            torch.cuda.synchronize()
            fitting = size
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    del step
    gc.collect()
    torch.cuda.empty_cache()
    fits = [size for size in sorted(candidates) if fitting is not None and size <= fitting]
    if not fits:
        raise SystemExit(f"no batch of {candidates} fits on this device")
    return fits[-2] if len(fits) > 1 else fits[-1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", default="128", help="samples per step, or `auto`: the largest that fits (GPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after the warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps (compilation happens here)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated; see the module docstring")
    parser.add_argument("--precision", default="auto", help="bf16, fp16, fp32 or auto (bf16 on GPUs)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak dense bf16 TFLOP/s (H100/H200: 989)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", type=Path, help="profile one more step per variant: Chrome traces in this "
                        "folder, the top host operators in the results")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    variants = [Variant.parse(text) for text in args.variants.split(",") if text]
    init_distributed()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(args.precision)[0]
    model_config = ModelConfig(preset=args.preset, vocab_size=VOCAB)
    if args.batch == "auto":
        if device.type != "cuda":
            raise SystemExit("--batch auto needs a GPU; give a number")
        size = largest_batch(model_config, device, precision, [32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024])
    else:
        size = int(args.batch)
    image_size = model_config.sizes().image_size
    batches = [synthetic_batch(size, image_size, device, seed) for seed in range(args.warmup + args.steps)]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    results = {}
    for variant in variants:
        seconds, flops, profiled = measure(variant, model_config, batches, args.warmup, device, precision,
                                           args.profile)
        samples = size / seconds
        results[str(variant)] = {"samples_per_s": round(samples, 2), "tflops": round(samples * flops / 1e12, 2),
                                 "mfu": round(samples * flops / 1e12 / args.peak_tflops, 4),
                                 "gflop_per_sample": round(flops / 1e9, 2)}
        if profiled is not None:
            results[str(variant)]["top_host_ops"] = profiled
        print(f"{variant}: {samples:.1f} samples/s", flush=True)
    baseline = results.get("plain", next(iter(results.values())))["samples_per_s"]
    print(f"\n{args.preset}, batch {size}, {precision}, one {name}; peak {args.peak_tflops:g} TFLOP/s\n")
    print("| variant | samples/s | GFLOP/sample | TFLOP/s | MFU | vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in results.items():
        print(f"| {label} | {row['samples_per_s']:.1f} | {row['gflop_per_sample']:.1f} | {row['tflops']:.1f} | "
              f"{row['mfu']:.1%} | {row['samples_per_s'] / baseline:.2f}x |")
    summary = {"preset": args.preset, "batch": size, "precision": precision, "device": name, "variants": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
