"""The `--dedup` set of image digests: on disk (SQLite), exact, bounded memory at any scale.

A Bloom filter would be smaller, but its false positives would drop unique images as
"duplicates"; a SQLite table keyed by the 32-byte sha256 costs ~60 bytes a row on disk,
and only its page cache (a few MB) in memory, however many rows there are.

Each digest maps to the lowest input ordinal seen with it, so a row is a duplicate exactly
when the store holds its digest under a lower ordinal: the same answer in every run, in
any order of insertion.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable

DEDUP_FILE = ".dedup.sqlite"  # downloads: kept, so a resumed job still knows finished chunks' images
SCRATCH_DEDUP_FILE = ".dedup-scratch.sqlite"  # local input: rebuilt by every run, removed after it
_CACHE_KIB = 8192


class DigestStore:
    """sha256 digest -> first input ordinal, in `folder/.dedup.sqlite`."""

    def __init__(self, folder: str, *, name: str = DEDUP_FILE):
        self.path = os.path.join(folder, name)
        self._db = sqlite3.connect(self.path, timeout=120, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        self._db.execute("CREATE TABLE IF NOT EXISTS digests (digest BLOB PRIMARY KEY, ordinal INTEGER NOT NULL) "
                         "WITHOUT ROWID")
        self._db.execute("CREATE INDEX IF NOT EXISTS digests_by_ordinal ON digests (ordinal)")
        self._db.execute("CREATE TABLE IF NOT EXISTS duplicates (ordinal INTEGER PRIMARY KEY)")

    def add(self, pairs: Iterable[tuple[int, bytes]]) -> None:
        """Record (ordinal, digest) pairs in one transaction; a pair whose digest is held under a lower
        ordinal (stored before, or earlier in `pairs`) is recorded as a duplicate. Set-based: the pairs go
        into a scratch table in one executemany, and two statements merge them."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS batch (digest BLOB NOT NULL, ordinal INTEGER NOT NULL)")
            self._db.execute("DELETE FROM batch")
            self._db.executemany("INSERT INTO batch VALUES (?, ?)", ((digest, ordinal) for ordinal, digest in pairs))
            self._db.execute("INSERT INTO digests SELECT digest, min(ordinal) FROM batch WHERE true GROUP BY digest "
                             "ON CONFLICT(digest) DO UPDATE SET ordinal = min(ordinal, excluded.ordinal)")
            self._db.execute("INSERT OR IGNORE INTO duplicates SELECT batch.ordinal FROM batch "
                             "JOIN digests ON digests.digest = batch.digest WHERE digests.ordinal < batch.ordinal")
            self._db.execute("DELETE FROM batch")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def first_ordinal(self, digest: bytes) -> int | None:
        """The lowest ordinal recorded with this digest, if any."""
        row = self._db.execute("SELECT ordinal FROM digests WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row else None

    def duplicates_between(self, start: int, stop: int) -> frozenset[int]:
        """Ordinals in [start, stop) found to be duplicates by `add`."""
        return frozenset(row[0] for row in self._db.execute(
            "SELECT ordinal FROM duplicates WHERE ordinal >= ? AND ordinal < ?", (start, stop)))

    def forget(self, ranges: Iterable[range]) -> None:
        """Drop what rows in these ordinal ranges added (chunks that were not finished)."""
        self._db.execute("BEGIN IMMEDIATE")
        for span in ranges:
            self._db.execute("DELETE FROM digests WHERE ordinal >= ? AND ordinal < ?", (span.start, span.stop))
            self._db.execute("DELETE FROM duplicates WHERE ordinal >= ? AND ordinal < ?", (span.start, span.stop))
        self._db.execute("COMMIT")

    def clear(self) -> None:
        """Start empty."""
        self._db.execute("DELETE FROM digests")
        self._db.execute("DELETE FROM duplicates")

    def close(self, *, remove: bool = False) -> None:
        """Close the database (and delete its files)."""
        self._db.close()
        if remove:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.remove(self.path + suffix)
