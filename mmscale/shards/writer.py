"""Write one planned chunk of input records as WebDataset shard(s); runs in worker processes.

A chunk is a fixed, contiguous range of input records. It becomes one shard
(`shard-000003.tar`), or with a byte cap several parts (`shard-000003-000.tar`,
`shard-000003-001.tar`, ...). Each part is written under a temporary name, fsynced and
renamed; the chunk's stats file (`shard-000003.stats.json`) is written last and marks the
chunk as done, so a killed run redoes exactly the chunks without one.

Sample keys are the 9-digit global ordinal of the input record: stable across re-runs,
unique, dot-free (WebDataset splits key and extension at the first dot). Each sample is
`KEY.jpg`, `KEY.txt`, `KEY.json` (img2dataset's layout; the json keeps the provenance: url or
source, caption, original and final size, sha256 of the original bytes, status) and `KEY.cls`
when there is a label. A VQA sample has no caption: its json also holds `question`, `answers` and
`question_type` (mmscale.data.vqa's format), and there is no `KEY.txt` unless its input had a caption.

Every record is accounted for: written, or listed in the chunk's `shard-000003.failed.jsonl`
(key, source, url, caption, reason, detail; a VQA row's question and answers), written before the
stats file.

URL records are downloaded by `threads` threads per worker (download.py) and written as they
arrive; decoding, resizing and encoding run on a separate pool of `image_threads` threads
(PIL and libjpeg-turbo release the GIL), so one process uses more than one core without
a slow server holding up the image work. Local records are written in input order.

`--retry-failed` rewrites a finished chunk's last part; a `shard-000003.retrying` marker is
written before any part is replaced and removed after the stats file, and a start that finds
one lists that chunk as it is on disk (finish_interrupted_retry).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from itertools import count, takewhile

from mmscale.atomic import open_temporary
from mmscale.shards.dedup import DigestStore
from mmscale.shards.download import RETRYABLE_REASONS, DownloadOptions, Fetched, fetch
from mmscale.shards.images import ImageOptions, SampleRejected, prepare_image
from mmscale.shards.output import Output
from mmscale.data.tars import tar_member, write_bytes_atomically
from mmscale.shards.sources import Loaded, Record, dedup_digest, iter_loaded
from mmscale.shards.vqa_input import Question

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
    download: DownloadOptions = DownloadOptions()
    live_dedup: bool = False
    """URL input with --dedup: check digests against finished chunks while writing (see sharding.py)."""
    shared_digests: bool = True
    """With live_dedup: also against the output folder's digest store (SQLite, one machine); False on a
    cluster, where only copies within the chunk are dropped."""
    image_threads: int = 1
    """Threads decoding, resizing and encoding images in this worker."""
    retry: bool = False
    """Retry a finished chunk's failed rows: `records` are those rows, `ordinals` their ordinals."""
    ordinals: tuple[int, ...] = ()

    def ordinal(self, offset: int) -> int:
        """The input ordinal of `records[offset]`."""
        return self.ordinals[offset] if self.ordinals else self.start + offset


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


def retry_marker_name(shard_name: str) -> str:
    """Present while a retry rewrites a chunk: `shard-000003.tar` -> `shard-000003.retrying`."""
    return shard_name[: -len(".tar")] + ".retrying"


def failures_name(shard_name: str) -> str:
    """The failed-rows file of a chunk: `shard-000003.tar` -> `shard-000003.failed.jsonl`."""
    return shard_name[: -len(".tar")] + ".failed.jsonl"


@dataclass(frozen=True)
class _Outcome:
    """What became of one record: tar members to write, or the reason it was not."""

    offset: int
    record: Record
    members: list[tuple[str, bytes]] | None = None
    digest: bytes | None = None
    reason: str | None = None
    detail: str = ""


def part_name(shard_name: str, part: int) -> str:
    """Part `part` of a byte-capped chunk: `shard-000003.tar` -> `shard-000003-001.tar`."""
    return f"{shard_name[: -len('.tar')]}-{part:03d}.tar"


def read_chunk_stats(output: Output, shard_name: str) -> ChunkStats | None:
    """A chunk's stats file, or None when it is missing or unreadable (the chunk is not done)."""
    try:
        value = output.read_json(stats_name(shard_name))
        return ChunkStats(index=value["chunk"], plan=value["plan"], records=value["records"],
                          shards=value["shards"], skipped=value["skipped"], bytes=value["bytes"])
    except (KeyError, TypeError):  # None (missing) or not a stats file
        return None


def write_chunk(task: ChunkTask) -> ChunkStats:
    """Write the chunk's shard(s), its failed rows, then its stats file; returns the stats.

    A retry task (`task.retry`) rewrites the chunk's last shard with its samples plus the
    retried rows that now succeed; the shard is renamed over the old one before the failed
    rows and stats are rewritten, and rows whose key the shards already hold (a retry killed
    after that rename) are not fetched again.
    """
    output = Output(task.output_dir)
    if not task.retry:
        _clear_earlier_try(output, task.shard_name)
    with output.staging() as staging:
        return _write_chunk(task, output, staging)


def _write_chunk(task: ChunkTask, output: Output, staging: str) -> ChunkStats:
    skipped: Counter[str] = Counter()
    failures: list[bytes] = []
    digests: list[tuple[int, bytes]] = []
    store = DigestStore(task.output_dir) if task.live_dedup and task.shared_digests else None
    chunk_digests: set[bytes] = set()
    kept: dict[str, int] = {}
    writer = _PartWriter(output, staging, task.shard_name, max_bytes=task.max_bytes)
    marker = os.path.join(task.output_dir, retry_marker_name(task.shard_name))
    try:
        if task.retry:
            records = read_chunk_stats(output, task.shard_name).records
            write_bytes_atomically(marker, b"")  # before any part is replaced; see finish_interrupted_retry
            task, kept, failures, skipped = _reopen_for_retry(task, writer)
        else:
            records = len(task.records)
        for outcome in _outcomes(task):
            ordinal = task.ordinal(outcome.offset)
            # local duplicates were found before writing (task.duplicates, see _outcome); downloads are checked here
            if outcome.members is not None and task.live_dedup \
                    and _is_duplicate(ordinal, outcome.digest, store, chunk_digests):
                outcome = _Outcome(outcome.offset, outcome.record, reason="duplicate")
            if outcome.members is not None:
                writer.add(outcome.members)
                if store is not None:
                    digests.append((ordinal, outcome.digest))
            else:
                skipped[outcome.reason] += 1
                failures.append(_failure_line(sample_key(ordinal), outcome))
            if _records_done is not None:
                with _records_done.get_lock():
                    _records_done.value += 1
        shards = {**kept, **writer.finish()}
        if store is not None:
            store.add(digests)  # before the stats file: a chunk is done only with its digests recorded
    finally:
        writer.abandon()
        if store is not None:
            store.close()
    stats = ChunkStats(index=task.index, plan=task.plan, records=records, shards=shards,
                       skipped=dict(sorted(skipped.items())),
                       bytes=sum(writer.sizes.get(name) or output.size(name) for name in shards))
    _record_chunk(output, task.shard_name, stats, failures)
    if task.retry:
        os.remove(marker)
    return stats


def _record_chunk(output: Output, shard_name: str, stats: ChunkStats, failures: list[bytes]) -> None:
    """The chunk's failed rows (in key order, whatever order the downloads finished in: "key" leads every
    line), then its stats file, which marks the chunk done."""
    output.write_bytes(failures_name(shard_name), b"".join(sorted(failures)))
    output.write_json(stats_name(shard_name), {
        "chunk": stats.index, "plan": stats.plan, "records": stats.records, "shards": stats.shards,
        "written": stats.written, "skipped": stats.skipped, "bytes": stats.bytes})


def finish_interrupted_retry(output_dir: str, shard_name: str, *, byte_capped: bool) -> None:
    """A retry killed after replacing a part but before rewriting the chunk's failed rows and stats left
    its marker: list the chunk's parts as they are on disk, drop from the failed rows those a part now
    holds, recount, and clear the marker. Nothing is downloaded; a later --retry-failed goes on."""
    output = Output(output_dir)
    stats = read_chunk_stats(output, shard_name)
    if stats is not None:
        parts = [shard_name] if not byte_capped else \
            list(takewhile(lambda name: os.path.exists(os.path.join(output_dir, name)),
                           (part_name(shard_name, number) for number in count())))
        keys = {name: _shard_keys(os.path.join(output_dir, name)) for name in parts}
        failures, skipped = _failures_left(output, shard_name, held=set().union(*keys.values()))
        _record_chunk(output, shard_name, replace(
            stats, shards={name: len(names) for name, names in keys.items()}, skipped=dict(sorted(skipped.items())),
            bytes=sum(os.path.getsize(os.path.join(output_dir, name)) for name in parts)), failures)
    # the killed retry's part, never renamed (mmscale.atomic's names; a process id before those)
    unfinished = re.compile(rf"\.{re.escape(shard_name[: -len('.tar')])}(-\d{{3,}})?\.tar\.tmp\w+")
    for name in os.listdir(output_dir):
        if unfinished.fullmatch(name):
            os.remove(os.path.join(output_dir, name))
    os.remove(os.path.join(output_dir, retry_marker_name(shard_name)))


def _clear_earlier_try(output: Output, shard_name: str) -> None:
    """What an earlier try of this chunk left (a task the engine retried after its executor died, a worker
    orphaned by a killed run): its stats file first, so the chunk never looks done without its shards, then
    its failed rows and its shard or parts. Its temporary files are left to the driver's sweep."""
    names = [stats_name(shard_name), failures_name(shard_name), shard_name]
    names += takewhile(output.exists, (part_name(shard_name, number) for number in count()))
    for name in names:
        output.remove(name)


def _is_duplicate(ordinal: int, digest: bytes, store: DigestStore | None, chunk_digests: set[bytes]) -> bool:
    if digest in chunk_digests:
        return True
    chunk_digests.add(digest)
    if store is None:
        return False
    first = store.first_ordinal(digest)
    return first is not None and first < ordinal


def _failure_line(key: str, outcome: _Outcome) -> bytes:
    record = outcome.record
    row = {"key": key, "source": record.source, "url": record.url, "caption": record.caption,
           "label": record.label, "reason": outcome.reason, "detail": outcome.detail[:300]}
    if record.question is not None:  # all of it: --retry-failed rebuilds the record from this line
        row |= record.question.as_json()
    return json_line(row) + b"\n"


def json_line(value, *, sort_keys: bool = False) -> bytes:
    """UTF-8 JSON of `value`. A string read with surrogateescape (a path or URL that is not UTF-8) makes
    the whole line ASCII JSON instead, its \\udcXX escapes reading back as the very same string."""
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=sort_keys).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, sort_keys=sort_keys).encode("ascii")


def failed_rows(output: Output, shard_name: str) -> list[dict]:
    """The failed rows a finished chunk listed (empty when it wrote no list)."""
    payload = output.read_bytes(failures_name(shard_name)) or b""
    return [json.loads(line) for line in payload.splitlines() if line.strip()]


def retry_records(rows: list[dict]) -> tuple[list[Record], tuple[int, ...]]:
    """Records (and ordinals) of failed rows worth another try: downloads that failed for a passing reason."""
    chosen = [row for row in rows if row.get("url") and row["reason"] in RETRYABLE_REASONS]
    return ([Record(source=row["source"], url=row["url"], caption=row["caption"], label=row.get("label"),
                    question=Question(row["question"], tuple(row.get("answers", ())), row.get("question_type", ""))
                    if "question" in row else None)
             for row in chosen], tuple(int(row["key"]) for row in chosen))


def _reopen_for_retry(task: ChunkTask, writer: _PartWriter
                      ) -> tuple[ChunkTask, dict[str, int], list[bytes], Counter]:
    """Copy the chunk's last shard into `writer`; returns (the task with only the retried rows no shard
    holds yet, the other shards, the failed rows not retried, their counts by reason)."""
    stats = read_chunk_stats(writer.output, task.shard_name)
    names = sorted(stats.shards)
    writer.first_part = len(names) - 1
    held = set()
    for name in names:
        held.update(_shard_keys(os.path.join(task.output_dir, name)))
    for members in _shard_samples(os.path.join(task.output_dir, names[-1])):
        writer.add(members)
    failures, skipped = _failures_left(writer.output, task.shard_name, held=held,
                                       retried={sample_key(ordinal) for ordinal in task.ordinals})
    keep = [offset for offset, ordinal in enumerate(task.ordinals) if sample_key(ordinal) not in held]
    task = replace(task, records=[task.records[offset] for offset in keep],
                   ordinals=tuple(task.ordinals[offset] for offset in keep))
    return task, {name: stats.shards[name] for name in names[:-1]}, failures, skipped


def _failures_left(output: Output, shard_name: str, *, held: set[str], retried: set[str] = frozenset()
                   ) -> tuple[list[bytes], Counter]:
    """The chunk's failed rows that a part does not hold now and that are not being retried: their lines
    and their counts by reason."""
    failures, skipped = [], Counter()
    for row in failed_rows(output, shard_name):
        if row["key"] not in held and row["key"] not in retried:
            failures.append(json_line(row) + b"\n")
            skipped[row["reason"]] += 1
    return failures, skipped


def _shard_keys(path: str) -> set[str]:
    with tarfile.open(path) as tar:
        return {member.name.split(".", 1)[0] for member in tar}


def _shard_samples(path: str) -> Iterator[list[tuple[str, bytes]]]:
    """The members of a shard written by this module, grouped by sample."""
    with tarfile.open(path) as tar:
        group: list[tuple[str, bytes]] = []
        for member in tar:
            if group and member.name.split(".", 1)[0] != group[0][0].split(".", 1)[0]:
                yield group
                group = []
            group.append((member.name, tar.extractfile(member).read()))
        if group:
            yield group


def _outcomes(task: ChunkTask) -> Iterator[_Outcome]:
    """Each record's outcome: URL records as their downloads finish, the others in input order.

    Downloads run on `task.download.threads` threads (waiting on the network), decoding and
    resizing on `task.image_threads` (PIL and libjpeg-turbo release the GIL): few threads for the
    CPU work keep the many download threads from fighting over the GIL.
    """
    def prepare(item: tuple[int, Record, Loaded | Fetched]) -> _Outcome:
        offset, record, loaded = item
        if isinstance(loaded, Fetched):
            if loaded.reason:
                return _Outcome(offset, record, reason=loaded.reason, detail=loaded.detail)
            loaded = Loaded(record.url, image=loaded.body, caption=record.caption, label=record.label,
                            question=record.question)
        return _outcome(offset, record, loaded, task)

    if any(record.url for record in task.records):
        def download(item: tuple[int, Record]) -> tuple[int, Record, Loaded | Fetched]:
            offset, record = item
            if record.url is None:
                return offset, record, next(iter_loaded([record], max_bytes=task.download.max_bytes))
            return offset, record, fetch(record.url, task.download)

        fetched = threaded_map(download, enumerate(task.records), threads=task.download.threads, ordered=False)
        yield from threaded_map(prepare, fetched, threads=task.image_threads, ordered=False)
        return
    loaded = iter_loaded(task.records, max_bytes=task.download.max_bytes)
    yield from threaded_map(prepare, zip(range(len(task.records)), task.records, loaded), threads=task.image_threads,
                            ordered=True)


def threaded_map(function: Callable, items: Iterable, *, threads: int, ordered: bool) -> Iterator:
    """map() over `threads` threads with a bounded window of work in flight; `ordered=False` yields as done."""
    if threads <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        yield from windowed_map(lambda item: pool.submit(function, item), items, window=2 * threads, ordered=ordered)


def windowed_map(submit: Callable[[object], Future], items: Iterable, *, window: int, ordered: bool,
                 result: Callable[[Future], object] = Future.result) -> Iterator:
    """`result(future)` of the `submit(item)` futures, at most `window` of them pending; `ordered=False` yields
    as they finish."""
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(submit(item))
            if len(pending) >= window:
                yield from _drain(pending, ordered=ordered, leave=window - 1, result=result)
        yield from _drain(pending, ordered=ordered, leave=0, result=result)
    finally:
        for future in pending:
            future.cancel()


def _drain(pending: deque[Future], *, ordered: bool, leave: int, result: Callable[[Future], object]) -> Iterator:
    while len(pending) > leave:
        if ordered:
            yield result(pending.popleft())
            continue
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            pending.remove(future)
            yield result(future)


def _outcome(offset: int, record: Record, loaded: Loaded, task: ChunkTask) -> _Outcome:
    if task.ordinal(offset) in task.duplicates and not loaded.problem:
        return _Outcome(offset, record, reason="duplicate")  # known before writing: no need to decode it
    try:
        members, digest = _sample_members(sample_key(task.ordinal(offset)), loaded, task=task)
    except SampleRejected as rejection:
        return _Outcome(offset, record, reason=rejection.reason, detail=rejection.detail)
    return _Outcome(offset, record, members=members, digest=digest)


def _sample_members(key: str, loaded: Loaded, *, task: ChunkTask) -> tuple[list[tuple[str, bytes]], bytes]:
    """The tar members of one sample and its dedup digest (sources.dedup_digest); raises SampleRejected to skip
    it. A VQA sample needs no caption; the caption limits do not apply to its question."""
    if loaded.problem:
        raise SampleRejected(loaded.problem)
    if loaded.question is None and loaded.caption is None:
        raise SampleRejected("missing_caption")
    if loaded.question is None and not task.captions.accepts(loaded.caption):
        raise SampleRejected("caption_length")
    image = prepare_image(loaded.image, task.image)
    image_sha256 = hashlib.sha256(loaded.image).digest()
    meta = {"key": key, "source": loaded.source, "status": "success",
            "original_width": image.original_width, "original_height": image.original_height,
            "width": image.width, "height": image.height, "sha256": image_sha256.hex()}
    if loaded.source.startswith(("http://", "https://")):
        meta["url"] = loaded.source
    members = [(f"{key}.jpg", image.jpeg)]
    if loaded.caption is not None:
        meta["caption"] = loaded.caption
        members.append((f"{key}.txt", loaded.caption.encode("utf-8")))
    if loaded.question is not None:
        meta |= loaded.question.as_json()
    if loaded.label is not None:
        meta["label"] = loaded.label
        members.append((f"{key}.cls", str(loaded.label).encode("ascii")))
    members.append((f"{key}.json", json_line(meta, sort_keys=True)))
    return members, dedup_digest(image_sha256, loaded.question)


def _closed_size(offset: int) -> int:
    """A tar's file size once closed: end blocks added, then padded to whole tar records."""
    return -(-(offset + _TAR_END) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for a regular file (mode 644, mtime 0, no owner).

    Built by hand: tarfile's own header code costs ~10x more, a third of a small sample's
    write time. Names over 100 bytes or sizes of 8 GB and more go through tarfile (PAX).
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or size >= 8 ** 11:
        info = tar_member(name, b"", 0)[0]
        info.size = size
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    header = bytearray(_TAR_BLOCK)
    header[0:len(encoded)] = encoded
    header[100:136] = b"0000644\x000000000\x000000000\x00" + b"%011o\x00" % size
    header[136:148] = b"00000000000\x00"  # mtime 0
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[156] = ord("0")
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


class _PartWriter:
    """Tar part(s) of one chunk: temporary files (in `staging`: the output folder, or a local folder for a
    store) put into place (Output.place: renamed or uploaded) as each one completes."""

    def __init__(self, output: Output, staging: str, shard_name: str, *, max_bytes: int | None):
        self.output, self.staging, self.shard_name, self.max_bytes = output, staging, shard_name, max_bytes
        self.shards: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.handle = self.name = self.temporary = None
        self.offset = 0
        self.first_part = 0  # a retry rewrites the chunk's last part and goes on from there

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """Append one sample's members, starting a new part first if the byte cap requires it."""
        needed = sum(_TAR_BLOCK + -(-len(payload) // _TAR_BLOCK) * _TAR_BLOCK for _, payload in members)
        if self.handle is not None and self.max_bytes is not None and self.shards[self.name] > 0 \
                and _closed_size(self.offset + needed) > self.max_bytes:
            self._close_part()
        if self.handle is None:
            self._open_part()
        for name, payload in members:
            padding = -len(payload) % _TAR_BLOCK
            self.handle.write(tar_header(name, len(payload)))
            self.handle.write(payload)
            self.handle.write(bytes(padding))
            self.offset += _TAR_BLOCK + len(payload) + padding
        self.shards[self.name] += 1

    def finish(self) -> dict[str, int]:
        """Close the last part (writing an empty one if the chunk had no samples)."""
        if self.handle is None and not self.shards:
            self._open_part()
        if self.handle is not None:
            self._close_part()
        return dict(self.shards)

    def abandon(self) -> None:
        """Drop an unfinished part after an error; its temporary file goes too."""
        if self.handle is not None:
            self.handle.close()
            os.remove(self.temporary)
            self.handle = None

    def _open_part(self) -> None:
        number = self.first_part + len(self.shards)
        self.name = self.shard_name if self.max_bytes is None else part_name(self.shard_name, number)
        self.shards[self.name] = 0
        # a fresh random name: a worker orphaned by a killed run never writes into this run's file
        self.handle, self.temporary = open_temporary(os.path.join(self.staging, self.name), buffering=1 << 20)
        self.offset = 0

    def _close_part(self) -> None:
        self.handle.write(bytes(_closed_size(self.offset) - self.offset))  # end blocks, record padding
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.handle = None
        self.sizes[self.name] = _closed_size(self.offset)
        self.output.place(self.temporary, self.name)
