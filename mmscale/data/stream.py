"""One reader's stream: its shards -> shuffled raw samples -> decoded, tokenized, masked batches.

Each dataloader worker of each rank (a reader) owns a deterministic stream of positions: in
epoch mode its piece of each epoch's shuffled shard list laid end to end (mmscale.data.epochs:
equal pieces by sample count, so readers finish an epoch together whatever the shard sizes), in
resampled mode an endless run of shards drawn by source weight. Shuffling happens on raw
(undecoded) samples, the buffer empties at the end of each epoch, and every random choice is a
function of the seed and the sample's identity, so a reader's state is small: where it is in its
stream, which positions sit in its shuffle buffer, and its RNG state. Restoring re-reads only
the shards those positions are in (raw bytes, no decoding) and continues with the next unseen
sample; on another number of readers, what no old reader trained is cut anew.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import IterableDataset, get_worker_info

from mmscale.data import epochs
from mmscale.data.samples import SampleDecoder
from mmscale.data.tars import (
    DEFAULT_MAX_MEMBER_BYTES,
    SAMPLE_EXTENSIONS,
    SampleRejected,
    ShardError,
    ShardSource,
    ShardTruncated,
    iter_raw_samples,
    shard_sizes,
)

# A stream that skips this many samples (or empty shards) in a row is broken, not noisy: stop it
# rather than keep every rank waiting for a batch that never comes.
MAX_SKIPS_IN_A_ROW = 20_000
# In `resampled` sampling the unreadable-shard fraction is judged over a reader's last this many draws.
BAD_SHARD_WINDOW = 20
# Entries of a worker's live state that state_dict() writes in another form, or not at all.
_DERIVED_KEYS = ("buffer", "rng", "skipped", "since_last_batch", "bad_since_batch")
# Saved positions of another version of the position scheme are refused, not misread.
LAYOUT_VERSION = "v2"


class UnusableData(RuntimeError):
    """A stream that skipped too many samples or shards (in a row, or of an epoch) to be worth continuing."""


def mix_seed(*parts) -> int:
    """A 63-bit seed from any printable parts; stable across processes and runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class StreamSettings:
    """How one rank's stream is cut from the shards (the same on every worker of the rank)."""

    sources: tuple[ShardSource, ...]
    sampling: str
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int
    batch_size: int
    epochs: int | None
    shuffle_shards: bool = True
    drop_last: bool = False
    max_bad_shard_fraction: float = 0.05
    sizes: tuple[int, ...] | None = None
    """Samples in each shard (sources' URLs in order), for epoch sampling; None: shard_sizes() finds them."""
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    """Larger tar members are not read; their samples are skipped as `member_too_large`."""


class ShardStream(IterableDataset):
    """An IterableDataset of whole batches with a `state_dict` for exact mid-epoch resume.

    Batches are dicts: `images` uint8 [B, 3, S, S], `input_ids`, `attention_mask` (and
    `mlm_input_ids`, `mlm_labels`, `mlm_positions`, `mlm_targets` when MLM is on), `labels`
    (-1 where a sample has no `.cls`), `keys`, `passes` (each sample's epoch), `skipped` (samples
    skipped since the previous batch, by reason) and `bad_shards` ([epoch, message] of each unreadable
    shard since the previous batch). In finite mode a last batch of size 0 carries the trailing counts.
    """

    def __init__(self, settings: StreamSettings, decoder: SampleDecoder):
        super().__init__()
        self.settings = settings
        self.decoder = decoder
        self._all_urls = [url for source in settings.sources for url in source.urls]
        self._sizes: list[int] | None = None
        if settings.sampling == "epoch":
            self._sizes = list(settings.sizes) if settings.sizes is not None else list(
                shard_sizes(self._all_urls).values())
        self._restored: dict | None = None
        self._live: dict | None = None
        self._epoch_plan: tuple = (None, None)

    def _read(self, url: str, *, start: int = 0) -> Iterator[dict]:
        """The raw samples of one shard from `start`, only the members a sample is decoded from."""
        return iter_raw_samples(url, start=start, extensions=SAMPLE_EXTENSIONS,
                                max_member_bytes=self.settings.max_member_bytes)

    @property
    def shard_count(self) -> int:
        """The shards of the spec: those of an epoch, in epoch sampling."""
        return len(self._all_urls)

    @property
    def samples_per_epoch(self) -> int | None:
        """The samples an epoch holds by the shards' sizes (None in resampled sampling)."""
        return None if self._sizes is None else sum(self._sizes)

    # --- positions --------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _epoch_order(self, epoch: int) -> tuple[list[str], list[int]]:
        """The epoch's shards in reading order and their first positions (the epoch's length last)."""
        if self._epoch_plan[0] != epoch:
            order = list(range(len(self._all_urls)))
            if self.settings.shuffle_shards:
                random.Random(mix_seed(self.settings.seed, "epoch", epoch)).shuffle(order)
            offsets = [0]
            for shard in order:
                offsets.append(offsets[-1] + self._sizes[shard])
            self._epoch_plan = (epoch, ([self._all_urls[shard] for shard in order], offsets))
        return self._epoch_plan[1]

    def _drawn_shard(self, draw: int, worker: int, salt=None) -> str:
        """The shard of a reader's `draw`; `salt` (the step of a re-partition) starts new streams there."""
        rng = random.Random(mix_seed(self.settings.seed, "draw", worker, draw) if salt is None
                            else mix_seed(self.settings.seed, "draw", worker, draw, "resumed", salt))
        sources = self.settings.sources
        source = rng.choices(sources, weights=[s.weight for s in sources])[0]
        return rng.choice(source.urls)

    def _epoch_stream(self, state: dict) -> Iterator[dict | None]:
        """Raw samples of the reader's piece of each epoch, from its position on; None after each epoch."""
        while self.settings.epochs is None or state["epoch"] < self.settings.epochs:
            epoch = state["epoch"]
            urls, offsets = self._epoch_order(epoch)
            own = epochs.plan(state, epoch)
            read = 0
            for shard, wanted in self._shards_to_read(state, own, offsets, rest=epochs.is_rest(state, epoch)):
                for raw in self._read_shard(state, urls[shard], offsets[shard], offsets[shard + 1], wanted, own):
                    read += 1
                    yield raw
            if not read:  # an epoch of nothing: counted in a row, so such epochs do not spin forever
                _count_skip(state, None, where=f"epoch {epoch} (this reader read no sample of it)")
            yield None  # the epoch ends: the shuffle buffer empties before the next one begins
            state.update(epoch=epoch + 1, cursor=0)

    def _shards_to_read(self, state: dict, own: epochs.Intervals, offsets: list[int], *, rest: bool):
        """(shard, wanted positions) of the reader's unread piece in order, and the shards without samples that
        it is the one to open (and count) in a whole epoch: those at a position of its piece, or at the
        epoch's end for the last reader."""
        pieces = epochs.split_by_shard(epochs.from_position(own, state["cursor"]), offsets)
        if rest:
            return pieces
        total, (reader, readers) = offsets[-1], state["reader"]
        empty = [(shard, []) for shard in range(len(offsets) - 1) if offsets[shard] == offsets[shard + 1]
                 and offsets[shard] >= state["cursor"] and (epochs.contains(own, offsets[shard])
                                                             or (offsets[shard] == total and reader == readers - 1))]
        return sorted(pieces + empty, key=lambda item: item[0])

    def _read_shard(self, state: dict, url: str, first: int, end: int, wanted: epochs.Intervals,
                    own: epochs.Intervals) -> Iterator[dict]:
        """The wanted positions of one shard (those `first`..`end`-1 of the epoch). The reader of the shard's
        first position counts it if it cannot be opened; the reader of its last counts a cut and samples
        beyond the size the shard was listed with."""
        heads, tails = epochs.contains(own, first) or first == end, epochs.contains(own, end - 1) or first == end
        last = wanted[-1][1] if wanted else first
        extra = 0
        try:
            for raw in self._read(url, start=wanted[0][0] - first if wanted else 0):
                position = first + raw["__index__"]
                if position >= last:
                    if not tails:
                        break
                    extra += 1  # beyond the size sizes.json gives: counted, not trained (positions would clash)
                    continue
                if not epochs.contains(wanted, position):
                    continue
                raw["__pass__"], raw["__position__"] = state["epoch"], position
                state["cursor"] = position + 1
                yield raw
        except ShardTruncated as error:
            if tails:
                _count_skip(state, "truncated_shard", where=f"shard {url}")
                warnings.warn(str(error), stacklevel=2)
        except ShardError as error:
            if heads:
                self._skip_shard(state, error, shards=None)
            else:
                _count_skip(state, None, where=str(error))  # counted by the reader of its first position
        else:
            if first == end and heads:
                _count_skip(state, "empty_shard", where=f"shard {url}")
        if extra:
            state["skipped"]["beyond_listed_size"] += extra
            state["since_last_batch"]["beyond_listed_size"] += extra
            warnings.warn(f"shard {url} holds {extra} samples more than the {end - first} its sizes.json lists: they "
                          "are skipped; rewrite sizes.json (tools/inspect_shards.py --write-sizes)", stacklevel=2)
        state["cursor"] = max(state["cursor"], last)

    def _resampled_stream(self, state: dict, worker: int) -> Iterator[dict]:
        """Raw samples of an endless run of drawn shards, from the reader's position on."""
        while True:
            url = self._drawn_shard(state["shard_cursor"], worker, state.get("draw_salt"))
            start = state["sample_cursor"]
            try:
                for raw in self._read(url, start=start):
                    raw["__pass__"], raw["__position__"] = state["shard_cursor"], raw["__index__"]
                    state["sample_cursor"] = raw["__index__"] + 1
                    yield raw
            except ShardTruncated as error:
                _count_skip(state, "truncated_shard", where=f"shard {url}")
                warnings.warn(str(error), stacklevel=2)
            except ShardError as error:
                self._skip_shard(state, error, shards=BAD_SHARD_WINDOW)
            else:
                if start == 0 and state["sample_cursor"] == 0:
                    _count_skip(state, "empty_shard", where=f"shard {url}")
            state.update(shard_cursor=state["shard_cursor"] + 1, sample_cursor=0)

    def _skip_shard(self, state: dict, error: ShardError, *, shards: int | None) -> None:
        """Count an unreadable shard and go on. In resampled sampling (`shards` is the window) stop once more
        than max_bad_shard_fraction of the reader's last draws were unreadable; in epoch sampling the
        BatchLoader and the training loop judge the epoch's shards as a whole (they get `bad_shards`)."""
        _count_skip(state, f"shard_{error.reason}", where=str(error))
        warnings.warn(f"skipped {error}", stacklevel=3)
        if shards is None:
            state["bad_since_batch"].append([state["epoch"], str(error)])
            return
        bad = state["bad_shards"]  # shard_cursor of each unreadable shard of the window
        bad.append(state["shard_cursor"])
        if state["shard_cursor"] + 1 < BAD_SHARD_WINDOW:
            return  # too few draws to judge yet
        bad[:] = [draw for draw in bad if draw > state["shard_cursor"] - BAD_SHARD_WINDOW]
        limit = self.settings.max_bad_shard_fraction
        if len(bad) > limit * BAD_SHARD_WINDOW:
            raise UnusableData(f"one reader found {len(bad)} of its last {BAD_SHARD_WINDOW} draws unreadable, more "
                               f"than data.max_bad_shard_fraction={limit:g} (last: {error}; skips so far "
                               f"{dict(state['skipped'])}): fix or remove those shards, or raise "
                               "data.max_bad_shard_fraction")

    # --- state ------------------------------------------------------------------------
    def _layout(self, reader: int, readers: int) -> str:
        """What a saved position is only valid for: this reader of this many, over these shards and sizes."""
        s = self.settings
        return f"{reader}/{readers}/{LAYOUT_VERSION}/{s.sampling}/{s.seed}/" \
               f"{mix_seed(tuple(self._all_urls), tuple(self._sizes or ()))}"

    def _fresh_state(self, worker: int, workers: int, start: dict | None = None) -> dict:
        s = self.settings
        reader = epochs.reader_order(rank=s.rank, worker=worker, world_size=s.world_size)
        state = epochs.started(reader=reader, readers=s.world_size * workers, total=self.samples_per_epoch or 0,
                               start=start)
        return state | {
            "layout": self._layout(reader, s.world_size * workers), "shard_cursor": 0, "sample_cursor": 0,
            "rng": random.Random(mix_seed(s.seed, "shuffle", s.rank * workers + worker)).getstate(),
            "skipped": Counter(), "since_last_batch": Counter(), "skips_in_a_row": 0, "delivered": 0,
            "bad_shards": [], "bad_since_batch": [],
        }

    def state_dict(self) -> dict:
        """This worker's position; only meaningful between batches (where the loader asks)."""
        if self._live is None:
            return self._unstarted_state()
        state, buffer, rng = self._live["state"], self._live["buffer"], self._live["rng"]
        return {
            **{key: value for key, value in state.items() if key not in _DERIVED_KEYS},
            "buffer": [[raw["__url__"], raw["__index__"], raw["__pass__"], raw["__position__"]] for raw in buffer],
            "rng": rng.getstate(),
            "skipped": dict(state["skipped"]),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` taken by the same worker of the same configuration, or from
        {"repartition": ...} (epochs.repartitioned_state(s): the whole rests, or this rank's share of them)
        after a change in the number of readers."""
        self._restored = dict(state) if state else None

    def _unstarted_state(self) -> dict:
        """The state of a worker that has not begun: what it was given, in a worker process a rank's share cut
        down to this reader's pieces (the loader sends each worker's state to the main process, and saves it)."""
        if not self._restored:
            return {}
        state = dict(self._restored)
        share, info = state.get("repartition"), get_worker_info()
        if share and "pieces" in share and info is not None:
            reader = epochs.reader_order(rank=self.settings.rank, worker=info.id, world_size=self.settings.world_size)
            state["repartition"] = epochs.own_share(share, reader)
        return state

    def _repartitioned_state(self, start: dict, worker: int, workers: int) -> dict:
        """A reader's start in a new layout. `epoch` sampling: its piece of what the old readers left of each
        epoch they had begun (epochs.repartition), then whole epochs; `resampled`: new streams of draws salted
        with the step."""
        state = self._fresh_state(worker, workers, start if self.settings.sampling == "epoch" else None)
        ours = state["layout"].split("/", 2)[2]
        _refuse_older(f"-/-/{start['layout']}" if start["layout"] else LAYOUT_VERSION)
        if start["layout"] not in (None, ours):
            raise ValueError(f"the checkpoint's loader read {start['layout']} (version/sampling/seed/shards) and this "
                             f"run reads {ours}: resume with the same data.sampling, data.seed and shard spec")
        state["rng"] = random.Random(mix_seed(self.settings.seed, "shuffle", state["reader"][0], "resumed",
                                              start["step"])).getstate()
        if self.settings.sampling == "resampled":
            state["draw_salt"] = start["step"]
        return state

    def _restore_buffer(self, positions: list) -> list[dict]:
        """Re-read the raw samples at buffered positions (no decoding), in buffered order."""
        wanted: dict[str, dict[int, list[int]]] = {}
        for slot, (url, index, *_) in enumerate(positions):
            wanted.setdefault(url, {}).setdefault(index, []).append(slot)
        buffer: list[dict | None] = [None] * len(positions)
        for url, slots in wanted.items():
            try:
                for raw in self._read(url, start=min(slots)):
                    for slot in slots.get(raw["__index__"], ()):
                        buffer[slot] = {**raw, "__pass__": positions[slot][2], "__position__": positions[slot][3]}
                    if raw["__index__"] >= max(slots):
                        break
            except (ShardTruncated, ShardError) as error:  # gone or cut since: what was read is kept, and counted
                warnings.warn(f"restoring the shuffle buffer: {error}", stacklevel=2)
        return [raw for raw in buffer if raw is not None]

    # --- iteration --------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        return self.iterate(*self._worker())

    def iterate(self, worker: int, workers: int) -> Iterator[dict]:
        """The batches of dataloader worker `worker` of `workers` of this rank (what __iter__ runs in a worker)."""
        restored = self._restored
        if restored and "repartition" in restored:
            state = self._repartitioned_state(restored["repartition"], worker, workers)
        else:
            state = self._fresh_state(worker, workers)
            if restored:
                _refuse_older(restored.get("layout", ""))
                if restored.get("layout") != state["layout"]:
                    raise ValueError(
                        f"loader state was saved for layout {restored.get('layout')} (reader/readers/version/"
                        f"sampling/seed/shards) and this loader is {state['layout']}: resume with the same "
                        "data.workers, world size, data.sampling, data.seed and shard spec")
                state.update(restored)
                state["skipped"] = Counter(restored.get("skipped", {}))
                state["since_last_batch"], state["bad_since_batch"] = Counter(), []
        self._restored = None  # a later pass over this dataset starts afresh
        rng = random.Random()
        rng.setstate(_as_rng_state(state["rng"]))
        buffer = self._restore_buffer(state["buffer"])
        self._live = {"state": state, "buffer": buffer, "rng": rng}
        raw_stream = self._epoch_stream(state) if self.settings.sampling == "epoch" \
            else self._resampled_stream(state, self.settings.rank * workers + worker)
        return self._batches(state, buffer, rng, raw_stream)

    def _shuffled(self, state: dict, buffer: list, rng: random.Random, raw_stream) -> Iterator[dict]:
        capacity = self.settings.shuffle_buffer
        for raw in raw_stream:
            if raw is None:  # an epoch ended
                while buffer:
                    yield _pop_random(buffer, rng)
                continue
            if capacity <= 1:
                yield raw
                continue
            buffer.append(raw)
            while len(buffer) >= capacity:  # a buffer restored from a larger setting drains down
                yield _pop_random(buffer, rng)
        while buffer:
            yield _pop_random(buffer, rng)

    def _batches(self, state: dict, buffer: list, rng: random.Random, raw_stream) -> Iterator[dict]:
        pending, passes, since = [], [], state["since_last_batch"]
        for raw in self._shuffled(state, buffer, rng, raw_stream):
            try:
                pending.append(self.decoder.decode(raw, seed=mix_seed(self.settings.seed, raw["__url__"],
                                                                      raw["__index__"], raw["__pass__"])))
            except SampleRejected as bad:
                _count_skip(state, bad.reason, where=f"shard {raw['__url__']} key {raw['__key__']}")
                continue
            passes.append(raw["__pass__"])
            state["skips_in_a_row"] = 0
            if len(pending) == self.settings.batch_size:
                yield self._collate(state, pending, passes)
                pending, passes = [], []
        if pending and self.settings.drop_last:
            state["skipped"]["incomplete_batch"] += len(pending)
            since["incomplete_batch"] += len(pending)
            pending = []
        if pending:
            yield self._collate(state, pending, passes)
        elif since or state["bad_since_batch"]:
            yield {"size": 0, "skipped": dict(since), "bad_shards": _take(state["bad_since_batch"])}

    def _collate(self, state: dict, samples: list, passes: list[int]) -> dict:
        batch = self.decoder.collate(samples, seed=mix_seed(*(sample.seed for sample in samples)))
        batch["passes"] = list(passes)  # each sample's epoch (its draw in resampled sampling)
        state["delivered"] += len(samples)
        batch["skipped"] = dict(state["since_last_batch"])
        batch["bad_shards"] = _take(state["bad_since_batch"])
        state["since_last_batch"].clear()
        return batch


def _take(events: list) -> list:
    taken = list(events)
    events.clear()
    return taken


def _refuse_older(layout: str) -> None:
    """A position saved by an mmscale whose loader cut epochs by shards (no version in its layout) means other
    samples in this one: refuse it rather than train some samples twice and others never."""
    if LAYOUT_VERSION not in layout.split("/"):
        raise ValueError(f"the checkpoint's loader position ({layout}) was saved by an earlier mmscale, which split "
                         "epochs among readers by shards; this one splits them by samples and cannot continue that "
                         "position exactly: finish the run with the mmscale that started it, or start a new run")


def _count_skip(state: dict, reason: str | None, *, where: str) -> None:
    """Count a skipped sample (or shard; None: a skip counted elsewhere, or an epoch that gave this reader
    nothing); stop a stream that has gone bad for good."""
    if reason is not None:
        state["skipped"][reason] += 1
        state["since_last_batch"][reason] += 1
    state["skips_in_a_row"] += 1
    if state["skips_in_a_row"] > MAX_SKIPS_IN_A_ROW:
        raise UnusableData(f"{state['skips_in_a_row']} samples or shards in a row were skipped "
                           f"(last: {reason}, {where}; so far {dict(state['skipped'])}): the data looks unusable")


def _pop_random(buffer: list, rng: random.Random):
    index = rng.randrange(len(buffer))
    buffer[index], buffer[-1] = buffer[-1], buffer[index]
    return buffer.pop()


def _as_rng_state(state):
    """random.Random state survives pickling as tuples but JSON/YAML round trips give lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
