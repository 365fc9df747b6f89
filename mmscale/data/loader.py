"""The streaming loader of a rank: its readers' ShardStreams (mmscale.data.stream) under a
StatefulDataLoader, with skip, bad-shard and sample counts, and `build_loader`, which makes one
from the `data` config section.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Iterator

import torch

from mmscale.data.config import DataConfig
from mmscale.data.samples import AugmentSettings, SampleDecoder
from mmscale.data.tars import ShardError, parse_spec, shard_sizes
from mmscale.data.stream import ShardStream, StreamSettings, UnusableData, mix_seed
from mmscale.data.text import CaptionEncoder
from mmscale.data.vqa import AnswerTargets

__all__ = ["BatchLoader", "ShardStream", "StreamSettings", "UnusableData", "build_loader"]


class BatchLoader:
    """A rank's batches: a StatefulDataLoader over a ShardStream, plus skip and sample counts.

    `state_dict()` / `load_state_dict()` cover the workers' positions and the counts, so a
    job restored from a checkpoint continues with the next unseen sample.
    """

    def __init__(self, stream: ShardStream, *, workers: int, prefetch_factor: int = 2):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.stream = stream
        self.skipped: Counter = Counter()
        self.bad_shards: Counter = Counter()  # unreadable shards per epoch, of this rank's readers
        self.last_bad_shard = ""
        self.samples_delivered = 0
        self.batches_delivered = 0
        self._start: dict | None = None  # the re-partition this loader started from, if any
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 on torch 2.14
            self._loader = StatefulDataLoader(
                stream, batch_size=None, num_workers=workers,
                prefetch_factor=prefetch_factor if workers > 0 else None,
                persistent_workers=False, pin_memory=torch.cuda.is_available(),
                # Its own generator for the workers' base seed: each iter() would otherwise draw it from torch's
                # global one, which a resumed run restores before the loader starts (the fusion model's ITM
                # negatives came out different after a resume).
                generator=torch.Generator().manual_seed(mix_seed(stream.settings.seed, "workers", stream.settings.rank)
                                                        % 2**63),
            )

    @property
    def readers(self) -> int:
        """This rank's readers: its dataloader workers, or the rank itself without workers."""
        return max(self._loader.num_workers, 1)

    def __iter__(self) -> Iterator[dict]:
        for batch in self._loader:
            self.skipped.update(batch.pop("skipped"))
            for epoch, message in batch.pop("bad_shards"):
                self.bad_shards[epoch] += 1
                self.last_bad_shard = message
            self.check_bad_shards(self.bad_shards)
            if batch["size"] == 0:
                continue
            self.samples_delivered += batch["size"]
            self.batches_delivered += 1
            yield batch

    def check_bad_shards(self, counts: Counter, *, last: str | None = None) -> None:
        """Stop once more than data.max_bad_shard_fraction of an epoch's shards were unreadable: `counts` per
        epoch, of this rank's readers or (the training loop's check at log steps) of all ranks together."""
        shards = self.stream.shard_count
        limit = self.stream.settings.max_bad_shard_fraction
        for epoch, bad in sorted(counts.items()):
            if bad > limit * shards:
                raise UnusableData(
                    f"{bad} of the {shards} shards of epoch {epoch} were unreadable, more than "
                    f"data.max_bad_shard_fraction={limit:g} (last: {last or self.last_bad_shard}; skips so far "
                    f"{dict(self.skipped)}): fix or remove those shards, or raise data.max_bad_shard_fraction")

    def state_dict(self) -> dict:
        """Everything needed to continue after the last batch this loader yielded."""
        state = {"loader": self._loader.state_dict(), "skipped": dict(self.skipped),
                 "bad_shards": dict(self.bad_shards), "samples_delivered": self.samples_delivered,
                 "batches_delivered": self.batches_delivered}
        if self._start is not None:  # for readers that have not delivered a batch since the re-partition
            state["start"] = self._start
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore before iterating; the workers and world size must match the saved run.

        A state saved after a pass ended resumes with the next pass, from its start.
        """
        if "repartition" in state:
            self.stream.load_state_dict({"repartition": state["repartition"]})
            self._start = state["repartition"]
        elif not state["loader"].get("_iterator_finished", False):
            self._loader.load_state_dict(state["loader"])
            self._start = state.get("start")
        self.skipped = Counter(state["skipped"])
        self.bad_shards = Counter(state.get("bad_shards", {}))
        self.samples_delivered = state["samples_delivered"]
        self.batches_delivered = state["batches_delivered"]


def build_loader(
    config: DataConfig, *, spec: str, tokenizer, batch_size: int, train: bool,
    rank: int | None = None, world_size: int | None = None, epochs: int | None = None,
    captions: CaptionEncoder | None = None, vqa: AnswerTargets | None = None, vqa_need_answers: bool = True,
) -> BatchLoader:
    """A rank's loader for `spec`: training (augmented, shuffled, endless unless `epochs`)
    or evaluation (center crop, in order, one pass).

    `rank` and `world_size` default to the initialized torch.distributed group (else 0 and 1). `captions`
    replaces the caption encoder the data config describes (e.g. an evaluation's own masking). `vqa`: read VQA samples
    with soft targets over that answer list (samples.SampleDecoder).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if rank is None or world_size is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        world_size = torch.distributed.get_world_size() if distributed else 1
    sources = tuple(parse_spec(spec))
    settings = StreamSettings(
        sources=sources, sampling=config.sampling if train else "epoch", rank=rank, world_size=world_size,
        seed=config.seed, shuffle_buffer=config.shuffle_buffer if train else 0, batch_size=batch_size,
        epochs=epochs if train else 1, shuffle_shards=train, drop_last=train,
        max_bad_shard_fraction=config.max_bad_shard_fraction, max_member_bytes=config.max_member_bytes,
    )
    if settings.sampling == "epoch":
        unreadable: list[ShardError] = []
        sizes = shard_sizes([url for source in sources for url in source.urls], unreadable=unreadable)
        settings = dataclasses.replace(settings, sizes=tuple(sizes.values()))
        _check_enough_samples(sum(sizes.values()), world_size=world_size, workers=max(config.workers, 1),
                              train=train, unreadable=unreadable)
    augment = AugmentSettings(
        image_size=config.image_size, max_pixels=config.max_pixels, train=train, crop_scale=config.crop_scale,
        crop_ratio=config.crop_ratio, hflip_probability=config.hflip_probability,
    )
    captions = captions or CaptionEncoder(tokenizer, context_length=config.context_length,
                                          mlm_probability=config.mlm_probability, pad_to_longest=config.pad_to_longest)
    stream = ShardStream(settings, SampleDecoder(augment, captions, vqa=vqa, vqa_need_answers=vqa_need_answers))
    return BatchLoader(stream, workers=config.workers, prefetch_factor=config.prefetch_factor)


def _check_enough_samples(samples: int, *, world_size: int, workers: int, train: bool,
                          unreadable: list[ShardError]) -> None:
    """In epoch sampling each reader trains an equal piece of the epoch's samples: training needs one for each."""
    readers = world_size * workers
    if samples >= readers:
        return
    if samples == 0 and unreadable:
        raise UnusableData(f"no shard could be read ({len(unreadable)} unreadable; first: {unreadable[0]})")
    layout = f"{samples} samples for {readers} readers ({world_size} ranks x {workers} workers)"
    if train:  # a reader without samples would end its rank's stream while the others train on: a hang
        fits = f"set data.workers={samples // world_size} or fewer, or " if samples >= world_size else ""
        raise ValueError(f"{layout}: in epoch sampling every reader needs a sample of its own; {fits}use more "
                         "data, or data.sampling=resampled")
    warnings.warn(f"{layout}: some read nothing", stacklevel=3)
