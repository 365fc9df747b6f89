"""Small random models of released classes, saved as their libraries save them (no hub here)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_siglip(folder: Path, tokenizer, *, side: int, positions: int, width: int = 64, layers: int = 2,
                heads: int = 4, patch: int = 8, scale: float = 2.3, bias: float = -3.0) -> Path:
    """A random SiglipModel (seed 0) with `tokenizer`, `positions` text positions and `side`-px images, saved with
    a SigLIP image processor (square resize, mean/std 0.5) and the tokenizer; its temperature exp(scale), bias
    `bias`. Returns `folder`."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    tower = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
             "num_attention_heads": heads}
    config = SiglipConfig(text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": positions,
                                       "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
                                       "eos_token_id": tokenizer.sep_token_id},
                          vision_config={**tower, "image_size": side, "patch_size": patch})
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(scale)
        model.logit_bias.fill_(bias)
    model.save_pretrained(folder, safe_serialization=True)
    SiglipImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
