"""Files and folders written under a temporary name beside their target, then renamed into place.

A temporary is `.{target name}.tmp{12 random hex digits}` in the target's own folder: the same
filesystem, so the final `os.replace` is atomic and readers never see half a file. It is created
exclusively (O_EXCL | O_NOFOLLOW for a file, mkdir for a folder), so a name guessed in advance, or a
symlink planted at it by someone else who can write to that folder, is never written through: a
collision just draws another name. Files get the usual 0666 & ~umask permissions (mkstemp's 0600
would make shards and checkpoints unreadable to the rest of a team).

Stale temporaries of a killed run match `TEMPORARY_GLOB` (and contain `.tmp`), which is what the
cleanups in train/checkpoints.py and shards/sharding.py look for.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMPORARY_GLOB = ".*.tmp*"
_ATTEMPTS = 100


def _candidate(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp{secrets.token_hex(6)}")


def _exhausted(target: Path) -> FileExistsError:
    return FileExistsError(f"{target.parent}: every one of {_ATTEMPTS} random temporary names for {target.name} "
                           "was taken; remove the stale .tmp files there")


def open_temporary(target: str | os.PathLike, *, buffering: int = -1) -> tuple[BinaryIO, Path]:
    """A new, empty file beside `target`, open for binary writing, and its path; the caller renames it
    over `target` (os.replace) when complete, or removes it."""
    target = Path(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_ATTEMPTS):
        candidate = _candidate(target)
        try:
            descriptor = os.open(candidate, flags, 0o666)
        except FileExistsError:
            continue
        return os.fdopen(descriptor, "wb", buffering=buffering), candidate
    raise _exhausted(target)


def temporary_folder(target: str | os.PathLike) -> Path:
    """A new, empty folder beside `target` (0777 & ~umask), to fill and rename into place."""
    target = Path(target)
    for _ in range(_ATTEMPTS):
        candidate = _candidate(target)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise _exhausted(target)


@contextmanager
def atomic_write(target: str | os.PathLike, *, fsync: bool = True, buffering: int = -1) -> Iterator[BinaryIO]:
    """Yield a binary handle to a fresh temporary beside `target`; when the block ends normally the
    file is flushed (and fsynced unless `fsync=False`) and renamed over `target`, and on an error it
    is removed and `target` is left as it was."""
    handle, temporary = open_temporary(target, buffering=buffering)
    try:
        with handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(target: str | os.PathLike, payload: bytes, *, fsync: bool = True) -> None:
    """Write `payload` to `target` through atomic_write."""
    with atomic_write(target, fsync=fsync) as handle:
        handle.write(payload)
