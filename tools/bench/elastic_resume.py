#!/usr/bin/env python3
"""Elastic resume, end to end: a run killed on one number of ranks and resumed on another trains each
sample of the interrupted epoch exactly once, before any sample of the next epoch.

    python tools/bench/elastic_resume.py [--samples 1400] [--shards 3] [--cases 2:1,1:2,2:3,3:2]

Writes rendered-digit shards of unequal sizes (1,400 samples in 3 shards by default: 467, 467, 466), trains
`configs/pretrain/tiny.yaml` as shipped (its shuffle buffer of 256, data.workers=1) with
train.samples=1344 (inside epoch 0) and train.log_sample_keys=true, kills the last rank with SIGKILL right
after the checkpoint of step 8 (--kill during: in the middle of step 10 instead, so steps 9-10 run again),
resumes the same command on the other number of ranks and counts the keys of sample_keys/: the steps up to
the checkpoint from the killed run, the later ones from the resumed run. Prints one table; the last line is
JSON. The global batch is 64, or 48 where a case has 3 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def launch(ranks: int, overrides: list[str], env: dict | None = None) -> tuple[int, str]:
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(29500 + os.getpid() % 1000), "--module", "mmscale.train", "--config",
               str(REPO / "configs" / "pretrain" / "tiny.yaml"), *overrides]
    environment = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"} | (env or {})
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=1200)
    return result.returncode, result.stdout + result.stderr


def keys_by_step(output: Path) -> dict[tuple[int, int], list]:
    """(rank, step) -> [(key, epoch), ...]; a step logged twice keeps its last entry."""
    entries = {}
    for path in sorted((output / "sample_keys").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            entries[(rank, entry["step"])] = list(zip(entry["keys"], entry["epochs"]))
    return entries


def run_case(root: Path, common: list[str], old: int, new: int, kill: str, samples: int) -> dict:
    batch = 48 if 3 in (old, new) else 64
    output = root / f"run-{old}-{new}-{kill}"
    overrides = [*common, f"output_dir={output}", f"train.global_batch_size={batch}", "train.save_every_steps=8"]
    fault = {"MMSCALE_KILL_AFTER_CHECKPOINT": f"{old - 1}:8"} if kill == "after" else \
        {"MMSCALE_KILL_DURING_STEP": f"{old - 1}:10"}
    code, log = launch(old, overrides, fault)
    if code == 0 or (output / "checkpoints" / "latest").read_text() != "step00000008":
        raise SystemExit(f"case {old}->{new}: the run was not killed after the checkpoint of step 8:\n{log[-3000:]}")
    before = {(rank, step): pairs for (rank, step), pairs in keys_by_step(output).items() if step <= 8}
    (output / "sample_keys").rename(output / "sample_keys.killed")
    code, log = launch(new, overrides)
    if code != 0:
        raise SystemExit(f"case {old}->{new}: the resumed run failed:\n{log[-3000:]}")
    trained = [pair for pairs in [*before.values(), *keys_by_step(output).values()] for pair in pairs]
    keys = [key for key, _ in trained]
    epoch0 = [key for key, epoch in trained if epoch == 0]
    return {"case": f"{old} -> {new}", "kill": kill, "batch": batch, "trained": len(keys), "distinct": len(set(keys)),
            "repeated": len(keys) - len(set(keys)), "epoch_0": len(epoch0), "epoch_0_distinct": len(set(epoch0)),
            "later_epochs": len(keys) - len(epoch0), "budget": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1400, help="samples in the generated shards")
    parser.add_argument("--shards", type=int, default=3, help="number of (unequal) shards")
    parser.add_argument("--budget", type=int, default=1344, help="train.samples (inside epoch 0 by default)")
    parser.add_argument("--cases", default="2:1,1:2,2:3,3:2", help="old:new rank counts")
    parser.add_argument("--kill", default="after,during", help="after (the checkpoint of step 8), during (step 10)")
    args = parser.parse_args(argv)
    from mmscale.shards.synthetic import make_synthetic_shards
    from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece

    rows = []
    with tempfile.TemporaryDirectory(prefix="mmscale-elastic-") as scratch:
        root = Path(scratch)
        per_shard = -(-args.samples // args.shards)
        shards = make_synthetic_shards(root / "shards", args.samples, samples_per_shard=per_shard, seed=0,
                                       corpus_name="digits")
        train_wordpiece(iter_captions(str(root / "shards")), vocab_size=200, output_dir=root / "tokenizer")
        common = [f"data.train={'::'.join(shards)}", f"tokenizer={root / 'tokenizer'}", f"train.samples={args.budget}",
                  "train.log_sample_keys=true", "train.progress=false", "train.tensorboard=false",
                  "train.log_every_steps=4"]
        for case in args.cases.split(","):
            old, new = (int(part) for part in case.split(":"))
            for kill in args.kill.split(","):
                rows.append(run_case(root, common, old, new, kill, args.budget))
                print(json.dumps(rows[-1]), flush=True)
        sizes = json.loads((root / "shards" / "sizes.json").read_text())
    print(f"\n{args.samples} samples in shards of {sorted(sizes.values(), reverse=True)}, budget {args.budget}")
    print(f"{'case':8s} {'kill':7s} {'batch':>5s} {'trained':>8s} {'distinct':>8s} {'repeated':>8s} "
          f"{'epoch 0':>8s} {'later':>6s}")
    for row in rows:
        print(f"{row['case']:8s} {row['kill']:7s} {row['batch']:5d} {row['trained']:8d} {row['distinct']:8d} "
              f"{row['repeated']:8d} {row['epoch_0']:8d} {row['later_epochs']:6d}")
    exact = all(row["repeated"] == 0 and row["distinct"] == row["trained"] == args.budget for row in rows)
    print(json.dumps({"exact": exact, "rows": rows}))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
