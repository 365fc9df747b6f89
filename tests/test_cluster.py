"""Cluster readiness on CPU: what MPI-style launchers start, the precision and TF32 choice on GPUs of each
generation (CUDA queries patched), and the DeepSpeed configs' reduction dtypes."""

from __future__ import annotations

import json
import math
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


@pytest.fixture
def gpu(monkeypatch):
    """CUDA queries answering as a GPU of a given compute capability would; `is_bf16_supported` says yes, as it
    does on a V100 (it counts emulation)."""
    import torch

    def set_capability(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm_{major}{minor}")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)

    return set_capability


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                      ((9, 0), "bf16")], ids=["V100", "T4", "A100", "H100"])
def test_auto_precision_is_bf16_only_with_native_bf16(gpu, capability, expected):
    from mmscale.train.precision import resolve_precision

    gpu(*capability)
    precision, reason = resolve_precision("auto")
    assert precision == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in reason


def test_fp32_on_a_gpu_runs_matmuls_in_tf32(gpu):
    import torch

    from mmscale.train.precision import allow_tf32

    before = torch.get_float32_matmul_precision()
    try:
        assert not allow_tf32(cuda=False) and torch.get_float32_matmul_precision() == before
        gpu(8, 0)
        assert allow_tf32()
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_lora_config_picks_its_precision_by_machine():
    import yaml

    assert yaml.safe_load((ROOT / "configs" / "finetune" / "lora.yaml").read_text())["train"]["precision"] == "auto"


def test_image_normalization_stays_fp32_through_casts():
    import torch

    from mmscale.models import ModelConfig, build_model

    model = build_model(ModelConfig(preset="tiny"), vocab_size=100, mlm_head=False)
    exact = model.image_mean.clone(), model.image_std.clone()
    for cast in (torch.nn.Module.bfloat16, torch.nn.Module.half, torch.nn.Module.float):
        cast(model)
        assert model.image_mean.dtype == model.image_std.dtype == torch.float32
        assert torch.equal(model.image_mean, exact[0]) and torch.equal(model.image_std, exact[1])


ZERO3_BUILD = """
import json, sys
from mmscale.losses import LossConfig
from mmscale.models import ModelConfig
from mmscale.train.config import TrainConfig
from mmscale.train.engine import batch_layout, build_objective, deepspeed_config, init_distributed
init_distributed()
train = TrainConfig(precision="bf16", deepspeed="configs/deepspeed/zero3.json", global_batch_size=2, steps=1)
config, _ = deepspeed_config(train, batch_layout(train, 1))
model = build_objective(ModelConfig(preset="tiny"), LossConfig(), config, vocab_size=100).model
print(json.dumps({"dtype": str(model.image_mean.dtype), "mean": model.image_mean.flatten().tolist(),
                  "std": model.image_std.flatten().tolist(),
                  "weights": str(model.towers.visual_projection.weight.dtype)}))
"""


@pytest.mark.slow
def test_a_bf16_zero3_model_normalizes_images_with_exact_fp32_values():
    """zero.Init makes every floating tensor in the training dtype: the buffers must come out fp32 all the same."""
    import torch

    from mmscale.models.dual_encoder import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

    result = subprocess.run([sys.executable, "-c", ZERO3_BUILD], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=os.environ | {"MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stderr[-3000:]
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built["weights"] == "torch.bfloat16"  # the partitioned weights are bf16: the case that rounded them
    assert built["dtype"] == "torch.float32"
    assert built["mean"] == torch.tensor(CLIP_IMAGE_MEAN, dtype=torch.float32).tolist()
    assert built["std"] == torch.tensor(CLIP_IMAGE_STD, dtype=torch.float32).tolist()


STAGES = """import json, sys, time
import deepspeed, torch
from mmscale.losses import LossConfig
from mmscale.models import ModelConfig
from mmscale.train.config import TrainConfig
from mmscale.train.engine import (batch_layout, build_objective, deepspeed_config, init_distributed, make_optimizer,
                                  parameter_groups)
init_distributed()
precision = sys.argv[1]
for name in sys.argv[2:]:
    train = TrainConfig(precision=precision, deepspeed=f"configs/deepspeed/{name}.json", global_batch_size=4,
                        micro_batch_size=2, steps=1)
    config, _ = deepspeed_config(train, batch_layout(train, 1))
    objective = build_objective(ModelConfig(preset="tiny"), LossConfig(mlm_weight=0.0), config, vocab_size=100)
    optimizer = make_optimizer(parameter_groups(objective, 0.1), train, config)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(0)
    batch = {"images": torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=generator),
             "input_ids": torch.randint(5, 100, (2, 8), generator=generator), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    start = time.perf_counter()
    losses = []
    for _ in range(2):
        out = engine(**batch)
        engine.backward(out.total)
        engine.step()
        losses.append(float(out.total))
    print(json.dumps({"config": name, "communication": str(engine.communication_data_type),
                      "accumulation": str(engine.get_data_types()[1]), "optimizer": type(engine.optimizer).__name__,
                      "losses": losses, "seconds": time.perf_counter() - start}), flush=True)
"""


@pytest.mark.slow
def test_shipped_zero_configs_reduce_and_accumulate_gradients_in_fp32():
    """bf16 gradients summed over hundreds of ranks and GradCache micro-batches lose their low bits: every
    shipped ZeRO config reduces and accumulates them in fp32, and DeepSpeed trains with it at each stage."""
    result = subprocess.run([sys.executable, "-c", STAGES, "bf16", "zero1", "zero2", "zero3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env=os.environ | {"MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    built = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [entry["config"] for entry in built] == ["zero1", "zero2", "zero3"]
    for entry in built:
        assert (entry["communication"], entry["accumulation"]) == ("torch.float32", "torch.float32"), entry
        assert all(math.isfinite(loss) for loss in entry["losses"]), entry
    for name in ("zero1", "zero2", "zero3", "zero3_offload"):
        config = json.loads((ROOT / "configs" / "deepspeed" / f"{name}.json").read_text())
        assert config["communication_data_type"] == "fp32" and config["data_types"]["grad_accum_dtype"] == "fp32"


def test_compile_under_zero3_is_refused_with_advice_and_allowed_at_zero2():
    from mmscale.train.config import TrainConfig
    from mmscale.train.engine import batch_layout, deepspeed_config

    def config(stage: int) -> TrainConfig:
        return TrainConfig(compile=True, global_batch_size=4, steps=1,
                           deepspeed=str(ROOT / "configs" / "deepspeed" / f"zero{stage}.json"))

    with pytest.raises(ValueError, match="graph breaks at every submodule.*ZeRO-1/2"):
        deepspeed_config(config(3), batch_layout(config(3), 1))
    assert deepspeed_config(config(2), batch_layout(config(2), 1))[0]["zero_optimization"]["stage"] == 2


def test_fused_adams_jit_build_gets_this_gpus_arch_unless_set(gpu):
    """torch's arch list holds `9.0a`, which DeepSpeed 0.19's FusedAdam build cannot parse: the build gets the
    device's own capability."""
    from mmscale.train.engine import set_cuda_arch_list

    gpu(9, 0)
    environ = {}
    assert set_cuda_arch_list(environ) == "9.0" and environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert set_cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}) == "8.0;9.0"


OPS_PER_STEP = """
import json, sys, torch, deepspeed
from torch.profiler import profile, ProfilerActivity
from mmscale.losses import LossConfig
from mmscale.models import ModelConfig
from mmscale.train.config import TrainConfig
from mmscale.train.engine import (batch_layout, build_objective, deepspeed_config, init_distributed, make_optimizer,
                                  parameter_groups)
init_distributed()
train = TrainConfig(precision="bf16", deepspeed=f"configs/deepspeed/{sys.argv[1]}.json", global_batch_size=4, steps=1)
config, _ = deepspeed_config(train, batch_layout(train, 1))
objective = build_objective(ModelConfig(preset="tiny"), LossConfig(mlm_weight=0.0), config, vocab_size=100)
engine, *_ = deepspeed.initialize(model=objective, optimizer=make_optimizer(parameter_groups(objective, 0.1), train,
                                  config), config=config)
g = torch.Generator().manual_seed(0)
batch = {"images": torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8, generator=g),
         "input_ids": torch.randint(5, 100, (4, 8), generator=g), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
def step():
    engine.backward(engine(**batch).total)
    engine.step()
step()
with profile(activities=[ProfilerActivity.CPU]) as profiler:
    step()
print(json.dumps({event.key: event.count for event in profiler.key_averages()}))
"""


@pytest.mark.slow
def test_a_bf16_zero2_step_does_not_scan_every_gradient_for_overflow():
    """DeepSpeed's bf16 ZeRO-1/2 checks each parameter's gradient for inf/NaN every step (an amin and an amax per
    parameter, then a host read): fp16's loss-scaling check, which bf16 does not need and the loop's agreed
    NaN/inf skip already covers. mmscale turns it off (issue 26 item 14: per-parameter host work in a step)."""
    from mmscale.train.config import TrainConfig
    from mmscale.train.engine import batch_layout, deepspeed_config

    result = subprocess.run([sys.executable, "-c", OPS_PER_STEP, "zero2"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=os.environ | {"MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    calls = json.loads(result.stdout.strip().splitlines()[-1])
    assert calls.get("aten::amax", 0) == 0 and calls.get("aten::amin", 0) == 0, calls
    assert calls.get("aten::mm", 0) > 0  # the profile saw the step
    train = TrainConfig(precision="bf16", deepspeed=str(ROOT / "configs" / "deepspeed" / "zero2.json"))
    kept = deepspeed_config(train, batch_layout(train, 1))[0]["bf16"]
    assert kept == {"enabled": True, "check_grad_overflow": False}
