"""Cluster readiness on CPU: what MPI-style launchers start, the precision and TF32 choice on GPUs of each
generation (CUDA queries patched), and the DeepSpeed configs' reduction dtypes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmscale.train.engine import free_port, launcher_environment

ROOT = Path(__file__).resolve().parent.parent
OPEN_MPI = {"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}


def test_a_torch_style_launcher_environment_is_kept():
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node-a", "MASTER_PORT": "29511"}
    assert launcher_environment(environ | OPEN_MPI) == {}


def test_one_process_alone_is_rank_0_of_1():
    found = launcher_environment({})
    assert {name: found[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


@pytest.mark.parametrize(("variables", "expected"), [
    (OPEN_MPI, ("9", "16", "1", "8")),
    ({"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_SIZE": "8", "MV2_COMM_WORLD_LOCAL_RANK": "1",
      "MV2_COMM_WORLD_LOCAL_SIZE": "4"}, ("5", "8", "1", "4")),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}, ("2", "4", "0", "2")),
    ({"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"},
     ("6", "8", "2", "4")),
], ids=["openmpi", "mvapich", "pmi", "srun"])
def test_mpi_launchers_are_mapped_to_rank_and_world(variables, expected):
    found = launcher_environment(variables | {"MASTER_ADDR": "node-a"})
    assert (found["RANK"], found["WORLD_SIZE"], found["LOCAL_RANK"], found["LOCAL_WORLD_SIZE"]) == expected
    assert found["MASTER_PORT"] == "29500"  # the same on every rank, where a free port would differ
    assert "MASTER_ADDR" not in found


def test_several_mpi_nodes_without_master_addr_is_a_clear_error():
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        launcher_environment(OPEN_MPI)


def test_one_mpi_node_rendezvouses_on_loopback():
    variables = OPEN_MPI | {"OMPI_COMM_WORLD_SIZE": "8"}
    assert launcher_environment(variables)["MASTER_ADDR"] == "127.0.0.1"


JOIN = """
import json, sys
import torch.distributed as dist
from mmscale.train.engine import init_distributed
init_distributed()
ranks = [None] * dist.get_world_size()
dist.all_gather_object(ranks, dist.get_rank())
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "ranks": ranks}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_started_by_open_mpi_join_one_group_of_two():
    """As `mpirun -n 2` starts them (its variables, no RANK/WORLD_SIZE): one group of 2, not two groups of 1."""
    port = str(free_port())
    base = {name: value for name, value in os.environ.items()
            if name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    processes = [subprocess.Popen(
        [sys.executable, "-c", JOIN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=base | {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2",
                    "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": port,
                    "OMP_NUM_THREADS": "1"}) for rank in range(2)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results == [{"rank": rank, "world": 2, "ranks": [0, 1]} for rank in range(2)]
