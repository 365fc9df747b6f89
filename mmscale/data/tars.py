"""Shard specs and raw shard reading.

A shard spec names tar files in WebDataset layout: brace expansion
(`data/shard-{000000..000099}.tar`), a directory (all its `*.tar`), several sources joined
with `::`, each optionally weighted with a trailing `@W` (`a-{0..9}.tar@3::b-{0..4}.tar@1`),
local paths, fsspec URLs (`s3://`, `gs://`, `https://`, ...) and, only when the command line
(`--allow-pipe`) or the environment (`MMSCALE_ALLOW_PIPE=1`) allows it, `pipe:` commands: never a
config file, which may come from anyone.

Reading groups tar members by key (webdataset's naming rule), numbering samples in shard order so
that a loader position is just (shard, index). Shards may come from anyone: only plain tars are
read, only the members a reader uses, each up to a size limit, and the reader's own fields
(`__key__`, `__url__`, `__index__`) cannot be overwritten by a member's name.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import braceexpand

from mmscale.atomic import write_atomically

SIZES_FILE = "sizes.json"
# Opening a remote shard (fsspec) is retried this many times, after 1, 2, 4, ... x REMOTE_BACKOFF_S
# seconds, before the shard counts as unreadable; a missing object is not retried.
REMOTE_RETRIES = 3
REMOTE_BACKOFF_S = 1.0
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SAMPLE_EXTENSIONS = IMAGE_EXTENSIONS + ("txt", "json", "cls")
"""The members training, inspection and re-sharding read; others are passed over unread."""
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20
"""Larger tar members are skipped unread (`member_too_large`): downloads are capped at 20 MB."""
_MAX_TEXT_HEADER_BYTES = 1 << 20
_SKIP_BLOCK_BYTES = 1 << 20
_TEXT_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                      tarfile.GNUTYPE_LONGLINK)
_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip"), (b"\xfd7zXZ\x00", "xz", "xz -d"), (b"BZh", "bzip2", "bunzip2"),
               (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"))
ALLOW_PIPE_VARIABLE = "MMSCALE_ALLOW_PIPE"
_PIPE_REFUSED = ("pipe: URLs run shell commands and are refused; if you trust this spec, pass --allow-pipe "
                 f"(or set {ALLOW_PIPE_VARIABLE}=1)")
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


def pipes_allowed() -> bool:
    """Whether `pipe:` shard URLs may run: only when the command line (`--allow-pipe`, which sets it) or the
    environment says `MMSCALE_ALLOW_PIPE=1`, so that no config file can turn it on."""
    return os.environ.get(ALLOW_PIPE_VARIABLE, "") == "1"


def parse_spec(spec: str) -> list[ShardSource]:
    """Split a shard spec into weighted sources, expanding braces and directories.

    Raises ValueError for an empty spec, a non-positive weight, or a `pipe:` URL (named or found in a
    folder) unless pipes_allowed().
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
            urls.extend(_folder_shards(url) if _is_local(url) and os.path.isdir(url) else [url])
        for url in urls:
            if url.startswith("pipe:") and not pipes_allowed():
                raise ValueError(f"shard {url}: {_PIPE_REFUSED}")
        sources.append(ShardSource(urls=tuple(urls), weight=weight))
    return sources


def _folder_shards(folder: str) -> list[str]:
    """The `*.tar` files of a folder, as paths that cannot read as a `pipe:` or remote URL (`./pipe:x.tar`)."""
    found = sorted(name for name in os.listdir(folder) if name.endswith(".tar")
                   and os.path.isfile(os.path.join(folder, name)))
    if not found:
        raise ShardError(f"shard directory {folder}: contains no .tar files")
    return [os.path.join(folder, name) for name in found]  # join(".", name) keeps the "./"


def spec_urls(spec: str) -> list[str]:
    """All shard URLs of a spec, sources concatenated in order (weights ignored)."""
    return [url for source in parse_spec(spec) for url in source.urls]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def open_shard(url: str):
    """Open a shard for binary reading; a missing or unreadable shard raises ShardError naming it."""
    if url.startswith("pipe:"):
        if not pipes_allowed():
            raise ShardError(f"shard {url}: {_PIPE_REFUSED}")
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
        self.head = b""  # the first bytes, to say what a file that is not a tar is
        self.closed = False
        self.close_error: Exception | None = None

    def __str__(self) -> str:  # webdataset names the file object in its error messages
        return self.url

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if not self.head:
            self.head = data[:8]
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


def iter_raw_samples(url: str, *, start: int = 0,
                     extensions: Collection[str] | None = None,
                     max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Yield the samples of one shard as dicts of raw bytes, in tar order.

    Each dict has `__key__`, `__url__`, `__index__` (ordinal in the shard) and one entry per
    member extension (lower case) among `extensions` (None: all); other members are passed over
    unread, and so are the members of samples before `start`. A member over `max_member_bytes`, or
    one named like the reader's own fields (`KEY.__url__`), is not read either: its sample carries
    the SampleRejected (`member_too_large`, `reserved_member`) under `__rejected__`, which
    `check_raw_sample` raises. Only plain tars are read: a compressed file (whatever its name) is a
    ShardError (`not_a_tar`). A truncated shard (cut inside a member, inside a header, or at a member
    boundary) raises ShardTruncated after the samples read before the cut; each member yielded was
    read whole, and a sample left without one of its members is skipped downstream.
    """
    stream = _EndWatcher(open_shard(url), url)
    wanted = None if extensions is None else frozenset(extensions)
    index = 0
    current: dict | None = None
    try:
        archive = tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo)
        for member in archive:
            archive.members = []  # a streamed archive keeps every header it has read otherwise
            name = _sample_name(member)
            if name is None:
                continue
            key, extension = name
            starts = current is None or key != current["__key__"]
            position = index + 1 if starts and current is not None else index
            # read before the sample is switched: a member cut short leaves the previous sample the last whole one
            content = _member_content(archive, member, extension, wanted if position >= start else frozenset(),
                                      max_member_bytes)
            if starts:
                if current is not None and index >= start:
                    yield current
                index, current = position, {"__key__": key, "__url__": url, "__index__": position}
            if isinstance(content, SampleRejected):
                current.setdefault("__rejected__", content)
            elif content is not None:
                current[extension] = content
        if stream.ran_out:
            raise tarfile.ReadError("no end-of-archive marker")
        stream.close()
        if stream.close_error is not None:  # e.g. a pipe: command that exited with an error
            raise ShardError(f"shard {url}: {stream.close_error}")
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        if index == 0 and current is None and "unexpected end of data" not in str(error):
            raise ShardError(f"shard {url}: {_not_a_tar(stream.head, error)}", "not_a_tar") from None
        if current is not None and index >= start:
            yield current
        raise ShardTruncated(url, index + (current is not None), error) from None
    finally:
        stream.close()
    if current is not None and index >= start:
        yield current


def check_raw_sample(sample: dict) -> None:
    """Raise the SampleRejected that reading marked a raw sample with (an oversized or reserved member)."""
    rejected = sample.get("__rejected__")
    if rejected is not None:
        raise rejected


def _sample_name(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, lower-case extension) of a regular member, None for anything else: links, folders, sparse
    files, names without an extension and webdataset's own `__...__` members."""
    from webdataset.tariterators import base_plus_ext  # webdataset imports torch: see open_shard

    if not member.isreg() or member.issparse() or os.path.basename(member.name).startswith("__"):
        return None
    key, extension = base_plus_ext(member.name)
    return None if key is None else (key, extension.lower())


def _member_content(archive: tarfile.TarFile, member: tarfile.TarInfo, extension: str,
                    wanted: frozenset[str] | None, max_member_bytes: int) -> bytes | SampleRejected | None:
    """A member's bytes; None for a member nobody reads; the rejection for one that must not be read. Unread
    members are still passed through block by block, so a cut inside one is found here, as if it were read."""
    content = None
    if extension.startswith("__"):  # `KEY.__index__` would overwrite the reader's own fields
        content = SampleRejected("reserved_member", f"member {member.name} is named like a reader field")
    elif wanted is not None and extension not in wanted:
        pass
    elif member.size > max_member_bytes:
        content = SampleRejected("member_too_large",
                                 f"member {member.name} is {member.size:,} bytes, over max_member_bytes={max_member_bytes:,}")
    else:
        return archive.extractfile(member).read()
    handle = archive.extractfile(member)
    while handle.read(_SKIP_BLOCK_BYTES):
        pass
    return content


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a PAX or GNU long-name header's body into memory whole: refuse a huge one first."""

    def _proc_member(self, archive):
        if self.type in _TEXT_HEADER_TYPES and self.size > _MAX_TEXT_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(f"a {self.size:,}-byte extended header at offset {self.offset}")
        return super()._proc_member(archive)


def _not_a_tar(head: bytes, error: Exception) -> str:
    for magic, name, command in _COMPRESSED:
        if head.startswith(magic):
            return f"compressed with {name}: mmscale reads plain (uncompressed) tars only; decompress it ({command})"
    return f"not a readable tar file ({error})"


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


def count_samples(url: str) -> int:
    """The samples of a shard, numbered as iter_raw_samples numbers them (a truncated shard: those before the
    cut). A local tar is walked header by header without reading its members; others are read through."""
    if _is_local(url) and not url.startswith("file:"):
        with open_shard(url) as handle:  # raises ShardError for a missing or empty file
            head = handle.read(8)
            handle.seek(0)
            try:
                with tarfile.open(fileobj=handle, mode="r:", tarinfo=_BoundedTarInfo) as archive:
                    return _count_keys(_sample_name(member) for member in _members_until_error(archive))
            except tarfile.ReadError as error:
                raise ShardError(f"shard {url}: {_not_a_tar(head, error)}", "not_a_tar") from None
    count = 0
    try:
        for _ in iter_raw_samples(url, extensions=()):
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
    count, current = 0, None
    for name in names:
        if name is not None and name[0] != current:
            count, current = count + 1, name[0]
    return count


def shard_sizes(urls: list[str], *, unreadable: list | None = None) -> dict[str, int]:
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
                listed[url] = count_samples(url)
            except ShardError as error:
                listed[url] = 0
                if unreadable is not None:
                    unreadable.append(error)
    return {url: listed[url] for url in urls}


def write_bytes_atomically(path: str | os.PathLike, payload: bytes) -> None:
    """Write a file under a fresh temporary name and rename it, so readers never see half of it."""
    write_atomically(path, payload)


def json_bytes(value) -> bytes:
    """`value` as the indented, key-sorted JSON the project's small files hold."""
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def write_json_atomically(path: str | os.PathLike, value) -> None:
    """Atomically write `value` as indented JSON."""
    write_bytes_atomically(path, json_bytes(value))


def sample_caption(sample: dict) -> str | None:
    """The caption of a raw sample: its `txt` member, else `json["caption"]`; None if absent.

    Raises SampleRejected: `bad_text` for text that is not UTF-8, `bad_json` for a `json` member that
    does not parse (nested too deep included) when it is where the caption would be.
    """
    try:
        if sample.get("txt"):
            return sample["txt"].decode("utf-8").strip() or None
        if not sample.get("json"):
            return None
        text = sample["json"].decode("utf-8")
    except UnicodeDecodeError:
        raise SampleRejected("bad_text", "caption is not UTF-8") from None
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as error:  # a crafted document nests past the parser's stack
        raise SampleRejected("bad_json", f"json member does not parse ({type(error).__name__})") from None
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
