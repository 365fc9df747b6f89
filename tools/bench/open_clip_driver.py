"""open_clip's own trainer and a zero-shot evaluation, for tools/bench/learning.py.

Runs in a separate interpreter with open_clip (and the webdataset 0.2.x its loader needs) on
PYTHONPATH, so nothing here imports mmscale. Prints one JSON line: {"top1": .., "seconds": ..}.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import tarfile
import time

import torch
import torch.nn.functional as F
from PIL import Image


def model_config(args, vocab_size: int) -> dict:
    """open_clip's config of a model matched to mmscale's `tiny` preset."""
    return {
        "embed_dim": args.embed_dim,
        "vision_cfg": {"image_size": args.image_size, "layers": args.layers, "width": args.width,
                       "head_width": args.width // args.heads, "mlp_ratio": 4.0, "patch_size": args.patch_size},
        "text_cfg": {"context_length": args.context_length, "vocab_size": vocab_size, "width": args.width,
                     "heads": args.heads, "layers": args.layers, "hf_tokenizer_name": args.tokenizer,
                     "tokenizer_kwargs": {"clean": "whitespace"}, "pool_type": "eos", "eos_id": args.eos_id,
                     "pad_id": args.pad_id},
    }


def read_test_set(spec_glob: str) -> tuple[list[Image.Image], list[int]]:
    images, labels = [], []
    for path in sorted(glob.glob(spec_glob)):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for sample in members.values():
            if "jpg" in sample and "cls" in sample:
                images.append(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
                labels.append(int(sample["cls"]))
    return images, labels


@torch.no_grad()
def zero_shot(model, preprocess, tokenizer, images, labels, classnames, templates) -> float:
    model.eval()
    weights = []
    for name in classnames:
        features = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
        weights.append(F.normalize(features.mean(0), dim=0))
    weights = torch.stack(weights)
    correct = 0
    for start in range(0, len(images), 256):
        batch = torch.stack([preprocess(image) for image in images[start:start + 256]])
        predicted = (F.normalize(model.encode_image(batch), dim=-1) @ weights.T).argmax(1)
        correct += int((predicted == torch.tensor(labels[start:start + 256])).sum())
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True, help="brace spec of the training shards")
    parser.add_argument("--train-samples", type=int, required=True)
    parser.add_argument("--test", required=True, help="glob of the held-out shards")
    parser.add_argument("--classnames", required=True)
    parser.add_argument("--templates", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--context-length", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    import open_clip
    from open_clip_train.main import main as train_main
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True, trust_remote_code=False)
    args.eos_id, args.pad_id = hf.sep_token_id, hf.pad_token_id
    name = "mmscale-bench-tiny"
    config_dir = os.path.join(args.output, "model_configs")
    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, f"{name}.json"), "w") as handle:
        json.dump(model_config(args, len(hf)), handle)
    open_clip.add_model_config(config_dir)

    started = time.perf_counter()
    train_main([
        "--train-data", args.train, "--train-num-samples", str(args.train_samples), "--dataset-type", "webdataset",
        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", str(args.lr),
        "--warmup", str(args.warmup), "--wd", str(args.wd), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--model", name, "--workers", str(args.workers), "--precision", "fp32", "--seed", str(args.seed),
        "--logs", args.output, "--name", "run", "--save-frequency", "1", "--log-every-n-steps", "10",
        "--report-to", "", "--device", "cpu",
    ])
    seconds = time.perf_counter() - started

    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=os.path.join(args.output, "run", "checkpoints", f"epoch_{args.epochs}.pt"))
    tokenizer = open_clip.get_tokenizer(name)
    classnames = [line.strip() for line in open(args.classnames) if line.strip()]
    templates = [line.strip() for line in open(args.templates) if line.strip()]
    images, labels = read_test_set(args.test)
    top1 = zero_shot(model, preprocess, tokenizer, images, labels, classnames, templates)
    print(json.dumps({"top1": top1, "seconds": seconds}))


if __name__ == "__main__":
    main()
