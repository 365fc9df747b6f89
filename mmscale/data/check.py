"""`mmscale data-check`: run the training loader alone and report throughput and skips (`vqa=true`: VQA samples,
and how many questions the answer list covers).

Worth doing before a long job: it reads real shards through the exact loader that training
uses (same config section), so a bad spec, an unreadable tokenizer or a slow decode shows
up in seconds instead of on a cluster.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from mmscale.data.config import DataConfig
from mmscale.data.loader import build_loader
from mmscale.data.text import load_tokenizer
from mmscale.data.vqa import AnswerTargets, answers_counted, count_answers


@dataclass
class DataCheckConfig:
    """What `mmscale data-check` reads: the data section plus a tokenizer and a batch size."""

    data: DataConfig = field(default_factory=DataConfig)
    """The loader's config section, exactly as training uses it."""
    tokenizer: str = ""
    """Local Hugging Face tokenizer folder (for example from tools/train_tokenizer.py)."""
    batch_size: int = 64
    """Samples per batch."""
    batches: int = 20
    """Batches to read before reporting (the stream is endless)."""
    vqa: bool = False
    """Read VQA samples (KEY.json question + answers) as VQA fine-tuning does, over an answer list counted from
    data.train; the report adds the share of questions the list covers."""
    vqa_answers: int = 1000
    """With vqa: the answer list's size (fine-tuning's vqa.answers)."""


@dataclass
class DataCheckReport:
    """What one check measured."""

    batches: int
    samples: int
    seconds: float
    samples_per_second: float
    skipped: dict
    answer_coverage: float | None = None
    """With vqa: the share of the questions read that have an answer in the list (the rest train toward none)."""


def run_data_check(config: DataCheckConfig) -> DataCheckReport:
    """Read `config.batches` training batches and time them."""
    if not config.data.train:
        raise ValueError("data.train is empty: give a shard spec, e.g. data.train=shards/shard-{000000..000009}.tar")
    if not config.tokenizer:
        raise ValueError("tokenizer is empty: give a local tokenizer folder, e.g. tokenizer=runs/tokenizer")
    targets = None
    if config.vqa:
        targets = AnswerTargets(answers_counted(count_answers(config.data.train), config.vqa_answers, config.data.train))
        print(f"data-check: answer list of {len(targets)} answers counted from data.train", flush=True)
    loader = build_loader(config.data, spec=config.data.train, tokenizer=load_tokenizer(config.tokenizer),
                          batch_size=config.batch_size, train=True, vqa=targets)
    start, batches, covered = time.perf_counter(), 0, 0
    for batch in tqdm(loader, total=config.batches, unit="batch", desc="data-check"):
        batches += 1
        if targets is not None:
            covered += int((batch["answer_targets"].sum(dim=1) > 0).sum())
        if batches >= config.batches:
            break
    seconds = time.perf_counter() - start
    samples = loader.samples_delivered
    return DataCheckReport(batches=batches, samples=samples, seconds=round(seconds, 3),
                           samples_per_second=round(samples / seconds, 1), skipped=dict(loader.skipped),
                           answer_coverage=round(covered / samples, 4) if targets is not None and samples else None)


def print_report(report: DataCheckReport) -> None:
    """A short human summary, then the report as one JSON line."""
    print(f"read {report.samples} samples in {report.batches} batches, {report.seconds:.1f} s "
          f"({report.samples_per_second:.0f} samples/s, worker start-up included)")
    print("skipped: " + (", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items())) or "none"))
    if report.answer_coverage is not None:
        print(f"questions with an answer in the list: {report.answer_coverage:.1%}")
    print(json.dumps(report.__dict__))
