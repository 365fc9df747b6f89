"""The training loop: one loop for pretraining and fine-tuning (STYLE.md 5)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from mmscale.config import dump_yaml
from mmscale.data.loader import build_loader
from mmscale.data.text import IGNORE_INDEX, load_tokenizer, special_token_ids
from mmscale.data.vqa import AnswerTargets
from mmscale.eval.embed import current_logit_scale, evaluate
from mmscale.eval.vqa import answer_questions, vqa_metrics
from mmscale.finetune.lora import apply_lora, is_adapted, merge_adapter, save_adapter
from mmscale.finetune.qlora import COMPUTE_DTYPES, check_quantize_base, quantize_base, training_device
from mmscale.finetune.vqa import choose_answer_list
from mmscale.losses import LossConfig, check_labels, feature_gradients
from mmscale.models import build_model, load_model, training_flops_per_sample
from mmscale.models.base import ImageTextModel
from mmscale.models.checkpoint import model_kind, saved_quantization, saved_vqa_answers, skeleton_like
from mmscale.models.config import resolve_attention
from mmscale.models.from_open_clip import PREFIX as OPEN_CLIP
from mmscale.models.from_open_clip import converted_source
from mmscale.models.flops import vqa_flops_per_sample
from mmscale.train.checkpoints import (
    Progress,
    from_rank_0,
    gather_fp32_weights,
    latest_tag,
    load_checkpoint,
    remove_incomplete,
    rng_state,
    save_checkpoint,
    saved_world_size,
    set_rng_state,
)
from mmscale.train.config import TrainRunConfig
from mmscale.train.engine import (
    BatchLayout,
    batch_layout,
    build_objective,
    deepspeed_config,
    init_distributed,
    lr_lambda,
    make_optimizer,
    manual_clipping,
    parameter_groups,
    place_teacher,
    zero_stage,
)
from mmscale.train.metrics import MetricsWriter, memory_gib
from mmscale.train.precision import allow_tf32, resolve_precision
from mmscale.train.report import write_report

# The masked captions go in as flat positions and targets (computed by the loader, on the CPU), not as
# [B, L] labels: picking rows by a boolean mask would make the device wait for the host.
MODEL_INPUTS = ("images", "input_ids", "attention_mask", "mlm_input_ids", "mlm_positions", "mlm_targets", "labels",
                "answer_targets")
LOSS_PARTS = ("total", "contrastive", "mlm", "classification", "itm", "vqa", "distill", "distill_feature")


class NonFiniteLoss(RuntimeError):
    """Too many NaN/inf losses in a row; a checkpoint was saved before stopping."""


@dataclass
class Run:
    """What the loop works with, set up once."""

    config: TrainRunConfig
    engine: object
    model: ImageTextModel
    tokenizer: object
    layout: BatchLayout
    total_steps: int
    output: Path
    device: torch.device
    text_shapes: list = field(default_factory=list)
    """(caption length, masked positions per caption) of each micro-batch since the last log: the work
    the text tower did, for the FLOP count (captions are padded per batch)."""
    manual_clip: float = 0.0
    """Clip gradients to this norm in the loop (0: DeepSpeed clips); see engine.manual_clipping."""
    grad_norm: float | torch.Tensor = 0.0

    @property
    def rank(self) -> int:
        return dist.get_rank()


def _tokenizer_path(config: TrainRunConfig) -> str:
    path = config.tokenizer or config.model.init_from or config.model.text_from
    if not path:
        raise ValueError("tokenizer is not set: pass tokenizer=DIR (a Hugging Face tokenizer folder, e.g. from "
                         "tools/train_tokenizer.py)")
    return path


def _model_line(config: TrainRunConfig, model: ImageTextModel) -> str:
    """What the run trains: the model's class and source, its pre-processing and the losses."""
    source = config.model.init_from or ",".join(filter(None, (config.model.vision_from, config.model.text_from)))
    origin = f"from {source}" if source else f"new ({config.model.preset})"
    mean = ", ".join(f"{value:.3f}" for value in model.image_mean.flatten().tolist())
    std = ", ".join(f"{value:.3f}" for value in model.image_std.flatten().tolist())
    padding = "padded to the batch's longest" if config.data.pad_to_longest else "padded to that length"
    towers = model.towers.get_base_model() if hasattr(model.towers, "get_base_model") else model.towers  # PEFT's
    return (f"{type(towers).__name__} {origin}; images {model.image_size} px, mean ({mean}), std ({std}); "
            f"captions of {config.data.context_length} tokens {padding}; loss {config.loss.contrastive}"
            f"{f' + MLM {config.loss.mlm_weight}' if config.loss.mlm_weight > 0 else ''}")


def _contrastive_loss(config: TrainRunConfig) -> str:
    """loss.contrastive, `auto` resolved: SigLIP's own loss for a SigLIP start, CLIP's otherwise."""
    if config.loss.contrastive != "auto":
        return config.loss.contrastive
    siglip = config.model.init_from and model_kind(config.model.init_from) == "siglip"
    return "siglip" if siglip else "clip"


def _total_steps(config: TrainRunConfig) -> int:
    train = config.train
    if train.samples:
        return max(1, train.samples // train.global_batch_size)
    if train.steps:
        return train.steps
    raise ValueError("set a budget: train.samples=N (training pairs) or train.steps=N")


def _check_fit(config: TrainRunConfig, model: ImageTextModel) -> None:
    """Check the data settings against the model; data.image_size=0 takes the model's side."""
    if not config.data.image_size:
        config.data.image_size = model.image_size
    if config.data.image_size != model.image_size:
        raise ValueError(f"data.image_size={config.data.image_size} but the model's image tower takes "
                         f"{model.image_size} px; set data.image_size={model.image_size}")
    fixed = model.fixed_caption_length
    if fixed and (config.data.context_length != fixed or config.data.pad_to_longest):
        raise ValueError(f"this {model.kind} model reads captions padded to its {fixed} positions (SigLIP pools the "
                         f"last one): set data.context_length={fixed} data.pad_to_longest=false (`mmscale finetune "
                         "--checkpoint` sets both for a SigLIP checkpoint)")
    positions = getattr(model.towers.config.text_config, "max_position_embeddings", None)
    if positions is not None and config.data.context_length > positions:
        raise ValueError(f"data.context_length={config.data.context_length} exceeds the text tower's "
                         f"{positions} positions")


def setup(config: TrainRunConfig) -> Run:
    """Process group, run directory, tokenizer, engine."""
    import deepspeed

    quantized = saved_quantization(config.model.init_from) if config.model.init_from else ""
    if quantized:
        raise ValueError(f"model.init_from={config.model.init_from} is an `--quantize {quantized}` export, which "
                         "serves but cannot train; start from the float model it was exported from (the run's final/)")
    if config.model.quantize_base:
        check_quantize_base(config.model.quantize_base, training_device())
    init_distributed()
    world = dist.get_world_size()
    layout = batch_layout(config.train, world)
    total_steps = _total_steps(config)
    config.train.precision, precision_reason = resolve_precision(config.train.precision)
    if allow_tf32() and config.train.precision == "fp32":
        precision_reason += "; fp32 matmuls in TF32"
    config.model.attention = resolve_attention(config.model.attention, precision=config.train.precision,
                                               cuda=torch.cuda.is_available(), fusion=bool(config.model.fusion_layers))
    ds_config, notes = deepspeed_config(config.train, layout)
    output = Path(config.output_dir)
    if config.model.init_from.startswith(OPEN_CLIP):  # converted once, by rank 0, into the run's folder
        config.model.init_from = from_rank_0(lambda: str(converted_source(config.model.init_from, output)))
    if config.train.resume == "never" and from_rank_0(lambda: latest_tag(output / "checkpoints")):
        raise ValueError(f"{output} already holds checkpoints and train.resume=never; pick another output_dir")
    saved_world = saved_world_size(output / "checkpoints") if config.train.resume == "auto" else None
    if saved_world not in (None, world):  # elastic resume: DeepSpeed re-partitions a universal checkpoint
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        if dist.get_rank() == 0:
            print(f"mmscale train: the checkpoint was saved by {saved_world} processes and this run has {world}: "
                  f"its state is re-partitioned (DeepSpeed universal checkpoint, the loader's position split among "
                  f"the new readers); global batch {layout.global_batch_size} kept", flush=True)
    tokenizer = load_tokenizer(_tokenizer_path(config))
    torch.manual_seed(config.train.seed)
    vqa_answers = None
    if config.loss.objective == "vqa":
        if not (config.model.fusion_layers or (config.model.init_from and model_kind(config.model.init_from) == "blip")):
            raise ValueError("loss.objective=vqa needs a fusion model (questions attending to the image): start from a "
                             "fusion checkpoint, or set model.fusion_layers > 0 for a new model")
        resuming = config.train.resume == "auto" and from_rank_0(lambda: latest_tag(output / "checkpoints")) is not None
        vqa_answers = choose_answer_list(
            config.vqa, train_spec=config.data.train, output=output, resuming=resuming,
            checkpoint_answers=saved_vqa_answers(config.model.init_from) if config.model.init_from else [])
    config.loss.contrastive = _contrastive_loss(config)
    objective = build_objective(config.model, config.loss, ds_config, vocab_size=len(tokenizer),
                                token_ids=special_token_ids(tokenizer), vqa_answers=vqa_answers)
    _check_fit(config, objective.model)
    if config.loss.mlm_weight == 0 or objective.model.mlm_head is None:
        config.data.mlm_probability = 0.0  # no masked captions to make (CLIP's and SigLIP's tokenizers have no mask)
    if config.distill.teacher:
        objective.attach_teacher(load_teacher(config.distill.teacher, tokenizer, config.loss), config.distill)
    if config.lora.enabled:
        if zero_stage(ds_config) == 3:
            raise ValueError("LoRA fine-tuning runs with ZeRO stage 0-2 (train.deepspeed=configs/deepspeed/zero0.json); "
                             "the adapters are small and the frozen base is whole on each rank")
        quantized_layers = []
        if config.model.quantize_base:
            quantized_layers = quantize_base(objective.model, config.model.quantize_base, device=training_device(),
                                             compute_dtype=COMPUTE_DTYPES[config.train.precision])
        trainable, total = apply_lora(objective.model, config.lora)
        if dist.get_rank() == 0:
            print(f"mmscale train: LoRA r={config.lora.rank} trains {trainable:,} of {total:,} parameters "
                  f"({trainable / total:.2%})", flush=True)
            if quantized_layers:
                print(f"mmscale train: QLoRA: the frozen base's {len(quantized_layers)} transformer-layer linear "
                      f"layers in bitsandbytes {config.model.quantize_base}; final/ merges into the float base",
                      flush=True)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(objective.model)
    vision_tower = getattr(objective.model.towers, objective.model.tower_names[0])
    groups = parameter_groups(objective, config.train.weight_decay, lr=config.train.lr,
                              scaled=vision_tower.parameters(), lr_scale=config.train.vision_lr_scale)
    optimizer = make_optimizer(groups, config.train, ds_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.train, total_steps))
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if getattr(objective, "teacher", None) is not None:
        held, whole = place_teacher(objective.teacher, ds_config, engine.device)
        if held < whole:
            print(f"mmscale train: distillation teacher partitioned (ZeRO-3 inference): rank {dist.get_rank()} holds "
                  f"{held:,} of {whole:,} parameter values", flush=True)
    if config.train.compile:
        engine.compile()
    total = sum(getattr(p, "ds_numel", p.numel()) for p in objective.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in objective.parameters())
    print(f"mmscale train: rank {dist.get_rank()} holds {local:,} of {total:,} parameter values", flush=True)
    if dist.get_rank() == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(dump_yaml(config))
        print(f"mmscale train: {world} process{'es' * (world > 1)}, global batch {layout.global_batch_size} = micro "
              f"{layout.micro_batch_size} x accumulation {layout.accumulation} x {world}; {total_steps} steps; "
              f"DeepSpeed config {config.train.deepspeed} with {', '.join(notes)} filled by mmscale", flush=True)
        print(f"mmscale train: precision {config.train.precision} ({precision_reason}), {config.model.attention} "
              "attention", flush=True)
        print(f"mmscale train: model {_model_line(config, objective.model)}", flush=True)
    return Run(config=config, engine=engine, model=objective.model, tokenizer=tokenizer, layout=layout,
               total_steps=total_steps, output=output, device=engine.device,
               manual_clip=config.train.grad_clip if manual_clipping(config.train, ds_config) else 0.0)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {name: batch[name].to(device, non_blocking=True) for name in MODEL_INPUTS if name in batch}


def _all_finite(value: torch.Tensor) -> bool:
    """Whether `value` is finite on every rank: the step's one blocking device-to-host read."""
    finite = torch.isfinite(value.detach()).to(torch.int32).reshape(1)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _loss_parts(out) -> torch.Tensor:
    """LOSS_PARTS of one micro-batch as one float32 tensor on the device (no host sync)."""
    total = out.total.detach()
    return torch.stack([total.new_zeros(()) if getattr(out, part) is None else getattr(out, part).detach().float()
                        for part in LOSS_PARTS])


def load_teacher(folder: str, tokenizer, loss: LossConfig) -> ImageTextModel:
    """The distillation teacher (distill.teacher): a frozen model that must read the student's tokens."""
    if loss.objective != "contrastive":
        raise ValueError(f"distill.teacher distils image-text similarities: it needs loss.objective=contrastive, "
                         f"not {loss.objective}")
    if not Path(folder).is_dir():
        raise ValueError(f"distill.teacher={folder} is not a folder; give a model folder mmscale loads (a final/)")
    try:
        theirs = load_tokenizer(folder)
    except ValueError:
        raise ValueError(f"distill.teacher={folder} has no tokenizer; the teacher must read the student's tokens "
                         "(a model saved with the same tokenizer)") from None
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"distill.teacher={folder} has another tokenizer than the student's ({len(theirs)} against "
                         f"{len(tokenizer)} tokens); the teacher must read the student's tokens")
    return load_model(folder, mlm_head=False)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each tower's layer activations in the backward pass instead of keeping them (non-reentrant
    checkpointing: it keeps the random state, so dropout draws the same masks again)."""
    for tower in (getattr(model.towers, name) for name in model.tower_names):
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train_step(run: Run, batches, progress: Progress, bad_in_row: list[int], keys: list) -> torch.Tensor:
    """One optimizer step over `accumulation` micro-batches; returns the mean over its micro-batches of
    each of LOSS_PARTS on this rank, on the device (read at log steps only), and appends (key, epoch) of
    every trained sample to `keys`. The MLM loss is the mean over every masked token of the global step.

    With accumulation and loss.whole_batch_negatives, the step is GradCache's two passes: features of every
    micro-batch without gradients, the step's contrastive loss over all of them (every rank's) and its
    gradient with respect to each feature, then each micro-batch again with gradients, replaying the random
    generator state of its first pass (patch dropout draws the same patches). A step whose feature pass is
    NaN/inf on any rank is skipped on all of them (new batches are drawn); a micro-batch whose loss is NaN/inf
    (without the feature pass, or in the gradient pass after a finite feature pass) is skipped alike, before
    its gradients are reduced, and a new batch takes its place: the one blocking read of a micro-batch.
    Under GradCache that batch adds no contrastive gradient (it was not in the step's loss), only its MLM."""
    config = run.config.loss
    accumulation = run.layout.accumulation
    cached = config.objective == "contrastive" and accumulation > 1 and config.whole_batch_negatives
    while True:
        micro = [next(batches) for _ in range(accumulation)]
        if config.objective == "classify":
            for batch in micro:
                check_labels(batch["labels"], config.classes)
        inputs = [_to_device(batch, run.device) for batch in micro]
        extra = {}
        if config.objective == "contrastive" and config.mlm_weight > 0 and all("mlm_targets" in b for b in micro):
            extra["mlm_tokens"] = _mlm_tokens(run, inputs)
        if not cached:
            break
        states, passes = [], []
        with torch.no_grad():
            for batch in inputs:
                states.append(rng_state())
                passes.append(run.engine(**batch, features_only=True))
        gradients = feature_gradients(config, passes)
        if _all_finite(gradients.loss):
            break
        _count_nonfinite(run, progress, bad_in_row)
    bad_in_row[0] = 0
    sums = None
    pending = [(batch, device_batch, True) for batch, device_batch in zip(micro, inputs)]
    while pending:
        batch, device_batch, from_feature_pass = pending.pop(0)
        index = accumulation - len(pending) - 1
        if cached:
            rows = slice(index * run.layout.micro_batch_size, (index + 1) * run.layout.micro_batch_size)
            image_grad, text_grad = gradients.image[rows], gradients.text[rows]
            if from_feature_pass:
                set_rng_state(states[index])
            else:  # a replacement: not in the step's contrastive loss, so no feature gradient (its MLM loss counts)
                image_grad, text_grad = torch.zeros_like(image_grad), torch.zeros_like(text_grad)
            extra |= {"feature_gradients": (image_grad, text_grad, gradients.logit_scale, gradients.logit_bias),
                      "accumulation": accumulation}
        out = run.engine(**device_batch, **extra)
        if cached and from_feature_pass and _injected_nan(progress.step + 1, index):
            out.total = out.total + float("nan")
        if not _all_finite(out.total):
            # Skipped on every rank (the check is agreed) before its gradients are reduced; under GradCache the
            # earlier micro-batches' gradients are in already, so a fresh batch takes its place in the step.
            _count_nonfinite(run, progress, bad_in_row)
            replacement = next(batches)
            pending.insert(0, (replacement, _to_device(replacement, run.device), False))
            continue
        keys.extend(zip(batch["keys"], batch.get("passes", [None] * len(batch["keys"]))))
        rows = len(batch["input_ids"])
        run.text_shapes.append((batch["input_ids"].shape[1], len(batch.get("mlm_positions", ())) / max(rows, 1)))
        run.engine.backward(out.total)
        _injected_fault(progress.step + 1, during=True)
        if run.manual_clip and run.engine.is_gradient_accumulation_boundary():
            run.grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in run.engine.module.parameters() if p.grad is not None], run.manual_clip)
        run.engine.step()
        parts = _loss_parts(out)
        sums = parts if sums is None else sums + parts
    progress.step += 1
    progress.samples += run.layout.global_batch_size
    means = sums / accumulation
    if cached:  # the step's contrastive loss comes from the feature pass; the gradient pass's total is a surrogate
        contrastive = gradients.loss.float()
        itm = means[4] if getattr(run.engine.module, "itm", False) else 0.0
        total = config.contrastive_weight * contrastive + config.mlm_weight * means[2] + config.itm_weight * itm
        if run.config.distill.teacher:
            total = total + run.config.distill.weight * means[6] + run.config.distill.feature_weight * means[7]
        means = torch.stack([total, contrastive, *means[2:]])
    return means


def _count_nonfinite(run: Run, progress: Progress, bad_in_row: list[int]) -> None:
    progress.nonfinite_skipped += 1
    bad_in_row[0] += 1
    if bad_in_row[0] >= run.config.train.max_bad_steps:
        raise NonFiniteLoss(f"{bad_in_row[0]} NaN/inf losses in a row at step {progress.step}")


def _mlm_tokens(run: Run, inputs: list[dict]) -> torch.Tensor:
    """The masked tokens of the global step (every micro-batch, every rank) per micro-batch and rank: the
    divisor that makes the MLM loss a token-weighted mean after DeepSpeed's averaging (mlm_loss). Counted and
    summed on the device, from the batches already there: no host sync (a CPU count copied with a blocking
    `.to()` waited for the whole stream on CUDA)."""
    count = sum((batch["mlm_targets"] != IGNORE_INDEX).sum(dtype=torch.float32) for batch in inputs)
    dist.all_reduce(count)
    return count.clamp(min=1.0) / (run.layout.accumulation * dist.get_world_size())


def _flops_per_sample(run: Run) -> float:
    """Training FLOPs per pair over the micro-batches since the last log (their mean caption length and
    masked positions), then forgets them."""
    shapes, run.text_shapes = run.text_shapes or [(run.config.data.context_length, 0.0)], []
    length = sum(shape[0] for shape in shapes) / len(shapes)
    if run.config.loss.objective == "vqa":
        return vqa_flops_per_sample(run.model, context_length=round(length))
    masked = sum(shape[1] for shape in shapes) / len(shapes) if run.config.loss.mlm_weight > 0 else 0.0
    return training_flops_per_sample(run.model, context_length=round(length), masked_tokens=masked,
                                     contrastive_batch_size=run.layout.global_batch_size,
                                     itm=getattr(run.engine.module, "itm", False))


def _log_record(run: Run, progress: Progress, losses: torch.Tensor, seconds: float, steps: int, loader) -> dict:
    """The train record of a log step: losses averaged over the window and the ranks (reduced on the
    device, NCCL takes no CPU tensors), throughput, optimizer state, skips, memory."""
    losses = losses.detach().to(torch.float32).clone()
    dist.all_reduce(losses)
    values = (losses / dist.get_world_size()).tolist()
    samples_per_second = steps * run.layout.global_batch_size / max(seconds, 1e-9)
    tflops = _flops_per_sample(run) * samples_per_second / dist.get_world_size() / 1e12
    record = {"kind": "train", "step": progress.step, "samples": progress.samples, "loss": values[0]}
    record |= {f"{part}_loss": value for part, value in zip(LOSS_PARTS[1:], values[1:])}
    scale = current_logit_scale(run.model)
    record |= {"lr": run.engine.get_lr()[0], "temperature": 1.0 / scale if scale else math.inf,
               "grad_norm": float(run.engine.get_global_grad_norm() or run.grad_norm),
               "samples_per_second": samples_per_second, "tflops_per_device": tflops,
               "nonfinite_skipped": progress.nonfinite_skipped, "fp16_skipped_steps": run.engine.skipped_steps}
    if run.config.train.peak_tflops:
        record["mfu"] = tflops / run.config.train.peak_tflops
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (dict(loader.skipped), dict(loader.bad_shards), loader.last_bad_shard))
    skipped = sum((Counter(counts) for counts, _, _ in per_rank), Counter())
    record |= {f"skipped_{reason}": count for reason, count in sorted(skipped.items())}
    # data.max_bad_shard_fraction is of an epoch's shards, all ranks' readers together (the same verdict on each).
    loader.check_bad_shards(sum((Counter(bad) for _, bad, _ in per_rank), Counter()),
                            last=next((last for _, _, last in reversed(per_rank) if last), ""))
    return record | memory_gib()


def _answer_targets(run: Run) -> AnswerTargets | None:
    """VQA fine-tuning's soft targets over the model's answer list (None for other objectives)."""
    return AnswerTargets(run.model.vqa_answers) if run.config.loss.objective == "vqa" else None


def run_eval(run: Run, step: int) -> dict | None:
    """Validation metrics on every rank's share of data.val (None without data.val)."""
    config = run.config
    if not config.data.val:
        return None
    if config.loss.objective == "vqa":
        loader = build_loader(config.data, spec=config.data.val, tokenizer=run.tokenizer,
                              batch_size=config.eval.batch_size, train=False, vqa=_answer_targets(run))
        answered = answer_questions(run.model, loader, device=run.device, max_samples=config.eval.max_samples)
        return {"kind": "eval", "step": step} | vqa_metrics(answered, reduce=True)
    loader = build_loader(config.data, spec=config.data.val, tokenizer=run.tokenizer,
                          batch_size=config.eval.batch_size, train=False)
    metrics = evaluate(run.model, loader, tokenizer=run.tokenizer, device=run.device,
                       context_length=config.data.context_length, batch_size=config.eval.batch_size,
                       classnames=config.eval.classnames, templates=config.eval.templates,
                       max_samples=config.eval.max_samples, itm_label_groups=config.loss.itm_label_groups)
    return {"kind": "eval", "step": step} | metrics


def _save(run: Run, progress: Progress, loader) -> str:
    return save_checkpoint(run.engine, run.output / "checkpoints", progress=progress, loader_state=loader.state_dict(),
                           keep=run.config.train.keep_checkpoints)


def _resume(run: Run, loader) -> Progress:
    root = run.output / "checkpoints"
    if run.config.train.resume != "auto":
        return Progress()

    def newest_complete() -> str | None:  # rank 0 reads `latest` for all: on NFS another rank's view can be stale
        remove_incomplete(root)
        return latest_tag(root)

    tag = from_rank_0(newest_complete)
    if tag is None:
        return Progress()
    progress, loader_state = load_checkpoint(run.engine, root, tag, seed=run.config.train.seed,
                                             readers_per_rank=loader.readers)
    loader.load_state_dict(loader_state)
    if run.rank == 0:
        print(f"mmscale train: resumed from {root / tag} at step {progress.step} ({progress.samples} samples)",
              flush=True)
        rests = loader_state.get("repartition", {}).get("rests")
        if rests:  # re-partitioned: what the new readers train first, before whole epochs
            left = ", ".join(f"{sum(high - low for low, high in rest):,} of epoch {epoch}" for epoch, rest in rests)
            print(f"mmscale train: the loader re-partitions the samples no old reader trained ({left}, of "
                  f"{loader.stream.samples_per_epoch:,} an epoch) among this run's readers; none is skipped or "
                  "repeated", flush=True)
    return progress


def _finish(run: Run) -> Path:
    """The trained model as `final/` (rank 0), a folder transformers loads, from the fp32 master weights: in
    16-bit runs (and under ZeRO-3) the module holds only a rounded copy or a partition, so they come from the
    optimizer; in fp32 runs without ZeRO-3 the module holds them. LoRA adapters are saved in PEFT's format under
    `adapter/`, then merged into the base; a QLoRA base (model.quantize_base) is read again from its source in
    float, so final/ is that base plus the merged adapters, not a dequantized copy."""
    final = run.output / "final"
    zero3 = hasattr(run.model.logit_scale_parameter, "ds_id")
    sixteen_bit = run.config.train.precision != "fp32"
    source = run.config.model
    if is_adapted(run.model):
        model = run.model
        if sixteen_bit or source.quantize_base:  # the frozen base from its source: the module's is rounded or low-bit
            model = gather_fp32_weights(run.model, _adapted_skeleton(run) if run.rank == 0 else None,
                                        optimizer=run.engine.optimizer,
                                        keep_frozen=bool(source.init_from or source.vision_from or source.text_from))
        if run.rank == 0:
            save_adapter(model, run.output / "adapter",
                         base=source.init_from or f"{source.vision_from},{source.text_from}")
            model = merge_adapter(model)
    elif zero3 or sixteen_bit:
        model = gather_fp32_weights(run.model, skeleton_like(run.model) if run.rank == 0 else None,
                                    optimizer=run.engine.optimizer)
    else:
        model = run.model
    if run.rank == 0:
        model.float().save(final, tokenizer=run.tokenizer)
    dist.barrier()
    return final


def _adapted_skeleton(run: Run) -> ImageTextModel:
    """The run's model as it started, in fp32 and with the same adapters: its frozen base is read again from its
    source, where the 16-bit module holds it rounded (bf16 keeps 8 bits of mantissa) or QLoRA's in low bits."""
    skeleton = build_model(run.config.model, vocab_size=len(run.tokenizer), mlm_head=run.model.mlm_head is not None,
                           logit_bias_init=0.0 if run.model.logit_bias is not None else None,
                           vqa_answers=getattr(run.model, "vqa_answers", None))
    if run.model.classifier is not None:
        skeleton.add_classifier(run.model.classifier.out_features)
    apply_lora(skeleton, run.config.lora)
    return skeleton


def train(config: TrainRunConfig) -> dict:
    """Run (or resume) training to the budget; returns the last train and eval records."""
    run = setup(config)
    loader = build_loader(config.data, spec=config.data.train, tokenizer=run.tokenizer,
                          batch_size=run.layout.micro_batch_size, train=True, vqa=_answer_targets(run))
    progress = _resume(run, loader)
    writer = MetricsWriter(run.output, enabled=run.rank == 0, tensorboard=config.train.tensorboard)
    bar = _progress_bar(run, progress)
    lineage = _lineage_file(run)
    batches, bad_in_row, last = iter(loader), [0], {}
    losses, window_start, window_steps = 0, time.perf_counter(), 0
    tag = None
    if config.eval.every_steps and config.eval.at_start and progress.step == 0:
        _eval_and_log(run, 0, writer, last)
        window_start = time.perf_counter()
    try:
        while progress.step < run.total_steps:
            step_keys = []
            losses += train_step(run, batches, progress, bad_in_row, step_keys)
            window_steps += 1
            if lineage is not None:
                lineage.write(json.dumps({"step": progress.step, "keys": [key for key, _ in step_keys],
                                          "epochs": [epoch for _, epoch in step_keys]}) + "\n")
                lineage.flush()
            tag = None
            if progress.step % config.train.log_every_steps == 0 or progress.step == run.total_steps:
                last["train"] = _log_record(run, progress, losses / window_steps, time.perf_counter() - window_start,
                                            window_steps, loader)
                writer.write(last["train"])
                losses, window_start, window_steps = 0, time.perf_counter(), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{last['train']['loss']:.3f}", refresh=False)
            paused = time.perf_counter()  # eval and checkpoint time is not training throughput
            if config.eval.every_steps and progress.step % config.eval.every_steps == 0 \
                    and progress.step != run.total_steps:
                _eval_and_log(run, progress.step, writer, last)
            if progress.step % config.train.save_every_steps == 0:
                tag = _save(run, progress, loader)
                _injected_fault(progress.step)
            window_start += time.perf_counter() - paused
            if bar is not None:
                bar.update(1)
    except NonFiniteLoss as error:
        _save(run, progress, loader)
        writer.close()
        _report(run)
        dist.barrier()  # the launcher kills every rank once one exits non-zero: wait for rank 0's report
        raise NonFiniteLoss(f"{error}; saved a checkpoint under {run.output / 'checkpoints'}. Lower train.lr, "
                            "check the data, or use train.precision=bf16") from None
    finally:
        if bar is not None:
            bar.close()
        if lineage is not None:
            lineage.close()
    if tag is None:  # the run ends on a checkpoint (resuming a finished run does nothing)
        _save(run, progress, loader)
    _eval_and_log(run, progress.step, writer, last)
    final = _finish(run)
    writer.close()
    _report(run)
    return {"final": str(final), "step": progress.step, "samples": progress.samples} | last


def _eval_and_log(run: Run, step: int, writer: MetricsWriter, last: dict) -> None:
    record = run_eval(run, step)
    if record is not None:
        last["eval"] = record
        writer.write(record)


def _report(run: Run) -> None:
    """Plots and report.md (rank 0); a failure here is reported, never fatal to a finished run."""
    if run.rank != 0:
        return
    try:
        print(f"report: {write_report(run.output)}", flush=True)
    except Exception as error:  # noqa: BLE001  # the model and metrics are saved; plots are a convenience
        print(f"warning: could not write the run report ({error}); retry with `mmscale report {run.output}`",
              flush=True)


def _lineage_file(run: Run):
    if not run.config.train.log_sample_keys:
        return None
    folder = run.output / "sample_keys"
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"rank{run.rank}.jsonl", "a", encoding="utf-8")  # noqa: SIM115  # open for the run


def _injected_fault(step: int, *, during: bool = False) -> None:
    """Crash testing, as a node failure would: MMSCALE_KILL_AFTER_CHECKPOINT=RANK:STEP makes that rank SIGKILL
    itself right after the checkpoint of that step, MMSCALE_KILL_DURING_STEP=RANK:STEP in the middle of the
    step (after the backward pass of its first micro-batch)."""
    target = os.environ.get("MMSCALE_KILL_DURING_STEP" if during else "MMSCALE_KILL_AFTER_CHECKPOINT", "")
    if target and target == f"{dist.get_rank()}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _injected_nan(step: int, micro_batch: int) -> bool:
    """Fault testing: MMSCALE_NAN_IN_GRADIENT_PASS=STEP makes the gradient pass of that step's first micro-batch
    NaN after a finite feature pass (what a masked-LM overflow does), on every rank."""
    return micro_batch == 0 and os.environ.get("MMSCALE_NAN_IN_GRADIENT_PASS", "") == str(step)


def _progress_bar(run: Run, progress: Progress):
    if run.rank != 0 or not run.config.train.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True)
