"""Peak memory of LoRA vs full fine-tuning of a preset, each in a fresh process (same batches).

Reports peak resident memory (CPU) or peak allocated device memory (GPU) over a few AdamW steps
of the contrastive objective, fp32 weights.

    python tools/bench/finetune_memory.py --preset base --batch 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def measure(preset: str, mode: str, batch: int, steps: int, lora_dropout: float) -> dict:
    import torch

    from mmscale.finetune.lora import LoraSettings, apply_lora
    from mmscale.losses import LossConfig, PretrainingObjective
    from mmscale.models import ModelConfig, build_model
    from mmscale.train.metrics import memory_gib

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(ModelConfig(preset=preset), vocab_size=30522, mlm_head=False)
    trainable = sum(p.numel() for p in model.parameters())
    if mode == "lora":
        trainable, _ = apply_lora(model, LoraSettings(enabled=True, dropout=lora_dropout))
    objective = PretrainingObjective(model, LossConfig(mlm_weight=0.0)).to(device)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(1000, 30522, (batch, 64), generator=generator)
        images = torch.randint(0, 256, (batch, 3, model.image_size, model.image_size), dtype=torch.uint8,
                               generator=generator)
        loss = objective(images.to(device), ids.to(device), torch.ones_like(ids).to(device)).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"mode": mode, "trainable_parameters": trainable} | memory_gib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="PEFT's dropout copies each adapted layer's input")
    parser.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.preset, args.mode, args.batch, args.steps, args.lora_dropout)))
        return
    rows = []
    for mode in ("full", "lora"):
        output = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                                 "--steps", str(args.steps), "--lora-dropout", str(args.lora_dropout), "--mode", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
    key = "gpu_memory_gib" if "gpu_memory_gib" in rows[0] else "cpu_rss_gib"
    print(f"{args.preset}, batch {args.batch}, fp32, {args.steps} AdamW steps; peak {key}\n")
    print("| fine-tuning | trainable parameters | peak memory (GiB) | vs full |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['trainable_parameters']:,} | {row[key]:.2f} | {row[key] / rows[0][key]:.2f}x |")
    print(json.dumps({row["mode"]: row[key] for row in rows}))


if __name__ == "__main__":
    main()
