"""make_shards on Spark and Ray clusters started by the tests, against the same job on a local process pool.

Four engines: Spark in local mode and a standalone master with 2 worker processes; Ray with
`ray.init()` and a 2-node cluster (`ray start --head` and a second `ray start`). Four inputs: an
image folder, a table of image paths, tar shards and a URL table served by the scripted HTTP server,
each with --dedup, duplicates and failing rows. The shards' members, sizes.json and failed.parquet
must equal the multiprocessing run's. Then the faults: the driver SIGKILLed mid-run and run again,
and a worker process SIGKILLed mid-chunk (the process holding the chunk's temporary tar open),
which the engine retries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as parquet
import pytest
from corpus import image_bytes, write_table, write_tar
from shardkit import jpeg_bytes, write_shards

from mmscale.shards.make_shards import main
from mmscale.shards.serve import ImageServer, Response
from mmscale.shards.synthetic import make_image_folder

pytest.importorskip("pyspark", reason="pip install 'mmscale[spark]'")
pytest.importorskip("ray", reason="pip install 'mmscale[ray]'")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--samples-per-shard", "7", "--resize", "32", "--dedup", "--workers", "2", "--no-progress",
          "--timeout", "2", "--retries", "0", "--allow-private-urls"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def contents(out: Path) -> dict:
    """Everything a reader of the output sees: each shard's members (by name; a download chunk writes in
    the order downloads finish), sizes.json, failed.parquet's rows, the file names; no temporary file.
    Hidden files are make_shards' own (its lock; the digests of downloads, which a local pool keeps)."""
    assert not [path.name for path in out.iterdir() if ".tmp" in path.name]
    names = sorted(path.name for path in out.iterdir() if path.name != "stats.json" and not path.name.startswith("."))
    shards = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            shards[path.name] = sorted((member.name, tar.extractfile(member).read()) for member in tar)
    failed = parquet.read_table(out / "failed.parquet").to_pylist()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] + stats["skipped_total"] == stats["records"]
    return {"names": names, "shards": shards, "sizes": json.loads((out / "sizes.json").read_text()),
            "failed": failed}


@pytest.fixture(scope="module")
def server():
    routes = {f"/ok/{i}.jpg": Response(body=image_bytes((40 + i, 36), seed=i)) for i in range(12)}
    # a copy of /ok/3.jpg two rows later; a download chunk keeps the copy that arrives first, so it answers late
    routes |= {"/copy.jpg": Response(body=image_bytes((43, 36), seed=3), delay_s=0.5),
               "/page.jpg": Response(body=b"<html>moved</html>", content_type="text/html"),
               "/gone.jpg": Response(410)}
    routes |= {f"/slow/{i}.jpg": Response(body=image_bytes((40, 40), seed=100 + i), delay_s=0.1) for i in range(60)}
    with ImageServer(routes) as served:
        yield served


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, server) -> dict[str, list[str]]:
    """make_shards arguments of each input kind, every one with duplicates and rows that fail."""
    root = tmp_path_factory.mktemp("inputs")
    folder = root / "folder"
    samples = make_image_folder(folder, 20, size=40, seed=5)
    for copy, original in (("000020", "000002"), ("000021", "000009")):  # copies in later chunks
        shutil.copy(folder / f"{original}.jpg", folder / f"{copy}.jpg")
        (folder / f"{copy}.txt").write_text(f"copy of {original}\n")
    (folder / "000022.jpg").write_bytes(b"not a jpeg")
    (folder / "000022.txt").write_text("broken\n")
    rows = [{"image": str(Path(sample.image_path)), "caption": sample.caption} for sample in samples]
    rows += [{"image": str(folder / "000004.jpg"), "caption": "a copy"}, {"image": str(root / "missing.jpg"),
                                                                           "caption": "gone"}]
    table = write_table(root / "table.parquet", rows, "parquet")
    tars = root / "tars"
    write_shards(tars, shards=2, per_shard=8)
    write_tar(tars / "shard-000002.tar", [("c0.jpg", jpeg_bytes(1)), ("c0.txt", b"a copy of shard 0's second"),
                                          ("c1.jpg", b"not a jpeg"), ("c1.txt", b"broken"),
                                          ("c2.jpg", jpeg_bytes(7)), ("c2.txt", b"fine")])
    urls = [f"/ok/{i}.jpg" for i in range(12)] + ["/page.jpg", "/gone.jpg"]
    urls.insert(5, "/copy.jpg")  # the same bytes as /ok/3.jpg, in the same chunk
    url_table = write_table(root / "urls.jsonl", [{"url": server.url(path), "caption": f"row {number}"}
                                                  for number, path in enumerate(urls)], "jsonl")
    return {"folder": ["--input", str(folder)],
            "table": ["--input", str(table), "--image-column", "image", "--caption-column", "caption"],
            "tar": ["--input", f"{tars}/shard-{{000000..000002}}.tar"],
            "url": ["--input", str(url_table)]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs) -> dict[str, dict]:
    """Each input written by the multiprocessing distributor."""
    root = tmp_path_factory.mktemp("multiprocessing")
    expected = {}
    for kind, arguments in inputs.items():
        assert main([*arguments, "--output", str(root / kind), *COMMON]) == 0
        expected[kind] = contents(root / kind)
        assert expected[kind]["failed"], kind  # every input has rows that fail
    assert {row["reason"] for row in expected["folder"]["failed"]} == {"duplicate", "not_an_image"}
    assert {row["reason"] for row in expected["url"]["failed"]} == {"duplicate", "not_an_image", "http_410"}
    return expected


def wait_for(check, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)


class Cluster(NamedTuple):
    address: str  # what make_shards' --spark-master or --ray-address takes
    web: str  # the master's web UI (Spark) or the dashboard, which takes job submissions (Ray)


@pytest.fixture(scope="module")
def spark_standalone(tmp_path_factory):
    """A Spark standalone master and 2 worker processes of 1 core each on 127.0.0.1."""
    import pyspark

    spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
    logs = tmp_path_factory.mktemp("spark-logs")
    port, ui = free_port(), free_port()
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(logs),
           "SPARK_WORKER_DIR": str(logs / "work"), "PYSPARK_PYTHON": sys.executable}
    processes = [subprocess.Popen([str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                   "--port", str(port), "--webui-port", str(ui)], env=env,
                                  stdout=open(logs / "master.log", "wb"), stderr=subprocess.STDOUT)]
    master = f"spark://127.0.0.1:{port}"
    for number in range(2):
        processes.append(subprocess.Popen(
            [str(spark_class), "org.apache.spark.deploy.worker.Worker", master, "--cores", "1", "--memory", "1g",
             "--host", "127.0.0.1", "--webui-port", str(free_port())], env=env,
            stdout=open(logs / f"worker{number}.log", "wb"), stderr=subprocess.STDOUT))

    def alive_workers() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as answer:
                return json.load(answer).get("aliveworkers", 0)
        except OSError:
            return 0

    previous = os.environ.get("PYSPARK_PYTHON")
    try:
        wait_for(lambda: alive_workers() == 2, timeout=90, what="2 Spark workers to register")
        os.environ["PYSPARK_PYTHON"] = sys.executable  # the executors' interpreter, which has mmscale
        yield Cluster(master, f"http://127.0.0.1:{ui}")
    finally:
        restore_env("PYSPARK_PYTHON", previous)
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def ray_command(*arguments: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ray"), *arguments]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A 2-node Ray cluster on this machine: a head (with the dashboard, which runs submitted jobs) and a
    second node, 1 CPU each."""
    port, dashboard = free_port(), free_port()
    # Ray 2.5x turns token authentication on for `ray start --head`; a second `ray start` then needs the token
    # (RAY_AUTH_TOKEN on a real cluster). This loopback test cluster runs without it, its driver too.
    # A submitted job's entry point runs in a shell on the head: `python` is this interpreter, as in a venv.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    head = ["start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--node-ip-address", "127.0.0.1",
            "--disable-usage-stats"]
    subprocess.run(ray_command(*head), env=env, check=True, capture_output=True, timeout=180)
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run(ray_command("start", "--address", address, "--num-cpus", "1", "--node-ip-address",
                                   "127.0.0.1"), env=env, check=True, capture_output=True, timeout=180)
        yield Cluster(address, f"http://127.0.0.1:{dashboard}")
    finally:
        subprocess.run(ray_command("stop", "--force"), env=env, capture_output=True, timeout=120)
        restore_env("RAY_AUTH_MODE", previous)


ENGINES = ["spark-local", "spark-standalone", "ray-local", "ray-cluster"]


def needs_java(engine: str) -> None:
    if engine.startswith("spark") and not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        pytest.skip("Spark needs a Java runtime (java on PATH or JAVA_HOME)")


@pytest.fixture(scope="module")
def engine_arguments(request):
    """The make_shards arguments that run on each engine (clusters started on first use)."""
    def arguments(engine: str) -> list[str]:
        needs_java(engine)
        if engine == "spark-local":
            return ["--distributor", "spark", "--spark-master", "local[2,4]"]
        if engine == "spark-standalone":
            return ["--distributor", "spark", "--spark-master", request.getfixturevalue("spark_standalone").address]
        if engine == "ray-local":
            return ["--distributor", "ray", "--ray-address", "local"]
        return ["--distributor", "ray", "--ray-address", request.getfixturevalue("ray_cluster").address]

    return arguments


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_writes_what_multiprocessing_writes(tmp_path, engine, engine_arguments, inputs, reference):
    """Same members, sizes.json and failed.parquet for folder, table, tar and URL input (with --dedup: the
    first copy in record order kept, later ones listed as duplicates, across chunks for local input)."""
    for kind, arguments in inputs.items():
        out = tmp_path / kind
        assert main([*arguments, "--output", str(out), *COMMON, *engine_arguments(engine)]) == 0, kind
        assert contents(out) == reference[kind], kind
    if engine == "ray-cluster":
        import ray

        ray.init(address=engine_arguments(engine)[-1], logging_level="ERROR")
        try:
            assert len([node for node in ray.nodes() if node["Alive"]]) == 2
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def submitted_input(tmp_path_factory, server) -> tuple[list[str], dict]:
    """The README's submit commands' input (parquet files of URLs and captions, by a glob), and what the
    process pool makes of it."""
    root = tmp_path_factory.mktemp("submitted")
    (root / "laion").mkdir()
    for part in range(2):
        write_table(root / "laion" / f"part-{part:05d}.parquet",
                    [{"url": server.url(f"/ok/{i}.jpg"), "caption": f"row {i}"} for i in range(6 * part, 6 * part + 6)],
                    "parquet")
    arguments = ["--input", f"{root}/laion/*.parquet", "--url-column", "url", "--caption-column", "caption",
                 "--resize", "32", "--threads", "4", "--samples-per-shard", "5", "--allow-private-urls"]
    assert main([*arguments, "--output", str(root / "pool"), "--no-progress"]) == 0
    expected = contents(root / "pool")
    assert sum(expected["sizes"].values()) == 12
    return arguments, expected


def finished_apps(master_ui: str) -> list[str]:
    with urllib.request.urlopen(f"{master_ui}/json/", timeout=10) as answer:
        return [app["id"] for app in json.load(answer)["completedapps"]]


def test_spark_submit_runs_make_shards_on_the_master_it_names(tmp_path, spark_standalone, submitted_input):
    """The README's spark-submit command, against the standalone master: make_shards takes the master from
    spark-submit (no --spark-master), the workers run the chunks, and the output is the process pool's."""
    needs_java("spark")
    import pyspark

    arguments, expected = submitted_input
    before = finished_apps(spark_standalone.web)
    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    result = subprocess.run([str(spark_submit), "--master", spark_standalone.address,
                             "--conf", f"spark.pyspark.python={sys.executable}", str(REPO / "tools" / "make_shards.py"),
                             "--distributor", "spark", *arguments, "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert contents(tmp_path / "out") == expected
    # one progress bar on the driver over the executors' chunks: every row, the image rate, the skips (spark-submit
    # passes the Python driver's stderr on to its own stdout)
    log = result.stdout + result.stderr
    assert re.search(r"writing shards: 100%.* 12/12 .*images/s, skipped 0", log), log[-3000:]
    wait_for(lambda: len(finished_apps(spark_standalone.web)) == len(before) + 1, timeout=30,
             what="the master to list the application as finished")  # it ran there, not in local mode


def test_ray_job_submit_runs_make_shards_on_the_cluster(tmp_path, ray_cluster, submitted_input):
    """The README's `ray job submit` command, through the head's dashboard: the job's driver finds the cluster
    by RAY_ADDRESS (no --ray-address), its tasks run there, and the output is the process pool's."""
    arguments, expected = submitted_input
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # the test cluster's setting (see ray_cluster)
    result = subprocess.run(ray_command("job", "submit", "--address", ray_cluster.web, "--working-dir", str(REPO),
                                        "--", "python", "tools/make_shards.py", "--distributor", "ray", *arguments,
                                        "--output", str(tmp_path / "out")),
                            capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in result.stdout and "writing shards: 100%" in result.stdout, result.stdout[-3000:]
    assert contents(tmp_path / "out") == expected


def slow_url_input(root: Path, server) -> list[str]:
    """60 rows that each take 0.1 s to answer: 12 chunks of 5, long enough to kill something mid-run."""
    table = write_table(root / "slow.jsonl", [{"url": server.url(f"/slow/{i}.jpg"), "caption": f"slow {i}"}
                                              for i in range(60)], "jsonl")
    return ["--input", str(table), "--samples-per-shard", "5", "--threads", "1", "--workers", "2", "--no-progress",
            "--allow-private-urls", "--retries", "0"]


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory, server) -> tuple[list[str], dict]:
    root = tmp_path_factory.mktemp("slow")
    arguments = slow_url_input(root, server)
    assert main([*arguments, "--output", str(root / "out")]) == 0
    expected = contents(root / "out")
    assert sum(expected["sizes"].values()) == 60
    return arguments, expected


def make_shards_process(arguments: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "make_shards.py"), *arguments],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


FAULT_ENGINES = {"spark": ["--distributor", "spark", "--spark-master", "local[2,4]"],
                 "ray": ["--distributor", "ray", "--ray-address", "local"]}


@pytest.mark.parametrize("engine", sorted(FAULT_ENGINES))
def test_driver_killed_mid_run_then_run_again_completes_with_the_same_output(tmp_path, engine, slow_reference,
                                                                            capsys):
    """SIGKILL the driver (a second driver on its output is refused meanwhile); the same command again
    keeps the finished chunks, redoes the rest and ends with the output of an uninterrupted run."""
    needs_java(engine)
    arguments, expected = slow_reference
    out = tmp_path / "out"
    command = [*arguments, "--output", str(out), *FAULT_ENGINES[engine]]
    driver = make_shards_process(command)
    try:
        wait_for(lambda: len(list(out.glob("*.stats.json"))) >= 2 or driver.poll() is not None, timeout=120,
                 what="two chunks to finish")
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert main([*command[:-len(FAULT_ENGINES[engine])]]) == 2  # a second driver on that output: refused
        assert "another make_shards is writing there" in capsys.readouterr().err
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    done_at_kill = len(list(out.glob("*.stats.json")))
    assert done_at_kill < 12 and not (out / "sizes.json").exists()
    again = make_shards_process(command)
    log = again.communicate(timeout=300)[0].decode()
    assert again.returncode == 0, log[-3000:]
    written = re.search(r"this run: (\d+) of 12 chunks written", log)
    assert written and int(written.group(1)) <= 12 - done_at_kill, log[-2000:]  # the finished ones kept
    assert contents(out) == expected


def pids_writing_into(folder: Path) -> set[int]:
    """Processes holding one of the folder's temporary shard files open (a chunk being written)."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for descriptor in os.scandir(f"/proc/{entry.name}/fd"):
                target = os.readlink(descriptor.path)
                if target.startswith(f"{folder}/.shard-") and ".tar.tmp" in target:
                    found.add(int(entry.name))
                    break
        except OSError:
            continue
    return found


def run_killing_a_worker(command: list[str], out: Path) -> tuple[int | None, int, str]:
    """Run make_shards and SIGKILL the first executor process caught holding a chunk's temporary tar open;
    returns (the killed pid, the exit code, the output)."""
    out.mkdir()
    driver = make_shards_process(command)
    killed = None
    try:
        deadline = time.monotonic() + 120
        while killed is None and driver.poll() is None and time.monotonic() < deadline:
            writers = pids_writing_into(out) - {driver.pid}
            if writers:
                killed = min(writers)
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.01)
        log = driver.communicate(timeout=300)[0].decode()
    finally:
        driver.kill()
    return killed, driver.returncode, log


@pytest.mark.parametrize("engine", sorted(FAULT_ENGINES))
def test_a_worker_killed_mid_chunk_is_retried_with_no_duplicate_or_half_shard(tmp_path, engine, slow_reference):
    """The engine runs the killed worker's task again; the output equals the uninterrupted run's, with no
    temporary file left."""
    needs_java(engine)
    arguments, expected = slow_reference
    out = tmp_path / "out"
    killed, code, log = run_killing_a_worker([*arguments, "--output", str(out), *FAULT_ENGINES[engine]], out)
    assert killed is not None, "no worker was caught writing a chunk"
    assert code == 0, log[-3000:]
    assert contents(out) == expected


def test_a_task_out_of_retries_stops_the_job_with_one_clear_line_and_the_next_run_finishes(tmp_path, slow_reference):
    """local[2]: Spark's local mode tries a task once, so the killed worker's chunk fails the job: exit 1,
    the engine's reason in one line (not a JVM stack trace); the same command with retries then resumes."""
    needs_java("spark")
    arguments, expected = slow_reference
    out = tmp_path / "out"
    command = [*arguments, "--output", str(out), "--distributor", "spark"]
    killed, code, log = run_killing_a_worker([*command, "--spark-master", "local[2]"], out)
    assert killed is not None and code == 1, log[-3000:]
    error = [line for line in log.splitlines() if line.startswith("make_shards: error:")]
    assert len(error) == 1 and "Python worker exited unexpectedly" in error[0], log[-3000:]
    assert "run the same command again to resume" in error[0] and "\tat " not in log.split(error[0])[1]
    assert main([*command, "--spark-master", "local[2,4]"]) == 0
    assert contents(out) == expected


@pytest.mark.parametrize("engine,package", [("spark", "pyspark"), ("ray", "ray")])
def test_a_missing_engine_says_what_to_install(tmp_path, monkeypatch, capsys, engine, package):
    monkeypatch.setitem(sys.modules, package, None)  # what `import pyspark` meets where it is not installed
    images = tmp_path / "images"
    make_image_folder(images, 2, size=32)
    assert main(["--input", str(images), "--output", str(tmp_path / "out"), "--distributor", engine]) == 2
    assert f"--distributor {engine} needs {package}: pip install 'mmscale[{engine}]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_engine_addresses_need_their_engine(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--spark-master", "local[2]"])
    assert "--spark-master needs --distributor spark" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["spark", "ray"])
def test_an_engine_that_cannot_start_says_which_flag_to_check(tmp_path, capsys, engine):
    """A master URL Spark cannot parse, a Ray address where nothing listens (ray.init would wait minutes)."""
    needs_java(engine)
    images = tmp_path / "images"
    make_image_folder(images, 2, size=32)
    address = ["--spark-master", "nosuch://head"] if engine == "spark" else ["--ray-address", f"127.0.0.1:{free_port()}"]
    started = time.monotonic()
    assert main(["--input", str(images), "--output", str(tmp_path / "out"), "--no-progress", "--distributor", engine,
                 *address]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    if engine == "spark":
        assert error.startswith("make_shards: error: could not start Spark (master nosuch://head): ") \
            and error.endswith("check --spark-master (and that Java runs)"), error
    else:
        assert error == (f"make_shards: error: nothing answers at {address[1]} (Connection refused); check "
                         "--ray-address or RAY_ADDRESS")
    assert time.monotonic() - started < 60


def test_a_url_job_deduplicated_on_one_machine_is_not_resumed_on_a_cluster(tmp_path, server, capsys):
    """A local pool checks downloads against the whole output, a cluster within each chunk: a resume on the
    other kind would mix both, so the plan differs and the output is refused."""
    table = write_table(tmp_path / "urls.jsonl", [{"url": server.url(f"/ok/{i}.jpg"), "caption": f"row {i}"}
                                                  for i in range(4)], "jsonl")
    arguments = ["--input", str(table), "--output", str(tmp_path / "out"), "--dedup", "--allow-private-urls",
                 "--no-progress", "--samples-per-shard", "2"]
    assert main(arguments) == 0
    assert main(arguments) == 0  # the same job again: a no-op resume
    assert main([*arguments, "--distributor", "ray", "--ray-address", "local"]) == 2  # refused before Ray starts
    assert "holds shards made from other input or options" in capsys.readouterr().err
