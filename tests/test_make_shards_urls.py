"""make_shards on URL tables, against a real HTTP server on 127.0.0.1 with scripted faults.

Every input row must end either in a shard or in failed.parquet with the right reason, and the
counts must add up to the input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import email.utils
import time
from pathlib import Path

import pyarrow.parquet as parquet
import pytest
from corpus import image_bytes, read_samples, write_table, write_tar

from mmscale.data.config import DataConfig
from mmscale.shards.download import DownloadOptions, disallowed_by_robots, fetch
from mmscale.data.loader import build_loader
from mmscale.shards.images import decode_image
from mmscale.shards.make_shards import main
from mmscale.shards.serve import ImageServer, Response

REPO = Path(__file__).resolve().parents[1]
# the test servers listen on 127.0.0.1, a private address: downloading from it takes the opt-in
FAST = ["--timeout", "0.5", "--retries", "1", "--retry-backoff", "0.05", "--workers", "1", "--no-progress",
        "--allow-private-urls"]


def run(*args) -> int:
    return main([*map(str, args)])


def outcome(out: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(url -> KEY.json of written samples, url -> failure reason)."""
    written = {}
    for sample in read_samples(str(out)):
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and {"jpg", "txt"} <= set(sample)
        written[meta["url"]] = meta
    failed = {row["url"]: row["reason"] for row in parquet.read_table(out / "failed.parquet").to_pylist()}
    return written, failed


@pytest.fixture(scope="module")
def faults():
    good = {f"/ok/{i}.jpg": image_bytes((40 + 8 * i, 36), seed=i) for i in range(6)}
    routes = {path: Response(body=body) for path, body in good.items()}
    routes.update({
        "/flaky.jpg": [Response(500), Response(body=image_bytes((40, 40), seed=10))],
        "/slow.jpg": Response(body=good["/ok/2.jpg"], delay_s=2.0),
        "/cut.jpg": Response(body=good["/ok/3.jpg"], truncate_to=100),
        "/page.jpg": Response(body=b"<html><body>moved</body></html>", content_type="text/html"),
        "/huge.jpg": Response(body=image_bytes((200, 200))),
        "/hop1": Response(302, headers={"Location": "/hop2"}),
        "/hop2": Response(301, headers={"Location": "/redirected.jpg"}),
        "/redirected.jpg": Response(body=image_bytes((40, 40), seed=11)),
        "/loop": Response(302, headers={"Location": "/loop"}),
        "/noai.jpg": Response(body=good["/ok/5.jpg"], headers={"X-Robots-Tag": "noai, noimageai"}),
        "/otherbot.jpg": Response(body=image_bytes((40, 40), seed=12), headers={"X-Robots-Tag": "otherbot: noindex"}),
        "/copy.jpg": Response(body=good["/ok/0.jpg"]),
        "/gone.jpg": Response(410),
    })
    with ImageServer(routes) as server:
        yield server


EXPECTED_FAILURES = {"/missing.jpg": "http_404", "/slow.jpg": "timeout", "/cut.jpg": "truncated",
                     "/page.jpg": "not_an_image", "/huge.jpg": "image_too_large", "/loop": "too_many_redirects",
                     "/noai.jpg": "robots", "/copy.jpg": "duplicate", "/gone.jpg": "http_410"}
EXPECTED_WRITTEN = [f"/ok/{i}.jpg" for i in range(6)] + ["/flaky.jpg", "/hop1", "/otherbot.jpg"]


def test_every_row_ends_in_a_shard_or_in_the_failures_with_its_reason(tmp_path, faults):
    paths = EXPECTED_WRITTEN + list(EXPECTED_FAILURES)
    rows = [{"url": faults.url(path), "caption": f"row {number}"} for number, path in enumerate(paths)]
    rows.append({"url": "ftp://127.0.0.1/a.jpg", "caption": "not http"})
    table = write_table(tmp_path / "urls.parquet", rows, "parquet")
    out = tmp_path / "out"
    assert run("--input", table, "--url-column", "url", "--caption-column", "caption", "--output", out,
               "--samples-per-shard", 7, "--resize", 32, "--max-pixels", 20_000, "--dedup", *FAST) == 0
    written, _ = outcome(out)
    assert sorted(written) == sorted(faults.url(path) for path in EXPECTED_WRITTEN)
    failures = {row["url"] or row["source"]: row["reason"]
                for row in parquet.read_table(out / "failed.parquet").to_pylist()}
    assert failures == {**{faults.url(path): reason for path, reason in EXPECTED_FAILURES.items()},
                        "ftp://127.0.0.1/a.jpg": "unsupported_url"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] + stats["skipped_total"] == stats["records"] == len(rows)
    assert faults.requests["/flaky.jpg"] == 2 and faults.requests["/slow.jpg"] == 2  # one retry each
    assert faults.requests["/missing.jpg"] == 1  # a 404 is not retried
    first = written[faults.url("/ok/5.jpg")]
    assert (first["original_width"], first["original_height"], first["caption"]) == (80, 36, "row 5")
    assert first["status"] == "success" and len(first["sha256"]) == 64
    assert faults.requests["/redirected.jpg"] == 1  # reached through /hop1 -> /hop2
    per_chunk = [json.loads(path.read_text()) for path in sorted(out.glob("*.stats.json"))]
    assert sum(chunk["written"] + sum(chunk["skipped"].values()) for chunk in per_chunk) == len(rows)
    sample = next(s for s in read_samples(str(out)) if json.loads(s["json"])["url"] == faults.url("/ok/5.jpg"))
    assert decode_image(sample["jpg"]).size == (71, 32)


def test_robots_headers_can_be_ignored_and_other_agents_do_not_count(tmp_path, faults):
    table = write_table(tmp_path / "urls.jsonl", [{"url": faults.url("/noai.jpg"), "text": "a"}], "jsonl")
    assert run("--input", table, "--output", tmp_path / "out", "--ignore-robots-headers", *FAST) == 0
    assert len(read_samples(str(tmp_path / "out"))) == 1
    assert disallowed_by_robots(["mmscale: noimageai"]) and disallowed_by_robots(["NOINDEX"])
    assert not disallowed_by_robots(["googlebot: noai", "nofollow"])


def test_private_addresses_are_refused_by_default_each_row_with_its_reason(tmp_path, faults):
    """Without --allow-private-urls, loopback (also by name), private and link-local URLs are not
    fetched: each row is in failed.parquet as private_address, and the server sees no request."""
    port = faults.url("/").split(":")[2].split("/")[0]
    urls = [faults.url("/ok/0.jpg"), f"http://localhost:{port}/ok/1.jpg", f"http://[::1]:{port}/ok/2.jpg",
            "http://169.254.169.254/latest/meta-data/iam/", "http://10.0.0.1/a.jpg", "http://192.168.0.1/a.jpg"]
    table = write_table(tmp_path / "urls.csv", [{"url": url, "caption": "c"} for url in urls], "csv")
    before = faults.requests
    options = [option for option in FAST if option != "--allow-private-urls"]
    assert run("--input", table, "--output", tmp_path / "out", *options) == 0
    written, failed = outcome(tmp_path / "out")
    assert written == {} and failed == {url: "private_address" for url in urls}
    assert faults.requests == before


@pytest.mark.parametrize("mode,size", [("center_crop", (32, 32)), ("border", (32, 32)), ("keep_ratio", (71, 32)),
                                       ("no", (80, 36))])
def test_resize_modes(tmp_path, faults, mode, size):
    table = write_table(tmp_path / "urls.csv", [{"url": faults.url("/ok/5.jpg"), "caption": "c"}], "csv")
    assert run("--input", table, "--output", tmp_path / "out", "--resize", 32, "--resize-mode", mode, *FAST) == 0
    (sample,) = read_samples(str(tmp_path / "out"))
    assert decode_image(sample["jpg"]).size == size


def test_body_size_cap_and_a_glob_of_tables(tmp_path, faults):
    for part in range(2):
        write_table(tmp_path / f"part-{part}.csv", [{"url": faults.url(f"/ok/{part}.jpg"), "caption": "c"}], "csv")
    out = tmp_path / "out"
    sizes = {path: len(faults.routes[path].body) for path in ("/ok/0.jpg", "/ok/1.jpg")}
    assert sizes["/ok/0.jpg"] < sizes["/ok/1.jpg"]
    cap = sum(sizes.values()) // 2
    assert run("--input", tmp_path / "part-*.csv", "--output", out, "--max-download-bytes", cap, *FAST) == 0
    written, failed = outcome(out)
    assert set(written) == {faults.url("/ok/0.jpg")} and failed == {faults.url("/ok/1.jpg"): "too_large"}


def test_retry_failed_downloads_only_the_failed_rows(tmp_path):
    body = image_bytes((30, 30))
    routes = {"/a.jpg": Response(body=body), "/b.jpg": Response(body=image_bytes((30, 31))),
              "/busy.jpg": [Response(503), Response(503), Response(body=image_bytes((30, 32)))],
              "/missing.jpg": Response(404)}
    with ImageServer(routes) as server:
        table = write_table(tmp_path / "urls.csv", [{"url": server.url(p), "caption": p} for p in routes], "csv")
        out = tmp_path / "out"
        options = ["--input", table, "--output", out, "--samples-per-shard", 2, *FAST]
        assert run(*options, "--retries", 0) == 0
        assert outcome(out)[1] == {server.url("/busy.jpg"): "http_503", server.url("/missing.jpg"): "http_404"}
        assert run(*options, "--retries", 0, "--retry-failed") == 0  # 503 again
        # a retry killed after its shard was renamed into place leaves the old lists and its marker beside it
        killed = {name: (out / name).read_bytes() for name in ("shard-000001.failed.jsonl", "shard-000001.stats.json")}
        assert run(*options, "--retries", 0, "--retry-failed") == 0
        assert not (out / "shard-000001.retrying").exists()
        for name, payload in killed.items():
            (out / name).write_bytes(payload)
        (out / "shard-000001.retrying").write_bytes(b"")
        (out / ".shard-000001.tar.tmp99999").write_bytes(b"half a part")
        assert run(*options, "--retries", 0) == 0  # a plain rerun lists the chunk as it is on disk: no request
        assert not (out / "shard-000001.retrying").exists() and not (out / ".shard-000001.tar.tmp99999").exists()
        assert outcome(out)[1] == {server.url("/missing.jpg"): "http_404"}
        for name, payload in killed.items():  # and a retry that finds the row in a shard does not fetch it
            (out / name).write_bytes(payload)
        assert run(*options, "--retries", 0, "--retry-failed") == 0
        written, failed = outcome(out)
        assert failed == {server.url("/missing.jpg"): "http_404"}
        assert len({s["__key__"] for s in read_samples(str(out))}) == 3
        assert sorted(written) == sorted(server.url(p) for p in ("/a.jpg", "/b.jpg", "/busy.jpg"))
        assert server.requests == {"/a.jpg": 1, "/b.jpg": 1, "/busy.jpg": 3, "/missing.jpg": 1}
        stats = json.loads((out / "stats.json").read_text())
        assert (stats["written"], stats["skipped"]) == (3, {"http_404": 1})
        assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 2, "shard-000001.tar": 1}


def test_a_429_waits_as_long_as_retry_after_says_in_seconds_or_as_an_http_date():
    """The backoff here is 10 ms; Retry-After (delay-seconds, or an HTTP date 2 s ahead: 1-2 s at its
    one-second resolution) makes the retry wait longer, and the retry succeeds."""
    body = image_bytes((30, 30))
    options = DownloadOptions(threads=1, timeout_s=5, retries=1, backoff_s=0.01, allow_private_urls=True)
    for retry_after in ("1", None):
        when = retry_after or email.utils.formatdate(time.time() + 2, usegmt=True)
        routes = {"/busy.jpg": [Response(429, headers={"Retry-After": when}), Response(body=body)]}
        with ImageServer(routes) as server:
            started = time.monotonic()
            fetched = fetch(server.url("/busy.jpg"), options)
            waited = time.monotonic() - started
        assert (fetched.body, fetched.attempts) == (body, 2)
        assert 0.9 < waited < 4, (when, waited)


def test_the_timeout_covers_a_dripping_body_and_a_malformed_url_is_a_failure_not_a_crash():
    options = DownloadOptions(threads=1, timeout_s=0.5, retries=0, allow_private_urls=True)
    with ImageServer({"/drip.jpg": Response(body=image_bytes((30, 30)), drip_s=0.05)}) as server:
        started = time.monotonic()
        fetched = fetch(server.url("/drip.jpg"), options)
        assert fetched.reason == "timeout" and time.monotonic() - started < 1.5
    for url in ("http://[::1/x.jpg", "http://exa mple.com:port/x.jpg"):
        assert fetch(url, options).reason == "bad_url"


@pytest.mark.slow
def test_killed_download_job_resumes_with_every_row_once(tmp_path):
    """SIGKILL a 2-process download mid-run; the restart rewrites no finished shard, and every row ends
    up written or failed exactly once."""
    routes = {f"/{i}.jpg": Response(body=image_bytes((32, 32), seed=i), delay_s=0.01) for i in range(300)}
    routes.update({f"/{i}.jpg": Response(404) for i in range(0, 300, 13)})
    with ImageServer(routes) as server:
        table = write_table(tmp_path / "urls.tsv", [{"url": server.url(f"/{i}.jpg"), "caption": f"c{i}"}
                                                    for i in range(300)], "tsv")
        out = tmp_path / "out"
        options = ["--input", str(table), "--output", str(out), "--samples-per-shard", "10", "--threads", "4",
                   "--timeout", "5", "--retries", "0", "--dedup", "--allow-private-urls"]
        process = subprocess.Popen([sys.executable, str(REPO / "tools" / "make_shards.py"), *options,
                                    "--workers", "2", "--no-progress"], start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(list(out.glob("*.stats.json"))) < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        finished = {path.name[: -len(".stats.json")] + ".tar" for path in out.glob("*.stats.json")}
        assert 0 < len(finished) < 30, process.stderr.read().decode()
        before = {name: os.stat(out / name).st_mtime_ns for name in finished}
        assert run(*options, "--workers", 2, "--no-progress") == 0
        assert {name: os.stat(out / name).st_mtime_ns for name in finished} == before
        written, failed = outcome(out)
        keys = [s["__key__"] for s in read_samples(str(out))]
        failed_keys = [row["key"] for row in parquet.read_table(out / "failed.parquet").to_pylist()]
        assert len(keys) == len(set(keys)) == 300 - 24 and len(failed_keys) == len(set(failed_keys)) == 24
        assert sorted(keys + failed_keys) == [f"{i:09d}" for i in range(300)]
        assert set(failed.values()) == {"http_404"}
        assert all(server.requests[f"/{i}.jpg"] <= 2 for i in range(300))


def test_img2dataset_output_folders_are_read_as_they_are(tmp_path, tokenizer):
    """img2dataset's layout (NNNNN.tar of KEY.jpg/txt/json beside NNNNN.parquet and NNNNN_stats.json, no
    sizes.json): the training loader reads it, and make_shards reshards it."""
    folder = tmp_path / "img2dataset"
    folder.mkdir()
    for shard in range(2):
        members = []
        for index in range(6):
            key = f"{shard:05d}{index:04d}"
            meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "error_message": None,
                    "width": 40, "height": 40, "original_width": 80, "original_height": 80, "exif": "{}",
                    "sha256": "0" * 64, "caption": f"picture {key}"}
            members += [(f"{key}.jpg", image_bytes((40, 40), seed=index)), (f"{key}.txt", meta["caption"].encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
        write_tar(folder / f"{shard:05d}.tar", members)
        write_table(folder / f"{shard:05d}.parquet", [{"key": "x", "status": "success"}], "parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 6, "successes": 6}))
    config = DataConfig(image_size=32, context_length=16, shuffle_buffer=4, workers=0)
    loader = build_loader(config, spec=str(folder), tokenizer=tokenizer, batch_size=4, train=False)
    assert sum(batch["size"] for batch in loader) == 12 and not loader.skipped
    assert run("--input", folder, "--output", tmp_path / "out", "--resize", 32, *FAST) == 0
    samples = read_samples(str(tmp_path / "out"))
    assert [s["txt"].decode() for s in samples] == [f"picture {s:05d}{i:04d}" for s in range(2) for i in range(6)]
