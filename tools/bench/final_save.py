"""`final/` at the end of a ZeRO-3 run: time and peak memory of gathering the fp32 master weights, before
(DeepSpeed's zero_to_fp32 on rank 0 reading every rank's checkpoint files while the others wait) and
after (mmscale's gather_fp32_weights: every rank hands over its in-memory partitions, one parameter at a
time), each in its own DeepSpeed job (a fresh heap) on the same model, batch and seed. Both must give the
same weights, bit for bit.

    python tools/bench/final_save.py --preset base            # 2 CPU ranks through the deepspeed launcher

Each job builds the preset under ZeRO-3, takes one optimizer step on a synthetic batch (so Adam's moments
exist, as in a real checkpoint), saves a checkpoint, then runs its method. Peak memory is the largest resident
set size a sampler saw during each, above the rank's resident size before it. Prints a table; the last
line is one JSON object {"before": {...}, "after": {...}} with seconds and peak MiB per rank.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """The largest resident set size seen while the block runs (sampled every 5 ms), above its start."""

    def __enter__(self):
        self.start = self.peak = rss_mib()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_mib())

    @property
    def added(self) -> float:
        return self.peak - self.start


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from mmscale.losses import LossConfig
    from mmscale.models import ModelConfig
    from mmscale.models.checkpoint import skeleton_like
    from mmscale.train.checkpoints import Progress, consolidate, gather_fp32_weights, save_checkpoint
    from mmscale.train.config import TrainConfig
    from mmscale.train.engine import (
        batch_layout,
        build_objective,
        deepspeed_config,
        init_distributed,
        make_optimizer,
        parameter_groups,
    )
    from tools.bench.train_throughput import VOCAB, synthetic_batch

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    train = TrainConfig(global_batch_size=args.batch * world, precision="bf16" if args.bf16 else "fp32",
                        deepspeed=str(REPO / "configs" / "deepspeed" / "zero3.json"))
    ds_config, _ = deepspeed_config(train, batch_layout(train, world))
    torch.manual_seed(0)  # the same model in both jobs
    objective = build_objective(ModelConfig(preset=args.preset, vocab_size=VOCAB), LossConfig(), ds_config,
                                vocab_size=VOCAB)
    optimizer = make_optimizer(parameter_groups(objective, 0.2), train, ds_config)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds_config)
    image_size = objective.model.image_size
    engine.backward(engine(**synthetic_batch(args.batch, image_size, engine.device, rank)).total)
    engine.step()
    root = Path(args.output) / "checkpoints"
    tag = save_checkpoint(engine, root, progress=Progress(step=1), loader_state={}, keep=1)
    model = objective.model
    dist.barrier()
    started = time.perf_counter()
    with PeakRss() as memory:
        if args.method == "before":
            weights = consolidate(root, tag, skeleton_like(model)) if rank == 0 else None
        else:
            weights = gather_fp32_weights(model, skeleton_like(model) if rank == 0 else None)
        dist.barrier()  # under "before" the other ranks wait here, as the trainer's did
    result = (time.perf_counter() - started, memory.added)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        digests = {name: hashlib.sha1(tensor.detach().float().numpy().tobytes()).hexdigest()
                   for name, tensor in weights.state_dict().items()}
        report = {"seconds": round(max(r[0] for r in gathered), 2), "peak_mib_per_rank": [round(r[1]) for r in gathered],
                  "parameters": sum(p.numel() for p in weights.parameters()), "digests": digests}
        Path(args.output, f"{args.method}.json").write_text(json.dumps(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="samples per rank in the one training step")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 (fp32 masters either way)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from mmscale.train.engine import free_port

    report = {}
    with tempfile.TemporaryDirectory(prefix="mmscale-final-save-") as scratch:
        for method in ("before", "after"):
            command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
                       "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker", "--method", method,
                       "--output", scratch, "--preset", args.preset, "--batch", str(args.batch),
                       *(["--bf16"] if args.bf16 else [])]
            env = os.environ | {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
                                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"the {method} job failed:\n{(result.stdout + result.stderr)[-4000:]}")
            report[method] = json.loads(Path(scratch, f"{method}.json").read_text())
    differing = [name for name, digest in report["before"].pop("digests").items()
                 if report["after"]["digests"].get(name) != digest]
    report["after"].pop("digests")
    if differing:
        raise SystemExit(f"the two methods disagree on {len(differing)} tensors, e.g. {differing[:3]}")
    report |= {"preset": args.preset, "parameters": report["after"].pop("parameters"), "ranks": args.ranks,
               "identical_weights": True}
    report["before"].pop("parameters")
    print(f"{report['preset']}: {report['parameters']:,} parameters, ZeRO-3 on {report['ranks']} ranks; "
          "both give identical weights")
    print(f"{'final/ weights from':58s} {'seconds':>8s} {'peak MiB added per rank':>24s}")
    for method, label in (("before", "checkpoint files, rank 0 alone (zero_to_fp32)"),
                          ("after", "in-memory partitions, every rank (gather_fp32_weights)")):
        print(f"{label:58s} {report[method]['seconds']:8.2f} {str(report[method]['peak_mib_per_rank']):>24s}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
