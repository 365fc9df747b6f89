#!/usr/bin/env python3
"""GradCache under ZeRO-3: pairs/s of `tiny` on 2 CPU ranks with and without whole-batch negatives.

    python tools/bench/gradcache.py [--steps 24] [--repeats 2] [--trees OLD_CHECKOUT,.]

Trains `configs/pretrain/tiny.yaml` under configs/deepspeed/zero3.json, global batch 64 as micro 16 x
accumulation 2 x 2 ranks, once with `loss.whole_batch_negatives=true` (GradCache: a feature pass, then a
gradient pass per micro-batch) and once with false, and reports the steady pairs/s (the mean of the log
windows after the first). With --trees, each source tree (a checkout of another commit, for a before/after
figure) runs the same layouts in turn, interleaved over --repeats so that a busy machine slows both alike.
Prints one table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(tree: Path, shards: Path, tokenizer: Path, output: Path, steps: int, whole_batch: bool) -> float:
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(29500 + os.getpid() % 1000), "--module", "mmscale.train", "--config",
               str(tree / "configs" / "pretrain" / "tiny.yaml"), f"data.train={shards}", f"tokenizer={tokenizer}",
               f"output_dir={output}", "train.deepspeed=" + str(tree / "configs" / "deepspeed" / "zero3.json"),
               "train.global_batch_size=64", "train.micro_batch_size=16", f"train.samples={64 * steps}",
               "train.log_every_steps=4", "train.progress=false", "train.tensorboard=false",
               f"train.save_every_steps={10**6}", f"loss.whole_batch_negatives={str(whole_batch).lower()}",
               "train.precision=fp32"]
    environment = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                                "PYTHONPATH": str(tree)}
    result = subprocess.run(command, cwd=tree, env=environment, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"training failed in {tree}:\n{(result.stdout + result.stderr)[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    windows = [record["samples_per_second"] for record in records if record.get("kind") == "train"][1:]
    return statistics.mean(windows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trees", default=".", help="comma-separated source trees to compare (default: this one)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from mmscale.shards.synthetic import make_synthetic_shards
    from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece

    trees = [Path(tree).resolve() for tree in args.trees.split(",")]
    results: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="mmscale-gradcache-") as scratch:
        root = Path(scratch)
        shards = root / "shards"
        make_synthetic_shards(shards, 2048, samples_per_shard=256, seed=0, corpus_name="characters")
        train_wordpiece(iter_captions(str(shards)), vocab_size=200, output_dir=root / "tokenizer")
        for repeat in range(args.repeats):
            for tree in trees:
                for whole_batch in (True, False):
                    output = root / f"run-{repeat}-{trees.index(tree)}-{whole_batch}"  # a fresh run each time
                    pairs = run(tree, shards, root / "tokenizer", output, args.steps, whole_batch)
                    results.setdefault((str(tree), whole_batch), []).append(pairs)
    print("| tree | layout | pairs/s (each repeat) | mean |")
    print("|---|---|---|---:|")
    table = []
    for (tree, whole_batch), values in results.items():
        layout = "GradCache (whole-batch negatives)" if whole_batch else "whole_batch_negatives=false"
        print(f"| {tree} | {layout} | {', '.join(f'{v:.0f}' for v in values)} | {statistics.mean(values):.0f} |")
        table.append({"tree": tree, "whole_batch_negatives": whole_batch, "pairs_per_second": values})
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
