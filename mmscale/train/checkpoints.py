"""Resumable checkpoints (DeepSpeed's sharded format plus mmscale's per-rank state) and `final/`.

Layout: `checkpoints/<tag>/` holds DeepSpeed's files and `trainer_state_rank<r>.pt` (loader
position, counters, RNG states) for every rank; `checkpoints/latest` names the newest complete
tag and is replaced (write + rename) only after every rank has finished writing, so a crash during
a save leaves the previous checkpoint as `latest`. Older tags beyond the kept count are deleted
after that.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass
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


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to stable storage."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() or path.is_dir():
            _fsync(path)
    _fsync(folder)


def save_checkpoint(engine, root: Path, *, progress: Progress, loader_state: dict, keep: int) -> str:
    """Save on every rank (collective); returns the tag. The tag that `latest` names is never written
    again (a save at the step of the last checkpoint, as the final or a NaN-abort save can be, keeps
    that checkpoint as it is), and every file is on stable storage before `latest` moves to a new tag."""
    if keep < 1:
        raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = f"step{progress.step:08d}"
    if latest_tag(root) == tag:  # every rank reads the same file: all skip alike
        dist.barrier()
        return tag
    (root / tag).mkdir(parents=True, exist_ok=True)
    state = _plain({"progress": asdict(progress), "loader": loader_state, "rng": rng_state(), "world_size": world})
    with atomic_write(root / tag / f"trainer_state_rank{rank}.pt", fsync=False) as handle:  # fsynced below
        torch.save(state, handle)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    dist.barrier()
    if rank == 0:
        _fsync_tree(root / tag)
        write_atomically(root / LATEST, tag.encode())
        _fsync(root)
        for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return tag


def saved_world_size(root: Path) -> int | None:
    """How many processes saved the newest complete checkpoint (None: there is none)."""
    tag = latest_tag(root)
    if tag is None:
        return None
    return _trainer_state(root / tag / "trainer_state_rank0.pt")["world_size"]


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


def load_checkpoint(engine, root: Path, tag: str, *, seed: int = 0) -> tuple[Progress, dict]:
    """Restore engine, RNG and counters from `tag`; returns the progress and this rank's loader state.

    A checkpoint saved by another number of processes is loaded through DeepSpeed's universal checkpoint
    (`ds_to_universal`, run here by rank 0 into `<root>/universal/<tag>`; the engine must have been built with
    `checkpoint.load_universal`), and the loader position is re-partitioned (epochs.repartitioned_state);
    ranks beyond the old world start their random generators from (seed, step, rank)."""
    from mmscale.data.epochs import repartitioned_state

    rank, world = dist.get_rank(), dist.get_world_size()
    first = _trainer_state(root / tag / "trainer_state_rank0.pt")
    saved_world = first["world_size"]
    if saved_world == world:
        state = _trainer_state(root / tag / f"trainer_state_rank{rank}.pt") if rank else first
        load_path, _ = engine.load_checkpoint(str(root), tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {root / tag}")
        set_rng_state(state["rng"])
        return Progress(**state["progress"]), state["loader"]
    states = [first] + [_trainer_state(root / tag / f"trainer_state_rank{r}.pt") for r in range(1, saved_world)]
    universal = root / "universal"
    if rank == 0:
        _to_universal(root / tag, universal / tag)
    dist.barrier()
    load_path, _ = engine.load_checkpoint(str(universal), tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no universal checkpoint under {universal / tag}")
    progress = Progress(**first["progress"])
    if rank < saved_world:
        set_rng_state(states[rank]["rng"])
    else:
        _seed_everything(seed, progress.step, rank)
    loader = repartitioned_state([state["loader"] for state in states], rank=rank, step=progress.step)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(universal, ignore_errors=True)  # the next save is in this run's own layout
    return progress, loader


def _to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal on one tag: every parameter's fp32 weights and optimizer moments as whole
    tensors, which ZeRO 1-3 of any world size can partition again."""
    import argparse

    import deepspeed.checkpoint.ds_to_universal as converter

    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # DeepSpeed 0.19's converter concatenates each parameter's slices, which fails on 0-dim parameters
    # (`logit_scale`) under ZeRO-1/2, and its loader chunks them, which fails too: they go in as 1-element
    # tensors (the loader flattens every parameter anyway).
    merge_shards = converter._merge_zero_shards

    def merge_keeping_scalars(slice_base_path, state, *args, **kwargs):
        slices = merge_shards(slice_base_path, state, *args, **kwargs)
        if slices and torch.is_tensor(slices[0]) and slices[0].dim() == 0:
            return [piece.reshape(1) for piece in slices]
        return slices

    converter._merge_zero_shards = merge_keeping_scalars
    try:
        converter.main(argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                                          num_merge_workers=1, keep_temp_folder=False, strict=True,
                                          inject_missing_state=True))
    finally:
        converter._merge_zero_shards = merge_shards


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


def gather_fp32_weights(model: torch.nn.Module, skeleton: torch.nn.Module | None) -> torch.nn.Module | None:
    """The fp32 master weights of a DeepSpeed-trained `model` (ZeRO 1-3), gathered from the optimizer
    partitions in every rank's memory one parameter at a time, into `skeleton` (a whole model of the same
    config, on rank 0; None elsewhere, which returns None). A collective: every rank calls it. Parameters
    without a master (frozen ones) come from the module itself, gathered under ZeRO-3.

    Each rank holds at most one whole parameter beside its partitions, and rank 0 the skeleton: no
    checkpoint file is read, where zero_to_fp32 has rank 0 load every rank's optimizer files (Adam's
    moments included) while the others wait."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    targets = dict(skeleton.named_parameters()) if skeleton is not None else {}
    for name, parameter in model.named_parameters():  # the same order on every rank
        full = safe_get_full_fp32_param(parameter)
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
