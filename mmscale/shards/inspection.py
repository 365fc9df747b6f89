"""Verify WebDataset shards and describe them (`tools/inspect_shards.py`).

Every sample must have an image member that fully decodes and a UTF-8 caption; a `cls`
member must be an integer; keys must be unique; `sizes.json`, when present (or required
with `check_sizes`), must match the tars. All problems are collected, each naming the
shard and, where there is one, the key, so one run lists everything to fix.

A VQA sample (its json member holds a question or answers: mmscale.data.vqa's format) needs a
question and answers instead of a caption (`--questions-only`: a test split, no answers needed);
the report counts VQA samples, those without a question or answers by reason, the question types
and the most frequent normalized answers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

from tqdm import tqdm

from mmscale.shards.images import DEFAULT_MAX_PIXELS, decode_image
from mmscale.shards.sharding import parallel_map
from mmscale.shards.vqa_input import vqa_fields
from mmscale.data.tars import (
    DEFAULT_MAX_MEMBER_BYTES,
    SAMPLE_EXTENSIONS,
    SIZES_FILE,
    SampleRejected,
    ShardError,
    ShardTruncated,
    check_raw_sample,
    iter_raw_samples,
    read_sizes,
    sample_caption,
    sample_image_bytes,
    spec_urls,
)

TOP_ANSWERS = 10  # most frequent VQA answers reported


@dataclass
class ShardReport:
    """What one shard holds and what is wrong with it."""

    url: str
    samples: int = 0
    bytes: int = 0
    keys: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    caption_chars: list[int] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    bad_samples: Counter = field(default_factory=Counter)
    """Samples the loader would skip, by the reason it would count (the first problem of each)."""
    readable: bool = True
    vqa_samples: int = 0
    """Samples whose json member holds a question or answers."""
    vqa_bad: Counter = field(default_factory=Counter)
    """VQA samples without a question or answers, by mmscale.data.vqa.parse_vqa_json's reason."""
    question_types: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)
    """Normalized answers, each counted once per question that was given it (as the VQA answer list counts)."""


@dataclass
class InspectReport:
    """All shards of a spec, plus problems found across shards (sizes.json, repeated keys)."""

    shards: list[ShardReport]
    problems: list[str]

    @property
    def bad_samples(self) -> Counter:
        """Samples the loader would skip, by reason, over all shards."""
        return sum((shard.bad_samples for shard in self.shards), Counter())

    def total(self, name: str) -> Counter:
        """A Counter field of ShardReport summed over the shards."""
        return sum((getattr(shard, name) for shard in self.shards), Counter())

    @property
    def all_problems(self) -> list[str]:
        """Every problem, shard by shard, then the cross-shard ones."""
        return [problem for shard in self.shards for problem in shard.problems] + self.problems

    def describe(self, *, examples: int = 3) -> str:
        """Human-readable statistics and a few example samples."""
        merged = {name: [value for shard in self.shards for value in getattr(shard, name)]
                  for name in ("widths", "heights", "caption_chars", "caption_words")}
        labels = sum((shard.labels for shard in self.shards), Counter())
        bad = self.bad_samples
        lines = [f"shards: {len(self.shards):,}   samples: {sum(s.samples for s in self.shards):,}   "
                 f"bytes: {sum(s.bytes for s in self.shards) / 1e6:,.1f} MB"]
        if bad:
            lines.append(f"bad samples: {sum(bad.values()):,} ("
                         + ", ".join(f"{reason}={count:,}" for reason, count in sorted(bad.items())) + ")")
        for name, title in (("widths", "image width"), ("heights", "image height"),
                            ("caption_chars", "caption chars"), ("caption_words", "caption words")):
            values = merged[name]
            if values:
                lines.append(f"{title:14} min {min(values):,}  median {statistics.median(values):,.0f}  "
                             f"mean {statistics.fmean(values):,.1f}  max {max(values):,}")
        if labels:
            lines.append(f"labels: {sum(labels.values()):,} labelled samples, {len(labels):,} distinct")
        lines.extend(self._describe_vqa())
        shown = [example for shard in self.shards for example in shard.examples][:examples]
        if shown:
            lines.append("samples:")
            lines.extend(f"  {key}  {size:>9}  {caption[:100]}" for key, size, caption in shown)
        return "\n".join(lines)

    def _describe_vqa(self) -> list[str]:
        vqa = self.as_dict()["vqa"]
        if not vqa["samples"]:
            return []
        bad = ", ".join(f"{reason}={count:,}" for reason, count in vqa["bad"].items())
        lines = [f"vqa samples: {vqa['samples']:,}   without a question or answers: {sum(vqa['bad'].values()):,}"
                 + (f" ({bad})" if bad else "")]
        if vqa["question_types"]:
            lines.append("question types: " + ", ".join(f"{name or '(none)'}={count:,}"
                                                       for name, count in vqa["question_types"].items()))
        if vqa["top_answers"]:
            lines.append("top answers: " + ", ".join(f"{answer}={count:,}" for answer, count in vqa["top_answers"]))
        return lines

    def as_dict(self) -> dict:
        """The report's figures as JSON-ready values (`--json`)."""
        types, answers = self.total("question_types"), self.total("answers")
        return {"shards": len(self.shards), "samples": sum(shard.samples for shard in self.shards),
                "bytes": sum(shard.bytes for shard in self.shards),
                "bad_samples": dict(sorted(self.bad_samples.items())),
                "labelled_samples": sum(self.total("labels").values()), "problems": len(self.all_problems),
                "vqa": {"samples": sum(shard.vqa_samples for shard in self.shards),
                        "bad": dict(sorted(self.total("vqa_bad").items())),
                        "question_types": dict(sorted(types.items(), key=lambda item: (-item[1], item[0]))),
                        "top_answers": sorted(answers.items(), key=lambda item: (-item[1], item[0]))[:TOP_ANSWERS]}}


def inspect_shard(url: str, *, examples: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, need_answers: bool = True) -> ShardReport:
    """Read one shard through, fully decoding every image; collects problems instead of raising.
    `need_answers=False` accepts VQA questions without answers (a test split)."""
    report = ShardReport(url)
    if os.path.exists(url):
        report.bytes = os.path.getsize(url)
    try:
        for sample in iter_raw_samples(url, extensions=SAMPLE_EXTENSIONS, max_member_bytes=max_member_bytes):
            report.samples += 1
            _check_sample(sample, report, examples=examples, max_pixels=max_pixels, need_answers=need_answers)
    except ShardTruncated as error:
        report.problems.append(str(error))
    except ShardError as error:
        report.problems.append(str(error))
        report.readable = False
    return report


def _check_sample(sample: dict, report: ShardReport, *, examples: int, max_pixels: int, need_answers: bool) -> None:
    key = sample["__key__"]
    report.keys.append(key)
    reasons: list[str] = []

    def problem(reason: str, message: str) -> None:
        report.problems.append(f"shard {report.url} key {key}: {message}")
        reasons.append(reason)

    try:
        check_raw_sample(sample)
    except SampleRejected as rejected:
        problem(rejected.reason, rejected.detail)
    size = _check_image(sample, problem, report, max_pixels=max_pixels) if not reasons else "?"
    caption = None
    question = _check_question(sample, problem, report, need_answers=need_answers) if _is_vqa(sample) else None
    try:
        caption = sample_caption(sample)
        if caption is None and question is None and not _is_vqa(sample):
            problem("missing_caption", "no caption (no .txt member and no json caption)")
    except SampleRejected as rejected:
        problem(rejected.reason, "caption is not UTF-8" if rejected.reason == "bad_text" else rejected.detail)
    if caption:
        report.caption_chars.append(len(caption))
        report.caption_words.append(len(caption.split()))
    if "cls" in sample:
        text = sample["cls"].decode("ascii", errors="replace").strip()
        try:
            report.labels[int(text)] += 1
        except ValueError:
            problem("bad_label", f"label {text!r} in .cls is not an integer")
    if reasons:
        report.bad_samples[reasons[0]] += 1
    if len(report.examples) < examples:
        report.examples.append((key, size, question or caption or "<no caption>"))


def _is_vqa(sample: dict) -> bool:
    """Whether the sample's json member holds a question or answers (a VQA sample)."""
    try:
        meta = json.loads(sample["json"]) if sample.get("json") else None
    except (ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and ("question" in meta or "answers" in meta)


def _check_question(sample: dict, problem, report: ShardReport, *, need_answers: bool) -> str | None:
    """Count a VQA sample's question type and answers; '<question>  A: <answer>' to show, None when bad."""
    from mmscale.data.vqa import normalize_answer  # imports torch: only VQA shards pay for it

    report.vqa_samples += 1
    try:
        fields = vqa_fields(sample["json"], need_answers=need_answers)
    except SampleRejected as rejected:
        report.vqa_bad[rejected.reason] += 1
        problem(rejected.reason, _VQA_PROBLEMS.get(rejected.reason, rejected.reason))
        return None
    report.question_types[fields.question_type] += 1
    normalized = Counter(normalize_answer(answer) for answer in fields.answers)
    report.answers.update(normalized.keys())
    answer = normalized.most_common(1)[0][0] if normalized else "(no answers)"
    return f"Q: {fields.question}  A: {answer}"


_VQA_PROBLEMS = {"missing_question": "VQA sample without a question (json \"question\")",
                 "bad_json": "VQA answers are not a list of answers (json \"answers\")",
                 "missing_answer": "VQA question without answers (json \"answers\"; a test split? pass "
                                   "--questions-only)"}


def _check_image(sample: dict, problem, report: ShardReport, *, max_pixels: int) -> str:
    """Decode the sample's image in full; its size as text, '?' when there is none to show."""
    image = sample_image_bytes(sample)
    if image is None:
        problem("missing_image", "no image member (one of .jpg .jpeg .png .webp)")
        return "?"
    try:
        width, height = decode_image(image[1], max_pixels=max_pixels).size
    except SampleRejected as rejected:
        problem(rejected.reason, f"image does not decode ({rejected.reason}: {rejected.detail})")
        return "?"
    report.widths.append(width)
    report.heights.append(height)
    return f"{width}x{height}"


def inspect_spec(spec: str, *, examples: int = 3, check_sizes: bool = False, workers: int = 1,
                 progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, need_answers: bool = True) -> InspectReport:
    """Inspect every shard of a spec and cross-check keys and sizes.json."""
    urls = spec_urls(spec)
    shards = []
    check = partial(inspect_shard, examples=examples, max_pixels=max_pixels, max_member_bytes=max_member_bytes,
                    need_answers=need_answers)
    with tqdm(total=len(urls), desc="inspecting shards", unit="shard", disable=not progress) as bar:
        for report in parallel_map(check, urls, workers=workers):
            shards.append(report)
            bar.update()
    problems = _repeated_keys(shards) + _size_problems(shards, check_sizes=check_sizes)
    return InspectReport(shards, problems)


def _repeated_keys(shards: list[ShardReport]) -> list[str]:
    first_seen: dict[str, str] = {}
    problems = []
    for shard in shards:
        for key in shard.keys:
            if key in first_seen:
                problems.append(f"shard {shard.url} key {key}: key repeated (also in shard {first_seen[key]})")
            else:
                first_seen[key] = shard.url
    return problems


def _size_problems(shards: list[ShardReport], *, check_sizes: bool) -> list[str]:
    problems = []
    for shard in shards:
        if not shard.readable:
            continue
        folder = os.path.dirname(shard.url) or "."
        sizes_path = os.path.join(folder, SIZES_FILE)
        if not os.path.exists(sizes_path):
            if check_sizes:
                problems.append(f"shard {shard.url}: no {sizes_path}; write one with make_shards")
            continue
        recorded = read_sizes([shard.url])
        if recorded is None:
            problems.append(f"shard {shard.url}: not listed in {sizes_path} (or it is unreadable)")
        elif recorded[shard.url] != shard.samples:
            problems.append(f"shard {shard.url}: {sizes_path} says {recorded[shard.url]} samples, "
                            f"the tar has {shard.samples}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Inspect shards; prints statistics, then every problem; exit 1 if any, 2 for a bad spec."""
    parser = argparse.ArgumentParser(prog="inspect_shards", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="shard spec: a folder, a file, or e.g. out/shard-{000000..000009}.tar")
    parser.add_argument("--samples", type=int, default=3, help="example samples to print")
    parser.add_argument("--check-sizes", action="store_true", help="require sizes.json beside the shards")
    parser.add_argument("--workers", type=int, default=1, help="shards inspected in parallel")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="images with more pixels are reported as decompression bombs (image_too_large)")
    parser.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                        help="tar members larger than this are reported unread (member_too_large)")
    parser.add_argument("--questions-only", action="store_true",
                        help="VQA questions need no answers (a test split)")
    parser.add_argument("--json", action="store_true", help="end with the figures as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = inspect_spec(args.spec, examples=args.samples, check_sizes=args.check_sizes,
                              workers=args.workers, progress=not args.no_progress, max_pixels=args.max_pixels,
                              max_member_bytes=args.max_member_bytes, need_answers=not args.questions_only)
    except (ShardError, ValueError) as error:
        print(f"inspect_shards: error: {error}", file=sys.stderr)
        return 2
    print(report.describe(examples=args.samples))
    problems = report.all_problems
    if problems:
        print(f"\n{len(problems):,} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    elif any(shard.vqa_samples for shard in report.shards):
        print("ok: every sample has a decodable image and a caption or a VQA question"
              + (" with answers" if not args.questions_only else ""))
    else:
        print("ok: every sample has a decodable image and a caption")
    if args.json:
        print(json.dumps(report.as_dict()))
    return 1 if problems else 0
