"""save_checkpoint and load_checkpoint under real gloo ranks (spawned processes) with a real, tiny DeepSpeed
ZeRO-3 engine (issue 26, items 11-13). The process groups here time out after WAIT_LIMIT seconds, where a
training run's do after 10-30 minutes: a rank left waiting in a collective shows as an error within seconds."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distkit import free_port, save_from_every_rank
from epochkit import key_loader, write_text_shards

WAIT_LIMIT = 15  # seconds: the process groups' timeout in these tests
SLOW_CONVERSION = WAIT_LIMIT + 5  # seconds rank 0's conversion takes here, as a large checkpoint's would
SHARD_SIZES = [40, 25, 33, 50]  # 148 samples an epoch
BATCH, BUFFER = 4, 16


class Tiny(torch.nn.Module):
    """Two layers and a 0-dim parameter (as CLIP's logit_scale, which DeepSpeed's converter needs help with)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, inputs):
        return (self.second(torch.relu(self.first(inputs))) * self.scale).pow(2).mean()


def _engine(rank: int, world: int, port: int, *, load_universal: bool = False):
    """Join a gloo group that times out after WAIT_LIMIT and build a ZeRO-3 engine that has taken one step."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=WAIT_LIMIT))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a JIT build gloo does not need
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = Tiny()
    config = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
                                      config=config)
    engine.backward(engine(torch.randn(2, 8, generator=torch.Generator().manual_seed(rank))))
    engine.step()
    return engine


def _weights(engine) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master weight and Adam moments (collectives under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {f"{name}.{part}": read(parameter).detach().clone().reshape(-1)
            for name, parameter in engine.module.named_parameters()
            for part, read in (("weight", safe_get_full_fp32_param),
                               ("exp_avg", lambda p: safe_get_full_optimizer_state(p, "exp_avg")))}


def _held(loader_state: dict) -> int:
    """Positions of the rests a rank's loader state holds: the whole rests, or its readers' pieces."""
    start = loader_state["repartition"]
    if "pieces" in start:
        return sum(high - low for _, pieces in start["pieces"] for _, _, own in pieces for low, high in own)
    return sum(high - low for _, rest in start["rests"] for low, high in rest)


# --- item 13: rank 0 decides whether to save -----------------------------------------------------------
def _save_with_a_stale_rank(rank: int, world: int, port: int, root: str, results: str) -> None:
    from mmscale.train import checkpoints

    engine = _engine(rank, world, port)
    root = Path(root)
    progress = checkpoints.Progress(step=1, samples=4)
    flushed = []
    real_fsync = checkpoints._fsync
    checkpoints._fsync = lambda path: (flushed.append(Path(path).name), real_fsync(path))[1]
    first = checkpoints.save_checkpoint(engine, root, progress=progress, loader_state={}, keep=2)
    checkpoints._fsync = real_fsync
    written = {path.name: path.stat().st_mtime_ns for path in sorted((root / first).iterdir())}
    if rank == 1:  # its view of the shared folder lags: it has not seen `latest` move to step 1
        checkpoints.latest_tag = lambda folder: None
    started = time.monotonic()
    again = checkpoints.save_checkpoint(engine, root, progress=progress, loader_state={}, keep=2)
    seconds = time.monotonic() - started
    unchanged = written == {path.name: path.stat().st_mtime_ns for path in sorted((root / first).iterdir())}
    save_from_every_rank({"tags": [first, again], "seconds": seconds, "unchanged": unchanged, "flushed": flushed},
                         results)
    dist.destroy_process_group()


@pytest.mark.slow
def test_rank_0_decides_a_save_that_a_rank_with_a_stale_latest_would_repeat(tmp_path):
    """2 ranks save step 1, then save step 1 again (as a final save right after a checkpoint does) while rank 1
    still sees no `latest`. Rank 0 alone reads `latest`: both skip the second save at once (no rank waits in
    DeepSpeed's collectives for the other), agree on the tag, and the checkpoint stays as written. In the first
    save each rank flushed its own DeepSpeed files to disk before the barrier."""
    results = tmp_path / "results.pt"
    mp.spawn(_save_with_a_stale_rank, args=(2, free_port(), str(tmp_path / "checkpoints"), str(results)), nprocs=2,
             join=True)
    per_rank = torch.load(results)
    assert [entry["tags"] for entry in per_rank] == [["step00000001", "step00000001"]] * 2
    assert all(entry["unchanged"] and entry["seconds"] < WAIT_LIMIT for entry in per_rank), per_rank
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000001"
    for rank, entry in enumerate(per_rank):
        own = {f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"}
        assert own <= set(entry["flushed"]), (rank, entry["flushed"])


# --- items 11 and 12: an elastic load ----------------------------------------------------------------
def _save_one_rank(rank: int, world: int, port: int, root: str, spec: str, results: str) -> None:
    from mmscale.train.checkpoints import Progress, save_checkpoint

    engine = _engine(rank, world, port)
    loader = key_loader(spec, rank=rank, world=world, workers=2, batch=BATCH, buffer=BUFFER, epochs=1)
    batches = iter(loader)
    keys = [key for _ in range(6) for key in next(batches)["keys"]]
    save_checkpoint(engine, Path(root), progress=Progress(step=6, samples=len(keys)), loader_state=loader.state_dict(),
                    keep=2)
    save_from_every_rank({"keys": keys, "weights": _weights(engine)}, results)
    dist.destroy_process_group()


def _resume_on_two_ranks(rank: int, world: int, port: int, root: str, spec: str, results: str) -> None:
    from mmscale.train import checkpoints

    engine = _engine(rank, world, port, load_universal=True)
    reads, conversions = [], []
    read_trainer_state = checkpoints._trainer_state
    checkpoints._trainer_state = lambda path: (reads.append(Path(path).name), read_trainer_state(path))[1]
    if rank == 0:
        convert = checkpoints._to_universal

        def slow_conversion(*args, **kwargs):
            time.sleep(SLOW_CONVERSION)
            conversions.append(convert(*args, **kwargs))
            return conversions[-1]

        checkpoints._to_universal = slow_conversion
    started = time.monotonic()
    progress, loader_state = checkpoints.load_checkpoint(engine, Path(root), "step00000006", readers_per_rank=2,
                                                         conversion_processes=4)
    seconds = time.monotonic() - started
    loader = key_loader(spec, rank=rank, world=world, workers=2, batch=BATCH, buffer=BUFFER, epochs=1)
    loader.load_state_dict(loader_state)
    keys = [key for batch in loader for key in batch["keys"]]
    save_from_every_rank({"step": progress.step, "reads": reads, "seconds": seconds, "held": _held(loader_state),
                          "processes": [c.processes for c in conversions], "keys": keys, "weights": _weights(engine),
                          "leftover": (Path(root) / "universal").exists()}, results)
    dist.destroy_process_group()


@pytest.mark.slow
def test_an_elastic_load_waits_for_a_long_conversion_and_hands_each_rank_its_share(tmp_path):
    """A 1-rank ZeRO-3 checkpoint (loader of 2 workers, 6 batches in, shuffle buffers full) loaded on 2 ranks whose
    process group times out after WAIT_LIMIT s while rank 0's conversion takes longer: rank 1 waits for it without
    that timeout (item 11), the conversion's merging pass runs in 2 worker processes, and every weight and Adam
    moment comes back as saved (the 0-dim parameter too: the converter's fix reaches the workers). Rank 1 reads no
    trainer state (rank 0 reads the one saved) and each rank's loader state holds its own readers' pieces of the
    rest: together the 124 unread or buffered positions once (item 12). Every key trains exactly once."""
    spec = "::".join(write_text_shards(tmp_path / "shards", SHARD_SIZES, listed=True))
    root, saved, resumed = tmp_path / "checkpoints", tmp_path / "saved.pt", tmp_path / "resumed.pt"
    mp.spawn(_save_one_rank, args=(1, free_port(), str(root), spec, str(saved)), nprocs=1, join=True)
    mp.spawn(_resume_on_two_ranks, args=(2, free_port(), str(root), spec, str(resumed)), nprocs=2, join=True)
    before, after = torch.load(saved)[0], torch.load(resumed)
    assert [entry["step"] for entry in after] == [6, 6]
    assert after[1]["seconds"] > SLOW_CONVERSION > WAIT_LIMIT
    assert [entry["reads"] for entry in after] == [["trainer_state_rank0.pt"], []]
    assert after[0]["processes"][0][-1] == 2, after[0]["processes"]  # [extracting, merging]: one file, 5 parameters
    for entry in after:
        assert entry["weights"].keys() == before["weights"].keys()
        for name, value in entry["weights"].items():
            torch.testing.assert_close(value, before["weights"][name], rtol=0, atol=0, msg=name)
    unread = sum(SHARD_SIZES) - len(before["keys"])
    assert [entry["held"] for entry in after] == [unread // 2, unread - unread // 2]
    keys = before["keys"] + after[0]["keys"] + after[1]["keys"]
    assert len(keys) == len(set(keys)) == sum(SHARD_SIZES)
    assert not any(entry["leftover"] for entry in after)


# --- what runs where ----------------------------------------------------------------------------------
def test_conversion_runs_in_parallel_where_the_checkpoint_is_large_and_cores_and_memory_allow():
    from mmscale.train.checkpoints import conversion_workers

    gib = 1 << 30
    assert conversion_workers(optimizer_bytes=[gib // 8] * 4, cores=16, available_bytes=64 * gib) == (0, 0)
    assert conversion_workers(optimizer_bytes=[gib] * 8, cores=16, available_bytes=64 * gib) == (8, 8)
    assert conversion_workers(optimizer_bytes=[gib] * 64, cores=16, available_bytes=512 * gib) == (16, 8)
    assert conversion_workers(optimizer_bytes=[4 * gib] * 8, cores=16, available_bytes=17 * gib) == (2, 1)
    assert conversion_workers(optimizer_bytes=[gib] * 8, cores=1, available_bytes=64 * gib) == (0, 0)


def _read_a_refused_state(rank: int, world: int, port: int, root: str, results: str) -> None:
    from mmscale.train.checkpoints import saved_world_size

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=WAIT_LIMIT))
    try:
        saved_world_size(Path(root))
        outcome = "read"
    except Exception as error:  # noqa: BLE001  # what each rank sees is the subject
        outcome = f"{type(error).__name__}: {error}"
    save_from_every_rank(outcome, results)
    dist.destroy_process_group()


@pytest.mark.slow
def test_an_error_of_rank_0_reading_the_checkpoint_reaches_every_rank(tmp_path):
    """Rank 0 alone reads the newest trainer state; when it cannot (here: truncated), every rank gets an error
    naming the file at once, none waits for a value that never comes."""
    root = tmp_path / "checkpoints"
    (root / "step00000004").mkdir(parents=True)
    (root / "latest").write_text("step00000004")
    (root / "step00000004" / "trainer_state_rank0.pt").write_bytes(b"PK\x03\x04 cut short")
    results = tmp_path / "results.pt"
    mp.spawn(_read_a_refused_state, args=(2, free_port(), str(root), str(results)), nprocs=2, join=True)
    zero, one = torch.load(results)
    assert zero.startswith("ValueError: trainer state") and "unreadable" in zero
    assert one.startswith("RuntimeError: rank 0 failed: ValueError: trainer state") and "trainer_state_rank0.pt" in one
