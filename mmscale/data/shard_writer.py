"""Write one planned chunk of input records as WebDataset shard(s); runs in worker processes.

A chunk is a fixed, contiguous range of input records. It becomes one shard
(`shard-000003.tar`), or with a byte cap several parts (`shard-000003-000.tar`,
`shard-000003-001.tar`, ...). Each part is written under a temporary name, fsynced and
renamed; the chunk's stats file (`shard-000003.stats.json`) is written last and marks the
chunk as done, so a killed run redoes exactly the chunks without one.

Sample keys are the 9-digit global ordinal of the input record: stable across re-runs,
unique, dot-free (WebDataset splits key and extension at the first dot).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from mmscale.data.images import ImageOptions, SampleRejected, prepare_image
from mmscale.data.shards import tar_member, write_json_atomically
from mmscale.data.sources import Loaded, Record, iter_loaded

_TAR_BLOCK = 512
_TAR_END = 2 * _TAR_BLOCK  # two zero blocks close an archive
# Records done in this process, shared with the parent's progress bar (see set_progress_counter).
_records_done = None


def set_progress_counter(counter) -> None:
    """Count every record this process finishes in `counter` (a multiprocessing.Value)."""
    global _records_done
    _records_done = counter


@dataclass(frozen=True)
class CaptionFilter:
    """Caption length limits; a caption outside them is skipped as `caption_length`."""

    min_chars: int | None = None
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None

    def accepts(self, caption: str) -> bool:
        """Whether the caption's length is within every limit that is set."""
        chars, words = len(caption), len(caption.split())
        return not ((self.min_chars is not None and chars < self.min_chars)
                    or (self.max_chars is not None and chars > self.max_chars)
                    or (self.min_words is not None and words < self.min_words)
                    or (self.max_words is not None and words > self.max_words))


@dataclass(frozen=True)
class ChunkTask:
    """Everything a worker needs to write one chunk."""

    index: int
    start: int
    records: list[Record]
    output_dir: str
    shard_name: str
    plan: str
    max_bytes: int | None = None
    duplicates: frozenset[int] = frozenset()
    image: ImageOptions = ImageOptions()
    captions: CaptionFilter = CaptionFilter()


@dataclass
class ChunkStats:
    """What a chunk wrote (shard name -> samples) and skipped (reason -> count)."""

    index: int
    plan: str
    records: int
    shards: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    @property
    def written(self) -> int:
        """Samples written to the chunk's shards."""
        return sum(self.shards.values())


def sample_key(ordinal: int) -> str:
    """The shard key of the input record with this global ordinal."""
    return f"{ordinal:09d}"


def stats_name(shard_name: str) -> str:
    """The stats file of a chunk: `shard-000003.tar` -> `shard-000003.stats.json`."""
    return shard_name[: -len(".tar")] + ".stats.json"


def part_name(shard_name: str, part: int) -> str:
    """Part `part` of a byte-capped chunk: `shard-000003.tar` -> `shard-000003-001.tar`."""
    return f"{shard_name[: -len('.tar')]}-{part:03d}.tar"


def temporary_name(name: str) -> str:
    """Where a file is written before its rename; stale ones are removed by the next run.

    The process id keeps a worker orphaned by a killed run from writing into the same file
    as the next run (both would write the same bytes, and the rename is atomic).
    """
    return f".{name}.tmp{os.getpid()}"


def read_chunk_stats(path: str) -> ChunkStats | None:
    """A chunk's stats file, or None when it is missing or unreadable (the chunk is not done)."""
    try:
        with open(path) as handle:
            value = json.load(handle)
        return ChunkStats(index=value["chunk"], plan=value["plan"], records=value["records"],
                          shards=value["shards"], skipped=value["skipped"], bytes=value["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_chunk(task: ChunkTask) -> ChunkStats:
    """Write the chunk's shard(s), then its stats file; returns the stats."""
    skipped: Counter[str] = Counter()
    writer = _PartWriter(task.output_dir, task.shard_name, max_bytes=task.max_bytes)
    try:
        for offset, loaded in enumerate(iter_loaded(task.records)):
            ordinal = task.start + offset
            try:
                if ordinal in task.duplicates and not loaded.problem:
                    raise SampleRejected("duplicate")
                writer.add(_sample_members(sample_key(ordinal), loaded, task=task))
            except SampleRejected as rejection:
                skipped[rejection.reason] += 1
            if _records_done is not None:
                with _records_done.get_lock():
                    _records_done.value += 1
        shards = writer.finish()
    finally:
        writer.abandon()
    stats = ChunkStats(index=task.index, plan=task.plan, records=len(task.records), shards=shards,
                       skipped=dict(sorted(skipped.items())),
                       bytes=sum(os.path.getsize(os.path.join(task.output_dir, name)) for name in shards))
    write_json_atomically(os.path.join(task.output_dir, stats_name(task.shard_name)), {
        "chunk": stats.index, "plan": stats.plan, "records": stats.records, "shards": stats.shards,
        "written": stats.written, "skipped": stats.skipped, "bytes": stats.bytes})
    return stats


def _sample_members(key: str, loaded: Loaded, *, task: ChunkTask) -> list[tuple[str, bytes]]:
    """The tar members of one sample; raises SampleRejected (any reason) to skip it."""
    if loaded.problem:
        raise SampleRejected(loaded.problem)
    if loaded.caption is None:
        raise SampleRejected("missing_caption")
    if not task.captions.accepts(loaded.caption):
        raise SampleRejected("caption_length")
    image = prepare_image(loaded.image, task.image)
    meta = {"source": loaded.source, "caption": loaded.caption,
            "original_width": image.original_width, "original_height": image.original_height,
            "width": image.width, "height": image.height}
    members = [(f"{key}.jpg", image.jpeg), (f"{key}.txt", loaded.caption.encode("utf-8"))]
    if loaded.label is not None:
        meta["label"] = loaded.label
        members.append((f"{key}.cls", str(loaded.label).encode("ascii")))
    members.append((f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")))
    return members


def _closed_size(offset: int) -> int:
    """A tar's file size once closed: end blocks added, then padded to whole tar records."""
    return -(-(offset + _TAR_END) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _PartWriter:
    """Tar part(s) of one chunk: temporary files renamed into place as each one completes."""

    def __init__(self, output_dir: str, shard_name: str, *, max_bytes: int | None):
        self.output_dir, self.shard_name, self.max_bytes = output_dir, shard_name, max_bytes
        self.shards: dict[str, int] = {}
        self.handle = self.tar = self.name = None

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """Append one sample's members, starting a new part first if the byte cap requires it."""
        needed = sum(_TAR_BLOCK + -(-len(payload) // _TAR_BLOCK) * _TAR_BLOCK for _, payload in members)
        if self.tar is not None and self.max_bytes is not None and self.shards[self.name] > 0 \
                and _closed_size(self.tar.offset + needed) > self.max_bytes:
            self._close_part()
        if self.tar is None:
            self._open_part()
        for name, payload in members:
            # an integer mtime: a float one costs every member an extra PAX header block pair
            self.tar.addfile(*tar_member(name, payload, 0))
        self.shards[self.name] += 1

    def finish(self) -> dict[str, int]:
        """Close the last part (writing an empty one if the chunk had no samples)."""
        if self.tar is None and not self.shards:
            self._open_part()
        if self.tar is not None:
            self._close_part()
        return dict(self.shards)

    def abandon(self) -> None:
        """Drop an unfinished part after an error; its temporary file goes too."""
        if self.tar is not None:
            self.handle.close()
            os.remove(os.path.join(self.output_dir, temporary_name(self.name)))
            self.tar = None

    def _open_part(self) -> None:
        self.name = self.shard_name if self.max_bytes is None else part_name(self.shard_name, len(self.shards))
        self.shards[self.name] = 0
        self.handle = open(os.path.join(self.output_dir, temporary_name(self.name)), "wb")
        self.tar = tarfile.open(fileobj=self.handle, mode="w", format=tarfile.PAX_FORMAT)

    def _close_part(self) -> None:
        self.tar.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.tar = None
        os.replace(os.path.join(self.output_dir, temporary_name(self.name)),
                   os.path.join(self.output_dir, self.name))
