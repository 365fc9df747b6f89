"""Does mmscale learn what open_clip learns? Both trainers on the same shards, in one run.

Generates rendered-character shards (mmscale.shards.synthetic: glyphs in several fonts, sizes,
positions, rotations and colours; the label is the character, so colour tells nothing), trains

- mmscale: `tiny`, DeepSpeed through its launcher on 2 CPU ranks, CLIP + masked-LM
  (configs/pretrain/tiny.yaml: ZeRO-2, the stage tiny ships with), and again under ZeRO-3
  (configs/deepspeed/zero3.json, the stage of models that do not fit a device), and
- mmscale again with `model.fusion_layers=4` (BLIP-style cross-attention, ITM and image-conditioned MLM;
  its contrastive part is scored the same way, and its held-out masked-LM accuracy is printed), and
- open_clip: its own trainer (`open_clip_train.main`) with a matched ViT/text transformer
  (tools/bench/open_clip_driver.py), one process,

with the same batch, epochs, learning rate, warmup and weight decay, then scores both zero-shot on
held-out shards with the same class names and templates. open_clip's webdataset loader needs
webdataset 0.2.x, so open_clip is installed into its own `--target` folder (--open-clip-dir) and put
on its PYTHONPATH only. mmscale's wall time is its whole training command, from the `deepspeed` launcher's
start (about 14 s of imports and process start-up before the first step) to its exit; open_clip's is its
`main()` alone, after its imports: the comparison leans towards open_clip by a few seconds.

    python tools/bench/learning.py                          # characters, 4,000 pairs x 6 epochs
    python tools/bench/learning.py --corpus digits --train-samples 1400 --epochs 10
    python tools/bench/learning.py --seeds 3                # mean and spread over 3 seeds per trainer

The last line is one JSON object: {"mmscale_top1", "open_clip_top1", "mmscale_seconds", "open_clip_seconds",
"mmscale_zero3_top1", "mmscale_zero3_seconds", "mmscale_fusion_top1", "mmscale_fusion_seconds",
"mmscale_fusion_mlm_accuracy"}, means over the seeds (with --seeds > 1 also the per-seed
top-1 lists); the first four are the shipped config's.
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

OPEN_CLIP_PACKAGES = ("open-clip-torch==3.3.0", "webdataset==0.2.86", "timm", "ftfy", "braceexpand", "wcwidth",
                      "pandas", "pytz", "tzdata")


def ensure_open_clip(folder: Path) -> None:
    """open_clip and webdataset 0.2.x in their own folder, installed once (no effect on this environment)."""
    if (folder / "open_clip_train" / "main.py").is_file() and (folder / "webdataset").is_dir():
        return
    print(f"installing open_clip into {folder} ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(folder),
                    *OPEN_CLIP_PACKAGES], check=True)


def make_data(root: Path, *, corpus: str, train_samples: int, test_samples: int, per_shard: int) -> dict:
    """Train and held-out shards of one corpus, its zero-shot files and a WordPiece tokenizer."""
    from mmscale.shards.synthetic import make_synthetic_shards, write_zeroshot_files
    from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece

    train = make_synthetic_shards(root / "train", train_samples, samples_per_shard=per_shard, seed=0,
                                  corpus_name=corpus)
    test = make_synthetic_shards(root / "test", test_samples, samples_per_shard=per_shard, seed=1,
                                 corpus_name=corpus)
    classnames, templates = write_zeroshot_files(root, corpus)
    train_wordpiece(iter_captions(str(root / "train")), vocab_size=1000, output_dir=root / "tokenizer")
    brace = f"{root / 'train'}/shard-{{000000..{len(train) - 1:06d}}}.tar"
    return {"train": brace, "test": str(root / "test"), "test_glob": str(root / "test" / "*.tar"), "count": len(train),
            "tokenizer": str(root / "tokenizer"), "classnames": str(classnames), "templates": str(templates),
            "test_files": test}


def run_mmscale(data: dict, args, output: Path, *extra: str, repo: Path = REPO) -> tuple[float, float, list[dict]]:
    """(zero-shot top-1, training seconds, train metrics) of mmscale's tiny on 2 ranks, with `extra` overrides,
    trained by the mmscale of `repo` (another checkout: an earlier version) and scored by this one."""
    env = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    if repo != REPO:
        env["PYTHONPATH"] = str(repo)  # ahead of this checkout's editable install
    from mmscale.config import merge_overrides
    from mmscale.train.engine import free_port

    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
               "--master_port", str(free_port()), "--module", "mmscale.train",
               "--config", str(repo / "configs" / "pretrain" / "tiny.yaml"), *merge_overrides(
                   f"output_dir={output}", f"data.train={data['train']}", f"tokenizer={data['tokenizer']}",
                   f"train.samples={args.train_samples * args.epochs}", f"train.global_batch_size={args.batch}",
                   f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}", f"train.weight_decay={args.wd}",
                   "train.min_lr=0", "train.progress=false", "train.tensorboard=false",
                   f"train.save_every_steps={10**9}", *extra, *args.mmscale_overrides)]
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = output.parent / f"{output.name}.log"
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"mmscale training failed (log: {log}):\n{result.stderr[-3000:]}")
    evaluation = subprocess.run(
        [sys.executable, "-m", "mmscale.cli", "eval", "zeroshot", "--checkpoint", str(output / "final"),
         "--data", data["test"], "--classnames", data["classnames"], "--templates", data["templates"]],
        cwd=REPO, env=env, capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return json.loads(evaluation.stdout.strip().splitlines()[-1])["top1"], seconds, [
        record for record in records if record["kind"] == "train"]


def steady_rate(records: list[dict]) -> float:
    """Mean training pairs/s of a run's log windows after the first (which holds the start-up)."""
    return sum(r["samples_per_second"] for r in records[1:]) / max(1, len(records) - 1)


def run_open_clip(data: dict, args, output: Path, seed: int = 0) -> tuple[float, float]:
    """(zero-shot top-1, training seconds) of open_clip's trainer on the same shards."""
    env = os.environ | {"PYTHONPATH": str(args.open_clip_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(REPO / "tools" / "bench" / "open_clip_driver.py"), "--train", data["train"],
               "--train-samples", str(args.train_samples), "--test", data["test_glob"],
               "--classnames", data["classnames"], "--templates", data["templates"], "--tokenizer", data["tokenizer"],
               "--output", str(output), "--epochs", str(args.epochs), "--batch-size", str(args.batch),
               "--lr", str(args.lr), "--warmup", str(args.warmup), "--wd", str(args.wd), "--seed", str(seed)]
    output.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, cwd=output.parent, env=env, capture_output=True, text=True)
    (output.parent / "open_clip.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"open_clip failed (log: {output.parent / 'open_clip.log'}):\n{result.stderr[-3000:]}")
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    return numbers["top1"], numbers["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="characters", help="mmscale.shards.synthetic corpus (characters, digits, forms)")
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--test-samples", type=int, default=620)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--ranks", type=int, default=2, help="mmscale's CPU ranks")
    parser.add_argument("--open-clip-dir", type=Path, default=Path.home() / ".cache" / "mmscale" / "open_clip_bench",
                        help="where open_clip and webdataset 0.2.x are installed (once)")
    parser.add_argument("--output", type=Path, help="keep data, runs and logs here (default: a temporary folder)")
    parser.add_argument("--skip-open-clip", action="store_true", help="train mmscale only")
    parser.add_argument("--skip-zero3", action="store_true", help="leave out mmscale's ZeRO-3 run")
    parser.add_argument("--skip-fusion", action="store_true", help="leave out the fusion run (model.fusion_layers: "
                        "CLIP + ITM + image-conditioned MLM), whose contrastive part is scored like the dual encoder's")
    parser.add_argument("--patch-dropout", type=float, default=0.0, help="add a run with this model.patch_dropout")
    parser.add_argument("--before", metavar="GIT_REF", help="add a run trained by mmscale at this commit (a git "
                        "worktree of this checkout), for before/after comparisons")
    parser.add_argument("--seeds", type=int, default=1, help="train every row with seeds 0..N-1 and report the "
                        "mean and spread (zero-shot scores of a run this short move by a few points between seeds)")
    parser.add_argument("mmscale_overrides", nargs="*", help="extra key=value overrides for mmscale")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if not args.skip_open_clip:
        ensure_open_clip(args.open_clip_dir)
    rows: dict[str, list] = {}  # row label -> [(top-1, seconds, train records or None) per seed]
    fusion_mlm, fusion_mlm_blind = [], []  # the fusion run's held-out masked-LM accuracy with and without the image
    with tempfile.TemporaryDirectory(prefix="mmscale-learning-") as scratch:
        root = args.output or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        data = make_data(root / "data", corpus=args.corpus, train_samples=args.train_samples,
                         test_samples=args.test_samples, per_shard=args.per_shard)
        chance = 1 / len(Path(data["classnames"]).read_text().split())
        print(f"{args.corpus}: {args.train_samples} training / {args.test_samples} held-out pairs; "
              f"{args.epochs} epochs of batch {args.batch}, lr {args.lr}, warmup {args.warmup}; "
              f"{args.seeds} seed{'s' * (args.seeds > 1)}", flush=True)
        checkout = None
        if args.before:
            checkout = Path(scratch) / "before"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(checkout), args.before],
                           check=True, capture_output=True)
        try:
            for seed in range(args.seeds):
                for label, result in runs_of_seed(data, args, root / f"seed{seed}", seed, checkout):
                    rows.setdefault(label, []).append(result)
                    if label == FUSION:
                        accuracy, blind = masked_lm_accuracy(root / f"seed{seed}" / "mmscale_fusion" / "final", data)
                        fusion_mlm.append(accuracy)
                        fusion_mlm_blind.append(blind)
                    print(f"seed {seed}: {label}: zero-shot top-1 {result[0]:.3f}, {result[1]:.1f} s", flush=True)
        finally:
            if checkout is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(checkout)], check=False)
    curve = rows[SHIPPED][0][2]
    print("\ncontrastive loss (mmscale, seed 0): " + ", ".join(f"{r['step']}: {r['contrastive_loss']:.2f}" for r in curve))
    print(f"\n{'trainer':40s} {'zero-shot top-1':>22s} {'train seconds':>16s} {'pairs/s':>8s}")
    for label, results in rows.items():
        top1, seconds = mean_and_spread([r[0] for r in results], 3), mean_and_spread([r[1] for r in results], 1)
        rate = f"{sum(steady_rate(r[2]) for r in results) / len(results):8.0f}" if results[0][2] else f"{'':8s}"
        print(f"{label:40s} {top1:>22s} {seconds:>16s} {rate}")
    print(f"(mean +- standard deviation over {args.seeds} seed{'s' * (args.seeds > 1)}; pairs/s after the first log "
          f"window; chance {chance:.3f}; {os.cpu_count()} cores)")
    summary = {"mmscale_top1": mean(rows, SHIPPED, 0, 4), "open_clip_top1": mean(rows, OPEN_CLIP, 0, 4),
               "mmscale_seconds": mean(rows, SHIPPED, 1, 1), "open_clip_seconds": mean(rows, OPEN_CLIP, 1, 1),
               "mmscale_zero3_top1": mean(rows, ZERO3, 0, 4), "mmscale_zero3_seconds": mean(rows, ZERO3, 1, 1),
               "mmscale_fusion_top1": mean(rows, FUSION, 0, 4), "mmscale_fusion_seconds": mean(rows, FUSION, 1, 1)}
    if fusion_mlm:
        summary["mmscale_fusion_mlm_accuracy"] = round(sum(fusion_mlm) / len(fusion_mlm), 4)
        print(f"fusion: image-conditioned masked-LM accuracy on the held-out captions {summary['mmscale_fusion_mlm_accuracy']:.3f}"
              f" (without the image {sum(fusion_mlm_blind) / len(fusion_mlm_blind):.3f})")
    if args.seeds > 1:
        summary |= {"seeds": args.seeds, "mmscale_top1_per_seed": [round(r[0], 4) for r in rows[SHIPPED]],
                    "open_clip_top1_per_seed": [round(r[0], 4) for r in rows.get(OPEN_CLIP, [])]}
    print(json.dumps(summary))
    return 0


SHIPPED, ZERO3, OPEN_CLIP = "mmscale tiny (ZeRO-2), 2 ranks", "mmscale tiny, ZeRO-3, 2 ranks", "open_clip_train, 1 process"
FUSION = "mmscale tiny + fusion (ZeRO-2), 2 ranks"


def masked_lm_accuracy(final: Path, data: dict) -> tuple[float, float]:
    """(accuracy, accuracy_without_image) of `mmscale eval mlm` (random 15% masking) on the held-out shards."""
    env = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "mmscale.cli", "eval", "mlm", "--checkpoint", str(final), "--data",
                             data["test"]], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return summary["accuracy"], summary["accuracy_without_image"]


def runs_of_seed(data: dict, args, root: Path, seed: int, checkout: Path | None):
    """(row label, (top-1, seconds, train records or None)) of every trainer the arguments ask for, trained
    with `seed` (mmscale's train.seed and data.seed; open_clip's --seed)."""
    seeded = (f"train.seed={seed}", f"data.seed={seed}")
    yield SHIPPED, run_mmscale(data, args, root / "mmscale", *seeded)
    if not args.skip_zero3:
        yield ZERO3, run_mmscale(data, args, root / "mmscale_zero3", *seeded,
                                 f"train.deepspeed={REPO / 'configs' / 'deepspeed' / 'zero3.json'}")
    if not args.skip_fusion:  # the same budget and settings, with BLIP's cross-attention, ITM and conditioned MLM
        yield FUSION, run_mmscale(data, args, root / "mmscale_fusion", *seeded, "model.fusion_layers=4",
                                  "loss.itm_weight=1.0")
    if args.patch_dropout:
        yield f"mmscale tiny, patch dropout {args.patch_dropout:g}", run_mmscale(
            data, args, root / "mmscale_patch_dropout", *seeded, f"model.patch_dropout={args.patch_dropout}")
    if checkout is not None:
        yield f"mmscale tiny at {args.before} (before)", run_mmscale(data, args, root / "mmscale_before", *seeded,
                                                                     repo=checkout)
    if not args.skip_open_clip:
        yield OPEN_CLIP, (*run_open_clip(data, args, root / "open_clip", seed), None)


def mean_and_spread(values: list[float], digits: int) -> str:
    """"mean +- sample standard deviation" (the mean alone for one value)."""
    average = sum(values) / len(values)
    if len(values) == 1:
        return f"{average:.{digits}f}"
    spread = (sum((v - average) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{average:.{digits}f} +- {spread:.{digits}f}"


def mean(rows: dict, label: str, index: int, digits: int) -> float:
    """The mean over seeds of one number of a row; NaN for a row that was not run."""
    results = rows.get(label)
    return round(sum(r[index] for r in results) / len(results), digits) if results else float("nan")

if __name__ == "__main__":
    raise SystemExit(main())
