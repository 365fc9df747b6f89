#!/usr/bin/env python3
"""make_shards on Spark and Ray against its local process pool: the same input, 2 executors each, one run.

    python tools/bench/sharding_cluster.py [--images 2000] [--repeats 3] [--spark-master URL] [--ray-address ADDR]

Writes N photo-like JPEGs (320-512 px, as tools/bench/sharding.py does) and shards them, resized
to 256 keep_ratio at quality 90, 250 per shard, from two inputs: the image folder (decoding
and resizing: CPU-bound) and a parquet table of their URLs on a loopback server (downloads).
Each input goes through:
- `--distributor multiprocessing --workers 2` (the baseline);
- `--distributor spark`, a local master with 2 task slots (`local[2,4]`: 2 Python workers), or
  `--spark-master` for a running cluster;
- `--distributor ray`, a new local Ray with 2 CPUs (`--ray-address local`), or `--ray-address`.
Timed end to end (process start to exit: the engine's start-up included) and in the job
(make_shards' own wall_time_s: listing, hashing and writing, the engine's start included
where it starts inside the job), runs alternating, median of `--repeats`. The difference from
the baseline is the engine's overhead. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as parquet

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sharding import run_make_shards, start_server, write_images  # noqa: E402


def engines(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    spark = args.spark_master or "local[2,4]"
    ray = args.ray_address or "local"
    return {"multiprocessing, 2 workers": ("--distributor", "multiprocessing"),
            f"spark {spark}": ("--distributor", "spark", "--spark-master", spark),
            f"ray {ray}, 2 CPUs": ("--distributor", "ray", "--ray-address", ray)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spark-master", help="a running Spark cluster (default: local[2,4])")
    parser.add_argument("--ray-address", help="a running Ray cluster (default: a new local one with 2 CPUs)")
    args = parser.parse_args()
    runs = engines(args)
    results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sharding-cluster-") as temporary:
        root = Path(temporary)
        images = root / "images"
        images.mkdir()
        write_images(images, args.images)
        megabytes = sum(path.stat().st_size for path in images.iterdir()) / 1e6
        for path in images.glob("*.jpg"):  # a folder input: a caption beside each image
            path.with_suffix(".txt").write_text(f"a photo, number {int(path.stem)}\n")
        server, base = start_server(images)
        try:
            names = sorted(name for name in os.listdir(images) if name.endswith(".jpg"))
            table = root / "urls.parquet"
            parquet.write_table(pa.table({"url": [base + name for name in names],
                                          "caption": [f"a photo, number {i}" for i in range(len(names))]}), table)
            inputs = {"folder": images, "URL table": table}
            for repeat in range(args.repeats):
                for kind, source in inputs.items():
                    for name, extra in runs.items():
                        out = root / "out"
                        result = run_make_shards(source, out, workers=2, image_threads=None, extra=extra)
                        results.setdefault((kind, name), []).append(result)
                        shutil.rmtree(out)
                        print(f"  {kind}, {name}: {result[0]:.2f} s end to end, {result[1]:.2f} s in the job, "
                              f"{result[2]} images", file=sys.stderr)
        finally:
            server.kill()
    print(f"\n{args.images} photo-like JPEGs ({megabytes:.0f} MB, 320-512 px) -> resize 256 keep_ratio, quality 90, "
          f"250 per shard; median of {args.repeats}; {os.cpu_count()} CPUs\n")
    print(f"{'input':10s} {'distributor':28s} {'images':>7s} {'end to end s':>13s} {'images/s':>9s} "
          f"{'in job s':>9s} {'images/s':>9s} {'vs multiprocessing':>19s}")
    summary = {}
    for (kind, name), measured in results.items():
        wall = statistics.median(r[0] for r in measured)
        in_job = statistics.median(r[1] for r in measured)
        written = min(r[2] for r in measured)
        baseline = statistics.median(r[0] for r in results[(kind, "multiprocessing, 2 workers")])
        print(f"{kind:10s} {name:28s} {written:7d} {wall:13.2f} {written / wall:9.1f} {in_job:9.2f} "
              f"{written / in_job:9.1f} {baseline / wall:18.2f}x")
        summary[f"{kind}: {name}"] = round(written / wall, 1)
    print(json.dumps({"images_per_s_end_to_end": summary}))


if __name__ == "__main__":
    main()
