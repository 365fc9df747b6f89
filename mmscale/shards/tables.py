"""Tables of image paths or URLs and captions, read as a stream: csv, tsv, jsonl, parquet.

`--input` names one table, a glob of them (`urls/*.parquet`) or a folder of them; the files
are read in sorted order as one table. Rows are never all held at once: parquet is read one
record batch at a time (only the needed columns), text formats line by line. Counting the rows
(to plan the shards up front) reads parquet footers only and streams the text formats once.

A row that cannot be parsed (bad JSON, a line that is not UTF-8) stays in the numbering as a
skip reason string, so every input row is accounted for.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

TABLE_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_BATCH_ROWS = 8192  # parquet rows decoded at a time
_COLUMN_PROBE_ROWS = 1000  # jsonl rows read to learn the column names


class TableError(ValueError):
    """A table that cannot be read; the message names the file."""


@dataclass(frozen=True)
class TableFile:
    """One file of the table and its row count."""

    path: str
    kind: str
    rows: int


def table_paths(path: str, kind: str | None = None) -> list[tuple[str, str]]:
    """(file, kind) of every table file `path` names, sorted; `kind` overrides the extension."""
    if glob.has_magic(path):
        files = sorted(p for p in glob.glob(path) if os.path.isfile(p))
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if os.path.splitext(name)[1].lower() in TABLE_KINDS and not name.startswith("."))
    else:
        files = [path]
    found = []
    for file in files:
        file_kind = kind or TABLE_KINDS.get(os.path.splitext(file)[1].lower())
        if file_kind is None:
            raise TableError(f"input {file}: not a table (.csv, .tsv, .jsonl or .parquet); "
                             "narrow the --input pattern or pass --input-kind")
        found.append((file, file_kind))
    if not found:
        raise TableError(f"input {path}: matches no table files; check --input")
    return found


def count_rows(path: str, kind: str, advance: Callable[[int], object] | None = None) -> int:
    """Rows of one table file, exactly as many as `iter_rows` yields (parquet: from the footer; others:
    one streaming pass that parses no JSON). `advance(n)` is told of every n bytes read."""
    try:
        if kind == "parquet":
            import pyarrow.parquet as parquet

            return parquet.ParquetFile(path).metadata.num_rows
        if kind == "jsonl":
            with open(path, "rb") as handle:
                return _count(handle, (1 for line in handle if line.strip()), advance)
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            reader = csv.reader(handle, **_dialect(kind))
            next(reader, None)  # the header, as DictReader reads it; DictReader then skips empty rows
            return _count(handle.buffer, (1 for row in reader if row), advance)
    except csv.Error as error:
        raise TableError(f"input {path}: not valid {kind} ({error})") from None
    except (OSError, ValueError) as error:
        raise TableError(f"input {path}: cannot read it as {kind} ({error}); check --input-kind") from None


def _count(handle, ones: Iterator[int], advance: Callable[[int], object] | None) -> int:
    """Sum `ones` (rows read from `handle`), reporting the bytes read to `advance` every 65,536 rows."""
    rows = done = 0
    for rows, _ in enumerate(ones, start=1):
        if advance is not None and not rows % 65536:
            position = handle.tell()
            advance(position - done)
            done = position
    if advance is not None:
        advance(os.fstat(handle.fileno()).st_size - done)
    return rows


def column_names(path: str, kind: str) -> list[str]:
    """The columns of a table file (jsonl: the keys of its first rows)."""
    try:
        if kind == "parquet":
            import pyarrow.parquet as parquet

            return list(parquet.ParquetFile(path).schema_arrow.names)
        if kind == "jsonl":
            names: dict[str, None] = {}
            for number, row in enumerate(iter_rows(path, kind)):
                if isinstance(row, dict):
                    names.update(dict.fromkeys(row))
                if number >= _COLUMN_PROBE_ROWS:
                    break
            return list(names)
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            return list(csv.DictReader(handle, **_dialect(kind)).fieldnames or [])
    except (OSError, ValueError, csv.Error) as error:
        raise TableError(f"input {path}: cannot read it as {kind} ({error}); check --input-kind") from None


def iter_rows(path: str, kind: str, columns: list[str] | None = None) -> Iterator[dict | str]:
    """Rows of one file as dicts (or a skip reason string for a row that cannot be parsed)."""
    if kind == "parquet":
        import pyarrow.parquet as parquet

        _release_arrow_memory()
        table = parquet.ParquetFile(path, pre_buffer=False)
        wanted = [name for name in columns if name in table.schema_arrow.names] if columns else None
        for batch in table.iter_batches(batch_size=_BATCH_ROWS, columns=wanted, use_threads=False):
            if not batch.num_columns:  # none of the wanted columns: still one (empty) row per counted row
                yield from ({} for _ in range(batch.num_rows))
                continue
            names = batch.schema.names
            for values in zip(*(column.to_pylist() for column in batch.columns)):
                yield dict(zip(names, values))
    elif kind == "jsonl":
        with open(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    yield _json_row(line)
    else:
        # surrogateescape keeps a bad caption from sinking the whole file; it is skipped as bad_text
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            try:
                yield from csv.DictReader(handle, **_dialect(kind))
            except csv.Error as error:
                raise TableError(f"input {path}: not valid {kind} ({error})") from None


def _release_arrow_memory() -> None:
    """Make Arrow return freed buffers to the system.

    Arrow's default allocator (mimalloc) keeps what a batch freed: reading a 1M-row table held
    ~40 MB more than a 100k-row one; with the system allocator (or jemalloc) it holds the same.
    """
    import pyarrow as pa

    if pa.default_memory_pool().backend_name == "mimalloc":
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
        except NotImplementedError:
            pa.set_memory_pool(pa.system_memory_pool())


def _dialect(kind: str) -> dict:
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == "tsv" else {}


def _json_row(line: bytes) -> dict | str:
    try:
        row = json.loads(line)
    except UnicodeDecodeError:
        return "bad_text"
    except ValueError:
        return "bad_row"
    return row if isinstance(row, dict) else "bad_row"
