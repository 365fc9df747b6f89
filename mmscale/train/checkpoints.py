"""Resumable checkpoints (DeepSpeed's sharded format plus mmscale's per-rank state) and `final/`.

Layout: `checkpoints/<tag>/` holds DeepSpeed's files and `trainer_state_rank<r>.pt` (loader
position, counters, RNG states) for every rank; `checkpoints/latest` names the newest complete
tag and is replaced (write + rename) only after every rank has finished writing, so a crash during
a save leaves the previous checkpoint as `latest`. Older tags beyond the kept count are deleted
after that.

Only rank 0 reads `latest` and what it implies (whether to save, how many ranks saved), and tells the
others: on a shared filesystem with attribute caching (NFS) another rank can see an older `latest`, and a
rank that decided otherwise would wait in a collective the others never enter (issue 26, item 13).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mmscale.atomic import TEMPORARY_GLOB, atomic_write, write_atomically

LATEST = "latest"


@dataclass
class Progress:
    """Counters that say where a run is."""

    step: int = 0
    """Optimizer steps taken."""
    samples: int = 0
    """Training pairs consumed over all ranks."""
    nonfinite_skipped: int = 0
    """Micro-batches skipped for a NaN/inf loss."""


def rng_state() -> dict:
    """Every random generator's state (python, numpy, torch, CUDA), for set_rng_state, as plain data
    (tuples, numbers, tensors) that torch.load(weights_only=True) reads back: numpy's array becomes a tensor."""
    key, position, has_gauss, gauss = np.random.get_state()[1:]
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators from rng_state()."""
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                         numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _plain(value, where: str = "trainer state"):
    """`value` as the plain data torch.load(weights_only=True) reads (dicts, lists, tuples, strings, numbers,
    tensors): dict subclasses such as Counter become dicts and numpy scalars Python numbers; anything else
    is a TypeError naming where it is, raised when saving rather than when a resume fails to read it."""
    if value is None or type(value) in (bool, int, float, str, bytes) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint read "
                    "with torch.load(weights_only=True) cannot hold; save it as dicts, lists, numbers or tensors")


def latest_tag(root: Path) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    path = root / LATEST
    return path.read_text().strip() if path.is_file() else None


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_folders(folder: Path) -> None:
    """Flush `folder` and the folders under it (their entries: the names of the files in them)."""
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            _fsync(path)
    _fsync(folder)


def from_rank_0(compute, *, group=None):
    """compute() run on rank 0 alone, its value handed to every rank (a collective). An error on rank 0 is
    raised on every rank, so none is left waiting for a value that never comes."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("value", compute())]
        except Exception as error:
            box = [("error", f"{type(error).__name__}: {error}")]
            dist.broadcast_object_list(box, src=0, group=group)
            raise
    dist.broadcast_object_list(box, src=0, group=group)
    kind, value = box[0]
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


@contextlib.contextmanager
def _files_written(engine):
    """The paths DeepSpeed's checkpoint engine writes on this rank while the block runs: every file of a tag
    that save_checkpoint writes (its recovery scripts, copied beside the tags, are not part of a checkpoint)."""
    checkpoint_engine, written = getattr(engine, "checkpoint_engine", None), []
    if checkpoint_engine is None:  # not a DeepSpeed engine: nothing to record
        yield written
        return
    save, own = checkpoint_engine.save, "save" in vars(checkpoint_engine)

    def recording_save(state_dict, path, *args, **kwargs):
        written.append(Path(path))
        return save(state_dict, path, *args, **kwargs)

    checkpoint_engine.save = recording_save
    try:
        yield written
    finally:
        if own:
            checkpoint_engine.save = save
        else:
            del checkpoint_engine.save  # the class's method again


def save_checkpoint(engine, root: Path, *, progress: Progress, loader_state: dict, keep: int) -> str:
    """Save on every rank (collective); returns the tag. The tag that `latest` names is never written
    again (a save at the step of the last checkpoint, as the final or a NaN-abort save can be, keeps
    that checkpoint as it is): rank 0 reads `latest` and every rank follows its decision. Each rank flushes
    the files it wrote to stable storage before the barrier, and rank 0 moves `latest` after it."""
    if keep < 1:
        raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = f"step{progress.step:08d}"
    if from_rank_0(lambda: latest_tag(root) == tag):
        return tag
    (root / tag).mkdir(parents=True, exist_ok=True)
    state = _plain({"progress": asdict(progress), "loader": loader_state, "rng": rng_state(), "world_size": world})
    with atomic_write(root / tag / f"trainer_state_rank{rank}.pt") as handle:  # fsynced before the rename
        torch.save(state, handle)
    with _files_written(engine) as written:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    for path in written:
        _fsync(path)
    dist.barrier()
    if rank == 0:
        _fsync_folders(root / tag)
        write_atomically(root / LATEST, tag.encode())
        _fsync(root)
        for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return tag


def saved_world_size(root: Path) -> int | None:
    """How many processes saved the newest complete checkpoint (None: there is none). Read by rank 0 and
    handed to the others when a process group is up (a collective then)."""
    def read() -> int | None:
        tag = latest_tag(root)
        return None if tag is None else _trainer_state(root / tag / "trainer_state_rank0.pt")["world_size"]

    return from_rank_0(read) if dist.is_available() and dist.is_initialized() else read()


def _trainer_state(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path.parent} has no {path.name}: it was not saved completely")
    # Plain data only: unpickling anything else could run code planted by whoever can write the checkpoints.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"trainer state {path} holds more than plain data (it calls for {_refused_name(error)}), "
            "so it was not loaded: it was altered, or written by an older mmscale (before the trainer state was "
            "plain data); resume from a checkpoint this mmscale wrote, or start the run afresh") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"trainer state {path}: unreadable ({error}); resume from an earlier checkpoint") from None


def _refused_name(error: pickle.UnpicklingError) -> str:
    """What torch's weights_only unpickler refused (`posix.system`), picked from its long, generic message."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else "an object that is not plain data"


# The wait of the other ranks while rank 0 converts a checkpoint: no conversion takes this long, and a rank 0
# that dies closes its connections, which ends the wait at once. The process group's own timeout (10 or 30
# minutes) is shorter than converting a large checkpoint takes (issue 26, item 11).
CONVERSION_WAIT = timedelta(days=365)
# Optimizer state below which the conversion runs in this process: starting a worker (importing torch and
# DeepSpeed, seconds) would cost more than it saves.
PARALLEL_CONVERSION_BYTES = 1 << 30


@dataclass
class Conversion:
    """How a universal conversion ran."""

    seconds: float
    processes: list[int]
    """Worker processes of each of the converter's parallel passes (extracting, merging; 1: in this process)."""


def load_checkpoint(engine, root: Path, tag: str, *, seed: int = 0, readers_per_rank: int = 1,
                    conversion_processes: int | None = None) -> tuple[Progress, dict]:
    """Restore engine, RNG and counters from `tag`; returns the progress and this rank's loader state.

    A checkpoint saved by another number of processes is loaded through DeepSpeed's universal checkpoint
    (`ds_to_universal`, run by rank 0 into `<root>/universal/<tag>` with up to `conversion_processes` worker
    processes, None: as many as the cores and memory allow for a large checkpoint, while the other ranks wait
    without a timeout; the engine must have been built with `checkpoint.load_universal`), and the loader
    position is re-partitioned: each old rank's trainer state is read by one new rank, rank 0 builds the rests
    once and hands each rank its share, cut for `readers_per_rank` readers (BatchLoader.readers) per rank
    (epochs.repartitioned_states). Ranks beyond the old world start their random generators from (seed, step,
    rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    first: dict = {}  # old rank 0's trainer state, on rank 0

    def saved_world_of_first() -> int:
        first.update(_trainer_state(root / tag / "trainer_state_rank0.pt"))
        return first["world_size"]

    saved_world = from_rank_0(saved_world_of_first)
    if saved_world == world:
        state = _trainer_state(root / tag / f"trainer_state_rank{rank}.pt") if rank else first
        load_path, _ = engine.load_checkpoint(str(root), tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {root / tag}")
        set_rng_state(state["rng"])
        return Progress(**state["progress"]), state["loader"]
    universal = root / "universal"
    waits = dist.new_group(backend="gloo", timeout=CONVERSION_WAIT)
    try:
        conversion = from_rank_0(lambda: _to_universal(root / tag, universal / tag, processes=conversion_processes),
                                 group=waits)
        if rank == 0:
            print(f"mmscale train: converted {root / tag} to DeepSpeed's universal checkpoint in "
                  f"{conversion.seconds:.1f} s (processes per pass: {conversion.processes})", flush=True)
        load_path, _ = engine.load_checkpoint(str(universal), tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no universal checkpoint under {universal / tag}")
        states = {old: first if old == 0 else _trainer_state(root / tag / f"trainer_state_rank{old}.pt")
                  for old in range(rank, saved_world, world)}  # every old rank's state read once, by one rank
        progress, loader = _repartitioned(states, waits, readers_per_rank=readers_per_rank)
        if rank < saved_world:
            set_rng_state(states[rank]["rng"])
        else:
            _seed_everything(seed, progress.step, rank)
        dist.barrier(group=waits)
    finally:
        dist.destroy_process_group(waits)
    if rank == 0:
        shutil.rmtree(universal, ignore_errors=True)  # the next save is in this run's own layout
    return progress, loader


def _repartitioned(states: dict[int, dict], group, *, readers_per_rank: int) -> tuple[Progress, dict]:
    """The progress and this rank's loader state, from the old ranks' trainer states this rank read (`states`,
    by old rank): each rank sends what a re-partition needs of them (epochs.carried) to rank 0, which builds
    the new ranks' states once (epochs.repartitioned_states) and hands each rank its own (collectives)."""
    from mmscale.data.epochs import carried, repartitioned_states

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {old: carried(state["loader"]) for old, state in states.items()}
    if world == 1:  # nothing to gather or hand out
        built = repartitioned_states([mine[old] for old in sorted(mine)], world_size=1,
                                     readers_per_rank=readers_per_rank, step=states[0]["progress"]["step"])
        return Progress(**states[0]["progress"]), built[0]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0, group=group)
    shares = None
    if rank == 0:
        by_old_rank = {old: carry for part in gathered for old, carry in part.items()}
        step = states[0]["progress"]["step"]
        try:
            built = repartitioned_states([by_old_rank[old] for old in sorted(by_old_rank)], world_size=world,
                                         readers_per_rank=readers_per_rank, step=step)
            shares = [("value", (states[0]["progress"], share)) for share in built]
        except Exception as error:
            shares = [("error", f"{type(error).__name__}: {error}")] * world
            dist.scatter_object_list([None], shares, src=0, group=group)
            raise
    received = [None]
    dist.scatter_object_list(received, shares, src=0, group=group)
    kind, value = received[0]
    if kind == "error":
        raise RuntimeError(f"rank 0 failed to re-partition the loader position: {value}")
    progress, loader = value
    return Progress(**progress), loader


def conversion_workers(*, optimizer_bytes: list[int], cores: int, available_bytes: int) -> tuple[int, int]:
    """(extracting, merging) worker processes for ds_to_universal: none (0: in this process) for a small
    checkpoint; else one per core, extracting at most one optimizer file each, each holding about two of
    them in memory; merging holds a parameter's slices and moments, so half as many (DeepSpeed's advice)."""
    if sum(optimizer_bytes) < PARALLEL_CONVERSION_BYTES or cores < 2:
        return 0, 0
    fit = max(1, available_bytes // max(2 * max(optimizer_bytes), 1))
    return max(1, min(cores, len(optimizer_bytes), fit)), max(1, min(cores, fit) // 2)


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _to_universal(source: Path, target: Path, *, processes: int | None = None) -> Conversion:
    """DeepSpeed's ds_to_universal on one tag: every parameter's fp32 weights and optimizer moments as whole
    tensors, which ZeRO 1-3 of any world size can partition again. Its extracting and merging passes run in
    `processes` worker processes (half as many merging; None: conversion_workers())."""
    import argparse

    import deepspeed.checkpoint.ds_to_universal as converter

    if processes is None:
        sizes = [path.stat().st_size for path in source.glob("*optim_states.pt")]
        extract, merge = conversion_workers(optimizer_bytes=sizes, cores=len(os.sched_getaffinity(0)),
                                            available_bytes=_available_memory())
    else:
        extract, merge = processes, max(1, processes // 2)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    started, passes = time.perf_counter(), []
    original = converter._do_parallel_work, converter._merge_zero_shards
    converter._do_parallel_work = functools.partial(_parallel_work, passes=passes)
    _keep_scalars()
    try:
        converter.main(argparse.Namespace(input_folder=str(source), output_folder=str(target),
                                          num_extract_workers=extract, num_merge_workers=merge, keep_temp_folder=False,
                                          strict=True, inject_missing_state=True))
    finally:
        converter._do_parallel_work, converter._merge_zero_shards = original
    return Conversion(seconds=time.perf_counter() - started, processes=passes)


def _keep_scalars() -> None:
    """DeepSpeed 0.19's converter concatenates each parameter's slices, which fails on 0-dim parameters
    (`logit_scale`) under ZeRO-1/2, and its loader chunks them, which fails too: they go in as 1-element
    tensors (the loader flattens every parameter anyway). Installed in this process and in each worker."""
    import deepspeed.checkpoint.ds_to_universal as converter

    if not isinstance(converter._merge_zero_shards, functools.partial):
        converter._merge_zero_shards = functools.partial(_merge_keeping_scalars, converter._merge_zero_shards)


def _merge_keeping_scalars(merge, *args, **kwargs):
    slices = merge(*args, **kwargs)
    if slices and torch.is_tensor(slices[0]) and slices[0].dim() == 0:
        return [piece.reshape(1) for piece in slices]
    return slices


def _parallel_work(do_work, work_chunks, num_workers, *, passes: list[int]):
    """The converter's _do_parallel_work: in up to `num_workers` fresh (spawned) processes, which hold no CUDA
    context, process group or threads of the training process, each with the scalar fix installed; in this
    process for 0 or 1. Records how many worker processes the pass had (1: this process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(num_workers, len(work_chunks))
    passes.append(max(workers, 1))
    if workers <= 1:
        return [do_work(work) for work in work_chunks]
    with ProcessPoolExecutor(max_workers=workers, initializer=_keep_scalars,
                             mp_context=multiprocessing.get_context("spawn")) as executor:
        return list(executor.map(do_work, work_chunks))


def _seed_everything(seed: int, step: int, rank: int) -> None:
    mixed = hash((seed, step, rank)) % 2**31
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def consolidate(root: Path, tag: str, skeleton: torch.nn.Module, prefix: str = "model.") -> torch.nn.Module:
    """The fp32 master weights of checkpoint `tag`, gathered from every rank's partition by DeepSpeed's
    zero_to_fp32, loaded into `skeleton` (a whole, unpartitioned model of the same config)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    state = {name.removeprefix(prefix): tensor for name, tensor in state.items() if name.startswith(prefix)}
    missing, unexpected = skeleton.load_state_dict(state, strict=False)
    tied = {name for name, _ in skeleton.named_parameters(remove_duplicate=False)} - set(
        name for name, _ in skeleton.named_parameters())
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint {root / tag} does not fit the model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    return skeleton


def gather_fp32_weights(model: torch.nn.Module, skeleton: torch.nn.Module | None, *, optimizer=None,
                        keep_frozen: bool = False) -> torch.nn.Module | None:
    """The fp32 master weights of a DeepSpeed-trained `model`, gathered from the optimizer partitions in every
    rank's memory one parameter at a time (ZeRO 1-3), or read from `optimizer`'s fp32 groups (ZeRO-0's
    FP16_Optimizer, bf16 too), into `skeleton` (a whole model of the same config, on rank 0; None elsewhere,
    which returns None). A collective: every rank calls it. Parameters without a master (frozen ones) come
    from the module itself, gathered under ZeRO-3; with `keep_frozen` they keep the skeleton's values instead
    (a skeleton read again from the run's source, where a 16-bit module holds them rounded).

    Each rank holds at most one whole parameter beside its partitions, and rank 0 the skeleton: no
    checkpoint file is read, where zero_to_fp32 has rank 0 load every rank's optimizer files (Adam's
    moments included) while the others wait."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _flat_group_masters(optimizer)
    targets = dict(skeleton.named_parameters()) if skeleton is not None else {}
    for name, parameter in model.named_parameters():  # the same order on every rank
        if keep_frozen and not parameter.requires_grad:
            targets.pop(name, None)
            continue
        full = masters[id(parameter)] if id(parameter) in masters else safe_get_full_fp32_param(parameter)
        if full is None:
            with deepspeed.zero.GatheredParameters([parameter]):  # a no-op unless ZeRO-3 partitions it
                full = parameter.detach().clone() if skeleton is not None else None
        if skeleton is not None:
            if name not in targets:
                raise RuntimeError(f"parameter {name} of the trained model is not in the model being saved")
            target = targets.pop(name)
            with torch.no_grad():
                target.copy_(full.reshape(target.shape).to(target.dtype))
    if skeleton is not None and targets:
        raise RuntimeError(f"the trained model has no values for {sorted(targets)}")
    return skeleton


def _flat_group_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 master in DeepSpeed's ZeRO-0 16-bit optimizers: FP16_Optimizer (fused Adam) keeps
    one flat fp32 tensor per group, FP16_UnfusedOptimizer a list; {} for any other optimizer."""
    from torch._utils import _unflatten_dense_tensors

    masters = {}
    for params, flat in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups_flat", ())):
        masters |= {id(param): master for param, master in zip(params, _unflatten_dense_tensors(flat, params))}
    for params, listed in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
        masters |= {id(param): master for param, master in zip(params, listed)}
    return masters


def remove_incomplete(root: Path) -> None:
    """Delete tags newer than `latest` (a save that crashed half-way); rank 0 only."""
    tag = latest_tag(root)
    if tag is None or not root.is_dir():
        return
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith("step") and path.name > tag:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(TEMPORARY_GLOB):  # a `latest` that was never renamed into place
        os.unlink(path)
