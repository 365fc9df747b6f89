"""`mmscale prune`: remove a fraction of the attention heads and MLP neurons of every layer of both towers of a dual
encoder, the same count in each layer, by importance, and say what it cost in `prune_report.json`.

Importance is measured on calibration batches where `--data` is given (how much each head's output and each neuron's
activation carries, mmscale.models.pruning.ActivationImportance), else read from the weights. MLP neurons come out
for real (a smaller `intermediate_size`); attention heads are zeroed in place, as transformers 5 can save no
narrower attention (mmscale.models.pruning says why). A short recovery fine-tune is `mmscale finetune --checkpoint
OUT distill.teacher=CHECKPOINT`; the removed heads stay removed through it.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch

from mmscale.atomic import atomic_write
from mmscale.export.quantize import (
    adapter_base,
    embedding_agreement,
    folder_bytes,
    load_float,
    refuse_quantized,
    sample_inputs,
    throughput,
)
from mmscale.models.base import ImageTextModel
from mmscale.models.fusion import FusionEncoder
from mmscale.models.pruning import (
    ActivationImportance,
    MLP_OUT,
    EncoderLayer,
    removed_count,
    remove_neurons,
    tower_layers,
    weight_importance,
    zero_heads,
)

REPORT_FILE = "prune_report.json"


@torch.no_grad()
def calibrate(model: ImageTextModel, layers: dict[str, list[EncoderLayer]], batches, samples: int) -> tuple[dict, int]:
    """({side: [Importance per layer]}, pairs read) from running up to `samples` image-caption pairs of `batches`
    through both towers."""
    meters = {side: ActivationImportance(tower) for side, tower in layers.items()}
    seen = 0
    for meter in meters.values():
        meter.__enter__()
    try:
        for batch in batches:
            take = min(len(batch["images"]), samples - seen)
            device = model.device
            model.encode_images(batch["images"][:take].to(device))
            model.encode_texts(batch["input_ids"][:take].to(device), batch["attention_mask"][:take].to(device))
            seen += take
            if seen >= samples:
                break
    finally:
        for meter in meters.values():
            meter.__exit__()
    if seen == 0:
        raise ValueError("--data gave no sample to calibrate on")
    return {side: meter.importance() for side, meter in meters.items()}, seen


def prune_model(model: ImageTextModel, *, heads: float, mlp: float, importance: dict | None = None) -> dict:
    """Remove `heads` and `mlp` (fractions) of every layer's heads and MLP neurons, least important first
    (`importance`: calibrate's, else weight_importance), in place; returns what was removed, per tower."""
    layers = tower_layers(model)
    removed = {}
    pruned_heads = {side: dict(by_layer) for side, by_layer in model.pruned_heads.items()}
    for side, tower in layers.items():
        scores = importance[side] if importance else [weight_importance(layer) for layer in tower]
        head_count = removed_count(tower[0].heads, heads, "attention heads")
        width = tower[0].part(MLP_OUT).in_features
        neuron_count = removed_count(width, mlp, "MLP neurons")
        for index, (layer, score) in enumerate(zip(tower, scores)):
            already = pruned_heads.get(side, {}).get(index, [])
            if head_count > len(already):
                order = [head for head in _ascending(score.heads) if head not in already]
                chosen = sorted(already + order[:head_count - len(already)])
                zero_heads(layer, chosen)
                pruned_heads.setdefault(side, {})[index] = chosen
            if neuron_count:
                remove_neurons(layer, torch.sort(_descending(score.neurons)[:width - neuron_count]).values)
        tower_module = getattr(model.towers, model.tower_names[0 if side == "vision" else 1])
        tower_module.config.intermediate_size = width - neuron_count
        getattr(model.towers.config, f"{side}_config").intermediate_size = width - neuron_count
        removed[side] = {"layers": len(tower), "heads_per_layer": tower[0].heads,
                         "heads_removed_per_layer": head_count, "mlp_width_before": width,
                         "mlp_width_after": width - neuron_count}
    model.set_pruned_heads(pruned_heads)
    return removed


def _ascending(scores: torch.Tensor) -> list[int]:
    return torch.argsort(scores, stable=True).tolist()


def _descending(scores: torch.Tensor) -> torch.Tensor:
    return torch.argsort(scores, descending=True, stable=True)


def parameter_counts(model: ImageTextModel) -> dict:
    """The towers' stored parameters and those not zero (a removed head's weights are stored, as zeros)."""
    parameters = list(model.towers.parameters())
    return {"stored": sum(p.numel() for p in parameters),
            "nonzero": sum(int(torch.count_nonzero(p)) for p in parameters)}


def prune(checkpoint: str, out: str, *, heads: float, mlp: float, batches=None, calibration: int = 512,
          evaluate_fn=None, throughput_batch: int = 16) -> dict:
    """Write the pruned model to `out` with prune_report.json; returns the report. `batches` (image-caption
    batches) calibrate the importance; `evaluate_fn(model) -> dict` scores the model before and after."""
    from mmscale.data.text import load_tokenizer

    if heads == 0 and mlp == 0:
        raise ValueError("--heads and --mlp are both 0: nothing to remove")
    source = Path(checkpoint)
    refuse_quantized(adapter_base(source) or source)
    tokenizer = load_tokenizer(adapter_base(source) or source)
    original = load_float(source, keep_mlm_head=True).eval()
    if isinstance(original, FusionEncoder):
        raise ValueError(f"{source} is a fusion model; pruning takes dual encoders (the fusion layers' "
                         "cross-attention is not handled yet)")
    pruned = copy.deepcopy(original)
    layers = tower_layers(pruned)
    importance, seen = calibrate(pruned, layers, batches, calibration) if batches is not None else (None, 0)
    removed = prune_model(pruned, heads=heads, mlp=mlp, importance=importance)
    pruned.save(out, tokenizer=tokenizer)
    target = Path(out)
    with tempfile.TemporaryDirectory(prefix="mmscale-unpruned-") as staging:
        original.save(Path(staging) / "model", tokenizer=tokenizer)  # measured as the pruned folder is
        bytes_before = folder_bytes(Path(staging) / "model")
    images, texts = sample_inputs(original, tokenizer)
    report = {"source": str(source), "heads": heads, "mlp": mlp,
              "importance": f"calibration ({seen} pairs)" if seen else "weight magnitude",
              "removed": removed, "parameters_before": parameter_counts(original),
              "parameters_after": parameter_counts(pruned), "bytes_before": bytes_before,
              "bytes_after": folder_bytes(target)}
    report |= embedding_agreement(original, pruned, images, texts)
    batch = {name: texts[name][:throughput_batch] for name in ("input_ids", "attention_mask")}
    for name, model in (("before", original), ("after", pruned)):
        rates = throughput(model, images[:throughput_batch], batch, batches=5)
        report |= {f"images_per_second_{name}": rates["images_per_second"],
                   f"texts_per_second_{name}": rates["texts_per_second"]}
    report |= {"throughput_batch_size": throughput_batch, "torch_threads": torch.get_num_threads()}
    if evaluate_fn is not None:
        report["eval_before"] = evaluate_fn(original)
        report["eval_after"] = evaluate_fn(pruned)
    with atomic_write(target / REPORT_FILE) as handle:
        handle.write((json.dumps(report, indent=2) + "\n").encode())
    return report


def prune_command(args) -> int:
    """`mmscale prune`: calibrate on `--data` where given (and score zero-shot / retrieval there before and after),
    prune, print the report."""
    from mmscale.data.config import DataConfig
    from mmscale.data.loader import build_loader
    from mmscale.data.text import load_tokenizer
    from mmscale.eval.use import evaluator_on_data
    from mmscale.models.checkpoint import image_size_of

    batches = None
    if args.data:
        source = Path(args.checkpoint)
        data = DataConfig(image_size=image_size_of(adapter_base(source) or source), context_length=args.context_length,
                          workers=0, mlm_probability=0.0)
        batches = build_loader(data, spec=args.data, tokenizer=load_tokenizer(adapter_base(source) or source),
                               batch_size=64, train=False, rank=0, world_size=1)
    report = prune(args.checkpoint, args.out, heads=args.heads, mlp=args.mlp, batches=batches,
                   calibration=args.calibration, evaluate_fn=evaluator_on_data(args) if args.data else None)
    print(json.dumps(report))
    return 0
