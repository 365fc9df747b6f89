"""`mmscale eval zeroshot|retrieval`: a saved model on shards, one process."""

from __future__ import annotations

import json

import torch

from mmscale.data.config import DataConfig
from mmscale.data.loader import build_loader
from mmscale.data.text import load_tokenizer
from mmscale.eval.embed import evaluate
from mmscale.models import load_model


def run_eval_command(args) -> int:
    """Print the metrics, then one JSON object as the last line."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, mlm_head=False).to(device)
    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    data = DataConfig(val=args.data, image_size=model.image_size, context_length=args.context_length,
                      workers=args.workers, mlm_probability=0.0)
    loader = build_loader(data, spec=args.data, tokenizer=tokenizer, batch_size=args.batch_size, train=False,
                          rank=0, world_size=1)
    metrics = evaluate(model, loader, tokenizer=tokenizer, device=device, context_length=args.context_length,
                       batch_size=args.batch_size, classnames=getattr(args, "classnames", ""),
                       templates=getattr(args, "templates", ""))
    if args.eval_kind == "zeroshot":
        result = {"top1": metrics["top1"], "top5": metrics["top5"], "samples": int(metrics["samples"])}
    else:
        result = {name: metrics[name] for name in metrics if name.startswith(("i2t", "t2i"))}
        result |= {"val_loss": metrics.get("val_loss"), "samples": int(metrics["samples"])}
    for name, value in result.items():
        print(f"{name:>10}: {value:.4f}" if isinstance(value, float) else f"{name:>10}: {value}")
    skipped = dict(loader.skipped)
    if skipped:
        print(f"   skipped: {skipped}")
    print(json.dumps(result))
    return 0
