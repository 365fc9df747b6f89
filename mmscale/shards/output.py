"""The output folder of make_shards: a local or shared path, or an fsspec URL (s3://, gs://, az://, ...).

A path (local disk, NFS, Lustre): every file is written under a temporary name and renamed into
place (mmscale.atomic), and a POSIX lock file keeps a second make_shards out (sharding.py).

A URL names a store without rename (an object store): a shard is written to a local temporary
file and uploaded under its final name once complete, and small files (a chunk's failed rows and
stats, sizes.json, stats.json) are written in one request each. A store shows an object only
once its upload has completed, so a reader, or a resumed job, never sees half a shard, and a
chunk is done when its stats object exists, as on a path. The lock is a lease object the driver
renews (RemoteLease).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from mmscale.atomic import atomic_write
from mmscale.data.tars import json_bytes, write_bytes_atomically
from mmscale.shards.sources import InputError

LEASE_S = 120.0
"""A remote output's lease lapses this long after its driver last renewed it (a killed driver's, on
another machine; on the same machine a dead driver's lease is taken over at once)."""
LEASE_SETTLE_S = 1.0
"""How long a driver waits after writing the lease before reading it back to see whose write won."""


def is_url(location: str) -> bool:
    """Whether an output location is an fsspec URL rather than a path (file:// counts as a path)."""
    return bool(re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", location)) and not location.startswith("file://")


class Output:
    """Reads and writes the files of one output folder by name, on a path or an fsspec URL."""

    def __init__(self, location: str):
        self.location = location.removeprefix("file://") if location.startswith("file://") else location
        self.remote = is_url(location)
        self.fs = self.root = None
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(location)
            self.root = self.root.rstrip("/")

    def join(self, name: str) -> str:
        """The file's path (or the store's key of it)."""
        return f"{self.root}/{name}" if self.remote else os.path.join(self.location, name)

    def makedirs(self) -> None:
        if self.remote:
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            os.makedirs(self.location, exist_ok=True)

    def names(self) -> list[str]:
        """The names of the files in the folder (none when it does not exist yet)."""
        if not self.remote:
            return os.listdir(self.location)
        self.fs.invalidate_cache(self.root)
        try:
            return [path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def exists(self, name: str) -> bool:
        if not self.remote:
            return os.path.exists(self.join(name))
        self.fs.invalidate_cache(self.root)
        return self.fs.exists(self.join(name))

    def read_bytes(self, name: str) -> bytes | None:
        """The file's content; None when it is missing."""
        try:
            if self.remote:
                self.fs.invalidate_cache(self.join(name))  # a listing cached earlier would answer "missing"
                return self.fs.cat_file(self.join(name))
            with open(self.join(name), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def read_json(self, name: str):
        """The file's JSON; None when it is missing or not JSON (an error reading it raises: a store that does
        not answer is not an empty folder)."""
        payload = self.read_bytes(name)
        try:
            return None if payload is None else json.loads(payload)
        except ValueError:  # UnicodeDecodeError included
            return None

    def write_bytes(self, name: str, payload: bytes) -> None:
        """Write a whole file atomically: renamed into place on a path, one upload on a store."""
        if self.remote:
            self.fs.pipe_file(self.join(name), payload)
        else:
            write_bytes_atomically(self.join(name), payload)

    def write_json(self, name: str, value) -> None:
        self.write_bytes(name, json_bytes(value))

    def remove(self, name: str) -> None:
        """Delete the file if it is there."""
        try:
            if self.remote:
                self.fs.rm_file(self.join(name))
            else:
                os.remove(self.join(name))
        except FileNotFoundError:
            pass

    def size(self, name: str) -> int:
        return self.fs.size(self.join(name)) if self.remote else os.path.getsize(self.join(name))

    @contextmanager
    def staging(self) -> Iterator[str]:
        """Where temporary files of this folder are written: the folder itself on a path (renamed into
        place), a local temporary folder for a store (uploaded from there); removed afterwards."""
        if not self.remote:
            yield self.location
            return
        folder = tempfile.mkdtemp(prefix="mmscale-shards-")
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @contextmanager
    def writing(self, name: str) -> Iterator[BinaryIO]:
        """A binary handle to a new file that appears under `name` only when the block ends normally
        (mmscale.atomic's rename on a path, one upload to a store); on an error nothing appears."""
        with self.staging() as staging:
            local = os.path.join(staging, name)
            with atomic_write(local) as handle:
                yield handle
            if self.remote:
                self.place(local, name)

    def place(self, temporary: str, name: str) -> None:
        """Put a finished temporary file under its name: a rename on a path, an upload to a store."""
        if self.remote:
            self.fs.put_file(temporary, self.join(name))
            os.remove(temporary)
        else:
            os.replace(temporary, self.join(name))


class RemoteLease:
    """The lock of an output on a store: `.make_shards.lock` holds its driver's host, pid and a token, and
    the driver renews it every LEASE_S / 4. Another driver is refused while the lease is fresh; a lease not
    renewed for LEASE_S, or held by a process on this machine that is gone, is taken over. Stores cannot
    create an object only if it is absent, so two drivers starting together could both write it: each reads
    it back a moment later and the one whose write lost is refused. A driver that loses its lease later (to
    a driver that found it lapsed, or unable to renew it for LEASE_S / 2) stops at the next check()."""

    def __init__(self, output: Output, name: str):
        self.output, self.name = output, name
        self.token = secrets.token_hex(8)
        self.stopped = threading.Event()
        self.lost: str | None = None
        self.renewer: threading.Thread | None = None

    def _claim(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "renewed": time.time()}

    def _refuse(self, held: dict) -> InputError:
        return InputError(f"output {self.output.location}: another make_shards is writing there (host "
                          f"{held.get('host')}, pid {held.get('pid')}, lease renewed "
                          f"{time.time() - held.get('renewed', 0):.0f} s ago); wait for it or pick another "
                          f"--output. A killed driver's lease lapses {LEASE_S:.0f} s after its last renewal")

    def acquire(self) -> None:
        held = self.output.read_json(self.name)
        if held and not self._lapsed(held):
            raise self._refuse(held)
        self.output.write_json(self.name, self._claim())
        time.sleep(LEASE_SETTLE_S)  # a driver that started at the same moment has written by now: the last write won
        held = self.output.read_json(self.name) or {}
        if held.get("token") != self.token:
            raise self._refuse(held)
        self.renewer = threading.Thread(target=self._renew, daemon=True)
        self.renewer.start()

    @staticmethod
    def _lapsed(held: dict) -> bool:
        if time.time() - held.get("renewed", 0) > LEASE_S:
            return True
        if held.get("host") == socket.gethostname():
            try:
                os.kill(int(held.get("pid", 0)), 0)
            except ProcessLookupError:
                return True
            except (OSError, ValueError):
                return False
        return False

    def _renew(self) -> None:
        renewed = time.monotonic()
        while not self.stopped.wait(LEASE_S / 4):
            try:
                held = self.output.read_json(self.name) or {}
                if held.get("token") not in (None, self.token):
                    self.lost = f"make_shards on host {held.get('host')}, pid {held.get('pid')}, took it over"
                    return
                self.output.write_json(self.name, self._claim())
                renewed = time.monotonic()
            except Exception as error:  # the store did not answer: try again, while the lease surely holds
                if time.monotonic() - renewed > LEASE_S / 2:
                    self.lost = f"it could not be renewed for {LEASE_S / 2:g} s ({type(error).__name__}: {error})"
                    return

    def check(self) -> None:
        """Raise InputError once the lease is lost: the run stops instead of writing beside another driver."""
        if self.lost:
            raise InputError(f"output {self.output.location}: this make_shards lost its lease ({self.lost}) and "
                             "stopped; the chunks it finished are kept for the driver that holds the lease, or for "
                             "the same command run again once none does")

    def release(self) -> None:
        self.stopped.set()
        if self.renewer is not None:
            self.renewer.join()  # a renewal under way must not rewrite the lease after it is removed
        held = self.output.read_json(self.name)
        if held and held.get("token") == self.token:
            self.output.remove(self.name)
