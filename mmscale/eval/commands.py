"""`mmscale eval zeroshot|retrieval|mlm|vqa`: a saved model on shards, one process."""

from __future__ import annotations

import json
from pathlib import Path

from mmscale.data.config import DataConfig
from mmscale.data.loader import build_loader
from mmscale.data.text import load_tokenizer
from mmscale.eval.embed import evaluate
from mmscale.eval.metrics import read_lines
from mmscale.eval.use import serving_device
from mmscale.models import load_model
from mmscale.models.fusion import FusionEncoder


def run_eval_command(args) -> int:
    """Print the metrics, then one JSON object as the last line."""
    if args.eval_kind == "mlm":
        from mmscale.eval.mlm import mlm_command

        return mlm_command(args)
    if args.eval_kind == "vqa":
        from mmscale.eval.vqa import vqa_command

        return vqa_command(args)
    rerank = getattr(args, "rerank", 0)
    if rerank < 0:
        raise ValueError(f"--rerank {rerank}: give the number of contrastive candidates to re-rank (0: off)")
    report = getattr(args, "report", "")
    if report:  # refused before the pass over the data, not after it
        from mmscale.eval.report import check_names

        if Path(report).exists() and not Path(report).is_dir():
            raise ValueError(f"--report {report}: a file is there; give a folder (it is created if missing)")
        check_names(read_lines(args.classnames, "classnames"))
    model = load_model(args.checkpoint, mlm_head=False)
    device = serving_device(model)
    model = model.to(device)
    if rerank and not isinstance(model, FusionEncoder):
        raise ValueError(f"--rerank needs a fusion model (an ITM head): {args.checkpoint} is a dual encoder "
                         f"({model.kind}); train one with model.fusion_layers > 0, or start from a BLIP ITM folder")
    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    data = DataConfig(val=args.data, image_size=model.image_size, **model.caption_settings(args.context_length),
                      workers=args.workers, mlm_probability=0.0)

    def make_loader():
        return build_loader(data, spec=args.data, tokenizer=tokenizer, batch_size=args.batch_size, train=False,
                            rank=0, world_size=1)

    loader = make_loader()
    metrics = evaluate(model, loader, tokenizer=tokenizer, device=device, context_length=args.context_length,
                       batch_size=args.batch_size, classnames=getattr(args, "classnames", ""),
                       templates=getattr(args, "templates", ""),
                       itm_label_groups=getattr(args, "itm_label_groups", False),
                       match_labels=getattr(args, "match_labels", False), report=report)
    if args.eval_kind == "zeroshot":
        result = {"top1": metrics["top1"], "top5": metrics["top5"], "samples": int(metrics["samples"])}
        result |= {"report": report} if report else {}
    else:
        result = {name: metrics[name] for name in metrics if name.startswith(("i2t", "t2i"))}
        result |= {"val_loss": metrics.get("val_loss"), "samples": int(metrics["samples"])}
        result |= {name: metrics[name] for name in ("itm_accuracy",) if name in metrics}  # a fusion model's
        if rerank:
            from mmscale.eval.rerank import rerank_metrics

            model.eval()
            result |= rerank_metrics(model, make_loader, k=rerank, device=device, context_length=args.context_length,
                                     batch_size=args.batch_size, match_labels=args.match_labels) | {"rerank": rerank}
    for name, value in result.items():
        print(f"{name:>16}: {value:.4f}" if isinstance(value, float) else f"{name:>16}: {value}")
    skipped = dict(loader.skipped)
    if skipped:
        print(f"{'skipped':>16}: {skipped}")
    print(json.dumps(result))
    return 0
