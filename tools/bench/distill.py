"""Distillation: a 2-layer student of `tiny` taught by a deeper, longer-trained teacher, against the same student
trained without one (same shards, steps and seed), on rendered characters (the learning benchmark's corpus).

The teacher (`tiny`, 4 layers per tower) trains first, for --teacher-epochs; then the student (`tiny` with 2 layers
per tower) trains for --epochs twice through the DeepSpeed launcher on 2 CPU ranks: alone, and with
`distill.teacher=` the teacher's final/ (KL to its image-text similarities over the global batch, weight
--distill-weight, plus the embedding cosine at --feature-weight). Each is scored by held-out zero-shot top-1
(`mmscale eval zeroshot`, prompt ensembling over the corpus's templates).

    python tools/bench/distill.py
    python tools/bench/distill.py --teacher-epochs 4 --epochs 2      # a quick look

The last line is one JSON object: {"teacher", "student", "distilled"} each {"top1", "seconds"}, and the settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import make_data, run_mmscale  # noqa: E402

# The teacher is `tiny` as shipped (4 layers per tower) trained twice as long: a 6-layer tower of width 192 stayed at
# the contrastive loss's chance value (ln 64) for all 750 steps of lr 1e-3 here.
TEACHER = ()
STUDENT = ("model.vision_layers=2", "model.text_layers=2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="characters")
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--test-samples", type=int, default=620)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6, help="the students' epochs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--feature-weight", type=float, default=0.0)
    parser.add_argument("--output", type=Path, help="keep data and runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.mmscale_overrides = ["train.seed=0", "data.seed=0", "data.workers=1"]
    with tempfile.TemporaryDirectory() as scratch:
        root = args.output or Path(scratch)
        data = make_data(root / "data", corpus=args.corpus, train_samples=args.train_samples,
                         test_samples=args.test_samples, per_shard=args.per_shard)
        teacher_args = argparse.Namespace(**vars(args) | {"epochs": args.teacher_epochs})
        print(f"teacher: {args.teacher_epochs} epochs ...", flush=True)
        results = {"teacher": run_mmscale(data, teacher_args, root / "teacher", *TEACHER)}
        print(f"student alone: {args.epochs} epochs ...", flush=True)
        results["student"] = run_mmscale(data, args, root / "student", *STUDENT)
        print(f"student distilled: {args.epochs} epochs ...", flush=True)
        results["distilled"] = run_mmscale(
            data, args, root / "distilled", *STUDENT, f"distill.teacher={root / 'teacher' / 'final'}",
            f"distill.weight={args.distill_weight}", f"distill.feature_weight={args.feature_weight}")
    print(f"\n{args.corpus}: {args.train_samples} training / {args.test_samples} held-out pairs, batch {args.batch}, "
          f"{args.ranks} ranks, seed 0")
    print("| model | epochs | zero-shot top-1 | training seconds |")
    print("|---|---:|---:|---:|")
    labels = {"teacher": "teacher: tiny, 4 + 4 layers", "student": "student: tiny, 2 + 2 layers, alone",
              "distilled": f"student, distilled (weight {args.distill_weight:g}, features {args.feature_weight:g})"}
    for name, (top1, seconds, _) in results.items():
        epochs = args.teacher_epochs if name == "teacher" else args.epochs
        print(f"| {labels[name]} | {epochs} | {top1:.3f} | {seconds:.0f} |")
    summary = {name: {"top1": round(top1, 4), "seconds": round(seconds, 1)} for name, (top1, seconds, _) in
               results.items()}
    print(json.dumps(summary | {"epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                                "distill_weight": args.distill_weight, "feature_weight": args.feature_weight}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
