"""Which samples of an epoch each reader reads, and what is left of the epochs when the readers change.

An epoch is its shards in the epoch's (shuffled) order, laid end to end: sample position p of the
epoch is sample p - offset(shard) of the shard it falls in, the offsets being running sums of the
shards' sample counts (sizes.json, or counted). The readers (rank x worker) cut that line into
contiguous pieces of equal length, give or take one sample, so every reader finishes an epoch
within a batch of the others, whatever the sizes of the shards: the readers that the training loop
takes batches from first (worker 0 of every rank, then worker 1, ...) get the extra samples.
The counts are dealt over the whole run, not per epoch, so the odd samples do not pile up on the
same readers epoch after epoch.

After a change in the number of readers (elastic resume) the epochs that some reader had begun
become "rests": the sorted positions that no old reader trained (its unread positions and what
sat in its shuffle buffer), cut among the new readers the same way. A reader's piece of a rest
is a list of intervals; a piece of a whole epoch is one interval. The rests are built once, from
every old rank's saved state, and cut into one share per new rank (repartitioned_states): a rank
holds its own readers' pieces, not the whole rest (issue 26, item 12).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from itertools import accumulate

Intervals = list[tuple[int, int]]  # sorted, disjoint, non-empty [low, high) ranges of epoch positions


def reader_order(*, rank: int, worker: int, world_size: int) -> int:
    """Where a reader stands in the order the training loop takes batches: worker 0 of ranks 0..W-1
    (all in the same step), then worker 1 of every rank, and so on."""
    return worker * world_size + rank


def dealt(total: int, reader: int, readers: int) -> int:
    """How many of items 0..total-1 go to `reader` when they are dealt round the readers one by one."""
    return (total + readers - 1 - reader) // readers


def piece(*, before: int, length: int, reader: int, readers: int) -> tuple[int, int]:
    """`reader`'s [start, end) of an epoch (or rest) of `length` positions that begins after `before`
    positions of the run's stream: the readers' pieces follow each other in reader order, each as long
    as the count dealt to it of this stretch of the stream."""
    start = sum(dealt(before + length, other, readers) - dealt(before, other, readers) for other in range(reader))
    return start, start + dealt(before + length, reader, readers) - dealt(before, reader, readers)


def normalized(ranges: Iterable[tuple[int, int]]) -> Intervals:
    """Sorted, merged, without empty ranges."""
    merged: Intervals = []
    for low, high in sorted((int(low), int(high)) for low, high in ranges if high > low):
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def length(intervals: Intervals) -> int:
    return sum(high - low for low, high in intervals)


def from_position(intervals: Intervals, position: int) -> Intervals:
    """The part of `intervals` at or after `position`."""
    return [(max(low, position), high) for low, high in intervals if high > position]


def contains(intervals: Intervals, position: int) -> bool:
    index = bisect.bisect_right(intervals, (position, float("inf"))) - 1
    return index >= 0 and intervals[index][0] <= position < intervals[index][1]


def take(intervals: Intervals, start: int, end: int) -> Intervals:
    """Positions `start`..`end`-1 of the sequence the intervals spell, in order (a piece of a rest)."""
    taken, seen = [], 0
    for low, high in intervals:
        size = high - low
        first, last = max(start - seen, 0), min(end - seen, size)
        if first < last:
            taken.append((low + first, low + last))
        seen += size
        if seen >= end:
            break
    return taken


def cut(intervals: Intervals, bounds: list[tuple[int, int]]) -> list[Intervals]:
    """take(intervals, start, end) for each (start, end) of `bounds`, which follow each other in order, in one
    pass over the intervals (a rest can hold millions of them: one per sample that sat in a shuffle buffer)."""
    pieces: list[Intervals] = []
    index, seen = 0, 0  # seen: positions of the sequence before intervals[index]
    for start, end in bounds:
        while index < len(intervals) and seen + intervals[index][1] - intervals[index][0] <= start:
            seen += intervals[index][1] - intervals[index][0]
            index += 1
        taken, position, before = [], index, seen
        while position < len(intervals) and before < end:
            low, high = intervals[position]
            first, last = max(start - before, 0), min(end - before, high - low)
            if first < last:
                taken.append((low + first, low + last))
            before += high - low
            position += 1
        pieces.append(taken)
    return pieces


def split_by_shard(intervals: Intervals, offsets: list[int]) -> list[tuple[int, Intervals]]:
    """(shard number in the epoch's order, the intervals within it) for each shard the intervals touch,
    in order; `offsets` are the shards' first positions plus the epoch's length at the end."""
    pieces: list[tuple[int, Intervals]] = []
    for low, high in intervals:
        shard = bisect.bisect_right(offsets, low) - 1
        while low < high and shard < len(offsets) - 1:
            end = min(high, offsets[shard + 1])
            if end > low:
                if pieces and pieces[-1][0] == shard:
                    pieces[-1][1].append((low, end))
                else:
                    pieces.append((shard, [(low, end)]))
            low, shard = end, shard + 1
    return pieces


# --- a reader's position ---------------------------------------------------------------------------
# A reader's state (epoch sampling) holds: `reader` [order, readers], `total` (samples per epoch),
# `first_epoch` (where its layout began), `rests` [[epoch, rest length, its piece]] for the epochs
# that layout began inside, `epoch`, `cursor` (its next unread position of the epoch: it has read
# every position of its piece before it) and `buffer` [[url, index, epoch, position], ...].

def started(*, reader: int, readers: int, total: int, start: dict | None = None) -> dict:
    """A reader's position before it has read anything: at epoch 0 of a fresh run, or at the first epoch
    of a re-partition's `start`, with its piece of each rest: as cut for it (a share from
    repartitioned_states) or cut here from the whole rests (repartition()'s result)."""
    state = {"reader": [reader, readers], "total": total, "first_epoch": 0, "rests": [], "epoch": 0, "cursor": 0,
             "buffer": []}
    if start is not None and "pieces" in start:
        state["rests"] = [[epoch, size, [tuple(pair) for pair in own]]
                          for epoch, size, own in own_pieces(start, reader=reader, readers=readers)]
    elif start is not None:
        before = 0
        for epoch, rest in start["rests"]:
            rest = [tuple(pair) for pair in rest]
            low, high = piece(before=before, length=length(rest), reader=reader, readers=readers)
            state["rests"].append([epoch, length(rest), take(rest, low, high)])
            before += length(rest)
    if start is not None:
        state["first_epoch"] = state["epoch"] = start["first_epoch"]
    return state


def own_pieces(share: dict, *, reader: int, readers: int) -> list:
    """[[epoch, rest length, intervals], ...]: `reader`'s pieces in a share of repartitioned_states."""
    if share["readers"] != readers:
        raise ValueError(f"the loader position was re-partitioned for {share['readers']} readers and this loader "
                         f"has {readers} (ranks x data.workers): resume with the data.workers it was cut for")
    for owner, pieces in share["pieces"]:
        if owner == reader:
            return pieces
    raise ValueError(f"the loader position holds no piece for reader {reader} of {readers}: it was cut for "
                     f"readers {sorted(owner for owner, _ in share['pieces'])} (another rank's share)")


def own_share(share: dict, reader: int) -> dict:
    """A share of repartitioned_states cut down to one reader's pieces (what a worker keeps in its state)."""
    return {**share, "pieces": [[owner, pieces] for owner, pieces in share["pieces"] if owner == reader]}


def plan(state: dict, epoch: int) -> Intervals:
    """The positions of `epoch` that this reader reads (all of them, read or not)."""
    before = 0
    for rest_epoch, rest_length, own in state["rests"]:
        if rest_epoch == epoch:
            return [tuple(pair) for pair in own]
        if rest_epoch < epoch:
            before += rest_length
    whole_epochs = epoch - state["first_epoch"] - sum(1 for rest in state["rests"] if rest[0] < epoch)
    before += whole_epochs * state["total"]
    reader, readers = state["reader"]
    low, high = piece(before=before, length=state["total"], reader=reader, readers=readers)
    return [(low, high)] if high > low else []


def is_rest(state: dict, epoch: int) -> bool:
    return any(rest[0] == epoch for rest in state["rests"])


def repartition(readers: list[dict]) -> dict:
    """What the old readers left of the epochs any of them had begun, as {first_epoch, rests: [[epoch,
    intervals]]}: for each epoch from the oldest reader's to the newest's, the positions no old reader
    trained: the unread part of each reader's piece and whatever sat in its shuffle buffer."""
    oldest = min(reader["epoch"] for reader in readers)
    newest = max(reader["epoch"] for reader in readers)
    rests = []
    for epoch in range(oldest, newest + 1):
        ranges: list[tuple[int, int]] = []
        for reader in readers:
            if reader["epoch"] > epoch:
                continue
            own = plan(reader, epoch)
            if reader["epoch"] == epoch:
                own = from_position(own, reader["cursor"])
                ranges += [(position, position + 1) for position in _buffered(reader, epoch)]
            ranges += own
        rests.append([epoch, normalized(ranges)])
    return {"first_epoch": oldest, "rests": rests}


def _buffered(reader: dict, epoch: int) -> list[int]:
    """The positions of `epoch` in a reader's shuffle buffer: its saved entries [url, index, epoch, position],
    or carried()'s [[epoch, [position, ...]], ...]."""
    if "buffered" in reader:
        return next((positions for buffered_epoch, positions in reader["buffered"] if buffered_epoch == epoch), [])
    return [position for *_, buffered_epoch, position in reader["buffer"] if buffered_epoch == epoch]


# --- saved states ------------------------------------------------------------------------------------
# What a re-partition reads of an old reader's state (plan(), repartition(), the layout check); its random
# generator and counters stay behind.
_CARRIED_FIELDS = ("layout", "reader", "total", "first_epoch", "rests", "epoch", "cursor", "repartition")


def carried(loader_state: dict) -> dict:
    """What a re-partition needs of one old rank's BatchLoader.state_dict(): each reader's position, its shuffle
    buffer cut to the positions of each epoch in it (`buffered`: which samples sat there, not where to re-read
    them), the re-partition the rank had started from, and its counts: what each rank sends to the one that
    builds the rests."""
    readers = []
    for reader in _reader_states(loader_state["loader"]):
        kept = None if reader is None else {key: value for key, value in reader.items() if key in _CARRIED_FIELDS}
        if kept is not None and "buffer" in reader:
            buffered: dict[int, list[int]] = {}
            for *_, epoch, position in reader["buffer"]:
                buffered.setdefault(epoch, []).append(position)
            kept["buffered"] = [[epoch, positions] for epoch, positions in buffered.items()]
        readers.append(kept)
    return {"readers": readers, "start": loader_state.get("start"), "skipped": loader_state["skipped"],
            "bad_shards": loader_state.get("bad_shards", {}), "samples_delivered": loader_state["samples_delivered"]}


def repartitioned_state(saved: list[dict], *, rank: int, step: int) -> dict:
    """A BatchLoader state for `rank` of a run with a different number of ranks or workers than the run
    that saved `saved` (every old rank's BatchLoader.state_dict(), in rank order) at `step`. In `epoch`
    sampling the rest of the epochs the old readers had begun is exactly what none of them trained (what
    sat in their shuffle buffers goes back to the pool), cut among the new readers by the new layout; in
    `resampled` sampling the new readers start new streams derived from (seed, step). Counts carry over
    on rank 0. This state holds the whole rests (each reader cuts its piece); repartitioned_states builds
    them once for all ranks and gives each only its share."""
    carry = [carried(state) for state in saved]
    return _rank_state(_start(carry, step), carry, rank=rank)


def repartitioned_states(carry: list[dict], *, world_size: int, readers_per_rank: int, step: int) -> list[dict]:
    """The BatchLoader state of each rank of a run of `world_size` ranks with `readers_per_rank` readers each,
    resuming at `step` from the old ranks' `carry` (carried(), in old rank order): what repartitioned_state()
    gives, with the rests built once and cut here among all the new readers, so each rank's state holds its own
    readers' pieces (about 1/world_size of the rests) instead of the whole rests."""
    start = _start(carry, step)
    return [_rank_state(share, carry, rank=rank) for rank, share in
            enumerate(_shares(start, world_size=world_size, readers_per_rank=readers_per_rank))]


def _start(carry: list[dict], step: int) -> dict:
    """{layout, step} of the re-partition and, in `epoch` sampling, {first_epoch, rests} (repartition())."""
    per_rank = [state["readers"] for state in carry]
    known = [reader for states in per_rank for reader in states if reader and "layout" in reader]
    if not known:  # no reader had delivered a batch: the saved run's own start is the start
        # None: saved before any batch of a fresh run, so the run starts afresh in the new layout.
        return {**(_whole_start(carry) or {"layout": None, "first_epoch": 0, "rests": []}), "step": step}
    layouts = {reader["layout"].split("/", 2)[2] for reader in known}
    if len(layouts) != 1:
        raise ValueError(f"the checkpoint's loader states disagree on their layout: {sorted(layouts)}")
    start = {"layout": layouts.pop(), "step": step}
    if start["layout"].split("/")[1] == "epoch":  # version/sampling/seed/shards
        start |= repartition(_resolved(per_rank, carry, total=known[0]["total"]))
    return start


def _whole_start(carry: list[dict]) -> dict | None:
    """The start the old ranks had been given, whole again: the union of their shares' pieces (or the whole
    rests every rank held, as mmscale saved them before shares)."""
    starts = [state["start"] for state in carry if state.get("start")]
    if not starts or "pieces" not in starts[0]:
        return starts[0] if starts else None
    ranges: dict[int, list] = {}
    for start in starts:
        for _, pieces in start["pieces"]:
            for epoch, _, own in pieces:
                ranges.setdefault(epoch, []).extend(own)
    return {"layout": starts[0]["layout"], "first_epoch": starts[0]["first_epoch"],
            "rests": [[epoch, normalized(ranges[epoch])] for epoch in sorted(ranges)]}


def _shares(start: dict, *, world_size: int, readers_per_rank: int) -> list[dict]:
    """`start` cut into one share per new rank: {readers, pieces: [[reader, [[epoch, rest length, intervals],
    ...]], ...]} for the rank's readers, each rest cut in one pass (cut())."""
    readers = world_size * readers_per_rank
    pieces: list[list] = [[] for _ in range(readers)]
    before = 0
    for epoch, rest in start.get("rests", []):
        rest = [tuple(pair) for pair in rest]
        size = length(rest)
        ends = list(accumulate(dealt(before + size, reader, readers) - dealt(before, reader, readers)
                               for reader in range(readers)))
        for reader, own in enumerate(cut(rest, list(zip([0, *ends[:-1]], ends)))):
            pieces[reader].append([epoch, size, own])
        before += size
    common = {key: value for key, value in start.items() if key != "rests"} | {"readers": readers}
    return [common | {"pieces": [[order, pieces[order]] for order in
                                 (reader_order(rank=rank, worker=worker, world_size=world_size)
                                  for worker in range(readers_per_rank))]}
            for rank in range(world_size)]


def _rank_state(start: dict, carry: list[dict], *, rank: int) -> dict:
    """A BatchLoader state holding `start`; the old ranks' counts carry over on rank 0."""
    skipped = sum((Counter(state["skipped"]) for state in carry), Counter()) if rank == 0 else Counter()
    bad = sum((Counter(state["bad_shards"]) for state in carry), Counter()) if rank == 0 else Counter()
    return {"repartition": start, "skipped": dict(skipped), "bad_shards": dict(bad),
            "samples_delivered": sum(state["samples_delivered"] for state in carry) if rank == 0 else 0,
            "batches_delivered": 0}


def _resolved(per_rank: list[list[dict | None]], carry: list[dict], *, total: int) -> list[dict]:
    """Every old reader's position; one that had not delivered a batch yet is where its run started it."""
    world = len(per_rank)
    resolved = []
    for rank, (states, rank_state) in enumerate(zip(per_rank, carry)):
        for worker, state in enumerate(states):
            if state and "layout" in state:
                resolved.append(state)
                continue
            start = (state or {}).get("repartition") or rank_state.get("start")
            reader = reader_order(rank=rank, worker=worker, world_size=world)
            resolved.append(started(reader=reader, readers=world * len(states), total=total, start=start))
    return resolved


def _reader_states(loader_state: dict) -> list[dict | None]:
    """Each worker's ShardStream state in a StatefulDataLoader state (None: a worker that never delivered)."""
    if "dataset_state" in loader_state:  # no worker processes
        return [loader_state["dataset_state"] or None]
    snapshot = loader_state["_snapshot"]
    workers = snapshot["_main_snapshot"]["_num_workers"]
    return [(snapshot["_worker_snapshots"].get(f"worker_{i}") or {}).get("dataset_state") or None
            for i in range(workers)]
