"""Elastic resume, property style: the real ShardStream and repartitioned_state, driven in one process (no
workers, no ranks) through random interruptions and changes of rank and worker counts, over tar shards of
random, uneven sizes. A decoder that keeps only the key stands in for image decoding, so hundreds of runs
take seconds; the multi-process tests (test_train) keep a few representative ones end to end."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from epochkit import KeyDecoder, write_text_shards

from mmscale.data import epochs
from mmscale.data.epochs import carried, repartitioned_state, repartitioned_states
from mmscale.data.loader import ShardStream, StreamSettings
from mmscale.data.tars import parse_spec


class Rank:
    """One rank of a simulated run: its readers (ShardStreams), whose batches it takes in turn, as the
    StatefulDataLoader does, and their states saved as BatchLoader.state_dict() would hold them."""

    def __init__(self, spec: str, *, rank: int, world: int, workers: int, batch: int, buffer: int, epochs_: int,
                 start: dict | None):
        settings = StreamSettings(sources=tuple(parse_spec(spec)), sampling="epoch", rank=rank, world_size=world,
                                  seed=3, shuffle_buffer=buffer, batch_size=batch, epochs=epochs_)
        self.workers = max(workers, 1)
        self.streams = [ShardStream(settings, KeyDecoder()) for _ in range(self.workers)]
        self.start = start
        if start is not None:
            for stream in self.streams:
                stream.load_state_dict({"repartition": start["repartition"]})
        self.iterators = [None] * self.workers
        self.states: list[dict] = [stream.state_dict() for stream in self.streams]
        self.turn, self.done = 0, [False] * self.workers
        self.delivered = start["samples_delivered"] if start else 0

    def next_batch(self) -> list | None:
        """The next batch in worker order (a worker whose stream ended is passed over), None when all ended."""
        for _ in range(self.workers):
            worker, self.turn = self.turn, (self.turn + 1) % self.workers
            if self.done[worker]:
                continue
            if self.iterators[worker] is None:
                self.iterators[worker] = self.streams[worker].iterate(worker, self.workers)
            for batch in self.iterators[worker]:
                if batch["size"]:
                    self.states[worker] = self.streams[worker].state_dict()
                    self.delivered += batch["size"]
                    return list(zip(batch["keys"], batch["passes"]))
            self.done[worker] = True
        return None

    def saved(self) -> dict:
        snapshot = {"_main_snapshot": {"_num_workers": self.workers},
                    "_worker_snapshots": {f"worker_{i}": {"dataset_state": state} for i, state in enumerate(self.states)}}
        state = {"loader": {"_snapshot": snapshot}, "skipped": {}, "samples_delivered": self.delivered,
                 "batches_delivered": 0}
        if self.start is not None:
            state["start"] = self.start["repartition"]
        return state


def resumed_states(saved: list[dict], *, world: int, workers: int, step: int, shares: bool) -> list[dict]:
    """Each new rank's loader state: its share, built once (what load_checkpoint hands it), or the whole rests."""
    if shares:
        return repartitioned_states([carried(state) for state in saved], world_size=world,
                                    readers_per_rank=max(workers, 1), step=step)
    return [repartitioned_state(saved, rank=rank, step=step) for rank in range(world)]


def simulate(case: random.Random, root: Path, *, shares: bool = True) -> tuple[dict, list[dict], list[int]]:
    """A run over random shards with up to two interruptions, each resumed on a random layout from its last
    checkpoint (steps between the checkpoint and the kill are trained again, as after a SIGKILL); the new ranks
    get their shares of the loader position (`shares`) or the whole of it."""
    sizes = [case.choice([0, 1, 2, 5, 9, 17, 30, 47, 64]) for _ in range(case.randint(1, 6))]
    while sum(sizes) < 12:
        sizes.append(case.randint(5, 40))
    urls = write_text_shards(root, sizes, listed=case.random() < 0.7)
    spec = "::".join(urls)
    total = sum(sizes)
    epoch_count = case.randint(1, 3)
    layouts = []
    for _ in range(case.randint(1, 3)):
        while True:
            world, workers = case.randint(1, 3), case.choice([1, 1, 2, 3])
            if world * workers <= total // 2:
                break
        layouts.append((world, workers))
    buffer = case.choice([0, 4, 16, 256, 1000])
    batch = case.randint(1, 5)
    trained: dict[int, list] = {}  # step -> (key, epoch) of every rank
    step, saved = 0, None
    for number, (world, workers) in enumerate(layouts):
        starts = resumed_states(saved, world=world, workers=workers, step=step, shares=shares) if saved \
            else [None] * world
        ranks = [Rank(spec, rank=r, world=world, workers=workers, batch=batch, buffer=buffer, epochs_=epoch_count,
                      start=starts[r]) for r in range(world)]
        last = number == len(layouts) - 1
        kill = None if last else step + case.randint(0, max(total * epoch_count // (world * batch), 1))
        checkpoint = None if last else case.randint(step, kill)
        snapshots = [rank.saved() for rank in ranks] if checkpoint == step else None
        finished = False
        while kill is None or step < kill:
            batches = [rank.next_batch() for rank in ranks]
            if all(b is None for b in batches):
                finished = True
                break
            step += 1
            trained[step] = [pair for b in batches if b for pair in b]
            if step == checkpoint:
                snapshots = [rank.saved() for rank in ranks]
        if last or finished:
            break
        for later in [s for s in trained if s > checkpoint]:
            del trained[later]  # killed after the checkpoint: those steps run again
        step, saved = checkpoint, snapshots
    return {"sizes": sizes, "epochs": epoch_count, "layouts": layouts, "buffer": buffer, "batch": batch}, \
        [trained[s] for s in sorted(trained)], urls


def _check(description: dict, steps: list[list], urls: list[str]) -> None:
    every = {f"s{shard}k{i:04d}" for shard, size in enumerate(description["sizes"]) for i in range(size)}
    per_epoch = Counter((key, epoch) for pairs in steps for key, epoch in pairs)
    for epoch in range(description["epochs"]):
        keys = {key for key, e in per_epoch if e == epoch}
        assert keys == every, (description, epoch, sorted(every - keys)[:5], sorted(keys - every)[:5])
    assert set(per_epoch.values()) == {1}, (description, [p for p, n in per_epoch.items() if n > 1][:5])
    # Before any sample of the next epoch: the last step with a sample of epoch e is at most a round of one
    # rank's workers (their batches with the same number) after the first step with a sample of e + 1.
    slack = max(workers for _, workers in description["layouts"]) - 1
    for epoch in range(description["epochs"] - 1):
        last = max(i for i, pairs in enumerate(steps) if any(e == epoch for _, e in pairs))
        first = min(i for i, pairs in enumerate(steps) if any(e == epoch + 1 for _, e in pairs))
        assert last <= first + slack, (description, epoch, last, first)


def test_random_interruptions_and_layouts_train_every_sample_once_per_epoch_in_order(tmp_path):
    """200 random runs: 1-7 shards of 0-64 samples (sizes.json or counted), 1-3 epochs, shuffle buffers of
    0 to 1,000, 1-3 ranks x 1-3 workers, killed up to twice at a random step, resumed from a random earlier
    checkpoint on another layout, the new ranks given their shares of the position (every other run: the
    whole of it). Every sample trains exactly once per epoch, and each epoch ends before the next begins
    (within one round of a rank's workers)."""
    for number in range(200):
        case = random.Random(number)
        description, steps, urls = simulate(case, tmp_path / f"case{number}", shares=number % 2 == 0)
        _check(description, steps, urls)


def test_shares_hold_each_readers_pieces_as_the_whole_rests_cut_them(tmp_path):
    """Runs of test_random_...'s kind saved mid-epoch with full shuffle buffers: each new reader's pieces in its
    rank's share (built once for all ranks) equal those it cuts itself from the whole rests, each rank's share
    holds its readers' pieces only (together: every rest exactly once), and a share cut down to one reader
    (what a worker saves) still gives that reader its pieces."""
    case = random.Random(7)
    for number in range(30):
        urls = write_text_shards(tmp_path / f"case{number}", [case.randint(5, 60) for _ in range(case.randint(1, 5))],
                                 listed=True)
        old_world, old_workers = case.randint(1, 3), case.randint(1, 3)
        ranks = [Rank("::".join(urls), rank=r, world=old_world, workers=old_workers, batch=case.randint(1, 3),
                      buffer=case.choice([0, 4, 16]), epochs_=2, start=None) for r in range(old_world)]
        for _ in range(case.randint(0, 12)):
            for rank in ranks:
                rank.next_batch()
        saved = [rank.saved() for rank in ranks]
        world, workers = case.randint(1, 4), case.randint(1, 3)
        whole = resumed_states(saved, world=world, workers=workers, step=3, shares=False)
        shares = resumed_states(saved, world=world, workers=workers, step=3, shares=True)
        total, readers = ranks[0].streams[0].samples_per_epoch, world * workers
        rests = whole[0]["repartition"]["rests"]
        held = Counter()
        for rank in range(world):
            share = shares[rank]["repartition"]
            assert sorted(reader for reader, _ in share["pieces"]) == sorted(
                epochs.reader_order(rank=rank, worker=w, world_size=world) for w in range(workers))
            for reader, pieces in share["pieces"]:
                expected = epochs.started(reader=reader, readers=readers, total=total, start=whole[rank]["repartition"])
                assert epochs.started(reader=reader, readers=readers, total=total, start=share) == expected
                alone = epochs.own_share(share, reader)
                assert epochs.started(reader=reader, readers=readers, total=total, start=alone) == expected
                held.update(position for epoch, _, own in pieces for low, high in own for position in range(low, high))
        assert held == Counter(position for _, rest in rests for low, high in rest for position in range(low, high))
        assert [state["samples_delivered"] for state in shares] == [state["samples_delivered"] for state in whole]


def test_a_share_for_another_number_of_readers_is_refused():
    share = {"layout": None, "step": 1, "first_epoch": 0, "readers": 4, "pieces": [[1, []], [3, []]]}
    with pytest.raises(ValueError, match="re-partitioned for 4 readers and this loader has 6"):
        epochs.started(reader=1, readers=6, total=10, start=share)
    with pytest.raises(ValueError, match="no piece for reader 0 of 4"):
        epochs.started(reader=0, readers=4, total=10, start=share)


def test_cut_gives_each_bound_what_take_gives():
    case = random.Random(3)
    for _ in range(300):
        intervals = epochs.normalized((low, low + case.randint(1, 4)) for low in case.sample(range(60), 12))
        size = epochs.length(intervals)
        ends = sorted(case.randint(0, size) for _ in range(case.randint(1, 6)))
        bounds = list(zip([0, *ends[:-1]], ends))
        assert epochs.cut(intervals, bounds) == [epochs.take(intervals, start, end) for start, end in bounds]


def test_the_issue_23_scenario_two_ranks_to_one_with_a_large_buffer(tmp_path):
    """3 shards of about 467 (1,400 samples), buffer 256, 2 ranks x 1 worker, batch 32 per rank: interrupted
    after 8 steps and resumed on one rank (batch 64), 1,344 samples in all: 1,344 distinct, all of epoch 0."""
    urls = write_text_shards(tmp_path, [467, 467, 466], listed=True)
    spec = "::".join(urls)
    ranks = [Rank(spec, rank=r, world=2, workers=1, batch=32, buffer=256, epochs_=None, start=None) for r in (0, 1)]
    trained = [pair for _ in range(8) for rank in ranks for pair in rank.next_batch()]
    saved = [rank.saved() for rank in ranks]
    resumed = Rank(spec, rank=0, world=1, workers=1, batch=64, buffer=256, epochs_=None,
                   start=repartitioned_state(saved, rank=0, step=8))
    trained += [pair for _ in range(21 - 8) for pair in resumed.next_batch()]
    keys = [key for key, _ in trained]
    assert len(keys) == 1344 and len(set(keys)) == 1344
    assert {epoch for _, epoch in trained} == {0}


def test_pieces_are_equal_and_the_odd_samples_are_dealt_over_the_run():
    """7 samples an epoch over 3 readers: pieces of 3, 2, 2 in the first epoch, then the odd one goes to the
    next reader, so after 3 epochs each has read 7."""
    pieces = [[epochs.piece(before=epoch * 7, length=7, reader=reader, readers=3) for reader in range(3)]
              for epoch in range(3)]
    assert pieces[0] == [(0, 3), (3, 5), (5, 7)]
    counts = [sum(high - low for low, high in (epoch[reader] for epoch in pieces)) for reader in range(3)]
    assert counts == [7, 7, 7]
    for epoch in pieces:
        assert [low for low, _ in epoch[1:]] == [high for _, high in epoch[:-1]] and epoch[-1][1] == 7


@pytest.mark.parametrize("intervals,start,end,expected", [
    ([(0, 3), (5, 6), (9, 12)], 2, 6, [(2, 3), (5, 6), (9, 11)]),
    ([(4, 8)], 0, 4, [(4, 8)]),
    ([(0, 2), (4, 6)], 4, 4, []),
])
def test_take_cuts_a_rest_in_sequence_order(intervals, start, end, expected):
    assert epochs.take(intervals, start, end) == expected


def test_the_elastic_carry_bench_runs_and_shows_each_rank_its_share():
    """tools/bench/elastic_carry.py at toy size: after the change every old state is read once in all, and a
    rank's loader state holds its share, not the whole rests."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "tools" / "bench" / "elastic_carry.py"
    result = subprocess.run([sys.executable, str(script), "--layouts", "1:2,4:2", "--workers", "2", "--buffer", "50",
                             "--read", "200", "--epoch", "20000"], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {(row["layout"], row["way"]): row for row in json.loads(result.stdout.splitlines()[-1])["rows"]}
    assert rows[("4:2", "before")]["all_reads"] == 8 and rows[("4:2", "after")]["all_reads"] == 4
    assert rows[("1:2", "before")]["builds"] == 2 and rows[("1:2", "after")]["builds"] == 1
    for layout in ("1:2", "4:2"):
        whole, share = rows[(layout, "before")], rows[(layout, "after")]
        assert share["all_intervals"] < whole["all_intervals"] and share["worker_keeps"] < whole["worker_keeps"]
