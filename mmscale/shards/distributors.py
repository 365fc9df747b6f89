"""Where make_shards runs its chunk tasks: a local process pool, a Spark cluster or a Ray cluster.

The driver (the process running make_shards) lists the input, plans the chunks, holds the
output lock and gathers the totals, whatever the distributor; only the chunk tasks (hashing
images for `--dedup`, writing a chunk's shards) run on the distributor's executors, each one
writing its files straight into the output folder as on one machine. So executors must see
the input and the output at the same paths as the driver: a shared filesystem (NFS, Lustre,
a mounted bucket) on a real cluster, or for the output an fsspec URL (output.py).

- multiprocessing: a process pool on this machine (`--workers`), records counted live.
- spark: one Spark job per chunk, submitted from a few driver threads (so results stream back
  as chunks finish and at most a window of chunks is in memory); Spark places the tasks on its
  executors and retries a failed one (`spark.task.maxFailures`; a local master is started as
  `local[workers,4]`, four tries). Under `spark-submit`, its master and settings are used.
- ray: one Ray task per chunk, four tries (`max_retries=3`: a killed worker or a lost node reruns it).
  `ray.init()` connects as Ray itself decides (RAY_ADDRESS, a cluster started on this
  machine, else a new local one); `--ray-address local` always starts a local one.

A task the engine retries rewrites its chunk from the start (writer.write_chunk clears what an
earlier try left), and a chunk's shards appear under their names only when complete, so a
retried task leaves no duplicate or half shard.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from mmscale.shards.sources import InputError

DISTRIBUTORS = ("multiprocessing", "spark", "ray")
_EXTRAS = {"spark": ("pyspark", "mmscale[spark]"), "ray": ("ray", "mmscale[ray]")}
TASK_TRIES = 4
"""Tries of a chunk task on Spark and Ray: a task killed with its executor or node runs again."""


@dataclass(frozen=True)
class DistributorOptions:
    """Which engine runs the chunk tasks, and how to reach it."""

    name: str = "multiprocessing"
    spark_master: str | None = None
    """A Spark master URL (spark://host:7077, local[4], yarn, k8s://...); None: spark-submit's, else
    $SPARK_MASTER, else local[workers]."""
    ray_address: str | None = None
    """A Ray address (host:6379, ray://host:10001, auto, local); None: what `ray.init()` finds."""

    @property
    def local(self) -> bool:
        """Whether chunk tasks run in this machine's process pool."""
        return self.name == "multiprocessing"


def require_engine(name: str) -> None:
    """Raise InputError saying what to install when the engine's package is missing."""
    if name not in _EXTRAS:
        return
    module, extra = _EXTRAS[name]
    try:
        __import__(module)
    except ImportError:
        raise InputError(f"--distributor {name} needs {module}: pip install '{extra}'") from None


class TaskFailed(RuntimeError):
    """A chunk task failed on every try the engine gave it."""


def _reason(error: BaseException) -> str:
    """What went wrong, in one line: an engine wraps the task's error (Spark's in a JVM stack trace), so the
    innermost `SomeException: message` of the first line naming one."""
    for line in str(error).splitlines():
        named = list(re.finditer(r"\w*(?:Exception|Error): ", line))
        if named:
            return line[named[-1].start():].strip()[:300]
    return f"{type(error).__name__}: {str(error).strip()[:300]}"


class ClusterMap:
    """map() over a cluster engine's tasks, at most `window` in flight; `submit(function, item)` -> Future."""

    def __init__(self, submit: Callable[[Callable, object], Future], parallelism: int, describe: str):
        self.submit, self.parallelism, self.describe = submit, max(1, parallelism), describe

    def map(self, function: Callable, items: Iterable, *, ordered: bool = False) -> Iterator:
        """The tasks' results; a task's failure raises TaskFailed, an error of `items` (the driver's) as it is."""
        from mmscale.shards.writer import windowed_map

        return windowed_map(lambda item: self.submit(function, item), items, window=2 * self.parallelism,
                            ordered=ordered, result=self._result)

    def _result(self, future: Future):
        try:
            return future.result()
        except Exception as error:
            raise TaskFailed(f"a chunk task failed on {self.describe}, its retries used up: {_reason(error)}; "
                             "run the same command again to resume (finished chunks are kept)") from error


def _engine_start(what: str, flag: str, start: Callable):
    """start(), whose failure (no master there, no Java, a refused connection) reads as one line naming the flag."""
    try:
        return start()
    except Exception as error:
        raise InputError(f"could not start {what}: {_reason(error)}; check {flag}") from error


def _check_answers(address: str, flag: str, timeout: float = 10.0) -> None:
    """InputError unless something accepts a TCP connection at host:port."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise InputError(f"nothing answers at {address} ({error.strerror or error}); check {flag}") from None


@contextmanager
def cluster(options: DistributorOptions, *, workers: int) -> Iterator[ClusterMap]:
    """The engine's session for one make_shards run; stopped at the end if this run started it."""
    if options.name == "spark":
        with _spark(options.spark_master, workers=workers) as engine:
            yield engine
    elif options.name == "ray":
        with _ray(options.ray_address, workers=workers) as engine:
            yield engine
    else:
        raise ValueError(f"not a cluster distributor: {options.name}")


@contextmanager
def _spark(master: str | None, *, workers: int) -> Iterator[ClusterMap]:
    from pyspark.sql import SparkSession

    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # started by spark-submit, which set the master
    # no speculative copies: two tries of one chunk at once would write the same files
    builder = SparkSession.builder.appName("mmscale make_shards") \
        .config("spark.ui.showConsoleProgress", "false").config("spark.speculation", "false")
    # a cluster master retries a task 4 times by default (spark.task.maxFailures); a local one only with local[N,F]
    master = master or (None if submitted else os.environ.get("SPARK_MASTER") or f"local[{workers},{TASK_TRIES}]")
    if master:
        builder = builder.master(master)
    if master and master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # this interpreter, which has mmscale
    session = _engine_start(f"Spark (master {master or 'of spark-submit'})", "--spark-master (and that Java runs)",
                            builder.getOrCreate)
    context = session.sparkContext
    context.setLogLevel("ERROR")
    parallelism = context.defaultParallelism

    def run_one(function: Callable, item):
        return context.parallelize([item], 1).map(function).collect()[0]

    with ThreadPoolExecutor(2 * parallelism, thread_name_prefix="spark-chunk") as threads:
        try:
            yield ClusterMap(lambda function, item: threads.submit(run_one, function, item), parallelism,
                             f"Spark {context.master} ({parallelism} cores)")
        finally:
            context.cancelAllJobs()  # after a failure: the chunks still running (none after a whole run)
            threads.shutdown(cancel_futures=True)
            if not submitted:
                session.stop()


@contextmanager
def _ray(address: str | None, *, workers: int) -> Iterator[ClusterMap]:
    import ray

    started = not ray.is_initialized()
    if started:
        target = address or os.environ.get("RAY_ADDRESS")
        if target and re.fullmatch(r"[\w.-]+:\d+", target):
            _check_answers(target, "--ray-address or RAY_ADDRESS")  # ray.init would wait minutes for a wrong one
        extra = {"num_cpus": workers, "include_dashboard": False} if address == "local" else {}
        _engine_start(f"Ray (address {address or 'that ray.init finds'})", "--ray-address or RAY_ADDRESS",
                      lambda: ray.init(address=address, logging_level="ERROR", log_to_driver=False, **extra))
    parallelism = int(ray.cluster_resources().get("CPU", 1))
    remotes: dict[Callable, object] = {}
    running: dict[Future, object] = {}  # a task's future -> its ObjectRef, until it ends

    def submit(function: Callable, item) -> Future:
        if function not in remotes:
            remotes[function] = ray.remote(num_cpus=1, max_retries=TASK_TRIES - 1, retry_exceptions=False)(function)
        reference = remotes[function].remote(item)
        future = reference.future()
        running[future] = reference
        future.add_done_callback(lambda done: running.pop(done, None))
        return future

    try:
        yield ClusterMap(submit, parallelism, f"Ray ({parallelism} CPUs)")
    finally:
        for reference in running.copy().values():  # after a failure: the chunks still running on the cluster
            ray.cancel(reference, force=True)
        if started:
            ray.shutdown()
