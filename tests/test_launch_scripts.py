"""The launch scripts hand every value to deepspeed as one literal argument, and run none of them.

Fake `scontrol`, `srun` (runs its command as srun would, with SLURM_NODEID set) and `deepspeed` (writes its
arguments, one per line) on PATH stand in for the cluster. Where the subject is what DeepSpeed's own
launcher makes of the script's arguments, the real launcher runs instead, starting a stand-in
`mmscale.train` (the package in the launch directory comes first on the ranks' path) that writes down the
arguments and environment each rank got. The pdsh test at the end goes over real ssh.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
WEIRD_CONFIG = "my configs/it's $(touch {marker}) `touch {marker}` \"x\".yaml"
BREAKS_OUT_OF_QUOTES = "configs/a'$(touch {marker})'.yaml"  # what ran code when the script put '$config' in bash -c
WEIRD_OVERRIDE = "data.train=$(touch {marker})/{{000..002}}.tar"
# What a remote shell would expand, split, run or comment out, and what pdsh itself substitutes (%n, %h, %%).
PDSH_CRAFTED = [
    "data.train=shards/train-{000000..000002}.tar", "data.val=my val/a-{0..1}.tar@2::other dir/b.tar@0.5",
    "a=$(touch {marker}) `touch {marker}`", "b='\"' \\\" \\\\ \\ end", "c=$(touch {marker})", "d=`touch {marker}`",
    "e=100%n %% %h %u %", "f=100%n", "", "g=x\ty", "h=line\nnext", "i=two  spaces, a tab\tand \"$HOME\" !x",
    "*", "~", "j=a;b|c&d>e<f", "#k", "{a,b}", "l=it's",
]
# The ranks' `python -m mmscale.train`: writes its arguments and environment to rank<RANK>.json beside the package.
STAND_IN_TRAIN = """import json, os, sys
from pathlib import Path
names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES")
record = {"argv": sys.argv[1:], "env": {name: os.environ.get(name) for name in names}}
(Path(__file__).resolve().parents[1] / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))
"""
# pdsh as it runs over ssh: the command line (its arguments joined by spaces) through a shell on every host,
# after substituting %n (the host's index), %h and %% as pdsh does. The launcher's clean-up `pkill -f` on an
# interrupt is not run: on one machine it would match other runs' processes.
STAND_IN_PDSH = r"""#!/bin/bash
while [[ $1 == -* ]]; do [[ $1 == -w ]] && hosts=$2 && shift; [[ $1 == -f ]] && shift; shift; done
[[ $1 == pkill* ]] && exit 0
line="$*"; pids=(); index=0
for host in ${hosts//,/ }; do
    command=${line//%%/$'\x01'}; command=${command//%n/$index}; command=${command//%h/$host}
    bash -c "${command//$'\x01'/%}" & pids+=($!); index=$((index + 1))
done
status=0; for pid in "${pids[@]}"; do wait $pid || status=1; done; exit $status
"""


def _script(path: Path, body: str) -> None:
    path.write_text(body if body.startswith("#!") else "#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def cluster(tmp_path):
    """A PATH with the fakes, the files deepspeed's and srun's arguments land in, and a marker no command may
    create."""
    bin_dir, argv_file, marker = tmp_path / "bin", tmp_path / "deepspeed-argv", tmp_path / "code-ran"
    bin_dir.mkdir()
    _script(bin_dir / "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    # srun's own options come first; the task is the rest, started without a shell
    _script(bin_dir / "srun", f'printf "%s\\n" "$@" > {tmp_path / "srun-argv"}\n'
                              'while [[ $1 == -* ]]; do shift; done\n'
                              'SLURM_NNODES=2 SLURM_NODEID=0 exec "$@"\n')
    _script(bin_dir / "deepspeed", f'printf "%s\\n" "$@" > {argv_file}\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_JOB_ID": "77"}
    return {"env": env, "argv": argv_file, "srun": tmp_path / "srun-argv", "marker": marker, "cwd": tmp_path}


def _run(cluster, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cluster["cwd"], env=cluster["env"] | env,
                          capture_output=True, text=True, timeout=60)


def _with_real_deepspeed(cluster) -> None:
    """Make `deepspeed` the real launcher (CPU ranks), starting the stand-in mmscale.train of the launch directory."""
    (cluster["cwd"] / "bin" / "deepspeed").unlink()
    package = cluster["cwd"] / "mmscale"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(STAND_IN_TRAIN)
    cluster["env"]["PATH"] = f"{cluster['cwd'] / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin"
    cluster["env"] |= {"DS_ACCELERATOR": "cpu", "PYTHONDONTWRITEBYTECODE": "1"}


def _ranks(cluster) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(cluster["cwd"].glob("rank*.json"))]


@pytest.mark.parametrize("crafted", [WEIRD_CONFIG, BREAKS_OUT_OF_QUOTES], ids=["weird", "breaks-out"])
def test_slurm_passes_a_crafted_config_and_overrides_as_literal_arguments(cluster, crafted):
    config, override = (crafted.format(marker=cluster["marker"]),
                        WEIRD_OVERRIDE.format(marker=cluster["marker"]))
    address = f"node-a$(touch {cluster['marker']})"
    result = _run(cluster, "slurm.sbatch", config, override, MASTER_ADDR=address, GPUS_PER_NODE="8")
    assert result.returncode == 0, result.stderr
    assert cluster["argv"].read_text().splitlines() == [
        "--hostfile", "hostfile.77", "--no_ssh", "--node_rank", "0", "--master_addr", address, "--master_port",
        "29500", "--module", "mmscale.train", "--config", config, override]
    assert (cluster["cwd"] / "hostfile.77").read_text() == "node-a slots=8\nnode-b slots=8\n"
    assert not cluster["marker"].exists()


def test_slurm_without_overrides_passes_no_empty_argument(cluster):
    result = _run(cluster, "slurm.sbatch", "c.yaml", GPUS_PER_NODE="8")
    assert result.returncode == 0, result.stderr
    assert cluster["argv"].read_bytes().endswith(b"\n--config\nc.yaml\n")


def test_slurm_gives_srun_the_jobs_cpus_per_task(cluster):
    """Slurm 22.05-23.02's srun does not take sbatch's --cpus-per-task: each task (8 ranks and their loader
    workers) would get one CPU."""
    assert _run(cluster, "slurm.sbatch", "c.yaml", GPUS_PER_NODE="8", SLURM_CPUS_PER_TASK="64").returncode == 0
    srun_options = cluster["srun"].read_text().split("\nbash\n")[0].splitlines()
    assert srun_options == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64"]
    assert _run(cluster, "slurm.sbatch", "c.yaml", GPUS_PER_NODE="8").returncode == 0
    assert "--cpus-per-task" not in cluster["srun"].read_text()


def test_slurm_names_the_gpus_slurm_gave_the_task(cluster):
    result = _run(cluster, "slurm.sbatch", "c.yaml", "x=1", GPUS_PER_NODE="4", CUDA_VISIBLE_DEVICES="1,3")
    assert result.returncode == 0, result.stderr
    assert cluster["argv"].read_text().splitlines()[:6] == [
        "--hostfile", "hostfile.77", "--no_ssh", "--node_rank", "0", "--include"]
    assert cluster["argv"].read_text().splitlines()[6] == "node-a:1,3@node-b:1,3"
    uuids = _run(cluster, "slurm.sbatch", "c.yaml", GPUS_PER_NODE="4", CUDA_VISIBLE_DEVICES="GPU-5d2e")
    assert uuids.returncode == 2 and "CUDA_VISIBLE_DEVICES=GPU-5d2e: the DeepSpeed launcher takes GPU" in uuids.stderr


@pytest.mark.slow
def test_slurm_ranks_under_deepspeeds_launcher_use_the_tasks_gpus(cluster):
    """The real launcher with the script's --include: node 0's two ranks see GPUs 1 and 3 (not slots 0 and 1),
    in a world of 2 nodes x 2."""
    _with_real_deepspeed(cluster)
    result = _run(cluster, "slurm.sbatch", "c.yaml", "x=1", GPUS_PER_NODE="4", CUDA_VISIBLE_DEVICES="1,3",
                  MASTER_ADDR="127.0.0.1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert [rank["env"] for rank in _ranks(cluster)] == [
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "1,3"}
        for rank in (0, 1)]
    assert _ranks(cluster)[0]["argv"] == ["--local_rank=0", "--config", "c.yaml", "x=1"]


@pytest.mark.parametrize("name", ["MASTER_PORT", "GPUS_PER_NODE"])
def test_slurm_refuses_a_number_that_is_not_one(cluster, name):
    result = _run(cluster, "slurm.sbatch", "c.yaml", **{"GPUS_PER_NODE": "8", name: "8/e;touch x;#"})
    assert result.returncode == 2 and f"{name}=8/e;touch x;# is not a number" in result.stderr
    assert not cluster["argv"].exists()


def test_pretrain_passes_a_crafted_config_as_a_literal_argument(cluster):
    config, override = (WEIRD_CONFIG.format(marker=cluster["marker"]),
                        WEIRD_OVERRIDE.format(marker=cluster["marker"]))
    result = _run(cluster, "pretrain.sh", config, override, NUM_GPUS="2")
    assert result.returncode == 0, result.stderr
    assert cluster["argv"].read_text().splitlines() == [
        "--num_gpus", "2", "--module", "mmscale.train", "--config", config, override]
    assert not cluster["marker"].exists()


def test_pretrain_takes_num_gpus_from_cuda_visible_devices(cluster):
    """`--num_gpus N` would run on GPUs 0..N-1 whatever CUDA_VISIBLE_DEVICES says."""
    result = _run(cluster, "pretrain.sh", "c.yaml", NUM_GPUS="2", CUDA_VISIBLE_DEVICES="2,5,7")
    assert result.returncode == 0, result.stderr
    assert cluster["argv"].read_text().splitlines()[:2] == ["--include", "localhost:2,5"]
    too_many = _run(cluster, "pretrain.sh", "c.yaml", NUM_GPUS="4", CUDA_VISIBLE_DEVICES="2,5")
    assert too_many.returncode == 2 and "NUM_GPUS=4, but CUDA_VISIBLE_DEVICES=2,5 names only 2 GPUs" in too_many.stderr
    assert _run(cluster, "pretrain.sh", "c.yaml", CUDA_VISIBLE_DEVICES="2,5").returncode == 0
    assert cluster["argv"].read_text().splitlines()[0] == "--module"  # the launcher reads it itself


@pytest.mark.parametrize("visible, ranks, expected", [
    ("2,5,7", 2, ["--include", "localhost:2,5"]), ("3", 1, ["--include", "localhost:3"]),
    (None, 2, ["--num_gpus", "2"]), ("", 1, ["--num_gpus", "1"]), ("GPU-5d2e,GPU-77aa", 1, ["--num_gpus", "1"])])
def test_the_quickstarts_launch_uses_the_visible_gpus(monkeypatch, visible, ranks, expected):
    from mmscale.quickstart import local_device_args

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local_device_args(ranks) == expected


def test_multinode_quotes_every_argument_for_pdsh_and_its_remote_shell(cluster):
    """The real DeepSpeed launcher (pdsh backend) builds its pdsh command line from what the script passes;
    on each node the ranks get exactly the arguments given to the script: a brace spec stays one argument,
    spaces split nothing, nothing runs, pdsh substitutes no %n."""
    _with_real_deepspeed(cluster)
    _script(cluster["cwd"] / "bin" / "ssh", "exit 0\n")  # the launcher's reachability check
    _script(cluster["cwd"] / "bin" / "pdsh", STAND_IN_PDSH)
    (cluster["cwd"] / "hosts").write_text("node-a slots=1\nnode-b slots=1\n")
    config = WEIRD_CONFIG.format(marker=cluster["marker"])
    values = [value.replace("{marker}", str(cluster["marker"])) for value in PDSH_CRAFTED]
    result = _run(cluster, "multinode.sh", "hosts", config, *values, MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = _ranks(cluster)
    assert [rank["env"]["RANK"] for rank in ranks] == ["0", "1"]
    for rank in ranks:
        assert rank["argv"] == ["--local_rank=0", "--config", config, *values]
    assert not cluster["marker"].exists()


def test_multinode_refuses_a_directory_or_address_that_pdsh_would_mangle(cluster):
    """DeepSpeed writes the launch directory and the address into the remote line unquoted."""
    odd = cluster["cwd"] / "a b"
    odd.mkdir()
    result = subprocess.run(["bash", str(LAUNCH / "multinode.sh"), "hosts", "c.yaml"], cwd=odd,
                            env=cluster["env"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"PWD={odd} holds characters" in result.stderr
    result = _run(cluster, "multinode.sh", "hosts", "c.yaml", MASTER_ADDR="node-a;x")
    assert result.returncode == 2 and "MASTER_ADDR=node-a;x" in result.stderr and "LAUNCHER=openmpi" in result.stderr
    assert not cluster["argv"].exists()


def test_multinode_with_openmpi_passes_arguments_as_they_are(cluster):
    config = WEIRD_CONFIG.format(marker=cluster["marker"])
    override = WEIRD_OVERRIDE.format(marker=cluster["marker"])
    (cluster["cwd"] / "hosts").write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    result = _run(cluster, "multinode.sh", "hosts", config, override, LAUNCHER="openmpi")
    assert result.returncode == 0, result.stderr
    # mpirun exports the rendezvous to every rank (the first host unless MASTER_ADDR is set): DeepSpeed's Open MPI
    # runner exports none, and the ranks map OMPI_COMM_WORLD_* to their rank and world size themselves.
    assert cluster["argv"].read_text().splitlines() == [
        "--hostfile", "hosts", "--launcher", "openmpi", "--launcher_args",
        "-x MASTER_ADDR=node-a -x MASTER_PORT=29500 ", "--module", "mmscale.train", "--config", config, override]
    assert not cluster["marker"].exists()
    result = _run(cluster, "multinode.sh", "hosts", config, override, LAUNCHER="openmpi", MASTER_ADDR="10.0.0.7",
                  MASTER_PORT="29999")
    assert result.returncode == 0, result.stderr
    assert "-x MASTER_ADDR=10.0.0.7 -x MASTER_PORT=29999 " in cluster["argv"].read_text().splitlines()
    result = _run(cluster, "multinode.sh", "hosts", config, override, LAUNCHER="openmpi", MASTER_ADDR="a;b")
    assert result.returncode == 2 and "not a plain host" in result.stderr


def test_the_example_deepspeed_env_reads_as_deepspeed_reads_it():
    """DeepSpeed's launcher splits every line of .deepspeed_env at its first `=` and exports the rest, comments
    included (a `#` line would comment out the whole remote command), and passes on no GLOO_* by itself."""
    lines = (LAUNCH / "deepspeed_env.example").read_text().splitlines()
    variables = dict(line.split("=", 1) for line in lines)
    assert all(name.isidentifier() and name.isupper() for name in variables) and "" not in lines
    assert variables["GLOO_SOCKET_IFNAME"] == variables["NCCL_SOCKET_IFNAME"]


def test_every_launch_script_is_covered():
    assert {path.name for path in LAUNCH.iterdir() if os.access(path, os.X_OK) or path.suffix in (".sh", ".sbatch")} \
        == {"slurm.sbatch", "pretrain.sh", "multinode.sh"}


# -- a real pdsh launch over ssh ----------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin")


@pytest.fixture
def ssh_nodes(tmp_path):
    """Two host names of this machine (localhost and 127.0.0.1) reachable over ssh, as two nodes: sshd on a
    spare loopback port with a throw-away host key, accepting a throw-away user key; `ssh` on the PATH this
    yields (a wrapper adding the client config) is what DeepSpeed's check and pdsh run."""
    from mmscale.train.engine import free_port

    missing = [name for name in ("sshd", "pdsh", "ssh", "ssh-keygen") if not _tool(name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (.ci/run installs openssh-server and pdsh where it runs "
                    "as root)")
    root = tmp_path / "ssh"
    root.mkdir()
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nX11Forwarding no\n")
    (root / "ssh_config").write_text(
        f"Host *\n  Port {port}\n  User {getpass.getuser()}\n  IdentityFile {root / 'user_key'}\n"
        "  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
        "  LogLevel ERROR\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _script(bin_dir / "ssh", f'exec {_tool("ssh")} -F {root / "ssh_config"} "$@"\n')
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = open(root / "sshd.log", "w")
    sshd = subprocess.Popen([_tool("sshd"), "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while any(subprocess.run([str(bin_dir / "ssh"), host, "true"], capture_output=True, timeout=20).returncode
                  for host in ("localhost", "127.0.0.1")):
            if sshd.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"sshd on port {port} did not let this test's key in: "
                            f"{(root / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.3)
        yield {"bin": bin_dir, "hosts": ["localhost", "127.0.0.1"]}
    finally:
        import psutil

        sessions = psutil.Process(sshd.pid).children(recursive=True) if sshd.poll() is None else []
        for process in [*sessions, sshd]:  # ranks a failed run left behind in its ssh sessions, then sshd
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        sshd.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_multinode_over_real_pdsh_trains_both_nodes_on_a_brace_spec_and_a_weighted_spec_with_spaces(
        ssh_nodes, tmp_path, tokenizer_dir):
    """launch/multinode.sh -> DeepSpeed's pdsh launcher -> pdsh -> ssh -> each node's shell, two host names of
    this machine as two nodes of one slot. Before the script quoted its arguments for that shell, the brace
    spec reached the ranks as three data.train= arguments (the last kept: "1 shards for 2 readers"); the
    weighted spec, whose paths hold spaces and a %n, splits into several arguments or gets pdsh's node index."""
    from shardkit import write_shards

    from mmscale.train.engine import free_port

    shards, odd = tmp_path / "shards", tmp_path / "val shards 100%n"
    write_shards(shards, shards=3, per_shard=8, prefix="train")
    write_shards(odd / "a b", shards=2, per_shard=4, prefix="val")
    write_shards(odd / "c d", shards=1, per_shard=4, prefix="more")
    train = f"data.train={shards}/train-{{000000..000002}}.tar"
    val = f"data.val={odd}/a b/val-{{000000..000001}}.tar@2::{odd}/c d/more-000000.tar@1"
    launch_dir, output = tmp_path / "launch", tmp_path / "run"
    launch_dir.mkdir()
    # DeepSpeed's launcher exports these on every node (the ssh sessions start with a bare environment).
    (launch_dir / ".deepspeed_env").write_text("DS_ACCELERATOR=cpu\nTOKENIZERS_PARALLELISM=false\n"
                                               "GLOO_SOCKET_IFNAME=lo\nOMP_NUM_THREADS=1\n")
    (launch_dir / "hostfile").write_text("".join(f"{host} slots=1\n" for host in ssh_nodes["hosts"]))
    env = os.environ | {"PATH": f"{ssh_nodes['bin']}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                        "HOME": str(tmp_path), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}
    command = ["bash", str(LAUNCH / "multinode.sh"), "hostfile", str(REPO / "configs" / "pretrain" / "tiny.yaml"),
               train, val, f"tokenizer={tokenizer_dir}", f"output_dir={output}", "train.steps=2",
               "train.global_batch_size=8", "train.warmup_steps=1", "train.log_every_steps=1",
               "train.save_every_steps=1000", "train.progress=false", "train.tensorboard=false", "data.workers=1",
               "data.shuffle_buffer=8", "eval.max_samples=4", "eval.batch_size=4"]
    # Its own session: a terminal's Ctrl-C must not reach the launcher, whose handler runs `pkill -f` on every node.
    launcher = subprocess.Popen(command, cwd=launch_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        log, _ = launcher.communicate(timeout=400)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, log[-4000:]
    assert "2 processes" in log
    for host in ssh_nodes["hosts"]:  # pdsh prefixes each node's output with its name
        assert f"\n{host}: " in log
    resolved = yaml.safe_load((output / "config.yaml").read_text())["data"]
    assert (resolved["train"], resolved["val"]) == (train.split("=", 1)[1], val.split("=", 1)[1])
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if record["kind"] == "train"] == [1, 2]
    assert (output / "final" / "model.safetensors").is_file()
