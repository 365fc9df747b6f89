"""Command line of `tools/make_shards.py`: parse the arguments, run make_shards, print the summary."""

from __future__ import annotations

import argparse
import os
import re
import sys

from mmscale.shards.distributors import DISTRIBUTORS, DistributorOptions, TaskFailed
from mmscale.shards.download import DownloadOptions
from mmscale.shards.images import DEFAULT_MAX_PIXELS, RESIZE_MODES, ImageOptions
from mmscale.shards.writer import CaptionFilter
from mmscale.shards.sharding import DEFAULT_NAME_PATTERN, DEFAULT_SAMPLES_PER_SHARD, ShardingOptions, make_shards
from mmscale.data.tars import ShardError
from mmscale.shards.sources import INPUT_KINDS, InputError, InputOptions

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _positive(convert: type, what: str):
    """An argparse type: `convert(text)`, which must be greater than zero."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


_positive_int = _positive(int, "a whole number")
_positive_float = _positive(float, "a number")


def _byte_count(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1000000, 500MB or 1GiB")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _name_pattern(text: str) -> str:
    try:
        first, second = text.format(0), text.format(1)
    except (IndexError, KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} must format one shard number, e.g. shard-{{:06d}}.tar") from None
    if first == second or not first.endswith(".tar") or "/" in text or first.startswith("."):
        raise argparse.ArgumentTypeError(f"{text!r} must contain the shard number, end in .tar and name a "
                                         "file in the output folder, e.g. shard-{:06d}.tar")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The make_shards argument parser."""
    parser = argparse.ArgumentParser(
        prog="make_shards", description="Write an image-caption corpus as resumable WebDataset shards.")
    source = parser.add_argument_group("input")
    source.add_argument("--input", required=True,
                        help="folder of images+captions; a table (csv/tsv/jsonl/parquet), a glob or folder of "
                             "tables, of image paths or http(s) URLs; a COCO captions or VQA v2 questions json; "
                             "or a shard spec")
    source.add_argument("--input-kind", choices=INPUT_KINDS, help="override auto-detection from the path")
    source.add_argument("--image-root", help="folder that relative image paths of a table or COCO file start from; the "
                             "folder searched for a VQA v2 file's images by id")
    source.add_argument("--image-column", "--url-column", dest="image_column",
                        help="table column with image paths or URLs (default: auto)")
    source.add_argument("--caption-column", help="table column with captions (default: auto)")
    source.add_argument("--label-column", help="table column with integer labels, written as KEY.cls")
    source.add_argument("--coco-first-caption-only", action="store_true", help="one sample per COCO image")
    vqa = parser.add_argument_group("visual question answering (one sample per question: KEY.jpg + KEY.json "
                                    "with question, answers, question_type)")
    vqa.add_argument("--answers", help="VQA v2 annotations json with the answers of the --input questions file "
                                       "(leave out for a test split: questions without answers)")
    vqa.add_argument("--question-column", help="table column with questions (instead of captions)")
    vqa.add_argument("--answer-column", help="table column with answers: one answer, a JSON list, or a list")
    vqa.add_argument("--question-type-column", help="table column with question types (optional)")
    output = parser.add_argument_group("output")
    output.add_argument("--output", required=True,
                        help="output folder, or an fsspec URL (s3://bucket/shards: each shard written locally and "
                             "uploaded once complete); resumes if it holds this job's shards")
    output.add_argument("--samples-per-shard", type=_positive_int,
                        help=f"input records per shard (default {DEFAULT_SAMPLES_PER_SHARD})")
    output.add_argument("--max-bytes-per-shard", type=_byte_count,
                        help="split each shard into parts of at most this size (e.g. 1GB)")
    output.add_argument("--name-pattern", type=_name_pattern, default=DEFAULT_NAME_PATTERN,
                        help="shard file name, formatted with the shard number")
    images = parser.add_argument_group("images")
    images.add_argument("--resize", type=_positive_int, help="target size in pixels (see --resize-mode)")
    images.add_argument("--resize-mode", choices=RESIZE_MODES, default="keep_ratio",
                        help="keep_ratio: shorter side to --resize, never enlarged; center_crop: shorter side to "
                             "--resize, middle square kept; border: longer side to --resize, padded to a square; "
                             "no: keep the size (default keep_ratio)")
    images.add_argument("--jpeg-quality", type=_positive_int, default=90, help="quality of re-encoded JPEGs")
    images.add_argument("--min-side", type=_positive_int, help="skip images with a shorter side below this")
    images.add_argument("--max-aspect", type=_positive_float, help="skip images more elongated than this ratio")
    images.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                        help="skip images with more pixels (read from the header, before decoding)")
    images.add_argument("--dedup", action="store_true", help="skip exact duplicate images (sha256 of the bytes)")
    defaults = DownloadOptions()
    download = parser.add_argument_group("download (URL tables)")
    download.add_argument("--threads", type=_positive_int, default=defaults.threads,
                          help=f"concurrent downloads per worker process (default {defaults.threads})")
    download.add_argument("--timeout", type=_positive_float, default=defaults.timeout_s,
                          help=f"seconds per request: DNS, connect, headers and body (default {defaults.timeout_s:g})")
    download.add_argument("--retries", type=int, default=defaults.retries,
                          help=f"retries of connection errors, timeouts, 429 and 5xx (default {defaults.retries})")
    download.add_argument("--retry-backoff", type=_positive_float, default=defaults.backoff_s,
                          help=f"seconds before the first retry, doubling after (default {defaults.backoff_s:g})")
    download.add_argument("--max-redirects", type=int, default=defaults.max_redirects,
                          help=f"redirects followed (default {defaults.max_redirects})")
    download.add_argument("--max-download-bytes", type=_byte_count, default=defaults.max_bytes,
                          help="largest response body, and largest local image or caption file, accepted (default 20MB)")
    download.add_argument("--retry-failed", action="store_true",
                          help="download again the rows that failed for a passing reason (timeout, connection "
                               "error, 429, 5xx) in finished shards, adding those that succeed")
    download.add_argument("--ignore-robots-headers", action="store_true",
                          help="download even where X-Robots-Tag says noai/noimageai/noindex/noimageindex")
    download.add_argument("--allow-private-urls", action="store_true",
                          help="also download from loopback, private and link-local addresses (refused by "
                               "default as private_address: a scraped table may name internal hosts)")
    captions = parser.add_argument_group("captions")
    for bound in ("min", "max"):
        for unit in ("chars", "words"):
            captions.add_argument(f"--{bound}-caption-{unit}", type=_positive_int,
                                  help=f"skip captions with {'fewer' if bound == 'min' else 'more'} {unit}")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=_positive_int, default=min(4, os.cpu_count() or 1),
                     help="worker processes (default min(4, cpus))")
    run.add_argument("--image-threads", type=_positive_int,
                     help="threads per worker decoding and resizing images (default: cpus / workers)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    cluster = parser.add_argument_group(
        "cluster (the driver lists, plans and sums up; chunk tasks run on the executors, which must see --input "
        "and --output at the same paths: a shared filesystem)")
    cluster.add_argument("--distributor", choices=DISTRIBUTORS, default="multiprocessing",
                         help="multiprocessing: --workers processes here (default); spark: a Spark job per chunk "
                              "(pip install 'mmscale[spark]'); ray: a Ray task per chunk (pip install 'mmscale[ray]')")
    cluster.add_argument("--spark-master", help="Spark master URL, e.g. spark://head:7077 (default: spark-submit's, "
                                                "else $SPARK_MASTER, else local[--workers])")
    cluster.add_argument("--ray-address", help="Ray cluster address, e.g. head:6379 (default: what ray.init() finds: "
                                               "$RAY_ADDRESS or a cluster started here, else a new local one; "
                                               "'local': always a new local one with --workers CPUs)")
    return parser


def options_from_args(args: argparse.Namespace) -> ShardingOptions:
    """ShardingOptions from parsed arguments."""
    return ShardingOptions(
        input=InputOptions(path=args.input, kind=args.input_kind, image_root=args.image_root,
                           image_column=args.image_column, caption_column=args.caption_column,
                           label_column=args.label_column, coco_first_caption_only=args.coco_first_caption_only,
                           answers=args.answers, question_column=args.question_column,
                           answer_column=args.answer_column, question_type_column=args.question_type_column),
        output_dir=args.output, samples_per_shard=args.samples_per_shard,
        max_bytes_per_shard=args.max_bytes_per_shard,
        image=ImageOptions(resize=args.resize, resize_mode=args.resize_mode, jpeg_quality=args.jpeg_quality,
                           min_side=args.min_side, max_aspect=args.max_aspect, max_pixels=args.max_pixels),
        download=DownloadOptions(threads=args.threads, timeout_s=args.timeout, retries=args.retries,
                                 backoff_s=args.retry_backoff, max_redirects=args.max_redirects,
                                 max_bytes=args.max_download_bytes,
                                 respect_robots_headers=not args.ignore_robots_headers,
                                 allow_private_urls=args.allow_private_urls),
        captions=CaptionFilter(min_chars=args.min_caption_chars, max_chars=args.max_caption_chars,
                               min_words=args.min_caption_words, max_words=args.max_caption_words),
        dedup=args.dedup, retry_failed=args.retry_failed, workers=args.workers,
        image_threads=args.image_threads, name_pattern=args.name_pattern, progress=not args.no_progress,
        distributor=DistributorOptions(args.distributor, spark_master=args.spark_master, ray_address=args.ray_address))


def main(argv: list[str] | None = None) -> int:
    """Run make_shards; returns the exit code (2 for a bad input or option, 130 when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jpeg_quality > 100:
        parser.error(f"--jpeg-quality {args.jpeg_quality}: use 1 to 100 (95 or less is sensible)")
    if args.retries < 0 or args.max_redirects < 0:
        parser.error("--retries and --max-redirects must be 0 or more")
    if args.spark_master and args.distributor != "spark" or args.ray_address and args.distributor != "ray":
        parser.error("--spark-master needs --distributor spark, --ray-address needs --distributor ray")
    if args.resize_mode in ("center_crop", "border") and args.resize is None:
        parser.error(f"--resize-mode {args.resize_mode} needs --resize (the square's side)")
    try:
        summary = make_shards(options_from_args(args))
    except (InputError, ShardError) as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. an output folder that cannot be created or written
        print(f"make_shards: error: {error.filename or args.output}: {error.strerror or error}; "
              "check --output and free disk space", file=sys.stderr)
        return 2
    except TaskFailed as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make_shards: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary.describe())
    return 0
