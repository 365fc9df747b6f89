"""The launch scripts hand every value to deepspeed as one literal argument, and run none of them.

Fake `scontrol`, `srun` (runs its command as srun would, with SLURM_NNODES/SLURM_NODEID set) and
`deepspeed` (writes its arguments, one per line) on PATH stand in for the cluster.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
WEIRD_CONFIG = "my configs/it's $(touch {marker}) `touch {marker}` \"x\".yaml"
BREAKS_OUT_OF_QUOTES = "configs/a'$(touch {marker})'.yaml"  # what ran code when the script put '$config' in bash -c
WEIRD_OVERRIDE = "data.train=$(touch {marker})/{{000..002}}.tar"


def _script(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def cluster(tmp_path):
    """A PATH with the fakes, the file deepspeed's arguments land in, and a marker no command may create."""
    bin_dir, argv_file, marker = tmp_path / "bin", tmp_path / "deepspeed-argv", tmp_path / "code-ran"
    bin_dir.mkdir()
    _script(bin_dir / "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    # srun's own options come first; the task is the rest, started without a shell
    _script(bin_dir / "srun", 'while [[ $1 == -* ]]; do shift; done\n'
                              'SLURM_NNODES=2 SLURM_NODEID=0 exec "$@"\n')
    _script(bin_dir / "deepspeed", f'printf "%s\\n" "$@" > {argv_file}\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_JOB_ID": "77"}
    return {"env": env, "argv": argv_file, "marker": marker, "cwd": tmp_path}


def _run(cluster, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cluster["cwd"], env=cluster["env"] | env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("crafted", [WEIRD_CONFIG, BREAKS_OUT_OF_QUOTES], ids=["weird", "breaks-out"])
def test_slurm_passes_a_crafted_config_and_overrides_as_literal_arguments(cluster, crafted):
    config, override = (crafted.format(marker=cluster["marker"]),
                        WEIRD_OVERRIDE.format(marker=cluster["marker"]))
    address = f"node-a$(touch {cluster['marker']})"
    result = _run(cluster, "slurm.sbatch", config, override, MASTER_ADDR=address, GPUS_PER_NODE="8")
    assert result.returncode == 0, result.stderr
    assert cluster["argv"].read_text().splitlines() == [
        "--hostfile", "hostfile.77", "--no_ssh", "--num_nodes", "2", "--node_rank", "0", "--num_gpus", "8",
        "--master_addr", address, "--master_port", "29500", "--module", "mmscale.train", "--config", config, override]
    assert (cluster["cwd"] / "hostfile.77").read_text() == "node-a slots=8\nnode-b slots=8\n"
    assert not cluster["marker"].exists()


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


def test_multinode_refuses_what_pdshs_remote_shell_would_run(cluster):
    override = WEIRD_OVERRIDE.format(marker=cluster["marker"])
    result = _run(cluster, "multinode.sh", "hosts", "c.yaml", override)
    assert result.returncode == 2 and override in result.stderr and "LAUNCHER=openmpi" in result.stderr
    assert not cluster["argv"].exists()
    plain = _run(cluster, "multinode.sh", "hosts", "configs/a b.yaml", "train.lr=1e-4")
    assert plain.returncode == 0, plain.stderr


def test_multinode_with_openmpi_passes_arguments_as_they_are(cluster):
    config = WEIRD_CONFIG.format(marker=cluster["marker"])
    result = _run(cluster, "multinode.sh", "hosts", config, LAUNCHER="openmpi")
    assert result.returncode == 0, result.stderr
    assert cluster["argv"].read_text().splitlines() == [
        "--hostfile", "hosts", "--launcher", "openmpi", "--module", "mmscale.train", "--config", config]
    assert not cluster["marker"].exists()


def test_every_launch_script_is_covered():
    assert {path.name for path in LAUNCH.iterdir() if os.access(path, os.X_OK) or path.suffix in (".sh", ".sbatch")} \
        == {"slurm.sbatch", "pretrain.sh", "multinode.sh"}
