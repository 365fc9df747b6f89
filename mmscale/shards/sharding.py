"""Turn an image–caption corpus into WebDataset shards: plan, resume, write in parallel, sum up.

How it stays resumable and deterministic:
- The input is listed as numbered records (see sources.py) and cut up front into chunks of
  `samples_per_shard` consecutive records; chunk i always becomes `name_pattern.format(i)`.
  With `max_bytes_per_shard` as well, a chunk is split into parts of at most that many bytes
  (`shard-000003-000.tar`, `-001`, ...); chunk boundaries stay fixed, so resuming still works,
  and a byte cap alone uses the default of 10,000 records per chunk.
- A chunk is done when its stats file exists (written after its shards were renamed into
  place). A re-run skips done chunks, removes stale temporary files and redoes the rest;
  `sizes.json` and `stats.json` are rebuilt from the chunks' stats files at the end.
- `dedup` compares image bytes (sha256; COCO's several captions per image collapse to one; a VQA
  sample's question is compared with its image, so an image's several questions are all kept),
  keeping the digests in an on-disk set (dedup.py), so memory stays bounded at any scale.
  Local input is hashed up to the last chunk still to write, in record order, before
  writing, so the first copy is kept and the others are skipped the same way in every run.
  Downloaded input cannot be read twice: a chunk skips images already in a finished chunk or
  earlier in itself, and records its digests when it finishes (copies fetched by chunks
  running at the same time may both be kept).
- Tables are streamed (sources.TableInput): chunks are cut from row counts, and at most a
  few chunks' records are in memory at once.
- Every record is written or listed with its reason in its chunk's failed-rows file; the
  run ends by gathering them into `failed.parquet`.
- Every stats file carries a fingerprint of the input and options; resuming into a folder
  written with other options is refused rather than mixing two datasets.

Only one make_shards may write to an output folder at a time (a lock file enforces it; on an
object store, a lease object: output.py).

The chunk tasks (hashing for `dedup`, writing) run on a local process pool or on a Spark or Ray
cluster (distributors.py); the listing, the plan, the lock and the totals stay with this process.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace

from tqdm import tqdm

from mmscale.shards.dedup import DEDUP_FILE, SCRATCH_DEDUP_FILE, DigestStore
from mmscale.shards.distributors import ClusterMap, DistributorOptions, cluster, require_engine
from mmscale.shards.download import DownloadOptions
from mmscale.shards.output import Output, RemoteLease, is_url
from mmscale.shards.images import ImageOptions
from mmscale.shards.writer import (
    CaptionFilter,
    ChunkStats,
    ChunkTask,
    failed_rows,
    finish_interrupted_retry,
    read_chunk_stats,
    retry_marker_name,
    retry_records,
    set_progress_counter,
    stats_name,
    write_chunk,
)
from mmscale.data.tars import SIZES_FILE
from mmscale.shards.sources import (
    InputError,
    InputListing,
    InputOptions,
    Record,
    ShardCount,
    count_shard,
    dedup_digest,
    iter_loaded,
    list_input,
)

DEFAULT_SAMPLES_PER_SHARD = 10_000
DEFAULT_NAME_PATTERN = "shard-{:06d}.tar"
STATS_FILE = "stats.json"
FAILED_FILE = "failed.parquet"
INPUT_INDEX_FILE = "input_index.json"  # cached sample counts of input tars, keyed by size and mtime
_LOCK_FILE = ".make_shards.lock"


@dataclass(frozen=True)
class ShardingOptions:
    """A make_shards job: the input, where the shards go, and what to do to each sample."""

    input: InputOptions
    output_dir: str
    samples_per_shard: int | None = None
    max_bytes_per_shard: int | None = None
    image: ImageOptions = ImageOptions()
    captions: CaptionFilter = CaptionFilter()
    dedup: bool = False
    download: DownloadOptions = DownloadOptions()
    retry_failed: bool = False
    """After writing, download again the rows of finished chunks that failed for a passing reason
    (timeout, connection error, cut-short body, 408, 429, 5xx) and add those that succeed."""
    workers: int = 1
    image_threads: int | None = None
    """Threads per worker decoding and resizing images; None: the CPUs divided among the workers."""
    name_pattern: str = DEFAULT_NAME_PATTERN
    progress: bool = True
    distributor: DistributorOptions = DistributorOptions()
    """Where the chunk tasks run (distributors.py); `workers` sizes a local process pool, Spark master or Ray."""


@dataclass
class ShardingSummary:
    """Totals over the whole output folder, plus what this run did."""

    output_dir: str
    records: int
    sizes: dict[str, int]
    skipped: dict[str, int]
    bytes: int
    chunks: int
    chunks_written: int
    records_processed: int
    wall_time_s: float
    plan: str = ""

    @property
    def written(self) -> int:
        """Samples in the output shards."""
        return sum(self.sizes.values())

    @property
    def samples_per_s(self) -> float:
        """Input records processed per second in this run."""
        return self.records_processed / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def as_dict(self) -> dict:
        """The `stats.json` content."""
        return {"plan": self.plan, "records": self.records, "shards": len(self.sizes), "written": self.written,
                "skipped": self.skipped, "skipped_total": sum(self.skipped.values()), "bytes": self.bytes,
                "chunks_written_this_run": self.chunks_written, "wall_time_s": round(self.wall_time_s, 3),
                "samples_per_s": round(self.samples_per_s, 1)}

    def describe(self) -> str:
        """A two-line human summary."""
        skipped = ", ".join(f"{reason} {count:,}" for reason, count in sorted(self.skipped.items()))
        totals = (f"{len(self.sizes):,} shards, {self.written:,} samples, {self.bytes / 1e6:,.1f} MB in "
                  f"{self.output_dir} (skipped {sum(self.skipped.values()):,}{': ' + skipped if skipped else ''})")
        if self.chunks_written == 0 and self.records_processed == 0:
            return f"everything was already done ({self.chunks:,} of {self.chunks:,} chunks); nothing to do\n{totals}"
        return (f"{totals}\nthis run: {self.chunks_written:,} of {self.chunks:,} chunks written, "
                f"{self.records_processed:,} records in {self.wall_time_s:.1f} s "
                f"({self.samples_per_s:,.1f} samples/s)")


def plan_chunks(records: int, samples_per_shard: int) -> list[range]:
    """Record ranges of the chunks: chunk i holds records [i*n, (i+1)*n)."""
    return [range(start, min(start + samples_per_shard, records)) for start in range(0, records, samples_per_shard)]


def make_shards(options: ShardingOptions) -> ShardingSummary:
    """Write (or finish writing) the shards of a corpus; see the module docstring for how."""
    started = time.monotonic()
    output = Output(options.output_dir)
    options = replace(options, output_dir=output.location)  # file:///data/shards -> /data/shards
    require_engine(options.distributor.name)
    if output.remote and options.retry_failed:
        raise InputError(f"--retry-failed rewrites shards in place: it needs a local or shared output folder, "
                         f"not {options.output_dir}")
    _check_output_is_not_input(options)
    output.makedirs()
    with _output_lock(output) as check_lock, _Runner(options) as runner:
        listing = list_input(options.input, count_shards=lambda urls: _count_shards(urls, options),
                             progress=options.progress)
        _check_no_input_shard_in_output(listing, output)
        size = options.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD
        chunks = plan_chunks(len(listing), size)
        names = [options.name_pattern.format(index) for index in range(len(chunks))]
        plan = _fingerprint(options, listing.kind, len(listing),
                            within_chunk_dedup=_dedup_within_chunks(options, listing))
        if not output.remote:
            _finish_interrupted_retries(output.location, names, byte_capped=options.max_bytes_per_shard is not None)
        done = _done_chunks(output, names, plan=plan, byte_capped=options.max_bytes_per_shard is not None)
        pending = [index for index in range(len(chunks)) if index not in done]
        if pending:
            _remove_leftovers(output, [names[index] for index in pending])
            with output.staging() as staging, _digest_store(options, listing, staging) as store:
                if store is not None and listing.has_urls:
                    store.forget(chunks[index] for index in pending)
                elif store is not None:
                    find_duplicates(listing, store, options, runner, count=pending[-1] + 1)
                tasks = _chunk_tasks(pending, listing, names=names, plan=plan, options=options, store=store)
                done |= _write_chunks(tasks, options, runner, total=sum(len(chunks[index]) for index in pending),
                                      check_lock=check_lock)
        retried = _retry_failed(output, names, chunks, plan=plan, options=options, runner=runner,
                                live_dedup=listing.has_urls) if options.retry_failed else 0
        if (pending or retried) and not output.remote:
            _remove_leftovers(output, [])  # temporary files of tries an engine retried (a store's are local)
        summary = _summarize(output, names, known={} if retried else done, listing=listing, plan=plan,
                             pending=[chunks[i] for i in pending], wall_time_s=time.monotonic() - started)
        summary.records_processed += retried
        check_lock()
        _write_totals(output, summary, names, rewrite_stats=bool(pending) or retried > 0)
    return summary


def _shared_digests(options: ShardingOptions) -> bool:
    """Whether chunk tasks can all open one digest store in the output folder (SQLite: one machine, a path)."""
    return options.distributor.local and not is_url(options.output_dir)


def _dedup_within_chunks(options: ShardingOptions, listing: InputListing) -> bool:
    """Whether --dedup of downloads is checked within each chunk only (no store the tasks can share)."""
    return options.dedup and listing.has_urls and not _shared_digests(options)


@contextmanager
def _digest_store(options: ShardingOptions, listing: InputListing, staging: str) -> Iterator[DigestStore | None]:
    """--dedup's digests: local input's, hashed before writing, in a scratch store removed afterwards (in
    `staging`: the output folder, or a local folder for a store); downloads' in the output folder's store
    the workers check and add to, kept for a resumed job (none where they cannot share one: each chunk
    then drops the copies within itself)."""
    if not options.dedup or _dedup_within_chunks(options, listing):
        yield None
        return
    scratch = not listing.has_urls
    store = DigestStore(staging, name=SCRATCH_DEDUP_FILE if scratch else DEDUP_FILE)
    try:
        yield store
    finally:
        store.close(remove=scratch)


def _check_output_is_not_input(options: ShardingOptions) -> None:
    if os.path.exists(options.input.path) and os.path.exists(options.output_dir) \
            and os.path.samefile(options.input.path, options.output_dir):
        raise InputError(f"output {options.output_dir} is the input folder; pass a new folder with --output")


def _check_no_input_shard_in_output(listing: InputListing, output: Output) -> None:
    """Resharding into the folder being read would delete the input as stale leftovers."""
    if output.remote:
        prefix = output.location.rstrip("/") + "/"
        for record in listing.records or ():
            if record.shard_url and record.shard_url.startswith(prefix) and "/" not in record.shard_url[len(prefix):]:
                raise InputError(f"input shard {record.shard_url} is in the output folder {output.location}; "
                                 "write the new shards to another folder with --output")
        return
    output = os.path.realpath(output.location)
    for record in listing.records or ():
        if record.shard_url and os.path.exists(record.shard_url) \
                and os.path.dirname(os.path.realpath(record.shard_url)) == output:
            raise InputError(f"input shard {record.shard_url} is in the output folder {output}; "
                             "write the new shards to another folder with --output")


@contextmanager
def _output_lock(output: Output):
    """One make_shards per output folder: a POSIX lock on a path (local or shared), a lease on a store.
    Yields a check to call as the run goes: it raises InputError once a store's lease is lost."""
    if output.remote:
        lease = RemoteLease(output, _LOCK_FILE)
        lease.acquire()
        try:
            yield lease.check
        finally:
            lease.release()
        return
    path = output.join(_LOCK_FILE)
    try:  # O_NOFOLLOW: a symlink planted at the lock's name must not make us create or touch its target
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise InputError(f"output {output.location}: {_LOCK_FILE} is a symbolic link, not a lock file make_shards "
                         "wrote; remove it") from None
    try:
        try:
            # a POSIX record lock: unlike flock, forked workers do not inherit it, so workers
            # orphaned by a killed run cannot keep the next run out
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"output {output.location}: another make_shards is writing there; wait for it "
                             "or pick another --output") from None
        yield lambda: None  # a POSIX lock is held until the process ends
    finally:
        os.close(descriptor)


def _fingerprint(options: ShardingOptions, kind: str, records: int, *, within_chunk_dedup: bool = False) -> str:
    """Identifies input + options, so a resume never mixes shards from two different jobs (nor two scopes of
    --dedup: downloads checked against the whole output, or within each chunk on a cluster or a store)."""
    source = asdict(options.input)
    if kind != "tars":
        source["path"] = os.path.abspath(source["path"])
    for name in ("answers", "question_column", "answer_column", "question_type_column"):
        if source[name] is None:
            del source[name]  # absent: folders written before VQA input existed resume
    if source.get("answers"):
        source["answers"] = os.path.abspath(source["answers"])
    described = {"input": source, "kind": kind, "records": records, "image": asdict(options.image),
                 "captions": asdict(options.captions),
                 "dedup": "within each chunk" if within_chunk_dedup else options.dedup,
                 "download": _download_fingerprint(options.download),
                 "samples_per_shard": options.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD,
                 "max_bytes_per_shard": options.max_bytes_per_shard, "name_pattern": options.name_pattern}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _download_fingerprint(download: DownloadOptions) -> dict:
    """What changes which rows can be written (not threads, timeouts or retries: a resume may tune them)."""
    private = {"allow_private_urls": True} if download.allow_private_urls else {}  # absent: folders of older runs resume
    return {"max_bytes": download.max_bytes, "max_redirects": download.max_redirects,
            "respect_robots_headers": download.respect_robots_headers, **private}


def _done_chunks(output: Output, names: list[str], *, plan: str, byte_capped: bool) -> dict[int, ChunkStats]:
    """The stats of the chunks whose stats file and shards exist, by index; refuses an output folder from
    another job."""
    previous = output.read_json(STATS_FILE)
    if previous and previous.get("plan") != plan:
        raise InputError(f"output {output.location} holds shards made from other input or options; "
                         "pass a new --output (or delete that folder to start over)")
    owners = {name[: -len(".tar")]: index for index, name in enumerate(names)}
    present = set(output.names())
    for file_name in sorted(present):
        if file_name.endswith(".tar") and _owner(file_name, owners, byte_capped=byte_capped) is None:
            raise InputError(f"output {output.location}: {file_name} is not part of this job's plan; "
                             "pass a new --output (or delete that folder to start over)")
    done = {}
    for index, name in enumerate(names):
        stats = read_chunk_stats(output, name) if stats_name(name) in present else None
        if stats is None:
            continue
        if stats.plan != plan:
            raise InputError(f"output {output.location}: {stats_name(name)} comes from other input or options; "
                             "pass a new --output (or delete that folder to start over)")
        if all(shard in present for shard in stats.shards):
            done[index] = stats
    return done


def _finish_interrupted_retries(output: str, names: list[str], *, byte_capped: bool) -> None:
    markers = {name for name in os.listdir(output) if name.endswith(".retrying")}
    for name in names:
        if retry_marker_name(name) in markers:
            finish_interrupted_retry(output, name, byte_capped=byte_capped)


def _owner(file_name: str, owners: dict[str, int], *, byte_capped: bool) -> int | None:
    stem = file_name[: -len(".tar")]
    if byte_capped:
        match = re.fullmatch(r"(.*)-\d{3,}", stem)
        return owners.get(match.group(1)) if match else None
    return owners.get(stem)


def _remove_leftovers(output: Output, pending_names: list[str]) -> None:
    """Stale temporary files, and shards of chunks that never got their stats file."""
    stems = {name[: -len(".tar")] for name in pending_names}
    for file_name in output.names():
        stale_temporary = file_name.startswith(".") and ".tmp" in file_name
        stem = file_name[: -len(".tar")]
        unfinished = file_name.endswith(".tar") and (stem in stems or re.sub(r"-\d{3,}$", "", stem) in stems)
        if stale_temporary or unfinished:
            output.remove(file_name)


def parallel_map(function: Callable, items: Iterable, *, workers: int, ordered: bool = True,
                 progress_counter=None) -> Iterator:
    """map() over a process pool (in this process when workers <= 1); `ordered=False` yields as done.

    `items` may be a lazy iterator: at most 2 x workers items are taken from it ahead of the
    results, so a streamed input never piles up in the pool's queue.
    `progress_counter` (a multiprocessing.Value) is handed to every worker for
    writer.set_progress_counter, so record-level progress crosses processes.
    """
    if workers > 1 and isinstance(items, Sized):
        workers = min(workers, len(items))
    if workers <= 1:
        set_progress_counter(progress_counter)
        try:
            yield from map(function, items)
        finally:
            set_progress_counter(None)
        return
    window, stopped = threading.Semaphore(2 * workers), threading.Event()

    def feed() -> Iterator:  # runs in the pool's task-feeding thread
        for item in items:
            while not window.acquire(timeout=0.2):
                if stopped.is_set():
                    return
            if stopped.is_set():
                return
            yield item

    with multiprocessing.Pool(workers, initializer=_start_worker, initargs=(os.getpid(), progress_counter)) as pool:
        run = pool.imap if ordered else pool.imap_unordered
        try:
            for result in run(function, feed(), chunksize=1):
                window.release()
                yield result
        finally:
            stopped.set()


class _Runner:
    """Runs chunk tasks where ShardingOptions.distributor says; a cluster engine is started on first use."""

    def __init__(self, options: ShardingOptions):
        self.options, self.engine, self.stack = options, None, ExitStack()

    @property
    def live_progress(self) -> bool:
        """Whether workers count records as they go (a local pool), rather than per finished chunk."""
        return self.options.distributor.local

    def map(self, function: Callable, items: Iterable, *, ordered: bool, progress_counter=None) -> Iterator:
        if self.options.distributor.local:
            return parallel_map(function, items, workers=self.options.workers, ordered=ordered,
                                progress_counter=progress_counter)
        if self.engine is None:
            self.engine: ClusterMap = self.stack.enter_context(cluster(self.options.distributor,
                                                                       workers=self.options.workers))
        return self.engine.map(function, items, ordered=ordered)

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exception) -> None:
        self.stack.close()


def _start_worker(parent: int, progress_counter) -> None:
    """Pool workers outlive a SIGKILLed parent; make them stop within a second instead."""
    set_progress_counter(progress_counter)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _count_shards(urls: list[str], options: ShardingOptions) -> list[ShardCount]:
    """Sample counts of input tars, read in parallel and cached beside the output by size+mtime."""
    output = Output(options.output_dir)
    cache = output.read_json(INPUT_INDEX_FILE) or {}
    counts: dict[str, ShardCount] = {}
    for url in urls:
        entry, stamp = cache.get(url), _file_stamp(url)
        if entry and stamp and entry["stamp"] == stamp:
            counts[url] = ShardCount(url, entry["samples"], entry["truncated"])
    todo = [url for url in urls if url not in counts]
    progress = tqdm(total=len(todo), desc="counting input shards", unit="shard",
                    disable=not options.progress or not todo)
    for count in parallel_map(count_shard, todo, workers=options.workers):
        counts[count.url] = count
        progress.update()
        stamp = _file_stamp(count.url)
        if stamp and not count.error:
            cache[count.url] = {"stamp": stamp, "samples": count.samples, "truncated": count.truncated}
    progress.close()
    if todo:
        output.write_json(INPUT_INDEX_FILE, cache)
    return [counts[url] for url in urls]


def _file_stamp(url: str) -> list[int] | None:
    try:
        status = os.stat(url)
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def image_digests(task: tuple[int, list[Record], CaptionFilter]) -> list[tuple[int, bytes]]:
    """(ordinal, dedup digest: sources.dedup_digest) of a chunk's records, leaving out those skipped anyway."""
    start, records, captions = task
    return [(start + offset, dedup_digest(hashlib.sha256(loaded.image).digest(), loaded.question))
            for offset, loaded in enumerate(iter_loaded(records))
            if loaded.image and (loaded.question is not None or (loaded.caption and captions.accepts(loaded.caption)))]


def find_duplicates(listing: InputListing, store: DigestStore, options: ShardingOptions, runner: _Runner, *,
                    count: int) -> None:
    """Hash the images of chunks 0 .. count-1 in record order into `store`, which marks later copies."""
    size = options.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD
    store.clear()
    tasks = ((index * size, records, options.captions)
             for index, records in enumerate(listing.iter_chunks(size, count=count)))
    with tqdm(total=min(len(listing), count * size), desc="hashing images", unit="image",
              disable=not options.progress) as progress:
        for digests in runner.map(image_digests, tasks, ordered=True):  # store.add marks later copies: in order
            store.add(digests)
            progress.update(size)


def _chunk_tasks(pending: list[int], listing: InputListing, *, names: list[str], plan: str,
                 options: ShardingOptions, store: DigestStore | None) -> Iterator[ChunkTask]:
    """One task per pending chunk, read from the input as they are needed."""
    size, wanted = options.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD, set(pending)
    for index, records in enumerate(listing.iter_chunks(size, count=pending[-1] + 1)):
        if index not in wanted:
            continue
        start = index * size
        duplicates = store.duplicates_between(start, start + len(records)) \
            if store is not None and not listing.has_urls else frozenset()
        yield ChunkTask(index=index, start=start, records=records, output_dir=options.output_dir,
                        shard_name=names[index], plan=plan, max_bytes=options.max_bytes_per_shard,
                        image=options.image, captions=options.captions, duplicates=duplicates,
                        download=options.download, live_dedup=options.dedup and listing.has_urls,
                        shared_digests=_shared_digests(options), image_threads=_image_threads(options))


def _image_threads(options: ShardingOptions) -> int:
    """A cluster task holds one executor core; a local worker shares this machine's cores with the others."""
    if not options.distributor.local:
        return options.image_threads or 1
    return options.image_threads or max(1, (os.cpu_count() or 1) // options.workers)


def _retry_failed(output: Output, names: list[str], chunks: list[range], *, plan: str, options: ShardingOptions,
                  runner: _Runner, live_dedup: bool) -> int:
    """Retry the passing failures of every chunk (see ShardingOptions.retry_failed); returns the rows tried.
    The rows are counted first (for the progress bar) and read again chunk by chunk as tasks are needed."""

    def retryable(index: int) -> tuple[list[Record], tuple[int, ...]]:
        return retry_records(failed_rows(output, names[index]))

    def task(index: int) -> ChunkTask:
        records, ordinals = retryable(index)
        return ChunkTask(index=index, start=chunks[index].start, records=records, ordinals=ordinals, retry=True,
                         output_dir=options.output_dir, shard_name=names[index], plan=plan,
                         max_bytes=options.max_bytes_per_shard, image=options.image, captions=options.captions,
                         download=options.download, live_dedup=options.dedup and live_dedup,
                         shared_digests=_shared_digests(options), image_threads=_image_threads(options))

    counts = {index: count for index in range(len(names)) if (count := len(retryable(index)[0]))}
    total = sum(counts.values())
    if total:
        _write_chunks((task(index) for index in counts), options, runner, total=total)
    return total


def _write_chunks(tasks: Iterable[ChunkTask], options: ShardingOptions, runner: _Runner, *, total: int,
                  check_lock: Callable[[], None] = lambda: None) -> dict[int, ChunkStats]:
    """Write the chunks (`total` rows) in parallel under one progress bar: records as a local pool's workers
    count them, or a task's rows as a cluster's task finishes; images written per second and rows skipped
    beside it. `check_lock()` after each chunk stops the run once the output's lock is lost. Returns the
    chunks' stats by index."""
    rows: dict[int, int] = {}  # a submitted task's rows, by chunk index (tasks are made as they are needed)

    def counted(tasks: Iterable[ChunkTask]) -> Iterator[ChunkTask]:
        for task in tasks:
            rows[task.index] = len(task.records)
            yield task

    skipped: Counter[str] = Counter()
    written_stats: dict[int, ChunkStats] = {}
    done, written = multiprocessing.Value("q", 0), 0
    finished, started = threading.Event(), time.monotonic()
    with tqdm(total=total, desc="writing shards", unit="row", disable=not options.progress) as progress:

        def follow() -> None:
            while not finished.wait(0.5):
                progress.update(done.value - progress.n)

        follower = threading.Thread(target=follow, daemon=True)
        if runner.live_progress:
            follower.start()
        try:
            for stats in runner.map(write_chunk, counted(tasks), ordered=False, progress_counter=done):
                check_lock()
                written_stats[stats.index] = stats
                skipped.update(stats.skipped)
                written += stats.written
                if not runner.live_progress:
                    progress.update(rows.pop(stats.index))
                progress.set_postfix_str(f"{written / max(time.monotonic() - started, 1e-9):,.1f} images/s, "
                                         f"skipped {sum(skipped.values()):,}", refresh=False)
        finally:
            finished.set()
            if runner.live_progress:
                follower.join()
        if runner.live_progress:
            progress.update(done.value - progress.n)
    return written_stats


def _summarize(output: Output, names: list[str], *, known: dict[int, ChunkStats], plan: str, listing: InputListing,
               pending: list[range], wall_time_s: float) -> ShardingSummary:
    """Totals from every chunk's stats (those in `known`, read or written by this run, else its stats file)
    plus the skips counted while listing the input."""
    sizes: dict[str, int] = {}
    skipped: Counter[str] = Counter(listing.skipped)
    total_bytes = 0
    for index, name in enumerate(names):
        stats = known.get(index) or read_chunk_stats(output, name)
        if stats is None:
            raise InputError(f"output {output.location}: {stats_name(name)} is missing after writing; "
                             "re-run to finish")
        sizes.update(stats.shards)
        skipped.update(stats.skipped)
        total_bytes += stats.bytes
    return ShardingSummary(output_dir=output.location, records=len(listing), sizes=sizes,
                           skipped=dict(sorted(skipped.items())), bytes=total_bytes, chunks=len(names),
                           chunks_written=len(pending), records_processed=sum(len(chunk) for chunk in pending),
                           wall_time_s=wall_time_s, plan=plan)


def _write_totals(output: Output, summary: ShardingSummary, names: list[str], *, rewrite_stats: bool) -> None:
    """sizes.json, stats.json and failed.parquet, written only when they change, so a no-op run touches
    nothing."""
    if output.read_json(SIZES_FILE) != summary.sizes:
        output.write_json(SIZES_FILE, summary.sizes)
    if rewrite_stats or not output.exists(STATS_FILE):
        output.write_json(STATS_FILE, summary.as_dict())
    if rewrite_stats or not output.exists(FAILED_FILE):
        gather_failures(output, names)


_FAILURE_COLUMNS = ("key", "source", "url", "caption", "question", "label", "reason", "detail")


def _text(value) -> str | None:
    """A parquet string: surrogates (a path that is not UTF-8) become visible \\udcXX escapes."""
    return None if value is None else str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def gather_failures(output: Output, names: list[str]) -> int:
    """Every chunk's failed rows into failed.parquet (a chunk at a time, put in place when complete);
    returns the rows."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    schema = pa.schema([(column, pa.string()) for column in _FAILURE_COLUMNS])
    rows = 0
    with output.writing(FAILED_FILE) as handle, parquet.ParquetWriter(handle, schema) as writer:
        for name in names:
            lines = [{column: _text(row.get(column)) for column in _FAILURE_COLUMNS}
                     for row in failed_rows(output, name)]
            if lines:
                writer.write_table(pa.Table.from_pylist(lines, schema=schema))
                rows += len(lines)
    return rows

