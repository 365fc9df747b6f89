"""make_shards memory stays bounded as the input grows: 100,000 and 1,000,000 table rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as parquet
import pytest
from corpus import image_bytes

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2
# Peak RSS of this process image in KiB. Not ru_maxrss of RUSAGE_SELF: Linux carries that over from the
# process that forked and exec'd us (pytest, GBs late in a full run), so it would measure the test runner.
_HWM = """
def high_water_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
"""
_STORE = _HWM + """
import json, os, sys
from mmscale.shards.dedup import DigestStore
store, peaks = DigestStore(sys.argv[1]), []
for total in (100_000, 1_000_000):
    done = sum(1 for _ in store._db.execute("SELECT 1 FROM digests"))
    for start in range(done, total, 50_000):
        store.add((n, os.urandom(32)) for n in range(start, start + 50_000))
    peaks.append(high_water_kib() / 1024)
print(json.dumps(peaks))
"""
# Runs make_shards, then prints its peak RSS and the largest worker's (KiB). Workers are forked from
# this process after its exec, so their ru_maxrss (RUSAGE_CHILDREN) holds nothing of pytest's.
_MEASURE = _HWM + """
import json, resource, sys
from mmscale.shards.make_shards import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "main_kib": high_water_kib(),
                  "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def write_rows(path: Path, rows: int, images: int) -> Path:
    """A parquet table of `rows` rows over `images` tiny image files, written 100,000 rows at a time."""
    schema = pa.schema([("image", pa.string()), ("caption", pa.string())])
    with parquet.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 100_000):
            numbers = range(start, min(rows, start + 100_000))
            writer.write_table(pa.table({"image": [f"{n % images}.jpg" for n in numbers],
                                         "caption": [f"a tiny picture, row {n}" for n in numbers]}, schema=schema))
    return path


def peak_rss_mb(table: Path, out: Path) -> float:
    """An upper bound of the job's peak RSS: the main process's peak plus WORKERS x the largest worker's."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, "--input", str(table), "--output", str(out),
                             "--workers", str(WORKERS), "--no-progress"],
                            capture_output=True, text=True, cwd=REPO, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["code"] == 0, result.stderr
    return (measured["main_kib"] + WORKERS * measured["worker_kib"]) / 1024


@pytest.mark.slow
def test_a_million_row_table_shards_in_bounded_memory(tmp_path):
    images = 64
    for number in range(images):
        (tmp_path / f"{number}.jpg").write_bytes(image_bytes((8, 8), seed=number))
    small = peak_rss_mb(write_rows(tmp_path / "small.parquet", 100_000, images), tmp_path / "small")
    large = peak_rss_mb(write_rows(tmp_path / "large.parquet", 1_000_000, images), tmp_path / "large")
    stats = json.loads((tmp_path / "large" / "stats.json").read_text())
    assert (stats["records"], stats["written"], stats["shards"]) == (1_000_000, 1_000_000, 100)
    print(f"peak RSS: 100,000 rows {small:.0f} MB, 1,000,000 rows {large:.0f} MB")
    assert large < 1024
    assert large <= 1.2 * small


@pytest.mark.slow
def test_dedup_digests_live_on_disk(tmp_path):
    """A million distinct digests (a Python set of them would take ~130 MB) cost the store a few MB of RSS."""
    result = subprocess.run([sys.executable, "-c", _STORE, str(tmp_path)], capture_output=True, text=True,
                            cwd=REPO, check=True)
    after_100k, after_1m = json.loads(result.stdout)
    assert after_1m - after_100k < 16, (after_100k, after_1m)
