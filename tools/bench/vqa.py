"""VQA from a pretrained fusion model: pretrain `tiny` + fusion on a generated caption corpus, fine-tune it on the
same corpus's VQA shards, score held-out questions, float and int8.

For each corpus (shapes: colour / shape / background questions; characters: which character / digit or letter /
paper colour): `configs/pretrain/tiny_fusion.yaml` trains on caption shards through the DeepSpeed launcher on 2 CPU
ranks (tools/bench/itm_negatives.py's run), then `mmscale finetune --config configs/finetune/vqa.yaml` fine-tunes
the saved model (one process) on VQA shards of other images of that corpus (mmscale.shards.synthetic
.make_vqa_shards), and `mmscale eval vqa` scores held-out questions: VQA accuracy, per question type, beside the
question-only prior (each question type's most frequent answer); then `mmscale export --quantize int8` and the
same evaluation of the export.

    python tools/bench/vqa.py                                          # both corpora
    python tools/bench/vqa.py --corpora shapes --pretrain-steps 200 --vqa-steps 100   # a quick look

The last line is one JSON object: per corpus {"pretrain_seconds", "finetune_seconds", "accuracy",
"question_only_prior", "accuracy_<question type>"..., "int8_accuracy", "pretrain_steps", "vqa_steps"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from itm_negatives import REPO, mmscale  # noqa: E402
from itm_negatives import train as pretrain  # noqa: E402
from learning import make_data  # noqa: E402

# The pretraining that suits each corpus (issue 27's acceptance runs): characters' captions are templates of the
# label, so ITM draws no negative of the same label, and MLM weighs more (the names are what is to be read).
PRETRAIN = {"shapes": {"label_groups": False, "mlm_weight": 0.1}, "characters": {"label_groups": True, "mlm_weight": 0.5}}


def run_corpus(corpus: str, args, root: Path) -> dict:
    from mmscale.shards.synthetic import make_vqa_shards

    data = make_data(root / "captions", corpus=corpus, train_samples=args.caption_samples, test_samples=64,
                     per_shard=256)
    settings = argparse.Namespace(steps=args.pretrain_steps, batch=64, ranks=2, seed=args.seed, context_length=32,
                                  overrides=[], **PRETRAIN[corpus])
    print(f"{corpus}: pretraining tiny + fusion for {args.pretrain_steps} steps ...", flush=True)
    pretrain_seconds, _ = pretrain(data, settings, "micro_batch_longest", root / "pretrain")
    train = make_vqa_shards(root / "vqa-train", args.vqa_images, corpus=corpus, seed=10, samples_per_shard=256)
    test = make_vqa_shards(root / "vqa-test", args.test_images, corpus=corpus, seed=11, samples_per_shard=256)
    print(f"{corpus}: VQA fine-tuning for {args.vqa_steps} steps ...", flush=True)
    started = time.perf_counter()
    mmscale("finetune", "--checkpoint", str(root / "pretrain" / "final"), "--config",
            str(REPO / "configs" / "finetune" / "vqa.yaml"), f"data.train={train}", f"output_dir={root / 'vqa'}",
            f"train.samples={args.vqa_steps * 64}", f"train.lr={args.lr}", "train.warmup_steps=20", "data.workers=1",
            f"train.seed={args.seed}", f"data.seed={args.seed}", "train.progress=false", "train.tensorboard=false",
            f"train.save_every_steps={10**9}")
    finetune_seconds = time.perf_counter() - started
    common = ["--data", str(test), "--context-length", "32"]
    scores = mmscale("eval", "vqa", "--checkpoint", str(root / "vqa" / "final"), *common)
    mmscale("export", "--checkpoint", str(root / "vqa" / "final"), "--out", str(root / "int8"))
    int8 = mmscale("eval", "vqa", "--checkpoint", str(root / "int8"), *common)
    return {"pretrain_seconds": round(pretrain_seconds, 1), "finetune_seconds": round(finetune_seconds, 1)} | {
        name: round(value, 4) if isinstance(value, float) else value for name, value in scores.items()} | {
        "int8_accuracy": round(int8["accuracy"], 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", nargs="+", choices=list(PRETRAIN), default=list(PRETRAIN))
    parser.add_argument("--caption-samples", type=int, default=8192, help="pretraining pairs (default 8192)")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="steps of 64 (default: shapes 600, "
                        "characters 2000)")
    parser.add_argument("--vqa-images", type=int, default=2048, help="fine-tuning images, 3 questions each")
    parser.add_argument("--test-images", type=int, default=256, help="held-out images, 3 questions each")
    parser.add_argument("--vqa-steps", type=int, default=0, help="fine-tuning steps of 64 questions (default: "
                        "shapes 300, characters 600)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="keep shards and runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for corpus in args.corpora:
            steps = args.pretrain_steps or {"shapes": 600, "characters": 2000}[corpus]
            vqa_steps = args.vqa_steps or {"shapes": 300, "characters": 600}[corpus]
            root = Path(args.workdir or scratch) / corpus
            results[corpus] = run_corpus(corpus, argparse.Namespace(**vars(args) | {"pretrain_steps": steps,
                                                                                    "vqa_steps": vqa_steps}), root)
            results[corpus] |= {"pretrain_steps": steps, "vqa_steps": vqa_steps}
    print("\n| corpus | pretrain steps (s) | VQA steps (s) | VQA accuracy | question-only prior | per question type "
          "| int8 accuracy |")
    print("|---|---|---|---:|---:|---|---:|")
    for corpus, row in results.items():
        types = ", ".join(f"{name.removeprefix('accuracy_')} {value:.3f}" for name, value in row.items()
                          if name.startswith("accuracy_"))
        print(f"| {corpus} | {row['pretrain_steps']} ({row['pretrain_seconds']:.0f}) | {row['vqa_steps']} "
              f"({row['finetune_seconds']:.0f}) | {row['accuracy']:.3f} | {row['question_only_prior']:.3f} | {types} "
              f"| {row['int8_accuracy']:.3f} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
