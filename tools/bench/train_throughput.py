"""Training throughput and MFU of a preset: DeepSpeed ZeRO-3 (mmscale's engine) against plain PyTorch.

Both train the same model on the same synthetic batches (random uint8 images, random captions
with 15% MLM masking) in one process, so the numbers are the model and engine alone, not the
loader. The baseline is a plain PyTorch loop: bf16 autocast, torch AdamW (fused on GPU), no
partitioning; ZeRO-3 pays for partitioning with gathers, which this table prices.

    python tools/bench/train_throughput.py --preset base --batch 128 --peak-tflops 989   # one H100 SXM
    python tools/bench/train_throughput.py --preset tiny --batch 32 --steps 5             # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mmscale.data.text import IGNORE_INDEX  # noqa: E402
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

VOCAB, CONTEXT = 30522, 64


def synthetic_batch(batch: int, image_size: int, device: torch.device, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, VOCAB, (batch, CONTEXT), generator=generator)
    masked = torch.rand(batch, CONTEXT, generator=generator) < 0.15
    return {name: tensor.to(device) for name, tensor in {
        "images": torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=generator),
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "mlm_input_ids": torch.where(masked, torch.full_like(input_ids, 103), input_ids),
        "mlm_labels": torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
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


def plain_pytorch(model_config: ModelConfig, batches: list[dict], warmup: int, device: torch.device) -> float:
    objective = PretrainingObjective(build_model(model_config, vocab_size=VOCAB), LossConfig()).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(objective, 0.2), lr=1e-4, fused=device.type == "cuda")

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = objective(**batch).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, batches, warmup)


def zero3(model_config: ModelConfig, batches: list[dict], warmup: int, deepspeed_file: str) -> tuple[float, object]:
    import deepspeed

    train = TrainConfig(global_batch_size=len(batches[0]["images"]), precision="bf16", deepspeed=deepspeed_file)
    ds_config, _ = deepspeed_config(train, batch_layout(train, 1))
    objective = build_objective(model_config, LossConfig(), ds_config, vocab_size=VOCAB)
    optimizer = make_optimizer(parameter_groups(objective, 0.2), train, ds_config)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds_config)

    def step(batch):
        engine.backward(engine(**batch).total)
        engine.step()

    return timed(step, batches, warmup), objective.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=128, help="samples per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after the warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak dense bf16 TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--deepspeed", default="configs/deepspeed/zero3.json")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    init_distributed()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_config = ModelConfig(preset=args.preset, vocab_size=VOCAB)
    image_size = model_config.sizes().image_size
    batches = [synthetic_batch(args.batch, image_size, device, seed) for seed in range(args.warmup + args.steps)]
    torch.manual_seed(0)
    baseline = plain_pytorch(model_config, batches, args.warmup, device)
    ours, model = zero3(model_config, batches, args.warmup, args.deepspeed)
    flops = training_flops_per_sample(model, context_length=CONTEXT, masked_tokens=0.15 * CONTEXT,
                                      contrastive_batch_size=args.batch)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.preset}, batch {args.batch}, bf16, one {name}; {flops / 1e9:.1f} GFLOP per sample (fwd+bwd)\n")
    print("| pipeline | samples/s | TFLOP/s | MFU | vs plain |")
    print("|---|---:|---:|---:|---:|")
    rows = {}
    for label, seconds in (("plain PyTorch (bf16 autocast, AdamW)", baseline), ("mmscale ZeRO-3 (bf16)", ours)):
        samples_per_second = args.batch / seconds
        tflops = samples_per_second * flops / 1e12
        rows[label] = samples_per_second
        print(f"| {label} | {samples_per_second:.1f} | {tflops:.1f} | {tflops / args.peak_tflops:.1%} | "
              f"{samples_per_second * baseline / args.batch:.2f}x |")
    print(json.dumps({"preset": args.preset, "batch": args.batch, "device": name,
                      "zero3_samples_per_s": round(args.batch / ours, 2),
                      "plain_samples_per_s": round(args.batch / baseline, 2),
                      "zero3_mfu": round(args.batch / ours * flops / 1e12 / args.peak_tflops, 4)}))


if __name__ == "__main__":
    main()
