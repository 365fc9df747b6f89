"""Peak memory of full, LoRA and QLoRA (int8, nf4 base) fine-tuning of a preset, each in a fresh process.

Reports peak resident memory (CPU) or peak allocated device memory (GPU) over a few AdamW steps
of the contrastive objective, fp32 weights (QLoRA: the transformer layers' linear weights in int8 or nf4,
computing in fp32), counted from the built model on (building a QLoRA model holds the float base once).

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
    from mmscale.finetune.qlora import quantize_base
    from mmscale.losses import LossConfig, PretrainingObjective
    from mmscale.models import ModelConfig, build_model
    from mmscale.train.metrics import memory_gib

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(ModelConfig(preset=preset), vocab_size=30522, mlm_head=False)
    trainable = sum(p.numel() for p in model.parameters())
    if mode.startswith("qlora-"):
        quantize_base(model, mode.removeprefix("qlora-"), compute_dtype=torch.float32, device=device)
    if mode != "full":
        trainable, _ = apply_lora(model, LoraSettings(enabled=True, dropout=lora_dropout))
    objective = PretrainingObjective(model, LossConfig(mlm_weight=0.0)).to(device)
    start = _reset_peak_memory(device)
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
    return {"mode": mode, "trainable_parameters": trainable, "model_gib": start} | memory_gib()


def _reset_peak_memory(device) -> float:
    """Start the peak from the built model (QLoRA's float base, freed once quantized, is not training memory);
    returns the memory the model holds now, in GiB (CPU: this process's resident memory)."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**30
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:  # Linux: "5" resets VmHWM to VmRSS
            refs.write("5")
    except OSError:
        print("warning: could not reset the peak RSS (not Linux?): it includes building the model", file=sys.stderr)
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 2**20


MODES = ("full", "lora", "qlora-int8", "qlora-nf4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="PEFT's dropout copies each adapted layer's input")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.preset, args.mode, args.batch, args.steps, args.lora_dropout)))
        return
    rows = []
    for mode in MODES:
        output = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                                 "--steps", str(args.steps), "--lora-dropout", str(args.lora_dropout), "--mode", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
    key = "gpu_memory_gib" if "gpu_memory_gib" in rows[0] else "cpu_rss_gib"
    print(f"{args.preset}, batch {args.batch}, fp32, {args.steps} AdamW steps; peak {key}\n")
    print("| fine-tuning | trainable parameters | model built (GiB) | peak memory (GiB) | vs full |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['trainable_parameters']:,} | {row['model_gib']:.2f} | {row[key]:.2f} | "
              f"{row[key] / rows[0][key]:.2f}x |")
    print(json.dumps({row["mode"]: row[key] for row in rows}))


if __name__ == "__main__":
    main()
