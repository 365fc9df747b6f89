#!/usr/bin/env python3
"""URL-list sharding: make_shards against img2dataset, same images from the same loopback server, one run.

    python tools/bench/sharding.py [--images 2000] [--repeats 3] [--img2dataset-python PATH]

Writes N photo-like JPEGs (320-512 px, as tools/bench/loader.py makes them) and serves them
from a loopback HTTP server in its own process (mmscale.shards.serve: asyncio, keep-alive
allowed, the same for both tools). A parquet table of their URLs and captions goes to:
- img2dataset (the reference tool), 1 process, 16 threads, resize 256 keep_ratio, JPEG
  quality 90, webdataset output, 250 samples per shard;
- make_shards, 1 worker process, 16 download threads, the same resize, quality and shard size;
- make_shards, 1 worker process, its image work on one thread (as img2dataset's: per-core
  efficiency; by default a process decodes and resizes on as many threads as CPUs per worker);
- make_shards with 2 worker processes.
Each is timed end to end (process start to exit, what a user waits for) and, from its own
stats, inside the job (img2dataset's shard durations; make_shards' wall_time_s). Runs alternate,
`--repeats` times; the median of each is reported. Prints a table and, last, one JSON line:
{"mmscale_images_per_s", "img2dataset_images_per_s", "ratio", ...} (one process each, end to end).

img2dataset pins webdataset 0.2 (mmscale needs 1.x), so it runs from its own virtual
environment: `--img2dataset-python`, else `.bench-venvs/img2dataset` (created with pip on
first use).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as parquet

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import photo_like_jpeg  # noqa: E402

RESIZE, QUALITY, THREADS, PER_SHARD = 256, 90, 16, 250


def img2dataset_python(given: str | None) -> str:
    """A python that can run img2dataset, making the bench venv if needed."""
    if given:
        return given
    venv = REPO / ".bench-venvs" / "img2dataset"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with img2dataset (first run only)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "img2dataset"], check=True)
    return str(python)


def write_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        (folder / f"{index:06d}.jpg").write_bytes(photo_like_jpeg(rng))


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "mmscale.shards.serve", str(folder)], stdout=subprocess.PIPE,
                              cwd=REPO)
    return server, server.stdout.readline().decode().strip()


def run_img2dataset(python: str, table: Path, out: Path) -> tuple[float, float, int]:
    """(end-to-end seconds, in-job seconds, images written)."""
    command = [str(Path(python).with_name("img2dataset")), "--url_list", str(table), "--input_format", "parquet",
               "--url_col", "url", "--caption_col", "caption", "--output_folder", str(out),
               "--output_format", "webdataset", "--image_size", str(RESIZE), "--resize_mode", "keep_ratio",
               "--encode_quality", str(QUALITY), "--processes_count", "1", "--thread_count", str(THREADS),
               "--number_sample_per_shard", str(PER_SHARD), "--enable_wandb", "False"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    wall = time.perf_counter() - started
    stats = [json.loads(Path(path).read_text()) for path in glob.glob(str(out / "*_stats.json"))]
    # shards run one after another in one process: in-job time is first start to last end
    in_job = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return wall, in_job, sum(s["successes"] for s in stats)


def run_make_shards(table: Path, out: Path, *, workers: int, image_threads: int | None,
                    extra: tuple[str, ...] = ()) -> tuple[float, float, int]:
    """(end-to-end seconds, in-job seconds, images written) of tools/make_shards.py on `table` (or a folder)."""
    command = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--input", str(table), "--output", str(out),
               "--resize", str(RESIZE), "--resize-mode", "keep_ratio", "--jpeg-quality", str(QUALITY),
               "--workers", str(workers), "--threads", str(THREADS), "--samples-per-shard", str(PER_SHARD),
               "--no-progress", "--allow-private-urls", *extra] + \
        (["--image-threads", str(image_threads)] if image_threads else [])
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - started
    stats = json.loads((out / "stats.json").read_text())
    return wall, stats["wall_time_s"], stats["written"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--img2dataset-python")
    parser.add_argument("--skip-img2dataset", action="store_true", help="only make_shards (no reference, no ratio)")
    args = parser.parse_args()
    python = None if args.skip_img2dataset else img2dataset_python(args.img2dataset_python)
    with tempfile.TemporaryDirectory(prefix="bench-sharding-") as temporary:
        root = Path(temporary)
        (root / "images").mkdir()
        write_images(root / "images", args.images)
        megabytes = sum(p.stat().st_size for p in (root / "images").iterdir()) / 1e6
        server, base = start_server(root / "images")
        try:
            names = sorted(os.listdir(root / "images"))
            table = root / "urls.parquet"
            parquet.write_table(pa.table({"url": [base + name for name in names],
                                          "caption": [f"a photo, number {i}" for i in range(len(names))]}), table)
            runs = {"img2dataset, 1 process": [], "make_shards, 1 process": [], "make_shards, 1 proc, 1 cpu thr": [],
                    "make_shards, 2 processes": []}
            if args.skip_img2dataset:
                del runs["img2dataset, 1 process"]
            for repeat in range(args.repeats):
                for name in runs:
                    out = root / f"out-{repeat}-{list(runs).index(name)}"
                    if name.startswith("img2dataset"):
                        result = run_img2dataset(python, table, out)
                    else:
                        result = run_make_shards(table, out, workers=2 if "2 processes" in name else 1,
                                                 image_threads=1 if "1 cpu thr" in name else None)
                    runs[name].append(result)
                    shutil.rmtree(out)
                    print(f"  {name}: {result[0]:.2f} s end to end, {result[1]:.2f} s in the job, "
                          f"{result[2]} images", file=sys.stderr)
        finally:
            server.kill()
    print(f"\n{args.images} photo-like JPEGs ({megabytes:.0f} MB, 320-512 px) from a loopback server -> resize "
          f"{RESIZE} keep_ratio, quality {QUALITY}; median of {args.repeats}; {os.cpu_count()} CPUs\n")
    print(f"{'tool':30s} {'images':>7s} {'end to end s':>13s} {'images/s':>9s} {'in job s':>9s} {'images/s':>9s}")
    table_rows = {}
    for name, results in runs.items():
        wall = statistics.median(r[0] for r in results)
        in_job = statistics.median(r[1] for r in results)
        written = min(r[2] for r in results)
        table_rows[name] = (written / wall, written / in_job)
        print(f"{name:30s} {written:7d} {wall:13.2f} {written / wall:9.1f} {in_job:9.2f} {written / in_job:9.1f}")
    mmscale = table_rows["make_shards, 1 process"]
    two, one_thread = table_rows["make_shards, 2 processes"], table_rows["make_shards, 1 proc, 1 cpu thr"]
    if args.skip_img2dataset:
        print(json.dumps({"mmscale_images_per_s": round(mmscale[0], 1),
                          "mmscale_2_processes_images_per_s": round(two[0], 1)}))
        return
    reference = table_rows["img2dataset, 1 process"]
    print(json.dumps({"mmscale_images_per_s": round(mmscale[0], 1), "img2dataset_images_per_s": round(reference[0], 1),
                      "ratio": round(mmscale[0] / reference[0], 2),
                      "in_job_ratio": round(mmscale[1] / reference[1], 2),
                      "one_image_thread_ratio": round(one_thread[0] / reference[0], 2),
                      "mmscale_2_processes_images_per_s": round(two[0], 1)}))


if __name__ == "__main__":
    main()
