"""Input corpora for shard writing: list them as records, then load records' bytes.

Listing is cheap and deterministic (sorted folders, table row order, COCO file order, shard
order), so the same input always gives the same numbered records; that is what makes shard
writing resumable. Loading happens in the worker processes, one planned chunk at a time.

Kinds: `folder` (images with same-stem `.txt` captions and optional `.cls` labels, searched
recursively), `csv`, `tsv` (tab-separated, header row, no quoting), `jsonl`, `parquet`,
`coco` (a COCO-captions annotation file), `vqa` (a VQA v2 questions file, with its annotations file for
the answers; vqa_input.py) and `tars` (existing WebDataset shards). A table with a question column is VQA
input too: one sample per row, its question and answers in the sample's json member, no caption.

Tables (one file, a glob or a folder of them) are never held in memory: their listing counts
rows and streams them chunk by chunk (tables.py). A table's image column may hold local paths
or http(s) URLs; URL records are downloaded by the shard writer (download.py).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import stat
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path

from mmscale.shards.vqa_input import Question, VqaFileError, question_from_cells, sample_question, vqa_v2_samples
from mmscale.shards.tables import TABLE_KINDS, TableError, TableFile, column_names, count_rows, iter_rows, table_paths
from mmscale.data.tars import (
    IMAGE_EXTENSIONS,
    SAMPLE_EXTENSIONS,
    SampleRejected,
    ShardError,
    ShardTruncated,
    check_raw_sample,
    iter_raw_samples,
    sample_caption,
    sample_image_bytes,
    spec_urls,
)

INPUT_KINDS = ("folder", "csv", "tsv", "jsonl", "parquet", "coco", "vqa", "tars")
_TABLE_KIND_NAMES = ("csv", "tsv", "jsonl", "parquet")
_EXTENSION_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                    ".parquet": "parquet", ".json": "coco", ".tar": "tars"}
_IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "filename", "path", "file", "url", "URL",
                  "image_url", "img_url")
_URL_SCHEMES = ("http://", "https://")
_CAPTION_COLUMNS = ("caption", "text", "title", "txt")
_ROOT_PROBE = 20  # image paths checked at listing time to catch a wrong --image-root early
DEFAULT_MAX_FILE_BYTES = 20_000_000
"""Largest local image or caption file read (`too_large`), as for downloads (DownloadOptions.max_bytes)."""


class InputError(ValueError):
    """A mistake in the input or its options; the message names the thing and the fix."""


@dataclass(frozen=True, slots=True)
class Record:
    """One input sample before loading: where its image, caption and label come from."""

    source: str
    image_path: str | None = None
    caption: str | None = None
    caption_path: str | None = None
    label: int | None = None
    label_path: str | None = None
    shard_url: str | None = None
    shard_index: int = -1
    url: str | None = None  # an http(s) image to download
    problem: str | None = None  # skip reason already known at listing time
    question: Question | None = None  # a VQA sample: its question and answers take the caption's place


@dataclass(frozen=True)
class InputOptions:
    """Where the corpus is and how to read it."""

    path: str
    kind: str | None = None
    image_root: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    label_column: str | None = None
    coco_first_caption_only: bool = False
    answers: str | None = None
    """A VQA v2 annotations file: the answers of the questions file given as `path`."""
    question_column: str | None = None
    """A table of VQA samples: the column with the questions (the caption column is then not read)."""
    answer_column: str | None = None
    """The column with each question's answers: one answer, a JSON list of them, or a list."""
    question_type_column: str | None = None
    """The column with each question's type (optional)."""


@dataclass
class InputListing:
    """The numbered records of a corpus and the skips counted while listing it.

    Folder, COCO and tar listings hold their records; a table's are streamed from `table`.
    """

    kind: str
    records: list[Record] | None
    skipped: dict[str, int] = field(default_factory=dict)
    table: TableInput | None = None
    has_urls: bool = False
    """Some records are URLs to download (decided from the first rows)."""

    def __len__(self) -> int:
        return self.table.rows if self.table is not None else len(self.records)

    def iter_chunks(self, size: int, *, count: int) -> Iterator[list[Record]]:
        """The records of chunks 0 .. count-1 (chunk i is records [i*size, (i+1)*size)), in order."""
        if self.table is None:
            for start in range(0, min(len(self.records), count * size), size):
                yield self.records[start: start + size]
            return
        chunk: list[Record] = []
        for record in self.table.iter_records():
            chunk.append(record)
            if len(chunk) == size:
                yield chunk
                count -= 1
                if count == 0:
                    return
                chunk = []
        if chunk:
            yield chunk


@dataclass
class TableInput:
    """Table files read as one stream of records: which columns, and where relative paths start."""

    files: list[TableFile]
    image_column: str
    caption_column: str | None
    label_column: str | None
    root: str
    question_column: str | None = None
    answer_column: str | None = None
    question_type_column: str | None = None

    @property
    def rows(self) -> int:
        """Rows over all files."""
        return sum(file.rows for file in self.files)

    def iter_records(self) -> Iterator[Record]:
        """One Record per row, file after file."""
        columns = [c for c in (self.image_column, self.caption_column, self.label_column, self.question_column,
                               self.answer_column, self.question_type_column) if c]
        for file in self.files:
            for number, row in enumerate(iter_rows(file.path, file.kind, columns)):
                if isinstance(row, str):  # a row that could not be parsed: its skip reason
                    yield Record(source=f"{file.path}:{number + 1}", problem=row)
                    continue
                name = row.get(self.image_column)
                question = None
                if self.question_column:
                    question = question_from_cells(
                        row.get(self.question_column), row.get(self.answer_column) if self.answer_column else None,
                        row.get(self.question_type_column) if self.question_type_column else None,
                        with_answers=self.answer_column is not None)
                yield _row_record(name, row.get(self.caption_column) if self.caption_column else None,
                                  row.get(self.label_column) if self.label_column else None,
                                  root=self.root, source=str(name), question=question)


@dataclass
class Loaded:
    """A record's bytes and text, or the reason it must be skipped."""

    source: str
    image: bytes | None = None
    caption: str | None = None
    label: int | None = None
    problem: str | None = None
    question: Question | None = None


def dedup_digest(image_sha256: bytes, question: Question | None) -> bytes:
    """What `--dedup` compares: the image bytes' sha256; for a VQA sample the image and its question together,
    so an image's several questions are all kept (a caption corpus keeps one caption of an image)."""
    if question is None:
        return image_sha256
    return hashlib.sha256(image_sha256 + b"\0question\0" + question.text.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class ShardCount:
    """Complete samples in an input shard; `error` is set when it cannot be read at all, `reason` says why
    (ShardError's reasons: `not_a_tar`, `missing`, ...)."""

    url: str
    samples: int
    truncated: bool = False
    error: str | None = None
    reason: str | None = None


def detect_kind(path: str) -> str:
    """The input kind implied by a path: a folder of tars, tables or images, a glob of tables, or a file
    extension."""
    if glob.has_magic(path):
        try:
            return table_paths(path)[0][1]
        except TableError as error:
            raise InputError(str(error)) from None
    if any(marker in path for marker in ("{", "::", "://")):
        return "tars"
    if not os.path.exists(path):
        raise InputError(f"input {path}: no such file or folder; check --input")
    if os.path.isdir(path):
        if any(Path(path).glob("*.tar")):
            return "tars"
        names = [name for name in os.listdir(path) if not name.startswith(".")]
        tables = [name for name in names if os.path.splitext(name)[1].lower() in TABLE_KINDS]
        images = [name for name in names if os.path.splitext(name)[1][1:].lower() in IMAGE_EXTENSIONS]
        return TABLE_KINDS[os.path.splitext(min(tables))[1].lower()] if tables and not images else "folder"
    extension = Path(path).suffix.lower()
    if extension not in _EXTENSION_KINDS:
        raise InputError(f"input {path}: cannot tell the input kind from {extension or 'no extension'!r}; "
                         f"pass --input-kind (one of {', '.join(INPUT_KINDS)})")
    return _EXTENSION_KINDS[extension]


def list_input(options: InputOptions, *, count_shards: Callable[[list[str]], list[ShardCount]] | None = None,
               progress: bool = False) -> InputListing:
    """Number every sample of the corpus, deterministically.

    `count_shards` counts the samples of input tars (the caller may run it in parallel and
    cache it); by default they are read here one by one. `progress` shows a bar while the rows
    of csv/tsv/jsonl tables are counted (parquet needs only its footers).
    """
    kind = options.kind or detect_kind(options.path)
    if kind not in INPUT_KINDS:
        raise InputError(f"input kind {kind!r} is unknown; use one of {', '.join(INPUT_KINDS)}")
    if kind not in ("tars", *_TABLE_KIND_NAMES) and not os.path.exists(options.path):
        raise InputError(f"input {options.path}: no such file or folder; check --input")
    data = None
    if kind in ("coco", "vqa"):
        data = _read_json(options.path)
        if options.kind is None and isinstance(data, dict) and "questions" in data:
            kind = "vqa"  # a .json file: its content tells VQA v2 questions from COCO captions
    _check_vqa_options(options, kind)
    if kind == "folder":
        listing = _list_folder(options.path)
    elif kind == "coco":
        listing = _list_coco(options, data)
    elif kind == "vqa":
        listing = _list_vqa(options, data)
    elif kind == "tars":
        listing = _list_tars(options.path, count_shards or (lambda urls: [count_shard(u) for u in urls]))
    else:
        listing = _list_table(options, kind, progress)
    if not len(listing):
        raise InputError(f"input {options.path}: no samples found ({kind}); check --input and --input-kind")
    if kind == "coco":
        _check_image_root(options, listing.records)
    elif listing.table is not None:
        head = list(islice(listing.table.iter_records(), _ROOT_PROBE))
        listing.has_urls = any(record.url for record in head)
        _check_image_root(options, head)
    return listing


def _list_folder(root: str) -> InputListing:
    records, skipped = [], defaultdict(int)
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        names = set(files)
        stems_with_image = set()
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if name.startswith(".") or extension[1:].lower() not in IMAGE_EXTENSIONS:
                continue
            stems_with_image.add(stem)
            path = os.path.join(folder, name)
            caption, label = stem + ".txt", stem + ".cls"
            records.append(Record(
                source=os.path.relpath(path, root), image_path=path,
                caption_path=os.path.join(folder, caption) if caption in names else None,
                label_path=os.path.join(folder, label) if label in names else None))
        orphans = sum(1 for name in files if name.endswith(".txt") and name[:-4] not in stems_with_image)
        if orphans:
            skipped["missing_image"] += orphans
    records.sort(key=lambda record: record.source)
    return InputListing("folder", records, dict(skipped))


def _read_json(path: str, flag: str = "input"):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise InputError(f"{flag} {path}: not a readable JSON file ({error})") from None


def _check_vqa_options(options: InputOptions, kind: str) -> None:
    """VQA options that the input kind would silently ignore are mistakes."""
    if options.answers and kind != "vqa":
        raise InputError(f"--answers {options.answers}: VQA v2 answers go with a VQA v2 questions file as --input "
                         f"(a JSON file with a 'questions' list); {options.path} is {kind} input")
    columns = [f"--{name.replace('_', '-')}" for name in ("question_column", "answer_column", "question_type_column")
               if getattr(options, name)]
    if columns and kind not in _TABLE_KIND_NAMES:
        raise InputError(f"{' and '.join(columns)} name table columns; {options.path} is {kind} input")
    if columns and not options.question_column:
        raise InputError(f"{' and '.join(columns)} go with --question-column (the column with the questions)")


def _list_coco(options: InputOptions, data) -> InputListing:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise InputError(f"input {options.path}: not a COCO captions file (needs 'images' and 'annotations' "
                         "lists); pass --input-kind if it is something else")
    captions = defaultdict(list)
    for annotation in data["annotations"]:
        if isinstance(annotation, dict):  # anything else has no image to attach a caption to
            captions[annotation.get("image_id")].append(annotation.get("caption"))
    root = options.image_root or os.path.dirname(options.path)
    records = []
    for image in data["images"]:
        if not isinstance(image, dict):
            records.append(Record(source=f"{options.path}#images", problem="missing_image"))
            continue
        name = str(image.get("file_name", ""))
        texts = captions.get(image.get("id")) or [None]
        for text in texts[:1] if options.coco_first_caption_only else texts:
            records.append(_row_record(name, text, None, root=root, source=name))
    return InputListing("coco", records)


def _list_vqa(options: InputOptions, questions) -> InputListing:
    """One record per question of a VQA v2 questions file, in file order (vqa_input.vqa_v2_samples)."""
    annotations = _read_json(options.answers, "--answers") if options.answers else None
    try:
        samples = vqa_v2_samples(questions, annotations, path=options.path, answers_path=options.answers,
                                 image_root=options.image_root or os.path.dirname(options.path) or ".")
    except VqaFileError as error:
        raise InputError(str(error)) from None
    return InputListing("vqa", [Record(source=sample.source, image_path=sample.image_path, problem=sample.problem,
                                       question=sample.question) for sample in samples])


def _list_tars(spec: str, count_shards: Callable[[list[str]], list[ShardCount]]) -> InputListing:
    try:
        urls = spec_urls(spec)
    except (ShardError, ValueError) as error:
        raise InputError(f"input {spec}: {error}") from None
    records, skipped = [], defaultdict(int)
    errors = []
    for count in count_shards(urls):
        if count.error:  # shards may come from anyone: an unreadable one is counted, as the loader does
            errors.append(count.error)
            skipped[f"shard_{count.reason}"] += 1
            warnings.warn(f"{count.error}: skipped", stacklevel=2)
            continue
        if count.truncated:
            skipped["truncated_shard"] += 1
        records.extend(Record(source=f"{count.url}#{index}", shard_url=count.url, shard_index=index)
                       for index in range(count.samples))
    if errors and len(errors) == len(urls):
        raise InputError(f"input {spec}: no shard can be read (first: {errors[0]})")
    return InputListing("tars", records, dict(skipped))


def count_shard(url: str) -> ShardCount:
    """Count the complete samples of one input shard (reads it through)."""
    samples = 0
    try:
        for _ in iter_raw_samples(url, extensions=()):
            samples += 1
    except ShardTruncated as error:
        return ShardCount(url, error.samples_read, truncated=True)
    except ShardError as error:
        return ShardCount(url, 0, error=str(error), reason=error.reason)
    return ShardCount(url, samples)


def _list_table(options: InputOptions, kind: str, progress: bool) -> InputListing:
    from tqdm import tqdm

    try:
        paths = table_paths(options.path, options.kind)
        columns = column_names(*paths[0])
    except TableError as error:
        raise InputError(str(error)) from None
    first = paths[0][0]
    image = _choose_column(columns, options.image_column, _IMAGE_COLUMNS, "image path or URL", "--url-column",
                           first)
    caption = question = answer = question_type = label = None
    if options.question_column:  # VQA rows: the question takes the caption's place
        question = _choose_column(columns, options.question_column, (), "question", "--question-column", first)
        if options.answer_column:
            answer = _choose_column(columns, options.answer_column, (), "answer", "--answer-column", first)
        if options.question_type_column:
            question_type = _choose_column(columns, options.question_type_column, (), "question type",
                                           "--question-type-column", first)
    else:
        caption = _choose_column(columns, options.caption_column, _CAPTION_COLUMNS, "caption",
                                 "--caption-column", first)
    if options.label_column:
        label = _choose_column(columns, options.label_column, (), "label", "--label-column", first)
    for path, file_kind in paths[1:]:  # a later file of a glob without the columns would lose its rows
        if file_kind == "jsonl":
            continue  # rows are objects: one without the column is a counted skip
        try:
            names = column_names(path, file_kind)
        except TableError as error:
            raise InputError(str(error)) from None
        missing = [name for name in (image, caption, label, question, answer, question_type)
                   if name is not None and name not in names]
        if missing:
            raise InputError(f"input {path}: no column {', '.join(map(repr, missing))} (found in {first}); "
                             "every file of a table needs the same columns")
    try:
        text_bytes = sum(os.path.getsize(path) for path, file_kind in paths if file_kind != "parquet")
        with tqdm(total=text_bytes, desc="counting table rows", unit="B", unit_scale=True,
                  disable=not progress or not text_bytes) as bar:
            files = [TableFile(path, file_kind, count_rows(path, file_kind, bar.update)) for path, file_kind in paths]
    except TableError as error:
        raise InputError(str(error)) from None
    if not sum(file.rows for file in files):
        raise InputError(f"input {options.path}: the table has no rows; check --input")
    probe = (row.get(image) for row in islice(iter_rows(*paths[0], [image]), 100) if isinstance(row, dict))
    value = next((value for value in probe if value is not None), None)
    if value is not None and not isinstance(value, (str, int)):
        raise InputError(f"input {first}: column {image!r} holds {type(value).__name__} values, not "
                         "image file paths or URLs; write the images to files and give their paths")
    root = options.image_root or (options.path if os.path.isdir(options.path) else os.path.dirname(first))
    return InputListing(kind, None, table=TableInput(files, image, caption, label, root, question_column=question,
                                                     answer_column=answer, question_type_column=question_type))


def _choose_column(columns: list[str], requested: str | None, candidates: Iterable[str], what: str,
                   flag: str, path: str) -> str:
    if requested:
        if requested not in columns:
            raise InputError(f"input {path}: no column {requested!r} (columns: {', '.join(columns)}); "
                             f"pass the {what} column with {flag}")
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise InputError(f"input {path}: cannot tell which column holds the {what} "
                     f"(columns: {', '.join(columns)}); pass {flag}")


def _row_record(name, caption, label, *, root: str, source: str, question: Question | str | None = None) -> Record:
    """A record from table-like values, with bad values turned into skip reasons (`question`: a VQA row's
    question, or the reason it has none)."""
    if name is None or not str(name).strip():
        return Record(source=source, problem="missing_image")
    name = str(name).strip()
    url = name if name.startswith(_URL_SCHEMES) else None
    if url is None and "://" in name:
        return Record(source=source, problem="unsupported_url")
    path = None if url else os.path.join(root, name)
    if isinstance(question, str):
        return Record(source=source, image_path=path, url=url, problem=question)
    if isinstance(caption, float) and math.isnan(caption):
        caption = None
    if caption is not None and not isinstance(caption, (str, int, float)):
        return Record(source=source, image_path=path, problem="bad_text")  # a list or mapping, not text
    caption = str(caption).strip() if caption is not None else None
    if caption:
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:
            return Record(source=source, image_path=path, problem="bad_text")
    parsed_label = None
    if label is not None and str(label).strip() not in ("", "nan", "None"):
        parsed_label = _parse_label(label)
        if parsed_label is None:
            return Record(source=source, image_path=path, problem="bad_label")
    return Record(source=source, image_path=path, url=url, caption=caption or None, label=parsed_label,
                  question=question)


def _parse_label(value) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def _check_image_root(options: InputOptions, records: list[Record]) -> None:
    paths = [record.image_path for record in records if record.image_path][:_ROOT_PROBE]
    if paths and not any(os.path.exists(path) for path in paths):
        root = options.image_root or os.path.dirname(options.path)
        raise InputError(f"input {options.path}: none of the first {len(paths)} image paths exist "
                         f"(e.g. {paths[0]}); pass the folder they are relative to with --image-root "
                         f"(now {root or '.'})")


def iter_loaded(records: list[Record], *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[Loaded]:
    """Load each record's image bytes, caption and label, in order, one Loaded per record. Local files are
    read only when they are regular files of at most `max_bytes` (a table may name `/dev/zero` or a FIFO)."""
    position = 0
    while position < len(records):
        record = records[position]
        if record.shard_url is None:
            yield _load_file_record(record, max_bytes=max_bytes)
            position += 1
            continue
        end = position
        while end < len(records) and records[end].shard_url == record.shard_url:
            end += 1
        yield from _load_shard_records(records[position:end])
        position = end


def _load_file_record(record: Record, *, max_bytes: int) -> Loaded:
    if record.problem:
        return Loaded(record.source, problem=record.problem)
    if record.url:  # a URL further down a table whose first rows were local paths: the writer downloads it;
        return Loaded(record.source, problem="not_downloaded")  # --dedup's local pre-pass leaves it out
    try:
        image = read_regular_file(record.image_path, max_bytes=max_bytes)
    except SampleRejected as rejected:
        return Loaded(record.source, problem=rejected.reason)
    except FileNotFoundError:
        return Loaded(record.source, problem="missing_image")
    except OSError:
        return Loaded(record.source, problem="unreadable_image")
    caption, label = record.caption, record.label
    try:
        if record.caption_path:
            caption = read_regular_file(record.caption_path, max_bytes=max_bytes).decode("utf-8").strip() or None
        if record.label_path:
            text = read_regular_file(record.label_path, max_bytes=max_bytes).decode("ascii", errors="replace")
            label = _parse_label(text.strip())
            if label is None:
                return Loaded(record.source, problem="bad_label")
    except UnicodeDecodeError:
        return Loaded(record.source, problem="bad_text")
    except SampleRejected as rejected:
        return Loaded(record.source, problem=rejected.reason)
    except OSError:
        return Loaded(record.source, problem="missing_caption")
    return Loaded(record.source, image=image, caption=caption, label=label, question=record.question)


def read_regular_file(path: str, *, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; SampleRejected `not_a_file` (a device, FIFO,
    socket or folder: opened without blocking, never read) or `too_large`; OSError when it cannot be opened."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(descriptor, "rb", closefd=True) as handle:
        kind = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(kind):
            raise SampleRejected("not_a_file", f"{path} is not a regular file")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SampleRejected("too_large", f"{path} is over {max_bytes} bytes")
    return data


def _load_shard_records(records: list[Record]) -> Iterator[Loaded]:
    """Records of one shard, consecutive indices: one pass over the tar from the first."""
    url, first = records[0].shard_url, records[0].shard_index
    samples = iter_raw_samples(url, start=first, extensions=SAMPLE_EXTENSIONS)
    done = 0
    try:
        for sample in samples:
            yield _loaded_from_sample(sample)
            done += 1
            if done == len(records):
                break
    except ShardTruncated:
        pass  # the rest are counted below: the shard was cut since it was counted
    finally:
        samples.close()
    for record in records[done:]:
        yield Loaded(record.source, problem="truncated_shard")


def _loaded_from_sample(sample: dict) -> Loaded:
    source = f"{sample['__url__']}#{sample['__key__']}"
    image = sample_image_bytes(sample)
    try:
        check_raw_sample(sample)
        if image is None:
            return Loaded(source, problem="missing_image")
        caption = sample_caption(sample)
        question = sample_question(sample.get("json"))
    except SampleRejected as rejected:
        return Loaded(source, problem=rejected.reason)
    label = None
    if sample.get("cls"):
        label = _parse_label(sample["cls"].decode("ascii", errors="replace").strip())
        if label is None:
            return Loaded(source, problem="bad_label")
    return Loaded(source, image=image[1], caption=caption, label=label, question=question)
