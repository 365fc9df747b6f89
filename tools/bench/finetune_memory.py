"""Peak memory of full, LoRA and QLoRA (int8, nf4 base) fine-tuning of a preset, each in a fresh process.

Reports peak resident memory (CPU) or peak allocated device memory (GPU) over a few AdamW steps
of the contrastive objective, fp32 weights (QLoRA: the transformer layers' linear weights in int8 or nf4,
computing in fp32), counted from the built model on (building a QLoRA model holds the float base once).

    python tools/bench/finetune_memory.py --preset base --batch 16
    python tools/bench/finetune_memory.py --architecture siglip --preset large --modes full lora

`--architecture clip` / `siglip` measures a transformers `CLIPModel` / `SiglipModel` of the released models' sizes
(random weights): `base` is CLIP ViT-B/16 (224 px; text 512 wide, 77 tokens) / SigLIP base-patch16-224 (text 768
wide, 64 tokens), `large` CLIP ViT-L/14 / SigLIP large-patch16-256; `mmscale` (the default) builds the preset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _vit(width: int, layers: int, heads: int, image: int, patch: int) -> dict:
    return {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": 4 * width, "image_size": image, "patch_size": patch}


def _text(width: int, layers: int, heads: int, vocab: int, positions: int) -> dict:
    return {"hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": 4 * width, "vocab_size": vocab, "max_position_embeddings": positions}


# (vision, text, projection) of the released checkpoints of each class and size.
RELEASED = {
    ("clip", "tiny"): (_vit(128, 4, 4, 64, 8), _text(128, 4, 4, 1000, 32), 128),  # for the tests
    ("siglip", "tiny"): (_vit(128, 4, 4, 64, 8), _text(128, 4, 4, 1000, 32), 128),
    ("clip", "base"): (_vit(768, 12, 12, 224, 16), _text(512, 12, 8, 49408, 77), 512),
    ("clip", "large"): (_vit(1024, 24, 16, 224, 14), _text(768, 12, 12, 49408, 77), 768),
    ("siglip", "base"): (_vit(768, 12, 12, 224, 16), _text(768, 12, 12, 32000, 64), 768),
    ("siglip", "large"): (_vit(1024, 24, 16, 256, 16), _text(1024, 24, 16, 32000, 64), 1024),
}


def build(architecture: str, preset: str):
    """The model to fine-tune, and the (vocabulary, caption length) its captions take."""
    from mmscale.models import ModelConfig, build_model

    if architecture == "mmscale":
        return build_model(ModelConfig(preset=preset), vocab_size=30522, mlm_head=False), (30522, 64)
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from mmscale.models.dual_encoder import dual_encoder

    vision, text, projection = RELEASED[architecture, preset]
    if architecture == "clip":
        towers = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection))
    else:
        towers = SiglipModel(SiglipConfig(vision_config=vision, text_config=text | {"projection_size": projection}))
    return dual_encoder(towers, mlm_head=False), (text["vocab_size"], text["max_position_embeddings"])


def measure(architecture: str, preset: str, mode: str, batch: int, steps: int, lora_dropout: float) -> dict:
    import torch

    from mmscale.finetune.lora import LoraSettings, apply_lora
    from mmscale.finetune.qlora import quantize_base
    from mmscale.losses import LossConfig, PretrainingObjective
    from mmscale.train.metrics import memory_gib

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, (vocab, length) = build(architecture, preset)
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
        ids = torch.randint(vocab // 30, vocab, (batch, length), generator=generator)
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
    parser.add_argument("--architecture", choices=["mmscale", "clip", "siglip"], default="mmscale")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="PEFT's dropout copies each adapted layer's input")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.architecture != "mmscale" and (args.architecture, args.preset) not in RELEASED:
        parser.error(f"--architecture {args.architecture} has the sizes tiny, base and large, not {args.preset}")
    if args.mode:
        print(json.dumps(measure(args.architecture, args.preset, args.mode, args.batch, args.steps,
                                 args.lora_dropout)))
        return
    rows = []
    for mode in args.modes:
        output = subprocess.run([sys.executable, __file__, "--architecture", args.architecture, "--preset",
                                 args.preset, "--batch", str(args.batch),
                                 "--steps", str(args.steps), "--lora-dropout", str(args.lora_dropout), "--mode", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
    key = "gpu_memory_gib" if "gpu_memory_gib" in rows[0] else "cpu_rss_gib"
    print(f"{args.architecture} {args.preset}, batch {args.batch}, fp32, {args.steps} AdamW steps; peak {key}\n")
    print("| fine-tuning | trainable parameters | model built (GiB) | peak memory (GiB) | vs full |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['trainable_parameters']:,} | {row['model_gib']:.2f} | {row[key]:.2f} | "
              f"{row[key] / rows[0][key]:.2f}x |")
    print(json.dumps({row["mode"]: row[key] for row in rows}))


if __name__ == "__main__":
    main()
