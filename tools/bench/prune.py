"""Structured pruning: 25% of the attention heads and 25% of the MLP neurons of a trained `tiny`, what it costs in
held-out zero-shot, what a short recovery fine-tune gives back (taught by the unpruned model, and alone), and
what it saves in parameters, bytes and CPU time, on `tiny` and on a new `base`.

`tiny` trains for --epochs on rendered characters (the learning benchmark's corpus) through the DeepSpeed launcher
on 2 CPU ranks; `mmscale prune` calibrates on --calibration of its training pairs; the pruned folder is read back by
plain `transformers.AutoModel` (it must load there); then two recovery runs of --recovery-epochs start from it
(`model.init_from=`), one with `distill.teacher=` the unpruned final/ and one without. Each model is scored by
held-out zero-shot top-1 (`mmscale eval zeroshot`, prompt ensembling over the corpus's templates). Speed: a new
`base` (random weights: speed does not depend on training) pruned by weight magnitude, the float and pruned models
timed in turn within each round (tools/bench/compress.py's best_rates), the fastest round each.

    python tools/bench/prune.py
    python tools/bench/prune.py --epochs 4 --recovery-epochs 1 --speed-preset tiny     # a quick look

The last line is one JSON object: {"zeroshot": {model: top1}, "tiny": prune report numbers, "speed": {preset,
rows}} and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compress import best_rates, make_model  # noqa: E402
from learning import REPO, make_data, run_mmscale  # noqa: E402

REPORT_KEYS = ("removed", "parameters_before", "parameters_after", "bytes_before", "bytes_after", "image_cosine_mean",
               "text_cosine_mean", "images_per_second_before", "images_per_second_after", "texts_per_second_before",
               "texts_per_second_after")


def mmscale(*arguments: str) -> str:
    """The stdout of one `mmscale` command (it must succeed)."""
    env = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "mmscale.cli", *arguments], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"mmscale {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def zeroshot(folder: Path, data: dict) -> float:
    out = mmscale("eval", "zeroshot", "--checkpoint", str(folder), "--data", data["test"],
                  "--classnames", data["classnames"], "--templates", data["templates"])
    return json.loads(out.strip().splitlines()[-1])["top1"]


def prune(source: Path, target: Path, args, *data_arguments: str) -> dict:
    mmscale("prune", "--checkpoint", str(source), "--out", str(target), "--heads", str(args.heads),
            "--mlp", str(args.mlp), *data_arguments)
    return json.loads((target / "prune_report.json").read_text())


def loads_in_transformers(folder: Path) -> str:
    """The class plain transformers reads the pruned folder as, and its MLP width (it must be the pruned one)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder)
    vision = model.config.vision_config
    return f"{type(model).__name__} (vision intermediate_size {vision.intermediate_size})"


def speed(args, root: Path) -> dict:
    """Images/s and texts/s of a new `--speed-preset` model and of it pruned by weight magnitude."""
    import torch

    from mmscale.data.text import load_tokenizer
    from mmscale.export.quantize import sample_inputs
    from mmscale.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    make_model(root / "float", args.speed_preset)
    report = prune(root / "float", root / "pruned", args)
    models = {name: load_model(root / name, mlm_head=False).eval() for name in ("float", "pruned")}
    images, texts = sample_inputs(models["float"], load_tokenizer(root / "float"), count=args.batch_speed,
                                  context_length=64)
    rates = best_rates(models, images, texts, args.rounds)
    return {"preset": args.speed_preset, "threads": torch.get_num_threads(), "batch": args.batch_speed,
            "parameters_before": report["parameters_before"]["stored"],
            "parameters_after": report["parameters_after"]["stored"],
            "rows": rates, "images_speedup": rates["pruned"]["images_per_second"] / rates["float"]["images_per_second"],
            "texts_speedup": rates["pruned"]["texts_per_second"] / rates["float"]["texts_per_second"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="characters")
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--test-samples", type=int, default=620)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=12, help="the unpruned model's epochs")
    parser.add_argument("--recovery-epochs", type=int, default=2)
    parser.add_argument("--recovery-lr", type=float, default=3e-4)
    parser.add_argument("--heads", type=float, default=0.25)
    parser.add_argument("--mlp", type=float, default=0.25)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--speed-preset", default="base")
    parser.add_argument("--batch-speed", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the speed rows (0: torch's default)")
    parser.add_argument("--output", type=Path, help="keep data and runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.mmscale_overrides = ["train.seed=0", "data.seed=0", "data.workers=1"]
    with tempfile.TemporaryDirectory() as scratch:
        root = args.output or Path(scratch)
        data = make_data(root / "data", corpus=args.corpus, train_samples=args.train_samples,
                         test_samples=args.test_samples, per_shard=args.per_shard)
        print(f"tiny: {args.epochs} epochs ...", flush=True)
        unpruned, seconds, _ = run_mmscale(data, args, root / "tiny")
        teacher = root / "tiny" / "final"
        report = prune(teacher, root / "pruned", args, "--data", data["train"], "--calibration", str(args.calibration))
        loaded_as = loads_in_transformers(root / "pruned")
        top1 = {"unpruned": unpruned, "pruned": zeroshot(root / "pruned", data)}
        recovery = argparse.Namespace(**vars(args) | {"epochs": args.recovery_epochs, "lr": args.recovery_lr})
        start = f"model.init_from={root / 'pruned'}"
        print(f"recovery: {args.recovery_epochs} epochs, taught and alone ...", flush=True)
        top1["recovered_distilled"] = run_mmscale(data, recovery, root / "recovered", start,
                                                  f"distill.teacher={teacher}")[0]
        top1["recovered_alone"] = run_mmscale(data, recovery, root / "recovered_alone", start)[0]
        top1["unpruned_more"] = run_mmscale(data, recovery, root / "unpruned_more", f"model.init_from={teacher}")[0]
        print(f"speed: {args.speed_preset} ...", flush=True)
        rates = speed(args, root / "speed")
    tiny = {key: report[key] for key in REPORT_KEYS if key in report}
    print(f"\n{args.corpus}: {args.train_samples} training / {args.test_samples} held-out pairs, batch {args.batch}, "
          f"{args.ranks} ranks, seed 0; {args.heads:.0%} of heads and {args.mlp:.0%} of MLP neurons pruned, "
          f"calibrated on {args.calibration} training pairs; the pruned folder loads in transformers as {loaded_as}")
    print("| model | held-out zero-shot top-1 |")
    print("|---|---:|")
    labels = {"unpruned": f"tiny, {args.epochs} epochs ({seconds:.0f} s)", "pruned": "pruned, no fine-tune",
              "recovered_distilled": f"pruned + {args.recovery_epochs} epochs, distill.teacher=unpruned",
              "recovered_alone": f"pruned + {args.recovery_epochs} epochs, alone",
              "unpruned_more": f"unpruned + the same {args.recovery_epochs} epochs (control)"}
    for name, value in top1.items():
        print(f"| {labels[name]} | {value:.3f} |")
    before, after = tiny["parameters_before"], tiny["parameters_after"]
    print(f"\ntiny: towers' parameters {before['stored']:,} -> {after['stored']:,} stored ({after['nonzero']:,} "
          f"nonzero), bytes {tiny['bytes_before']:,} -> {tiny['bytes_after']:,}, embedding cosine to the unpruned "
          f"{tiny['image_cosine_mean']:.3f} (images) / {tiny['text_cosine_mean']:.3f} (texts)")
    print(f"\n{rates['preset']} (random weights, magnitude importance), batch {rates['batch']}, {rates['threads']} "
          f"threads, best of {args.rounds} rounds: parameters {rates['parameters_before']:,} -> "
          f"{rates['parameters_after']:,}")
    print("| model | images/s | texts/s |")
    print("|---|---:|---:|")
    for name, row in rates["rows"].items():
        print(f"| {name} | {row['images_per_second']:.1f} | {row['texts_per_second']:.1f} |")
    print(f"| speed-up | {rates['images_speedup']:.2f}x | {rates['texts_speedup']:.2f}x |")
    print(json.dumps({"zeroshot": {name: round(value, 4) for name, value in top1.items()}, "tiny": tiny,
                      "speed": rates, "heads": args.heads, "mlp": args.mlp, "epochs": args.epochs,
                      "recovery_epochs": args.recovery_epochs, "recovery_lr": args.recovery_lr}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
