"""Shard specs and raw shard reading.

A shard spec names tar files in WebDataset layout: brace expansion
(`data/shard-{000000..000099}.tar`), a directory (all its `*.tar`), several sources joined
with `::`, each optionally weighted with a trailing `@W` (`a-{0..9}.tar@3::b-{0..4}.tar@1`),
local paths, fsspec URLs (`s3://`, `gs://`, `https://`, ...) and, only when the caller allows
it, `pipe:` commands.

Reading groups tar members by key with webdataset's own tar iterator, numbering samples in
shard order so that a loader position is just (shard, index).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand

SIZES_FILE = "sizes.json"
# Opening a remote shard (fsspec) is retried this many times, after 1, 2, 4, ... x REMOTE_BACKOFF_S
# seconds, before the shard counts as unreadable; a missing object is not retried.
REMOTE_RETRIES = 3
REMOTE_BACKOFF_S = 1.0
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_WEIGHT = re.compile(r"@(\d+(?:\.\d*)?|\.\d+)$")


class ShardError(Exception):
    """A shard that cannot be opened or read at all; the message names the shard and `reason` says why
    (`missing`, `empty`, `permission`, `not_a_tar`, `remote`, `unreadable`): the training loader
    skips such a shard and counts it as `shard_<reason>`."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


class SampleRejected(Exception):
    """A sample that is skipped, not fatal; `reason` names the counter it is skipped under
    (`corrupt_image`, `missing_caption`, ...), shared by the shard writer and the loader."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class ShardTruncated(Exception):
    """A shard that ended in the middle of a tar member (a truncated or corrupt file)."""

    def __init__(self, url: str, samples_read: int, cause: Exception):
        super().__init__(f"shard {url}: truncated or corrupt tar after {samples_read} samples ({cause})")
        self.url = url
        self.samples_read = samples_read


@dataclass(frozen=True)
class ShardSource:
    """One `::`-separated part of a spec: its shard URLs and its sampling weight."""

    urls: tuple[str, ...]
    weight: float = 1.0


def parse_spec(spec: str, *, allow_pipe: bool = False) -> list[ShardSource]:
    """Split a shard spec into weighted sources, expanding braces and directories.

    Raises ValueError for an empty spec, a non-positive weight, or a `pipe:` URL when
    `allow_pipe` is false (a spec from a config file should not run shell commands unasked).
    """
    if not spec or not spec.strip():
        raise ValueError("empty shard spec: give a path such as data/shard-{000000..000009}.tar")
    sources = []
    for part in spec.split("::"):
        part = part.strip()
        weight = 1.0
        match = _WEIGHT.search(part)
        if match:
            weight = float(match.group(1))
            part = part[: match.start()]
        if weight <= 0:
            raise ValueError(f"shard spec part {part!r}: weight must be positive, got {weight}")
        urls = []
        for url in braceexpand.braceexpand(part):
            if url.startswith("pipe:") and not allow_pipe:
                raise ValueError(
                    f"shard {url}: pipe: URLs run shell commands and are refused; "
                    "set data.allow_pipe=true (or pass --allow-pipe) if you trust this spec"
                )
            if _is_local(url) and os.path.isdir(url):
                found = sorted(str(p) for p in Path(url).glob("*.tar"))
                if not found:
                    raise ShardError(f"shard directory {url}: contains no .tar files")
                urls.extend(found)
            else:
                urls.append(url)
        sources.append(ShardSource(urls=tuple(urls), weight=weight))
    return sources


def spec_urls(spec: str, *, allow_pipe: bool = False) -> list[str]:
    """All shard URLs of a spec, sources concatenated in order (weights ignored)."""
    return [url for source in parse_spec(spec, allow_pipe=allow_pipe) for url in source.urls]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def open_shard(url: str, *, allow_pipe: bool = False):
    """Open a shard for binary reading; a missing or unreadable shard raises ShardError naming it."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ShardError(f"shard {url}: pipe: URLs are refused unless explicitly allowed")
        from webdataset.gopen import gopen  # webdataset imports torch: only readers of shards pay for it

        return gopen(url, "rb")
    if _is_local(url):
        local = url[len("file:"):] if url.startswith("file:") else url
        try:
            handle = open(local, "rb")
        except FileNotFoundError:
            raise ShardError(f"shard {url}: no such file", "missing") from None
        except PermissionError as error:
            raise ShardError(f"shard {url}: permission denied ({error.strerror or error})", "permission") from None
        except OSError as error:
            raise ShardError(f"shard {url}: cannot open ({error.strerror or error})") from None
        if os.fstat(handle.fileno()).st_size == 0:
            handle.close()
            raise ShardError(f"shard {url}: empty file (0 bytes)", "empty")
        return handle
    return _open_remote(url)


def _open_remote(url: str, *, retries: int | None = None, backoff: float | None = None):
    """Open an fsspec URL, retrying failures other than a missing object with exponential backoff."""
    import fsspec

    retries = REMOTE_RETRIES if retries is None else retries
    backoff = REMOTE_BACKOFF_S if backoff is None else backoff
    for attempt in range(retries + 1):
        try:
            return fsspec.open(url, "rb").open()
        except FileNotFoundError:
            raise ShardError(f"shard {url}: no such file", "missing") from None
        except Exception as error:  # noqa: BLE001  # fsspec backends raise many types; name the shard either way
            if attempt == retries:
                raise ShardError(f"shard {url}: cannot open after {retries + 1} attempts ({error})", "remote") from None
            time.sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")


class _EndWatcher:
    """A read-only file wrapper that notices when a reader asks for bytes past the end.

    tarfile treats a tar that stops at a member boundary (or inside a header) as complete.
    A whole tar ends with zero blocks, so its reader stops before the end of the data; a
    reader that runs out of data while looking for the next header has a truncated tar.
    """

    def __init__(self, stream, url: str):
        self.stream, self.url = stream, url
        self.ran_out = False
        self.closed = False
        self.close_error: Exception | None = None

    def __str__(self) -> str:  # webdataset names the file object in its error messages
        return self.url

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if not data and size != 0:
            self.ran_out = True
        return data

    def close(self) -> None:
        """Close once; an error from closing (a failed pipe: command) is kept, not raised."""
        if self.closed:
            return
        self.closed = True
        try:
            self.stream.close()
        except Exception as error:  # whatever the opener's close raises; reported by the reader
            self.close_error = error


def iter_raw_samples(url: str, *, allow_pipe: bool = False, start: int = 0) -> Iterator[dict]:
    """Yield the samples of one shard as dicts of raw bytes, in tar order.

    Each dict has `__key__`, `__url__`, `__index__` (ordinal in the shard) and one entry per
    member extension (lower case). Samples before `start` are skipped without being decoded.
    A truncated shard (cut inside a member, inside a header, or at a member boundary) raises
    ShardTruncated after the samples read before the cut; each member yielded was read
    whole, and a sample left without one of its members is skipped downstream.
    """
    from webdataset.tariterators import base_plus_ext, tar_file_iterator  # see open_shard

    stream = _EndWatcher(open_shard(url, allow_pipe=allow_pipe), url)
    index = 0
    current: dict | None = None
    try:
        for member in tar_file_iterator(stream):
            key, extension = base_plus_ext(member["fname"])
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                if index >= start:
                    yield current
                index += 1
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url, "__index__": index}
            current[extension.lower()] = member["data"]
        if stream.ran_out:
            raise tarfile.ReadError("no end-of-archive marker")
        stream.close()
        if stream.close_error is not None:  # e.g. a pipe: command that exited with an error
            raise ShardError(f"shard {url}: {stream.close_error}")
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        if index == 0 and current is None and "unexpected end of data" not in str(error):
            raise ShardError(f"shard {url}: not a readable tar file ({error})", "not_a_tar") from None
        if current is not None and index >= start:
            yield current
        raise ShardTruncated(url, index + (current is not None), error) from None
    finally:
        stream.close()
    if current is not None and index >= start:
        yield current


def read_sizes(urls: list[str]) -> dict[str, int] | None:
    """Sample counts per shard from the `sizes.json` beside the shards, or None if any is unknown."""
    known = _listed_sizes(urls)
    return known if len(known) == len(set(urls)) else None


def _listed_sizes(urls: list[str]) -> dict[str, int]:
    """The sample counts that a `sizes.json` beside the shards gives (local folders and fsspec URLs)."""
    sizes: dict[str, int] = {}
    loaded: dict[str, dict] = {}
    for url in urls:
        if url.startswith("pipe:"):
            continue
        local = _is_local(url)
        folder = (os.path.dirname(url) or ".") if local else url.rsplit("/", 1)[0]
        if folder not in loaded:
            loaded[folder] = _read_sizes_file(folder, local=local)
        count = loaded[folder].get(url.rsplit("/", 1)[-1] if not local else os.path.basename(url))
        if isinstance(count, int) and count >= 0:
            sizes[url] = count
    return sizes


def _read_sizes_file(folder: str, *, local: bool) -> dict:
    try:
        if local:
            with open(os.path.join(folder, SIZES_FILE)) as handle:
                listed = json.load(handle)
        else:
            import fsspec

            with fsspec.open(f"{folder}/{SIZES_FILE}", "rt") as handle:
                listed = json.load(handle)
    except Exception:  # noqa: BLE001  # absent, unreadable or not JSON (any fsspec backend): count instead
        return {}
    return listed if isinstance(listed, dict) else {}


def count_samples(url: str, *, allow_pipe: bool = False) -> int:
    """The samples of a shard, numbered as iter_raw_samples numbers them (a truncated shard: those before the
    cut). A local tar is walked header by header without reading its members; others are read through."""
    if _is_local(url) and not url.startswith("file:"):
        with open_shard(url) as handle:  # raises ShardError for a missing or empty file
            try:
                with tarfile.open(fileobj=handle, mode="r:") as archive:
                    return _count_keys(member.name for member in _members_until_error(archive) if member.isfile())
            except tarfile.ReadError as error:
                raise ShardError(f"shard {url}: not a readable tar file ({error})", "not_a_tar") from None
    count = 0
    try:
        for _ in iter_raw_samples(url, allow_pipe=allow_pipe):
            count += 1
    except ShardTruncated as error:
        return error.samples_read
    return count


def _members_until_error(archive: tarfile.TarFile):
    try:
        yield from archive
    except (tarfile.TarError, OSError, EOFError):
        return  # truncated: the loader counts it when it gets there


def _count_keys(names) -> int:
    from webdataset.tariterators import base_plus_ext

    count, current = 0, None
    for name in names:
        key, _ = base_plus_ext(name)
        if key is not None and key != current:
            count, current = count + 1, key
    return count


def shard_sizes(urls: list[str], *, allow_pipe: bool = False, unreadable: list | None = None) -> dict[str, int]:
    """Samples per shard, in the order of `urls`: from sizes.json where it lists them, else counted (with a
    progress bar when there are many). An unreadable shard counts 0 (its error goes to `unreadable`); the
    loader meets it again and skips and counts it there."""
    listed = _listed_sizes(urls)
    missing = [url for url in dict.fromkeys(urls) if url not in listed]
    if missing:
        from tqdm import tqdm

        if len(missing) > 50:
            warnings.warn(f"{len(missing)} shards have no sizes.json entry: counting their samples (write a "
                          "sizes.json beside them to start faster)", stacklevel=2)
        for url in tqdm(missing, desc="counting samples", unit="shard", disable=len(missing) <= 50):
            try:
                listed[url] = count_samples(url, allow_pipe=allow_pipe)
            except ShardError as error:
                listed[url] = 0
                if unreadable is not None:
                    unreadable.append(error)
    return {url: listed[url] for url in urls}


def write_bytes_atomically(path: str | os.PathLike, payload: bytes) -> None:
    """Write a file under a temporary name and rename it, so readers never see half of it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json_atomically(path: str | os.PathLike, value) -> None:
    """Atomically write `value` as indented JSON."""
    write_bytes_atomically(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def sample_caption(sample: dict) -> str | None:
    """The caption of a raw sample: its `txt` member, else `json["caption"]`; None if absent.

    Raises UnicodeDecodeError for text that is not UTF-8, so callers can count it.
    """
    if sample.get("txt"):
        return sample["txt"].decode("utf-8").strip() or None
    if sample.get("json"):
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except json.JSONDecodeError:
            return None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(caption, str) and caption.strip():
            return caption.strip()
    return None


def sample_image_bytes(sample: dict) -> tuple[str, bytes] | None:
    """The (extension, bytes) of a raw sample's image member, or None when it has none."""
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return extension, sample[extension]
    return None


def tar_member(name: str, payload: bytes, mtime: int = 0) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A (TarInfo, file object) pair ready for `TarFile.addfile`, with deterministic metadata.

    The mtime is an int: a float one makes tarfile add a PAX header to every member.
    """
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = int(mtime)
    info.mode = 0o644
    return info, io.BytesIO(payload)
