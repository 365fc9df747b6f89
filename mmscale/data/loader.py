"""The streaming loader: shards -> shuffled raw samples -> decoded, tokenized, masked batches.

Each dataloader worker of each rank owns a deterministic stream of (shard, sample index)
positions: in epoch mode a per-epoch shuffled shard list split across all workers of all
ranks, in resampled mode an endless run of shards drawn by source weight. Shuffling
happens on raw (undecoded) samples, and every random choice is a function of the seed and
the sample's identity, so a worker's state is small: where it is in its stream, which
positions sit in its shuffle buffer, and its RNG state. Restoring re-reads only the shards
those positions are in (raw bytes, no decoding) and continues with the next unseen sample.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmscale.data.config import DataConfig
from mmscale.data.samples import AugmentSettings, SampleDecoder
from mmscale.data.shards import (
    SampleRejected,
    ShardError,
    ShardSource,
    ShardTruncated,
    iter_raw_samples,
    parse_spec,
)
from mmscale.data.text import CaptionEncoder

# A stream that skips this many samples (or empty shards) in a row is broken, not noisy: stop it
# rather than keep every rank waiting for a batch that never comes.
MAX_SKIPS_IN_A_ROW = 20_000
# In `resampled` sampling the unreadable-shard fraction is judged over a reader's last this many draws.
BAD_SHARD_WINDOW = 20
# Entries of a worker's live state that state_dict() writes in another form, or not at all.
_DERIVED_KEYS = ("buffer", "rng", "skipped", "since_last_batch")


class UnusableData(RuntimeError):
    """A stream that skipped too many samples or shards in a row to be worth continuing."""


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
    allow_pipe: bool = False
    max_bad_shard_fraction: float = 0.05


class ShardStream(IterableDataset):
    """An IterableDataset of whole batches with a `state_dict` for exact mid-epoch resume.

    Batches are dicts: `images` uint8 [B, 3, S, S], `input_ids`, `attention_mask` (and
    `mlm_input_ids`, `mlm_labels`, `mlm_positions`, `mlm_targets` when MLM is on), `labels`
    (-1 where a sample has no `.cls`), `keys`, and `skipped` (samples skipped since the
    previous batch, by reason). In finite mode a last batch of size 0 carries the trailing skip counts.
    """

    def __init__(self, settings: StreamSettings, decoder: SampleDecoder):
        super().__init__()
        self.settings = settings
        self.decoder = decoder
        self._all_urls = [url for source in settings.sources for url in source.urls]
        self._restored: dict | None = None
        self._live: dict | None = None
        self._epoch_plan: tuple = (None, [])
        self._carry_plan: tuple = (None, {})

    # --- positions --------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        worker_id, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        s = self.settings
        return s.rank * workers + worker_id, s.world_size * workers

    def _epoch_shards(self, epoch: int, worker: int, workers: int) -> list[str]:
        """This worker's shards for `epoch` (kept per epoch: a run may have 100,000s of shards)."""
        if self._epoch_plan[0] != (epoch, worker, workers):
            self._epoch_plan = ((epoch, worker, workers), self._epoch_urls(epoch)[worker::workers])
        return self._epoch_plan[1]

    def _epoch_urls(self, epoch: int) -> list[str]:
        """Every shard of `epoch`, in the order the readers split it (reader w takes positions w, w + readers, ...)."""
        urls = list(self._all_urls)
        if self.settings.shuffle_shards:
            random.Random(mix_seed(self.settings.seed, "epoch", epoch)).shuffle(urls)
        return urls

    def _drawn_shard(self, draw: int, worker: int, salt=None) -> str:
        """The shard of a reader's `draw`; `salt` (the step of a re-partition) starts new streams there."""
        rng = random.Random(mix_seed(self.settings.seed, "draw", worker, draw) if salt is None
                            else mix_seed(self.settings.seed, "draw", worker, draw, "resumed", salt))
        sources = self.settings.sources
        source = rng.choices(sources, weights=[s.weight for s in sources])[0]
        return rng.choice(source.urls)

    def _raw_stream(self, state: dict, worker: int, workers: int) -> Iterator[dict]:
        """Raw samples from the worker's position onwards, advancing `state` as shards end."""
        resampled = self.settings.sampling == "resampled"
        while True:
            if resampled:
                url = self._drawn_shard(state["shard_cursor"], worker, state.get("draw_salt"))
                shard_pass = state["shard_cursor"]
            else:
                if self.settings.epochs is not None and state["epoch"] >= self.settings.epochs:
                    return
                shards = self._epoch_shards(state["epoch"], worker, workers)
                if not shards:
                    return  # more readers than shards (warned at build time): nothing to read, ever
                if state["shard_cursor"] >= len(shards):
                    # Empty shards are counted as skips in a row, so shards that never hold a
                    # sample stop the stream instead of spinning through empty epochs forever.
                    state.update(epoch=state["epoch"] + 1, shard_cursor=0, bad_shards=[])
                    continue
                url, shard_pass = shards[state["shard_cursor"]], state["epoch"]
            start, wanted = state["sample_cursor"], None
            if not resampled and "carry" in state:
                wanted = self._carried_rest(state, worker + state["shard_cursor"] * workers)
                if wanted is not None and wanted.first == math.inf:  # trained whole before the re-partition
                    state.update(shard_cursor=state["shard_cursor"] + 1, sample_cursor=0)
                    continue
                start = max(start, wanted.first) if wanted is not None else start
            try:
                for raw in iter_raw_samples(url, allow_pipe=self.settings.allow_pipe, start=start):
                    if wanted is not None and not wanted.needs(raw["__index__"]):
                        if wanted.past(raw["__index__"]):
                            break
                        continue
                    raw["__pass__"] = shard_pass
                    state["sample_cursor"] = raw["__index__"] + 1
                    yield raw
            except ShardTruncated as error:
                _count_skip(state, "truncated_shard", where=f"shard {url}")
                warnings.warn(str(error), stacklevel=2)
            except ShardError as error:
                self._skip_shard(state, error, shards=None if resampled else len(shards))
            else:
                if start == 0 and state["sample_cursor"] == 0 and wanted is None:
                    _count_skip(state, "empty_shard", where=f"shard {url}")
            state.update(shard_cursor=state["shard_cursor"] + 1, sample_cursor=0)

    def _skip_shard(self, state: dict, error: ShardError, *, shards: int | None) -> None:
        """Count an unreadable shard and go on; stop once more than max_bad_shard_fraction of this reader's
        `shards` of the epoch (None: of its last BAD_SHARD_WINDOW draws) were unreadable."""
        _count_skip(state, f"shard_{error.reason}", where=str(error))
        warnings.warn(f"skipped {error}", stacklevel=3)
        bad = state["bad_shards"]  # shard_cursor of each unreadable shard of the epoch (or window)
        bad.append(state["shard_cursor"])
        if shards is None:
            if state["shard_cursor"] + 1 < BAD_SHARD_WINDOW:
                return  # too few draws to judge yet
            bad[:] = [draw for draw in bad if draw > state["shard_cursor"] - BAD_SHARD_WINDOW]
        limit = self.settings.max_bad_shard_fraction
        if len(bad) > limit * (shards or BAD_SHARD_WINDOW):
            share = f"of its last {BAD_SHARD_WINDOW} draws" if shards is None else f"of its {shards} shards this epoch"
            raise UnusableData(f"one reader found {len(bad)} {share} unreadable, more than data.max_bad_shard_fraction="
                               f"{limit:g} (last: {error}; skips so far {dict(state['skipped'])}): fix or remove those "
                               "shards, or raise data.max_bad_shard_fraction")

    def _carried_rest(self, state: dict, position: int) -> _Rest | None:
        """What is left to read of the shard at `position` of this epoch's list after a re-partition (None:
        all of it, or the carry is spent and dropped once this reader is past every old reader's epoch)."""
        carry = state["carry"]
        epoch = state["epoch"]
        if epoch > _newest_epoch(carry):
            del state["carry"]
            return None
        if self._carry_plan[0] != epoch:
            self._carry_plan = (epoch, _carried_rests(carry, epoch, self._epoch_urls(epoch)))
        return self._carry_plan[1].get(position)

    # --- state ------------------------------------------------------------------------
    def _layout(self, worker: int, workers: int) -> str:
        """What a saved position is only valid for: this worker of this many, over these shards."""
        s = self.settings
        return f"{worker}/{workers}/{s.sampling}/{s.seed}/{mix_seed(tuple(self._all_urls))}"

    def _fresh_state(self, worker: int, workers: int) -> dict:
        return {
            "layout": self._layout(worker, workers),
            "epoch": 0, "shard_cursor": 0, "sample_cursor": 0, "buffer": [],
            "rng": random.Random(mix_seed(self.settings.seed, "shuffle", worker)).getstate(),
            "skipped": Counter(), "since_last_batch": Counter(), "skips_in_a_row": 0, "delivered": 0,
            "bad_shards": [],
        }

    def state_dict(self) -> dict:
        """This worker's position; only meaningful between batches (where the loader asks)."""
        if self._live is None:
            return dict(self._restored) if self._restored else {}
        state, buffer, rng = self._live["state"], self._live["buffer"], self._live["rng"]
        return {
            **{key: value for key, value in state.items() if key not in _DERIVED_KEYS},
            "buffer": [[raw["__url__"], raw["__index__"], raw["__pass__"]] for raw in buffer],
            "rng": rng.getstate(),
            "skipped": dict(state["skipped"]),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` taken by the same worker of the same configuration, or from
        {"repartition": ...} (repartitioned_state) after a change in the number of readers."""
        self._restored = dict(state) if state else None

    def _repartitioned_state(self, plan: dict, worker: int, workers: int) -> dict:
        """A reader's start in a new layout. `epoch` sampling: the old readers' positions and shuffle buffers
        (the carry) say what each shard of the unfinished epochs still holds, and this reader reads that
        rest of its shards of the new split; `resampled`: new streams of draws salted with the step."""
        state = self._fresh_state(worker, workers)
        if plan["layout"] != state["layout"].split("/", 2)[2]:
            raise ValueError(f"the checkpoint's loader read {plan['layout']} (sampling/seed/shards) and this run reads "
                             f"{state['layout'].split('/', 2)[2]}: resume with the same data.sampling, data.seed and "
                             "shard spec")
        state["rng"] = random.Random(mix_seed(self.settings.seed, "shuffle", worker, "resumed", plan["step"])).getstate()
        if self.settings.sampling == "resampled":
            state["draw_salt"] = plan["step"]
        else:
            state["carry"] = plan["carry"]
            # From the oldest epoch anything is left of: a buffer can still hold samples of an epoch its reader has left.
            state["epoch"] = _oldest_epoch(plan["carry"])
        return state

    def _restore_buffer(self, positions: list) -> list[dict]:
        """Re-read the raw samples at buffered positions (no decoding), in buffered order.

        A position can be buffered twice, from two epochs, when epochs meet in the buffer.
        """
        wanted: dict[str, dict[int, list[int]]] = {}
        for slot, (url, index, _) in enumerate(positions):
            wanted.setdefault(url, {}).setdefault(index, []).append(slot)
        buffer: list[dict | None] = [None] * len(positions)
        for url, slots in wanted.items():
            try:
                for raw in iter_raw_samples(url, allow_pipe=self.settings.allow_pipe, start=min(slots)):
                    for slot in slots.get(raw["__index__"], ()):
                        buffer[slot] = {**raw, "__pass__": positions[slot][2]}
                    if raw["__index__"] >= max(slots):
                        break
            except ShardTruncated:
                pass  # positions before the break were read; later ones were never buffered
        return [raw for raw in buffer if raw is not None]

    # --- iteration --------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        worker, workers = self._worker()
        state = self._fresh_state(worker, workers)
        if self._restored and "repartition" in self._restored:
            state = self._repartitioned_state(self._restored["repartition"], worker, workers)
            self._restored = None
        elif self._restored:
            if self._restored.get("layout") != state["layout"]:
                raise ValueError(
                    f"loader state was saved for layout {self._restored.get('layout')} (worker/workers/sampling/"
                    f"seed/shards) and this loader is {state['layout']}: resume with the same data.workers, "
                    "world size, data.sampling, data.seed and shard spec"
                )
            state.update(self._restored)
            state["skipped"] = Counter(self._restored.get("skipped", {}))
            state["since_last_batch"] = Counter()
            self._restored = None  # a later pass over this dataset starts afresh
        rng = random.Random()
        rng.setstate(_as_rng_state(state["rng"]))
        buffer = self._restore_buffer(state["buffer"])
        self._live = {"state": state, "buffer": buffer, "rng": rng}
        yield from self._batches(state, buffer, rng, self._raw_stream(state, worker, workers))

    def _shuffled(self, buffer: list, rng: random.Random, raw_stream: Iterator[dict]) -> Iterator[dict]:
        capacity = self.settings.shuffle_buffer
        for raw in raw_stream:
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
        for raw in self._shuffled(buffer, rng, raw_stream):
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
        elif since:
            yield {"size": 0, "skipped": dict(since)}

    def _collate(self, state: dict, samples: list, passes: list[int]) -> dict:
        batch = self.decoder.collate(samples, seed=mix_seed(*(sample.seed for sample in samples)))
        batch["passes"] = list(passes)  # each sample's epoch (its draw in resampled sampling)
        state["delivered"] += len(samples)
        batch["skipped"] = dict(state["since_last_batch"])
        state["since_last_batch"].clear()
        return batch


@dataclass(frozen=True)
class _Rest:
    """The samples of one shard still to train in an epoch after a re-partition: every index from `prefix`
    on, and the `extra` ones before it (they sat in a shuffle buffer)."""

    prefix: float
    extra: frozenset

    @property
    def first(self) -> float:
        return min(self.prefix, min(self.extra, default=math.inf))

    def needs(self, index: int) -> bool:
        return index >= self.prefix or index in self.extra

    def past(self, index: int) -> bool:
        return self.prefix == math.inf and index >= max(self.extra, default=-1)

    def __and__(self, other: _Rest) -> _Rest:
        """What both leave to train (two re-partitions in a row)."""
        prefix = max(self.prefix, other.prefix)
        extra = {i for i in self.extra if other.needs(i)} | {i for i in other.extra if self.needs(i)}
        return _Rest(prefix, frozenset(i for i in extra if i < prefix))


def _carried_rests(carry: dict, epoch: int, urls: list[str]) -> dict[int, _Rest]:
    """For each position of `epoch`'s shard list, what the old readers had not trained of it: old reader
    p % R read its shards p // R in order, each up to its cursors; what sat in a buffer goes back."""
    readers, positions = carry["readers"], carry["positions"]
    buffered: dict[str, set[int]] = {}
    for url, index, shard_pass in carry["pending"]:
        if shard_pass == epoch:
            buffered.setdefault(url, set()).add(index)
    rests, seen = {}, set()
    for position, url in enumerate(urls):
        old_epoch, shard_cursor, sample_cursor = positions[position % readers]
        turn = position // readers
        if old_epoch > epoch or (old_epoch == epoch and turn < shard_cursor):
            prefix = math.inf
        elif old_epoch == epoch and turn == shard_cursor:
            prefix = sample_cursor
        else:
            prefix = 0
        extra = frozenset(buffered.get(url, ())) if url not in seen else frozenset()  # a repeated url: once
        seen.add(url)
        if prefix or extra:
            rests[position] = _Rest(prefix, extra)
    if "before" in carry:  # an earlier re-partition's readers had not trained everything either
        earlier = _carried_rests(carry["before"], epoch, urls)
        for position in range(len(urls)):
            rest = rests.get(position, _Rest(0, frozenset())) & earlier.get(position, _Rest(0, frozenset()))
            if rest.prefix or rest.extra:
                rests[position] = rest
            else:
                rests.pop(position, None)
    return rests


def _newest_epoch(carry: dict) -> int:
    """The newest epoch any old reader (of this or an earlier re-partition) had reached."""
    newest = max(old[0] for old in carry["positions"])
    return max(newest, _newest_epoch(carry["before"])) if "before" in carry else newest


def _oldest_epoch(carry: dict) -> int:
    """The oldest epoch a carry leaves anything of (a buffer can hold samples of an epoch its reader has left)."""
    oldest = min([old[0] for old in carry["positions"]] + [shard_pass for _, _, shard_pass in carry["pending"]])
    return min(oldest, _oldest_epoch(carry["before"])) if "before" in carry else oldest


def repartitioned_state(saved: list[dict], *, rank: int, step: int) -> dict:
    """A BatchLoader state for `rank` of a run with a different number of ranks or workers than the run
    that saved `saved` (every old rank's BatchLoader.state_dict(), in rank order) at `step`. In `epoch`
    sampling the rest of the unfinished epochs is exactly what the old readers had not trained (what sat in
    their shuffle buffers goes back to the pool), split among the new readers by the new layout; in
    `resampled` sampling the new readers start new streams derived from (seed, step). Counts carry over
    on rank 0."""
    readers = [reader for state in saved for reader in _reader_states(state["loader"])]
    layouts = {reader["layout"].split("/", 2)[2] for reader in readers if reader}
    if len(layouts) != 1:
        raise ValueError(f"the checkpoint's loader states disagree on their layout: {sorted(layouts)}")
    carry = {"readers": len(readers),
             "positions": [[r["epoch"], r["shard_cursor"], r["sample_cursor"]] if r else [0, 0, 0] for r in readers],
             "pending": [list(position) for r in readers if r for position in r["buffer"]]}
    earlier = next((reader["carry"] for reader in readers if reader and "carry" in reader), None)
    if earlier is not None:  # re-partitioned again before the old carry was spent: both apply
        carry["before"] = earlier
    skipped = sum((Counter(state["skipped"]) for state in saved), Counter()) if rank == 0 else Counter()
    return {"repartition": {"carry": carry, "step": step, "layout": layouts.pop()}, "skipped": dict(skipped),
            "samples_delivered": sum(state["samples_delivered"] for state in saved) if rank == 0 else 0,
            "batches_delivered": 0}


def _reader_states(loader_state: dict) -> list[dict | None]:
    """Each worker's ShardStream state in a StatefulDataLoader state (None: a worker that never delivered)."""
    if "dataset_state" in loader_state:  # no worker processes
        return [loader_state["dataset_state"] or None]
    snapshot = loader_state["_snapshot"]
    workers = snapshot["_main_snapshot"]["_num_workers"]
    return [(snapshot["_worker_snapshots"].get(f"worker_{i}") or {}).get("dataset_state") or None
            for i in range(workers)]


def _count_skip(state: dict, reason: str, *, where: str) -> None:
    """Count a skipped sample (or shard); stop a stream that has gone bad for good."""
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


class BatchLoader:
    """A rank's batches: a StatefulDataLoader over a ShardStream, plus skip and sample counts.

    `state_dict()` / `load_state_dict()` cover the workers' positions and the counts, so a
    job restored from a checkpoint continues with the next unseen sample.
    """

    def __init__(self, stream: ShardStream, *, workers: int, prefetch_factor: int = 2):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.stream = stream
        self.skipped: Counter = Counter()
        self.samples_delivered = 0
        self.batches_delivered = 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 on torch 2.14
            self._loader = StatefulDataLoader(
                stream, batch_size=None, num_workers=workers,
                prefetch_factor=prefetch_factor if workers > 0 else None,
                persistent_workers=False, pin_memory=torch.cuda.is_available(),
            )

    def __iter__(self) -> Iterator[dict]:
        for batch in self._loader:
            self.skipped.update(batch.pop("skipped"))
            if batch["size"] == 0:
                continue
            self.samples_delivered += batch["size"]
            self.batches_delivered += 1
            yield batch

    def state_dict(self) -> dict:
        """Everything needed to continue after the last batch this loader yielded."""
        return {"loader": self._loader.state_dict(), "skipped": dict(self.skipped),
                "samples_delivered": self.samples_delivered, "batches_delivered": self.batches_delivered}

    def load_state_dict(self, state: dict) -> None:
        """Restore before iterating; the workers and world size must match the saved run.

        A state saved after a pass ended resumes with the next pass, from its start.
        """
        if "repartition" in state:
            self.stream.load_state_dict({"repartition": state["repartition"]})
        elif not state["loader"].get("_iterator_finished", False):
            self._loader.load_state_dict(state["loader"])
        self.skipped = Counter(state["skipped"])
        self.samples_delivered = state["samples_delivered"]
        self.batches_delivered = state["batches_delivered"]


def build_loader(
    config: DataConfig, *, spec: str, tokenizer, batch_size: int, train: bool,
    rank: int | None = None, world_size: int | None = None, epochs: int | None = None,
) -> BatchLoader:
    """A rank's loader for `spec`: training (augmented, shuffled, endless unless `epochs`)
    or evaluation (center crop, in order, one pass).

    `rank` and `world_size` default to the initialized torch.distributed group (else 0 and 1).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if rank is None or world_size is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        world_size = torch.distributed.get_world_size() if distributed else 1
    sources = tuple(parse_spec(spec, allow_pipe=config.allow_pipe))
    settings = StreamSettings(
        sources=sources, sampling=config.sampling if train else "epoch", rank=rank, world_size=world_size,
        seed=config.seed, shuffle_buffer=config.shuffle_buffer if train else 0, batch_size=batch_size,
        epochs=epochs if train else 1, shuffle_shards=train, drop_last=train, allow_pipe=config.allow_pipe,
        max_bad_shard_fraction=config.max_bad_shard_fraction,
    )
    shard_count = sum(len(source.urls) for source in sources)
    readers = world_size * max(config.workers, 1)
    if settings.sampling == "epoch" and shard_count < readers:
        layout = f"{shard_count} shards for {readers} readers ({world_size} ranks x {max(config.workers, 1)} workers)"
        if train:  # a reader without shards would end its rank's stream while the others train on: a hang
            fits = f"set data.workers={shard_count // world_size} or fewer, or " if shard_count >= world_size else ""
            raise ValueError(f"{layout}: in epoch sampling every reader needs a shard of its own; {fits}write at "
                             f"least {readers} shards (many more balance better), or use data.sampling=resampled")
        warnings.warn(f"{layout}: some read nothing; write more, smaller shards", stacklevel=2)
    augment = AugmentSettings(
        image_size=config.image_size, max_pixels=config.max_pixels, train=train, crop_scale=config.crop_scale,
        crop_ratio=config.crop_ratio, hflip_probability=config.hflip_probability,
    )
    captions = CaptionEncoder(tokenizer, context_length=config.context_length,
                              mlm_probability=config.mlm_probability, pad_to_longest=config.pad_to_longest)
    stream = ShardStream(settings, SampleDecoder(augment, captions))
    return BatchLoader(stream, workers=config.workers, prefetch_factor=config.prefetch_factor)
