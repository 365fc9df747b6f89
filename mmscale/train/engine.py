"""DeepSpeed engine setup: process group, DeepSpeed config, ZeRO-3 construction, optimizer, schedule.

The DeepSpeed config is the user's file passed through (gpt-neox style); mmscale fills only
the batch sizes, precision and gradient clipping from the `train` section and reports what it
filled. mmscale builds the optimizer and schedule itself (it needs parameter groups), so the
file must not carry `optimizer` or `scheduler` sections.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mmscale.losses import ClassificationObjective, LossConfig, PretrainingObjective, VqaObjective
from mmscale.models import ModelConfig, build_model
from mmscale.models.base import ImageTextModel
from mmscale.models.heads import MaskedLMHead
from mmscale.models.init import init_module
from mmscale.train.config import TrainConfig
from mmscale.train.precision import resolve_precision


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch is made: micro batch x accumulation x world size."""

    global_batch_size: int
    micro_batch_size: int
    accumulation: int
    world_size: int


def free_port() -> int:
    """A free TCP port on loopback, for a rendezvous started without a launcher."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_group_backend(cuda: bool) -> str:
    """The torch.distributed backend: on CUDA machines one group with a backend per device type, NCCL for
    the step's CUDA tensors and gloo for CPU ones (NCCL refuses CPU tensors: "No backend type associated
    with device type cpu"), so `all_gather_object`, barriers and CPU counters keep working; gloo alone
    without CUDA."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


# Where MPI-style launchers (mpirun, mpiexec, srun) say which process this is: (name, rank, world size, local
# rank, local size). DeepSpeed's openmpi/mpich/impi/mvapich launchers start processes this way and export no
# RANK/WORLD_SIZE of their own.
LAUNCHER_VARIABLES = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/Intel MPI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("Slurm srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
)
DEFAULT_MASTER_PORT = 29500  # torch's and DeepSpeed's


def launcher_environment(environ: dict | None = None) -> dict[str, str]:
    """The variables torch.distributed needs (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) that `environ` lacks: none where a torch-style launcher (deepspeed, torchrun) set RANK and
    WORLD_SIZE; mapped from an MPI launcher's or srun's own variables where one started this process; else
    those of one process alone. Without them every process of an `mpirun -n 16` job would be rank 0 of a world
    of 1 and train alone on cuda:0 into the same folder."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        found = {}
    else:
        found = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        for launcher, rank, world, local_rank, local_size in LAUNCHER_VARIABLES:
            if rank in environ and world in environ:
                # srun's tasks-per-node reads like "4" or "4(x2)" or "4,2": this node's count is its first number
                local = (environ.get(local_size) or "").split("(")[0].split(",")[0]
                found = {"RANK": environ[rank], "WORLD_SIZE": environ[world],
                         "LOCAL_RANK": environ.get(local_rank, "0"), "LOCAL_WORLD_SIZE": local or environ[world]}
                if "MASTER_ADDR" not in environ and found["LOCAL_WORLD_SIZE"] != found["WORLD_SIZE"]:
                    raise RuntimeError(
                        f"{launcher} started this process as rank {found['RANK']} of {found['WORLD_SIZE']} on more "
                        "than one node, but MASTER_ADDR is not set: export MASTER_ADDR (the first node's address) and "
                        "MASTER_PORT to every rank (mpirun -x MASTER_ADDR=... or a .deepspeed_env line; "
                        "launch/multinode.sh does it for LAUNCHER=openmpi)")
                found["MASTER_PORT"] = str(DEFAULT_MASTER_PORT)
                break
        else:
            found["MASTER_PORT"] = str(free_port())  # one process alone: any free port
    found.setdefault("MASTER_ADDR", "127.0.0.1")
    return {name: value for name, value in found.items() if name not in environ}


def init_distributed() -> None:
    """Join the launcher's process group (one process without a launcher): NCCL for CUDA tensors and gloo for
    CPU ones on GPU machines, gloo on CPU (process_group_backend)."""
    import deepspeed

    if not torch.cuda.is_available():
        # The shared-memory comm op is a ~80 s JIT build that gloo on CPU does not need.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.update(launcher_environment())
    deepspeed.init_distributed(dist_backend=process_group_backend(torch.cuda.is_available()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(cpu_threads_per_rank())


def cpu_threads_per_rank() -> int:
    """Compute threads for one CPU rank: OMP_NUM_THREADS when set (the launcher's --bind_cores_to_rank sets
    it), else this machine's cores shared among its ranks. Each rank otherwise takes every core: on 2 cores
    2 ranks ran 4 busy threads and trained at 30 samples/s instead of 83 (tiny, ZeRO-0)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    ranks_here = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // ranks_here)


def batch_layout(train: TrainConfig, world_size: int) -> BatchLayout:
    """Derive micro batch and accumulation from the global batch, or say what does not fit."""
    global_batch = train.global_batch_size
    if global_batch % world_size:
        fits = [count for count in range(1, min(global_batch, 4 * world_size) + 1) if global_batch % count == 0]
        raise ValueError(f"train.global_batch_size={global_batch} is not a multiple of the {world_size} processes; "
                         f"process counts that fit it: {', '.join(map(str, fits))}")
    micro = train.micro_batch_size or global_batch // world_size
    if global_batch % (micro * world_size):
        raise ValueError(f"train.global_batch_size={global_batch} is not micro batch x accumulation x world size: "
                         f"{micro} x ? x {world_size}; pick train.micro_batch_size dividing {global_batch // world_size}")
    return BatchLayout(global_batch, micro, global_batch // (micro * world_size), world_size)


def deepspeed_config(train: TrainConfig, layout: BatchLayout) -> tuple[dict, list[str]]:
    """The user's DeepSpeed config with batch sizes, precision and clipping filled in, and a note of each
    value mmscale set."""
    path = Path(train.deepspeed)
    shipped = Path(__file__).resolve().parents[2] / path  # configs/ of a source checkout, from any directory
    if not path.is_file() and not path.is_absolute() and shipped.is_file():
        path = shipped
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed {path}: no such file (see configs/deepspeed/)")
    config = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise ValueError(f"{path}: remove the {owned!r} section; mmscale builds AdamW and the warmup + cosine "
                             "schedule from train.* (it needs parameter groups)")
    filled = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": train.grad_clip if not manual_clipping(train, config) else 0.0,
    }
    notes = []
    for key, value in filled.items():
        if key in config and config[key] not in ("auto", value):
            raise ValueError(f"{path}: {key}={config[key]} disagrees with train.* ({value}); set it to \"auto\" "
                             "or remove it")
        config[key] = value
        notes.append(f"{key}={value}")
    if train.compile and zero_stage(config) == 3:
        raise ValueError(f"train.compile=true with ZeRO-3 ({path}) compiles nothing worth having: DeepSpeed's parameter "
                         "gathering hooks are compiler-disabled, so the graph breaks at every submodule. Compile with "
                         "ZeRO-1/2 (train.deepspeed=configs/deepspeed/zero2.json) where the model fits a device, or "
                         "train ZeRO-3 without compile")
    precision = resolve_precision(train.precision)[0]
    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
    if precision == "bf16" and "check_grad_overflow" not in config["bf16"]:
        # ZeRO-1/2 would scan every parameter's gradient for inf/NaN each step (an amin and an amax per
        # parameter, 300 small kernels for tiny, and a host read): bf16 has fp32's range, so the loss-scaling
        # check fp16 needs does not apply, and the loop already skips a NaN/inf loss on every rank before its
        # gradients are reduced (ZeRO-3 and fp32 runs have no such scan either).
        config["bf16"]["check_grad_overflow"] = False
        notes.append("bf16.check_grad_overflow=false")
    fp16 = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    config["fp16"] = {**fp16, **config.get("fp16", {}), "enabled": precision == "fp16"}
    notes.append(f"precision={precision}")
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu" and not torch.cuda.is_available():
        # Without a GPU the optimizer is on the CPU anyway: torch's AdamW steps there (make_optimizer), where
        # DeepSpeed would insist on its CPUAdam, a JIT build that buys nothing on this path.
        config.setdefault("zero_force_ds_cpu_optimizer", False)
        notes.append("zero_force_ds_cpu_optimizer=false (no GPU: torch AdamW on the CPU)")
    config.setdefault("steps_per_print", 10**9)  # mmscale logs progress itself
    return config, notes


def place_teacher(teacher: torch.nn.Module, ds_config: dict, device: torch.device) -> tuple[int, int]:
    """Put the distillation teacher (mmscale.losses.Teacher) where it runs; (values this rank holds, values in
    all). Beside a ZeRO-3 student a float teacher becomes a ZeRO-3 inference engine of its own (no optimizer,
    the student's precision and partitioning settings): each rank holds its share and the layers are gathered
    around their forward, as DeepSpeed-Chat holds its reference model, so a teacher larger than one device fits.
    Otherwise, and for a quantized teacher (bitsandbytes int8/nf4 weights or int8-cpu layers: ZeRO cannot split
    those), it is moved to `device` whole."""
    import deepspeed

    parameters = list(teacher.parameters())
    whole = sum(parameter.numel() for parameter in parameters)
    quantized = getattr(teacher.model, "cpu_only", False) or any(not p.is_floating_point() for p in parameters)
    if zero_stage(ds_config) != 3 or quantized:
        teacher.to(device)
        return whole, whole
    for parameter in teacher.model.zero3_external_parameters():  # read outside their owner's forward
        deepspeed.zero.register_external_parameter(teacher, parameter)
    world = int(ds_config["train_batch_size"]) // (int(ds_config["train_micro_batch_size_per_gpu"])
                                                     * int(ds_config["gradient_accumulation_steps"]))
    inference = {"train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
                 "train_batch_size": ds_config["train_micro_batch_size_per_gpu"] * world,
                 "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
                 "bf16": ds_config.get("bf16", {"enabled": False}), "fp16": ds_config.get("fp16", {"enabled": False}),
                 "zero_optimization": {key: value for key, value in ds_config["zero_optimization"].items()
                                       if not key.startswith("offload_optimizer")}}
    deepspeed.initialize(model=teacher, config=inference)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in teacher.parameters())
    return held, whole


def manual_clipping(train: TrainConfig, ds_config: dict) -> bool:
    """fp32 without ZeRO is the one path where DeepSpeed 0.19 clips gradients itself, and that code
    fails on 0-dim parameters (`logit_scale`); there the loop clips with torch instead."""
    return resolve_precision(train.precision)[0] == "fp32" and zero_stage(ds_config) == 0 and train.grad_clip > 0


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def parameter_groups(module: torch.nn.Module, weight_decay: float, *, lr: float = 0.0,
                     scaled: Iterable[torch.nn.Parameter] = (), lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: decay for matrices, none for norms, biases and the temperature (open_clip's rule).
    Under ZeRO-3 a parameter is a flat partition, so its true rank comes from `ds_shape`. With `lr_scale` != 1
    the `scaled` parameters (e.g. the image tower's) get groups of their own at `lr` x `lr_scale` (the schedule
    scales each group's own peak); the unscaled groups come first, so group 0's rate is train.lr's."""
    scaled_ids = {id(parameter) for parameter in scaled} if lr_scale != 1.0 else set()
    groups = []
    for in_scaled in (False, True):
        decay, no_decay = [], []
        for parameter in {id(p): p for p in module.parameters() if p.requires_grad}.values():
            if (id(parameter) in scaled_ids) != in_scaled:
                continue
            shape = getattr(parameter, "ds_shape", parameter.shape)
            (decay if len(shape) >= 2 else no_decay).append(parameter)
        rate = {"lr": lr * lr_scale} if in_scaled else {}
        groups += [{"params": params, "weight_decay": decay_rate} | rate
                   for params, decay_rate in ((decay, weight_decay), (no_decay, 0.0)) if params or not in_scaled]
    return groups


def make_optimizer(groups: list[dict], train: TrainConfig, ds_config: dict) -> torch.optim.Optimizer:
    """DeepSpeed's fused AdamW on GPUs, its CPU Adam with optimizer offload, torch's AdamW on CPU
    (DeepSpeed's fused kernels are JIT builds a CPU run does not need)."""
    settings = {"lr": train.lr, "betas": tuple(train.betas), "eps": train.eps}
    if train.optimizer == "adamw8bit":
        if zero_stage(ds_config) > 0:
            raise ValueError("train.optimizer=adamw8bit keeps whole 8-bit states and does not combine with ZeRO; use "
                             "train.deepspeed=configs/deepspeed/zero0.json (fine-tuning) or train.optimizer=adamw")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **settings)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if torch.cuda.is_available():
        if offload == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **settings)
        from deepspeed.ops.adam import FusedAdam

        set_cuda_arch_list()
        try:
            return FusedAdam(groups, adam_w_mode=True, **settings)
        except Exception as error:  # noqa: BLE001  # its kernel is a JIT build that needs nvcc and ninja
            import warnings

            warnings.warn(f"DeepSpeed's FusedAdam could not be built ({type(error).__name__}: {error}); training with "
                          "torch's fused AdamW instead (install DeepSpeed with DS_BUILD_FUSED_ADAM=1 to prebuild it)",
                          stacklevel=2)
            return torch.optim.AdamW(groups, fused=True, **settings)
    return torch.optim.AdamW(groups, **settings)


def set_cuda_arch_list(environ: dict | None = None) -> str:
    """TORCH_CUDA_ARCH_LIST for DeepSpeed's JIT builds (FusedAdam), set to this GPU's compute capability unless
    the user set it: left unset, DeepSpeed 0.19 reads torch's own arch list, whose `sm_90a` entry it cannot parse
    (`invalid literal for int() with base 10: '0a'`, DeepSpeed issue 7589), and the build fails."""
    environ = os.environ if environ is None else environ
    if not environ.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability()
        environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    return environ["TORCH_CUDA_ARCH_LIST"]


def lr_lambda(train: TrainConfig, total_steps: int):
    """Linear warmup to train.lr, then cosine decay to train.min_lr, as a factor of train.lr."""
    floor = train.min_lr / train.lr if train.lr else 0.0

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = min(1.0, (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _reinitialize(model: ImageTextModel, *, temperature_init: float) -> None:
    """Re-run each module's own initialization, then mmscale's (open_clip's scheme, as `new_towers` does
    without ZeRO-3), with its full parameters gathered, writing on rank 0: construction under ZeRO-3 can
    leave weights uninitialized (PITFALLS.md 2)."""
    from transformers import PreTrainedModel

    rank = torch.distributed.get_rank()
    owners = [(name, module) for name, module in model.named_modules() if isinstance(module, PreTrainedModel)]
    owners.sort(key=lambda item: -len(item[0]))  # innermost first: vision/text towers before the dual encoder
    # Children before parents, as transformers initializes: CLIPMLP's own std for fc1/fc2 must win over
    # the generic Linear init.
    for name, module in reversed(list(model.named_modules())):
        # Some inits set their children's weights (CLIPAttention sets q/k/v_proj), so gather a module's
        # own parameters and those of its leaf children: at most one block's matrices at a time.
        parameters = list(module.parameters(recurse=False)) + [
            parameter for child in module.children() if not list(child.children())
            for parameter in child.parameters(recurse=False)]
        owner = next((owner for prefix, owner in owners if name.startswith(prefix)), None)
        if not parameters or owner is None:  # the MLM head and SigLIP bias are mmscale's, set below
            continue
        with _gathered(parameters):
            if rank == 0:
                for parameter in parameters:  # transformers' init functions skip tensors flagged as done
                    parameter._is_hf_initialized = False
                owner._init_weights(module)
                init_module(module, towers_config=model.towers.config)
    with _gathered([model.logit_scale_parameter]):
        if rank == 0:
            model.logit_scale_parameter.data.fill_(math.log(1 / temperature_init))
    if model.logit_bias is not None:
        with _gathered([model.logit_bias]):
            if rank == 0:
                model.logit_bias.data.fill_(model.logit_bias_init)
    mlm_head = model.mlm_head if isinstance(model.mlm_head, MaskedLMHead) else None
    for head in (mlm_head, getattr(model, "vqa_head", None)):
        if head is not None:
            with _gathered(list(head.parameters())):
                if rank == 0:
                    head.reset_parameters()


@contextlib.contextmanager
def _gathered(parameters: list[torch.nn.Parameter]):
    """Whole parameters, writable on rank 0 and broadcast on exit. One `GatheredParameters` per
    parameter: DeepSpeed 0.19's coalesced gather waits only for its last all-gather, which on gloo
    lets earlier ones land after the caller has written (half-initialized weights, a different
    model every run)."""
    import deepspeed

    with contextlib.ExitStack() as stack:
        for parameter in parameters:
            stack.enter_context(deepspeed.zero.GatheredParameters([parameter], modifier_rank=0))
        yield


def build_objective(model_config: ModelConfig, loss: LossConfig, ds_config: dict, *, vocab_size: int,
                    token_ids: dict[str, int] | None = None,
                    vqa_answers: list[str] | None = None) -> PretrainingObjective | ClassificationObjective | VqaObjective:
    """The model with its losses. A new model under ZeRO-3 is built partitioned (`zero.Init`), so
    one larger than a device's memory can be built; a model started from a folder is loaded whole
    and partitioned by `deepspeed.initialize`. `token_ids`: the tokenizer's pad/cls/sep ids (a new fusion model's
    config names them); `vqa_answers`: the answer list of loss.objective=vqa's answer head."""
    import deepspeed

    bias = loss.siglip_bias_init if loss.contrastive == "siglip" else None
    starts_from_folder = bool(model_config.init_from or model_config.vision_from)
    mlm = model_config.mlm_head and loss.mlm_weight > 0 and loss.objective == "contrastive"
    if zero_stage(ds_config) == 3 and not starts_from_folder:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_marker = HfDeepSpeedConfig(ds_config)  # noqa: F841  # transformers partitions while it is alive
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(model_config, vocab_size=vocab_size, mlm_head=mlm, logit_bias_init=bias,
                                token_ids=token_ids, vqa_answers=vqa_answers)
        _reinitialize(model, temperature_init=model_config.temperature_init)
        model.keep_normalization_fp32()  # zero.Init made them in the training dtype
        del zero3_marker  # later models (consolidation, eval) are built whole (PITFALLS.md 4)
    else:
        model = build_model(model_config, vocab_size=vocab_size, mlm_head=mlm, logit_bias_init=bias,
                            token_ids=token_ids, vqa_answers=vqa_answers)
    for parameter in model.zero3_external_parameters():
        deepspeed.zero.register_external_parameter(model, parameter)
    if loss.objective == "classify":
        return ClassificationObjective(model, loss)
    if loss.objective == "vqa":
        return VqaObjective(model, loss)
    return PretrainingObjective(model, loss)
