#!/usr/bin/env python3
"""Elastic resume's loader carry (issue 26, item 12): what each new rank reads and each reader receives when a
checkpoint saved on S ranks is loaded on W, the way mmscale did it before (every rank reads every old rank's
trainer state and builds the whole rests, which each of its workers receives) and the way it does now (each old
state read by one rank, the rests built once on rank 0, each rank handed its readers' pieces).

    python tools/bench/elastic_carry.py [--layouts 2:1,1:2,8:16,16:8] [--buffer 10000] [--workers 8]

Writes S trainer states as a run in epoch sampling leaves them mid-epoch: each of the S x workers readers has
read --read samples of its piece of an epoch of --epoch samples and holds a full shuffle buffer (--buffer raw
samples, [url, index, epoch, position] each) of positions it read. Both ways run here, in one process, on the
same files (in the page cache), through mmscale's own functions: `repartitioned_state` (the whole rests, as
before) and `carried` + `repartitioned_states` (as load_checkpoint now does). Ranks run in parallel in a real
load, so the wall time is one rank's work before (every rank does the same), and now the slowest rank's reads
plus rank 0's build and the pickling of the shares (the gather and scatter). Prints one table; the last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mmscale.data import epochs
from mmscale.data.stream import LAYOUT_VERSION


def saved_state(*, rank: int, world: int, workers: int, epoch_samples: int, read: int, buffer: int,
                shard_samples: int) -> dict:
    """One old rank's trainer state as save_checkpoint writes it, its loader mid-epoch with full buffers."""
    readers = world * workers
    snapshots = {}
    for worker in range(workers):
        reader = epochs.reader_order(rank=rank, worker=worker, world_size=world)
        low, _ = epochs.piece(before=0, length=epoch_samples, reader=reader, readers=readers)
        cursor = low + read
        urls = {}  # one string per shard, as a reader's samples of one shard share it
        positions = random.Random(reader).sample(range(low, cursor), buffer)
        entries = [[urls.setdefault(p // shard_samples, f"s3://bucket/datacomp/shard-{p // shard_samples:08d}.tar"),
                    p % shard_samples, 0, p] for p in positions]
        state = {"reader": [reader, readers], "total": epoch_samples, "first_epoch": 0, "rests": [], "epoch": 0,
                 "cursor": cursor, "buffer": entries, "layout": f"{reader}/{readers}/{LAYOUT_VERSION}/epoch/0/12345",
                 "shard_cursor": 0, "sample_cursor": 0, "rng": random.Random(reader).getstate(), "skipped": {},
                 "skips_in_a_row": 0, "delivered": read - buffer, "bad_shards": []}
        snapshots[f"worker_{worker}"] = {"worker_id": worker, "dataset_state": state,
                                         "fetcher_state": {"dataset_iter_state": None, "fetcher_ended": False}}
    loader = {"loader": {"_snapshot": {"_main_snapshot": {"_num_workers": workers}, "_worker_snapshots": snapshots}},
              "skipped": {}, "bad_shards": {}, "samples_delivered": workers * (read - buffer), "batches_delivered": 9}
    return {"progress": {"step": 100, "samples": 0, "nonfinite_skipped": 0}, "loader": loader,
            "rng": {"torch": torch.get_rng_state()}, "world_size": world}


def intervals(start: dict) -> int:
    """[low, high) ranges a re-partition's start holds (one per buffered sample, one per reader's unread part):
    in the whole rests, or in a share's pieces."""
    if "pieces" in start:
        return sum(len(own) for _, pieces in start["pieces"] for _, _, own in pieces)
    return sum(len(rest) for _, rest in start["rests"])


def read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def before(folder: Path, saved_world: int, world: int, workers: int) -> dict:
    """Every rank reads every old state and builds the whole rests; each worker receives (and sends back, and
    saves) the rank's whole state. One rank's figures: every rank does the same."""
    started = time.perf_counter()
    states = [read(folder / f"trainer_state_rank{old}.pt") for old in range(saved_world)]
    state = epochs.repartitioned_state([s["loader"] for s in states], rank=world - 1, step=100)
    seconds = time.perf_counter() - started
    received = len(pickle.dumps({"repartition": state["repartition"]}))
    return {"reads": saved_world, "all_reads": saved_world * world,
            "read_mb": sum((folder / f"trainer_state_rank{old}.pt").stat().st_size for old in range(saved_world)) / 1e6,
            "rank_intervals": intervals(state["repartition"]), "all_intervals": intervals(state["repartition"]) * world,
            "worker_mb": received / 1e6,
            "worker_keeps": intervals(state["repartition"]), "seconds": seconds, "builds": world}


def after(folder: Path, saved_world: int, world: int, workers: int) -> dict:
    """As load_checkpoint: rank r reads old states r, r + W, ... and sends their carry to rank 0, which builds
    every rank's share once and hands it out; a worker keeps its own pieces (stream._unstarted_state)."""
    read_seconds, carry, read_mb = [], {}, []
    for rank in range(world):
        started = time.perf_counter()
        mine = {old: epochs.carried(read(folder / f"trainer_state_rank{old}.pt")["loader"])
                for old in range(rank, saved_world, world)}
        payload = pickle.dumps(mine)  # the gather to rank 0
        read_seconds.append(time.perf_counter() - started)
        read_mb.append(sum((folder / f"trainer_state_rank{old}.pt").stat().st_size for old in mine) / 1e6)
        carry.update(pickle.loads(payload))
    started = time.perf_counter()
    shares = epochs.repartitioned_states([carry[old] for old in sorted(carry)], world_size=world,
                                         readers_per_rank=workers, step=100)
    sent = [pickle.dumps(share) for share in shares]  # the scatter
    received = [pickle.loads(payload) for payload in sent]
    build_seconds = time.perf_counter() - started
    largest = max(range(world), key=lambda rank: len(sent[rank]))
    share = received[largest]["repartition"]
    keeps = max(intervals(epochs.own_share(share, reader)) for reader, _ in share["pieces"])
    return {"reads": max(len(range(rank, saved_world, world)) for rank in range(world)), "all_reads": saved_world,
            "read_mb": max(read_mb), "rank_intervals": intervals(share),
            "all_intervals": sum(intervals(state["repartition"]) for state in received),
            "worker_mb": len(pickle.dumps({"repartition": share})) / 1e6, "worker_keeps": keeps,
            "seconds": max(read_seconds) + build_seconds, "builds": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="2:1,1:2,8:16,16:8", help="saved:new world sizes, comma-separated")
    parser.add_argument("--workers", type=int, default=8, help="data.workers, old and new")
    parser.add_argument("--buffer", type=int, default=10_000, help="data.shuffle_buffer")
    parser.add_argument("--read", type=int, default=50_000, help="samples each old reader has read")
    parser.add_argument("--epoch", type=int, default=100_000_000, help="samples an epoch")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        for layout in args.layouts.split(","):
            saved_world, world = (int(part) for part in layout.split(":"))
            folder = Path(temporary) / layout.replace(":", "-")
            folder.mkdir()
            for rank in range(saved_world):
                torch.save(saved_state(rank=rank, world=saved_world, workers=args.workers, epoch_samples=args.epoch,
                                       read=args.read, buffer=args.buffer, shard_samples=10_000),
                           folder / f"trainer_state_rank{rank}.pt")
            for name, measure in (("before", before), ("after", after)):
                rows.append({"layout": layout, "way": name, **measure(folder, saved_world, world, args.workers)})
    print(f"{args.workers} workers a rank, shuffle buffer {args.buffer:,}, {args.read:,} samples read per old reader")
    print("| saved -> new ranks | way | trainer-state reads (most by a rank / all ranks) | MB read by a rank | "
          "rests built | intervals in a rank's loader state (largest / all ranks) | MB each worker receives | "
          "intervals a worker keeps and saves | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['layout'].replace(':', ' -> ')} | {row['way']} | {row['reads']} / {row['all_reads']} | "
              f"{row['read_mb']:.1f} | {row['builds']} | {row['rank_intervals']:,} / {row['all_intervals']:,} | "
              f"{row['worker_mb']:.2f} | "
              f"{row['worker_keeps']:,} | {row['seconds']:.2f} |")
    print(json.dumps({"rows": [{key: round(value, 3) if isinstance(value, float) else value
                                for key, value in row.items()} for row in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
