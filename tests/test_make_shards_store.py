"""make_shards into an object store (S3's API, served by moto on 127.0.0.1, read and written with s3fs).

A store has no rename: a shard is written locally and uploaded under its name once complete, and the
lock is a lease object. The output must equal the same job's on a local disk, byte for byte, on the
process pool and on Spark; the loader's spec reader reads it back; a driver SIGKILLed mid-run leaves
only complete shards and the same command finishes the job; a live lease refuses a second driver and
a lapsed one is taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from corpus import image_bytes, read_samples, write_table

from mmscale.shards.make_shards import main
from mmscale.shards.output import LEASE_S, Output, is_url
from mmscale.shards.serve import ImageServer, Response
from mmscale.shards.synthetic import make_image_folder

fsspec = pytest.importorskip("fsspec")
pytest.importorskip("s3fs", reason="the store tests need s3fs and moto[server] (the test extra)")
moto_server = pytest.importorskip("moto.server", reason="the store tests need moto[server] (the test extra)")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--no-progress", "--workers", "2"]


@pytest.fixture(scope="module")
def store():
    """An S3 endpoint on 127.0.0.1 with a bucket `shards`; returns the environment that reaches it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    fsspec.config.conf["s3"] = {"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]}  # fsspec read the variables at import
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("shards")
    try:
        yield fs, {**os.environ, **env}
    finally:
        fsspec.config.conf.pop("s3", None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def make_shards(arguments: list[str], env: dict, *, wait: bool = True):
    command = [sys.executable, str(REPO / "tools" / "make_shards.py"), *arguments]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def files(fs, url: str) -> dict[str, bytes]:
    """Every object under the URL but the run's own stats.json (it has wall times) and lock."""
    fs.invalidate_cache()
    return {path.rsplit("/", 1)[-1]: fs.cat_file(path) for path in fs.ls(url, detail=False)
            if path.rsplit("/", 1)[-1] not in ("stats.json", ".make_shards.lock")}


def object_names(fs, url: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return [path.rsplit("/", 1)[-1] for path in fs.ls(url, detail=False)]
    except FileNotFoundError:
        return []


def local_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()
            if path.name not in ("stats.json", ".make_shards.lock")}


@pytest.fixture(scope="module")
def folder_job(tmp_path_factory) -> tuple[list[str], Path]:
    """An image folder with a copy and a broken image (--dedup), written to a local folder."""
    root = tmp_path_factory.mktemp("store-input")
    images = root / "images"
    make_image_folder(images, 20, size=40, seed=7)
    shutil.copy(images / "000003.jpg", images / "000020.jpg")
    (images / "000020.txt").write_text("a copy\n")
    (images / "000021.jpg").write_bytes(b"not a jpeg")
    (images / "000021.txt").write_text("broken\n")
    arguments = ["--input", str(images), "--samples-per-shard", "6", "--resize", "32", "--dedup", *QUIET]
    assert main([*arguments, "--output", str(root / "local")]) == 0
    return arguments, root / "local"


def test_output_urls_and_paths_are_told_apart(tmp_path, folder_job):
    assert is_url("s3://bucket/shards") and is_url("gs://b/x") and not is_url("/data/shards")
    assert not is_url("file:///data/shards") and Output("file:///data/shards").location == "/data/shards"
    arguments, local = folder_job
    assert main([*arguments, "--output", f"file://{tmp_path}/out"]) == 0  # a path, renamed into place
    assert local_files(tmp_path / "out") == local_files(local)


@pytest.mark.parametrize("distributor", [[], ["--distributor", "spark", "--spark-master", "local[2,4]"]],
                         ids=["multiprocessing", "spark"])
def test_a_store_receives_the_same_files_as_a_local_folder_and_the_loader_reads_them(store, folder_job,
                                                                                       distributor):
    if distributor and not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        pytest.skip("Spark needs a Java runtime (java on PATH or JAVA_HOME)")
    fs, env = store
    arguments, local = folder_job
    url = f"s3://shards/{'spark' if distributor else 'pool'}"
    make_shards([*arguments, "--output", url, *distributor], env)
    assert files(fs, url) == local_files(local)
    assert not [name for name in files(fs, url) if ".tmp" in name]
    samples = read_samples(f"{url}/shard-{{000000..000003}}.tar")
    assert len(samples) == sum(json.loads((local / "sizes.json").read_text()).values()) == 20
    again = make_shards([*arguments, "--output", url, *distributor], env)
    assert "everything was already done" in again.stdout


def test_retry_failed_into_a_store_is_refused_clearly(store, folder_job, capsys):
    arguments, _ = folder_job
    assert main([*arguments, "--output", "s3://shards/retry", "--retry-failed"]) == 2
    assert "--retry-failed rewrites shards in place" in capsys.readouterr().err


@pytest.fixture(scope="module")
def slow_urls(tmp_path_factory):
    routes = {f"/slow/{i}.jpg": Response(body=image_bytes((40, 40), seed=200 + i), delay_s=0.1) for i in range(48)}
    with ImageServer(routes) as server:
        root = tmp_path_factory.mktemp("store-slow")
        table = write_table(root / "slow.jsonl", [{"url": server.url(f"/slow/{i}.jpg"), "caption": f"slow {i}"}
                                                  for i in range(48)], "jsonl")
        arguments = ["--input", str(table), "--samples-per-shard", "4", "--threads", "1", "--allow-private-urls",
                     "--retries", "0", *QUIET]
        assert main([*arguments, "--output", str(root / "local")]) == 0
        yield arguments, root / "local"


def complete(payload: bytes) -> bool:
    import io

    try:
        with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
            return all(tar.extractfile(member).read() is not None for member in tar)
    except (tarfile.TarError, OSError):
        return False


def test_a_killed_driver_leaves_only_whole_shards_in_the_store_and_the_same_command_finishes(store, slow_urls,
                                                                                            capsys):
    fs, env = store
    arguments, local = slow_urls
    url = "s3://shards/killed"
    driver = make_shards([*arguments, "--output", url], env, wait=False)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            if len([name for name in object_names(fs, url) if name.endswith(".stats.json")]) >= 2:
                break
            time.sleep(0.1)
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert main([*arguments, "--output", url]) == 2  # the lease is live: a second driver is refused
        assert "another make_shards is writing there" in capsys.readouterr().err
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    left = files(fs, url)
    assert ".make_shards.lock" in object_names(fs, url)
    assert "sizes.json" not in left and 0 < len([name for name in left if name.endswith(".stats.json")]) < 12
    assert all(complete(payload) for name, payload in left.items() if name.endswith(".tar"))
    # the killed driver's lease names a process of this machine that is gone: taken over at once
    make_shards([*arguments, "--output", url], env)
    finished = files(fs, url)
    expected = local_files(local)
    assert finished.keys() == expected.keys()
    for name in expected:  # downloads are written as they arrive: compare a shard's members, not its order
        if name.endswith(".tar"):
            assert members(finished[name]) == members(expected[name]), name
        elif name != "failed.parquet":
            assert finished[name] == expected[name], name


def members(payload: bytes) -> list[tuple[str, bytes]]:
    import io

    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        return sorted((member.name, tar.extractfile(member).read()) for member in tar)


def test_a_live_lease_from_another_machine_refuses_and_a_lapsed_one_is_taken_over(store, folder_job, capsys):
    fs, _ = store
    arguments, local = folder_job
    url = "s3://shards/leased"
    fs.pipe_file("shards/leased/.make_shards.lock",
                 json.dumps({"host": "another-node", "pid": 1, "token": "x", "renewed": time.time()}).encode())
    assert main([*arguments, "--output", url]) == 2
    error = capsys.readouterr().err
    assert "host another-node" in error and f"lapses {LEASE_S:.0f} s after" in error
    fs.pipe_file("shards/leased/.make_shards.lock",
                 json.dumps({"host": "another-node", "pid": 1, "token": "x",
                             "renewed": time.time() - LEASE_S - 1}).encode())
    assert main([*arguments, "--output", url]) == 0
    assert files(fs, url) == local_files(local)
    fs.invalidate_cache()
    assert not fs.exists("shards/leased/.make_shards.lock")  # released at the end


def test_a_store_output_of_another_job_is_refused_as_on_a_disk(store, folder_job, capsys):
    """The fingerprint read back from the store: other options into the same URL are refused."""
    arguments, _ = folder_job
    url = "s3://shards/fingerprint"
    assert main([*arguments, "--output", url]) == 0
    assert main([*arguments, "--output", url, "--resize", "24"]) == 2
    assert "holds shards made from other input or options" in capsys.readouterr().err


def test_two_drivers_writing_the_lease_at_once_leave_one_holder(store):
    """Both find no lease and write theirs; reading it back a moment later, the one whose write lost is refused."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from mmscale.shards.output import RemoteLease
    from mmscale.shards.sources import InputError

    output = Output("s3://shards/race")
    leases = [RemoteLease(output, ".make_shards.lock") for _ in range(2)]
    start = Barrier(2)

    def acquire(lease: RemoteLease) -> str:
        start.wait()
        try:
            lease.acquire()
            return "held"
        except InputError as error:
            return str(error)

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(acquire, leases))
    assert outcomes.count("held") == 1, outcomes
    assert "another make_shards is writing there" in [outcome for outcome in outcomes if outcome != "held"][0]
    winner = leases[outcomes.index("held")]
    assert output.read_json(".make_shards.lock")["token"] == winner.token
    winner.release()
    assert output.read_json(".make_shards.lock") is None


def test_a_driver_whose_lease_is_taken_stops_with_a_clear_error(store, tmp_path, monkeypatch, capsys):
    """Another driver takes the lease over mid-run (it found it lapsed): this one stops at its next chunk
    instead of writing beside it, says why, and writes no totals."""
    from mmscale.shards import output as output_module

    fs, _ = store
    monkeypatch.setattr(output_module, "LEASE_S", 2.0)  # renewed (and checked) every 0.5 s
    routes = {f"/late/{i}.jpg": Response(body=image_bytes((40, 40), seed=300 + i), delay_s=0.4) for i in range(16)}
    url = "s3://shards/taken"
    with ImageServer(routes) as server:
        table = write_table(tmp_path / "late.jsonl", [{"url": server.url(f"/late/{i}.jpg"), "caption": f"late {i}"}
                                                      for i in range(16)], "jsonl")

        def take_over() -> None:
            deadline = time.monotonic() + 60
            while not [name for name in object_names(fs, url) if name.endswith(".stats.json")]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # as a driver taking a lease over does: write, read back after a renewal period, again if it lost
            # (a renewal that read the lease just before this write puts the running driver's back)
            while True:
                fs.pipe_file("shards/taken/.make_shards.lock", json.dumps(
                    {"host": "another-node", "pid": 1, "token": "theirs", "renewed": time.time()}).encode())
                time.sleep(0.6)
                if json.loads(fs.cat_file("shards/taken/.make_shards.lock"))["token"] == "theirs":
                    return
                assert time.monotonic() < deadline

        from threading import Thread

        thief = Thread(target=take_over)
        thief.start()
        code = main(["--input", str(table), "--output", url, "--samples-per-shard", "2", "--threads", "1",
                     "--workers", "1", "--allow-private-urls", "--retries", "0", "--no-progress"])
        thief.join()
    assert code == 2
    error = capsys.readouterr().err
    assert "lost its lease (make_shards on host another-node, pid 1, took it over) and stopped" in error, error
    names = object_names(fs, url)
    assert "sizes.json" not in names and len([name for name in names if name.endswith(".stats.json")]) < 8
    assert json.loads(fs.cat_file("shards/taken/.make_shards.lock"))["token"] == "theirs"  # left to its holder


def test_a_lease_that_cannot_be_renewed_is_given_up_before_it_lapses(store, monkeypatch):
    from mmscale.shards import output as output_module
    from mmscale.shards.output import RemoteLease
    from mmscale.shards.sources import InputError

    monkeypatch.setattr(output_module, "LEASE_S", 0.4)  # renewed every 0.1 s, given up after 0.2 s of failures
    output = Output("s3://shards/unrenewable")
    lease = RemoteLease(output, ".make_shards.lock")
    lease.acquire()
    lease.check()  # held

    def store_down(name, value):
        raise OSError("the store did not answer")

    monkeypatch.setattr(output, "write_json", store_down)
    time.sleep(1.0)
    with pytest.raises(InputError, match=r"could not be renewed for 0.2 s \(OSError: the store did not answer\)"):
        lease.check()
    monkeypatch.undo()
    lease.release()
