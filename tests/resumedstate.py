"""What a (re)started training process holds right after it loaded its run's latest checkpoint.

`python tests/resumedstate.py DUMP --config FILE [key=value ...]`, one process per rank (through DeepSpeed's
launcher): builds the run as `mmscale train` does (`setup`, which switches to DeepSpeed's universal checkpoint
when the world size changed), loads the checkpoint (`load_checkpoint`, which converts it), then gathers every
trained parameter's fp32 master weight and Adam moments with DeepSpeed's own `safe_get_full_*` (collectives
under ZeRO-3) and rank 0 writes them to DUMP (torch.save). Nothing is trained. tests/test_train.py compares a
re-partitioned load with DeepSpeed's offline consolidation and with a load on the saving world size.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from mmscale.config import load_config
    from mmscale.train.checkpoints import latest_tag, load_checkpoint
    from mmscale.train.config import TrainRunConfig
    from mmscale.train.loop import setup

    dump, flag, config_file, *overrides = [arg for arg in argv if not arg.startswith("--local_rank")]
    if flag != "--config":
        raise SystemExit("usage: resumedstate.py DUMP --config FILE [key=value ...]")
    config = load_config(TrainRunConfig, config_file, overrides)
    run = setup(config)
    root = run.output / "checkpoints"
    progress, _ = load_checkpoint(run.engine, root, latest_tag(root), seed=config.train.seed)
    state = {}
    for name, parameter in run.engine.module.named_parameters():
        if parameter.requires_grad:
            state[name] = {"weight": safe_get_full_fp32_param(parameter).detach().cpu().clone(),
                           "exp_avg": safe_get_full_optimizer_state(parameter, "exp_avg").detach().cpu().clone(),
                           "exp_avg_sq": safe_get_full_optimizer_state(parameter, "exp_avg_sq").detach().cpu().clone()}
    if dist.get_rank() == 0:
        torch.save({"step": progress.step, "parameters": state}, dump)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
