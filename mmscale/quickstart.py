"""`mmscale quickstart`: build a small corpus and run the whole data side on it.

Generates captioned shape images, shards them with the project's own sharding code,
verifies the shards, trains a WordPiece tokenizer on the captions, then streams training
batches through the loader with two workers, saves its state mid-epoch and shows that a
restored loader continues with exactly the next batch. Pretraining, evaluation, LoRA and
export join this command as they land.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from mmscale.data.config import DataConfig
from mmscale.data.inspection import inspect_spec
from mmscale.data.loader import build_loader
from mmscale.data.sharding import ShardingOptions, make_shards
from mmscale.data.sources import InputOptions
from mmscale.data.synthetic import make_image_folder
from mmscale.data.text import load_tokenizer
from mmscale.data.tokenizer_train import iter_captions, train_wordpiece

TRAIN_SAMPLES = 1536
SAMPLES_PER_SHARD = 128
BATCH_SIZE = 32


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_quickstart(out: str | os.PathLike) -> int:
    """Run every step, print a summary table and the paths; returns the exit code."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    started = _step("1/4 generating a captioned shapes corpus and sharding it")
    shards = out / "shards" / "train"
    with tempfile.TemporaryDirectory(prefix="mmscale-quickstart-") as images:
        make_image_folder(images, TRAIN_SAMPLES, size=64, seed=0, labels=True)
        summary = make_shards(ShardingOptions(input=InputOptions(path=images, kind="folder"), output_dir=str(shards),
                                              samples_per_shard=SAMPLES_PER_SHARD, workers=2))
    print(summary.describe())
    rows.append(("shards", f"{len(summary.sizes)} shards, {summary.written} samples", time.perf_counter() - started))
    spec = f"{shards}/shard-{{000000..{len(summary.sizes) - 1:06d}}}.tar"

    started = _step("2/4 verifying the shards")
    report = inspect_spec(spec, examples=2, check_sizes=True, progress=False)
    print(report.describe(examples=2))
    if report.all_problems:
        print("shard verification failed:\n" + "\n".join(report.all_problems))
        return 1
    rows.append(("inspect", "every image decodes, every key has a caption", time.perf_counter() - started))

    started = _step("3/4 training a WordPiece tokenizer on the captions")
    tokenizer_dir = out / "tokenizer"
    train_wordpiece(iter_captions(spec), vocab_size=512, output_dir=tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    rows.append(("tokenizer", f"{len(tokenizer)} tokens in {tokenizer_dir}", time.perf_counter() - started))

    started = _step("4/4 streaming training batches (2 workers), saving and restoring the loader mid-epoch")
    rate, resumed_ok = _loader_demo(spec, tokenizer)
    result = f"{rate:.0f} samples/s; resumed batch identical: {resumed_ok}"
    rows.append(("loader", result, time.perf_counter() - started))

    print("\nstep        result" + " " * 52 + "seconds")
    for name, result, seconds in rows:
        print(f"{name:11s} {result:58s} {seconds:7.1f}")
    print(f"\nshards: {spec}\ntokenizer: {tokenizer_dir}")
    return 0 if resumed_ok else 1


def _loader_demo(spec: str, tokenizer) -> tuple[float, bool]:
    """Throughput of the training loader, and whether a restored loader repeats the next batch."""
    config = DataConfig(image_size=64, workers=2, shuffle_buffer=256, context_length=32)

    def loader():
        return build_loader(config, spec=spec, tokenizer=tokenizer, batch_size=BATCH_SIZE, train=True)

    first = loader()
    iterator = iter(first)
    start = time.perf_counter()
    for _ in range(20):
        batch = next(iterator)
    rate = 20 * BATCH_SIZE / (time.perf_counter() - start)
    print(f"batch: images {tuple(batch['images'].shape)} {batch['images'].dtype}, "
          f"input_ids {tuple(batch['input_ids'].shape)}, mlm_labels {tuple(batch['mlm_labels'].shape)}")
    print(f"caption 0: {tokenizer.decode(batch['input_ids'][0], skip_special_tokens=True)!r}")
    state = first.state_dict()
    expected = next(iterator)
    restored = loader()
    restored.load_state_dict(state)
    again = next(iter(restored))
    same = again["keys"] == expected["keys"] and bool((again["images"] == expected["images"]).all())
    print(f"after 20 batches: saved the loader state; the restored loader's next batch "
          f"{'matches' if same else 'DIFFERS FROM'} the uninterrupted one")
    return rate, same
