"""Where should ITM hard negatives come from: the rank's micro-batch or every rank's? Both, in one run.

Trains `configs/pretrain/tiny_fusion.yaml` (CLIP + ITM + image-conditioned MLM) on the same generated shards
through the DeepSpeed launcher on 2 CPU ranks, once with `loss.itm_negatives=micro_batch` and once with `global`
(the image tokens gathered with gradient; captions padded to data.context_length in both runs, so the caption
length is no difference between them), and once more with the shipped default, micro-batch negatives and
captions padded to each batch's longest (what global negatives' fixed length costs). Each saved model is scored
on held-out shards with `mmscale eval retrieval --rerank K`: ITM accuracy (each pair and its hardest caption of
the batch), contrastive and re-ranked recall@1, and with `--label-groups` (templated captions: which template a
caption used is nowhere in its image) also by label (`--match-labels`); and with `mmscale eval mlm --words` on
the corpus's class names (colours, characters), with and without the image. Wall time is the whole training
command; pairs/s the mean of the log windows after the first.

    python tools/bench/itm_negatives.py                                   # shapes, 400 steps of 64
    python tools/bench/itm_negatives.py --corpus characters --steps 3000 --label-groups --mlm-weight 0.5 \
        --modes micro_batch_longest                                       # issue 27's characters acceptance run

The last line is one JSON object: per mode ("micro_batch", "global", "micro_batch_longest"), {"seconds",
"pairs_per_second", "itm_loss", "itm_accuracy", "i2t_r1", "t2i_r1", "rerank_i2t_r1", "rerank_t2i_r1",
"mlm_accuracy", "mlm_accuracy_without_image"} and with --label-groups "label_i2t_r1", "label_t2i_r1",
"label_rerank_i2t_r1", "label_rerank_t2i_r1".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import make_data, steady_rate  # noqa: E402

# Each run's overrides: global negatives need one caption length on every rank (data.pad_to_longest=false), so the
# comparison is at that length; `micro_batch_longest` is the shipped default (captions padded to the batch's
# longest), for what that padding costs.
MODES = {"micro_batch": ["loss.itm_negatives=micro_batch", "data.pad_to_longest=false"],
         "global": ["loss.itm_negatives=global", "data.pad_to_longest=false"],
         "micro_batch_longest": ["loss.itm_negatives=micro_batch", "data.pad_to_longest=true"]}
ENV = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def train(data: dict, args, mode: str, output: Path) -> tuple[float, list[dict]]:
    """(wall seconds, train records) of tiny_fusion with `mode`'s negatives."""
    from mmscale.config import merge_overrides
    from mmscale.train.engine import free_port

    overrides = [f"output_dir={output}", f"data.train={data['train']}", f"tokenizer={data['tokenizer']}",
                 f"train.samples={args.steps * args.batch}", f"train.global_batch_size={args.batch}",
                 f"train.seed={args.seed}", f"data.seed={args.seed}", *MODES[mode],
                 f"data.context_length={args.context_length}",
                 f"loss.mlm_weight={args.mlm_weight}", f"loss.itm_label_groups={str(args.label_groups).lower()}",
                 "train.progress=false", "train.tensorboard=false", f"train.save_every_steps={10**9}",
                 f"train.log_every_steps={max(1, args.steps // 20)}", *args.overrides]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
               "--master_port", str(free_port()), "--module", "mmscale.train",
               "--config", str(REPO / "configs" / "pretrain" / "tiny_fusion.yaml"), *merge_overrides(*overrides)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = output.parent / f"{output.name}.log"
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"training {mode} failed (log: {log}):\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return seconds, [record for record in records if record["kind"] == "train"]


def mmscale(*arguments: str) -> dict:
    """The JSON last line of `python -m mmscale.cli ARGUMENTS`."""
    result = subprocess.run([sys.executable, "-m", "mmscale.cli", *arguments], cwd=REPO, env=ENV,
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"mmscale {' '.join(arguments[:2])} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


RECALLS = ("i2t_r1", "t2i_r1", "rerank_i2t_r1", "rerank_t2i_r1")


def score(data: dict, args, final: Path) -> dict:
    """Re-ranked retrieval and ITM accuracy (by label too with --label-groups), and conditioned MLM accuracy
    on the class names, of a saved fusion model on the held-out shards."""
    common = ["--checkpoint", str(final), "--data", data["test"], "--context-length", str(args.context_length),
              "--batch-size", str(args.batch)]
    retrieval = ["eval", "retrieval", *common, "--rerank", str(args.rerank)]
    scores = mmscale(*retrieval, *(["--itm-label-groups"] if args.label_groups else []))
    if args.label_groups:
        by_label = mmscale(*retrieval, "--itm-label-groups", "--match-labels")
        scores |= {f"label_{name}": by_label[name] for name in RECALLS}
    words = mmscale("eval", "mlm", *common, "--words", data["classnames"])
    return scores | {"mlm_accuracy": words["accuracy"], "mlm_accuracy_without_image": words["accuracy_without_image"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="shapes", help="mmscale.shards.synthetic corpus (default shapes)")
    parser.add_argument("--train-samples", type=int, default=8192)
    parser.add_argument("--test-samples", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of --batch pairs (default 400)")
    parser.add_argument("--batch", type=int, default=64, help="global batch (default 64: 32 per rank)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--context-length", type=int, default=32, help="caption tokens, both runs (default 32)")
    parser.add_argument("--mlm-weight", type=float, default=0.1)
    parser.add_argument("--label-groups", action="store_true", help="loss.itm_label_groups (templated captions)")
    parser.add_argument("--rerank", type=int, default=16, help="K of the re-ranked retrieval (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--workdir", default="", help="keep shards and runs here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="more config overrides for both runs (key=value)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        data = make_data(root / "data", corpus=args.corpus, train_samples=args.train_samples,
                         test_samples=args.test_samples, per_shard=args.per_shard)
        results = {}
        for mode in args.modes:
            print(f"training {mode} ({' '.join(MODES[mode])}) ...", flush=True)
            seconds, records = train(data, args, mode, root / mode)
            scores = score(data, args, root / mode / "final")
            results[mode] = {"seconds": round(seconds, 1), "pairs_per_second": round(steady_rate(records), 1),
                             "itm_loss": round(records[-1]["itm_loss"], 4)} | {
                name: round(value, 4) for name, value in scores.items()
                if name in ("itm_accuracy", *RECALLS, "mlm_accuracy", "mlm_accuracy_without_image")
                or name.startswith("label_")}
    print(f"\n{args.corpus}, {args.steps} steps of {args.batch} on {args.ranks} CPU ranks, re-ranking the top "
          f"{args.rerank}:\n")
    by_label = " | by label: R@1 / re-ranked, i2t; t2i" if args.label_groups else ""
    print(f"| negatives | ITM accuracy | MLM on class names, with / without image | R@1 i2t / t2i | re-ranked R@1 "
          f"i2t / t2i{by_label} | final ITM loss | train s | pairs/s |")
    print("|---|---:|---|---|---|" + ("---|" if by_label else "") + "---:|---:|---:|")
    for mode, row in results.items():
        label = (f" | {row['label_i2t_r1']:.3f} / {row['label_rerank_i2t_r1']:.3f}; {row['label_t2i_r1']:.3f} / "
                 f"{row['label_rerank_t2i_r1']:.3f}" if by_label else "")
        print(f"| {mode} | {row['itm_accuracy']:.3f} | {row['mlm_accuracy']:.3f} / "
              f"{row['mlm_accuracy_without_image']:.3f} | {row['i2t_r1']:.3f} / {row['t2i_r1']:.3f} | "
              f"{row['rerank_i2t_r1']:.3f} / {row['rerank_t2i_r1']:.3f}{label} | {row['itm_loss']:.3f} | "
              f"{row['seconds']:.1f} | {row['pairs_per_second']:.0f} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
