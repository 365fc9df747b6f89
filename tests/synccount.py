"""Counting the calls that make the host wait for the device, during real training steps.

`SyncCounter` is a `TorchFunctionMode`: every torch call made while it is active passes through it,
mmscale's and DeepSpeed's alike, and it records the ones that need a tensor's value on the host
(`item`, `tolist`, `bool(t)`, `nonzero`, boolean-mask indexing, ...). On a GPU each of those blocks
until the device has finished all queued work. `python tests/synccount.py` trains a few steps of
`tiny` in one process under it and prints the counts per step as one JSON line; tests/test_syncs.py
and the GPU check (tools/gpu_check.sh, with `torch.cuda.set_sync_debug_mode` as a second witness)
read that line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

_SYNCING = {
    torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int", torch.Tensor.__float__: "float", torch.Tensor.__index__: "index",
    torch.Tensor.nonzero: "nonzero", torch.nonzero: "nonzero", torch.Tensor.numpy: "numpy",
    torch.masked_select: "masked_select", torch.Tensor.masked_select: "masked_select",
    torch.unique: "unique", torch.Tensor.unique: "unique", torch.argwhere: "argwhere",
}
_INDEXING = {torch.Tensor.__getitem__: "bool_index", torch.Tensor.__setitem__: "bool_index_set"}


def _has_bool_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


def _caller() -> str:
    """The innermost frame outside torch, as `@file:line`."""
    frame = sys._getframe(2)
    while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    return "" if frame is None else f"@{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


def _in_optimizer_step() -> bool:
    """Inside a torch optimizer's step: its `step` counters are host tensors unless it is fused or
    capturable, so reading them waits for nothing (on GPUs mmscale uses DeepSpeed's FusedAdam anyway)."""
    frame = sys._getframe(2)
    while frame is not None:
        if f"{os.sep}torch{os.sep}optim{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class SyncCounter(TorchFunctionMode):
    """Counts host-syncing torch calls by `phase` (a label the caller sets, e.g. the step number)."""

    def __init__(self, *, where: bool = False):
        super().__init__()
        self.where = where
        """Key the counts by call site too (`item@module.py:123`), to find where syncs come from."""
        self.phase = "setup"
        self.counts: dict[str, Counter] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _SYNCING.get(func)
        if name is None and func in _INDEXING and len(args) > 1 and _has_bool_mask(args[1]):
            name = _INDEXING[func]
        if name is not None and not _in_optimizer_step():
            self.counts.setdefault(self.phase, Counter())[name + (_caller() if self.where else "")] += 1
        return func(*args, **(kwargs or {}))


# The syncs a CUDA step is allowed, by name: DeepSpeed's optimizer step (its gradient norm and overflow checks)
# and mmscale's agreed finiteness check of each micro-batch's loss (one read, so a NaN micro-batch is skipped
# on every rank before its gradients are reduced).
ALLOWED_CUDA_SYNCS = ("DeepSpeedEngine.step", "loop._all_finite")


def _allow_syncs(function, name: str, allowed: Counter):
    """`function` run with CUDA's sync check off, counted under `name` in `allowed`."""
    def run(*args, **kwargs):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        allowed[name] += 1
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    return run


def raise_on_cuda_syncs(config) -> dict:
    """Run `mmscale.train.loop.train(config)` with CUDA raising on any synchronizing call inside a training step
    (`torch.cuda.set_sync_debug_mode("error")`), except inside ALLOWED_CUDA_SYNCS; returns how often each of
    those ran. A sync anywhere else in a step raises RuntimeError from the call that made it."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from mmscale.train import loop

    allowed: Counter = Counter()
    original_step, original_engine_step, original_finite = loop.train_step, DeepSpeedEngine.step, loop._all_finite

    def strict_step(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original_step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    loop.train_step = strict_step
    DeepSpeedEngine.step = _allow_syncs(original_engine_step, ALLOWED_CUDA_SYNCS[0], allowed)
    loop._all_finite = _allow_syncs(original_finite, ALLOWED_CUDA_SYNCS[1], allowed)
    try:
        loop.train(config)
    finally:
        loop.train_step, DeepSpeedEngine.step, loop._all_finite = original_step, original_engine_step, original_finite
    return {"allowed_syncs": dict(allowed)}


def count_training_syncs(config, counter: SyncCounter, *, cuda_sync_debug: bool = False) -> dict:
    """Run `mmscale.train.loop.train(config)` under `counter`, with each optimizer step and each log
    record in a phase of its own: {"steps": [counts of step 1, 2, ...], "log": [...], "log_steps": [...]}.
    With `cuda_sync_debug`, CUDA itself reports every synchronizing call inside a step
    (`torch.cuda.set_sync_debug_mode`), counted per step in "cuda_syncs"."""
    from mmscale.train import loop

    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    step_counts, log_counts, log_steps, original_step, original_log = [], [], [], loop.train_step, loop._log_record
    cuda_syncs, invalidations, original_invalidate = [], [], PartitionedParameterCoordinator._invalidate_trace

    def counted_invalidate(self):  # ZeRO-3 dropping its recorded module order (and with it prefetching)
        invalidations[-1] += 1
        return original_invalidate(self)

    def counted_step(run, *args, **kwargs):
        counter.phase = f"step{len(step_counts)}"
        invalidations.append(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda_sync_debug:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                return original_step(run, *args, **kwargs)
            finally:
                if cuda_sync_debug:
                    torch.cuda.set_sync_debug_mode("default")
                cuda_syncs.append(sum("synchroniz" in str(warning.message) for warning in caught))
                step_counts.append(dict(counter.counts.pop(counter.phase, {})))
                counter.phase = "between"

    def counted_log(run, progress, *args, **kwargs):
        counter.phase = "log"
        try:
            return original_log(run, progress, *args, **kwargs)
        finally:
            log_counts.append(dict(counter.counts.pop("log", {})))
            log_steps.append(progress.step)
            counter.phase = "between"

    loop.train_step, loop._log_record = counted_step, counted_log
    PartitionedParameterCoordinator._invalidate_trace = counted_invalidate
    try:
        with counter:
            loop.train(config)
    finally:
        loop.train_step, loop._log_record = original_step, original_log
        PartitionedParameterCoordinator._invalidate_trace = original_invalidate
    return {"steps": step_counts, "log": log_counts, "log_steps": log_steps, "cuda_syncs": cuda_syncs,
            "trace_invalidations": invalidations}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (shards, tokenizer, run)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--deepspeed", default="configs/deepspeed/zero3.json")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cuda-sync-error", action="store_true",
                        help="make CUDA raise on any sync inside a step but those of ALLOWED_CUDA_SYNCS (GPU only)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="micro batch size (of the global 16; below 16, GradCache accumulation)")
    parser.add_argument("--where", action="store_true", help="count by call site")
    parser.add_argument("--fusion", action="store_true", help="a fusion model (model.fusion_layers=4: ITM + "
                        "image-conditioned MLM)")
    parser.add_argument("--cuda-sync-debug", action="store_true",
                        help="also make CUDA raise on any synchronizing call inside a step (GPU only)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mmscale.config import load_config
    from mmscale.shards.synthetic import make_synthetic_shards
    from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece
    from mmscale.train.config import TrainRunConfig

    data, tokenizer = args.work / "shards", args.work / "tokenizer"
    if not (data / "sizes.json").is_file():
        make_synthetic_shards(data, 256, samples_per_shard=128, seed=0, corpus_name="characters")
        train_wordpiece(iter_captions(str(data)), vocab_size=200, output_dir=tokenizer)
    config = load_config(TrainRunConfig, None, [
        f"data.train={data}", f"tokenizer={tokenizer}", f"output_dir={args.work / 'run'}", "data.workers=1",
        "data.image_size=0", "data.context_length=32", "train.global_batch_size=16", f"train.steps={args.steps}",
        "train.log_every_steps=3", "train.warmup_steps=2", f"train.precision={args.precision}",
        f"train.deepspeed={args.deepspeed}", "train.progress=false", "train.tensorboard=false",
        f"train.save_every_steps={10**9}", f"train.micro_batch_size={args.micro_batch}",
        *(["model.fusion_layers=4", "loss.itm_weight=1.0"] if args.fusion else [])])
    if args.cuda_sync_error:
        print(json.dumps(raise_on_cuda_syncs(config)))
        return 0
    counter = SyncCounter(where=args.where)
    result = count_training_syncs(config, counter, cuda_sync_debug=args.cuda_sync_debug and torch.cuda.is_available())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
