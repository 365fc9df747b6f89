"""Download one image URL politely and robustly, or name why not.

Each worker process keeps one urllib3 pool (connections are reused: keep-alive) shared by its
download threads. A request:
- sends a user agent naming mmscale, follows redirects up to a limit (relative ones too),
- gives up after `timeout_s` (connect, each read, and the whole body together),
- retries connection errors, timeouts, cut-short bodies, 408, 429 and 5xx with exponential
  backoff (honouring a short `Retry-After`, delay-seconds or an HTTP date),
- refuses a body over `max_bytes` (from Content-Length before reading, else while reading),
- honours `X-Robots-Tag: noai / noimageai / noindex / noimageindex` unless told not to,
  for every agent or for `mmscale` (img2dataset's rule, with its token).

Failures are reasons, never exceptions: `timeout`, `connection_error`, `http_<code>`,
`too_many_redirects`, `too_large`, `robots`, `truncated`, `bad_url`.
"""

from __future__ import annotations

import datetime
import email.utils
import os
import random
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3

from mmscale import __version__

USER_AGENT_TOKEN = "mmscale"
USER_AGENT = f"{USER_AGENT_TOKEN}/{__version__} (image-text dataset downloader; +https://github.com/mmscale)"
ROBOTS_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
RETRYABLE_REASONS = frozenset({"timeout", "connection_error", "truncated", "http_408", "http_429", "http_500",
                               "http_502", "http_503", "http_504"})
_READ_BYTES = 1 << 16
_MAX_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class DownloadOptions:
    """How images are fetched from URLs."""

    threads: int = 16
    """Concurrent requests per worker process."""
    timeout_s: float = 10.0
    """Seconds a request may take in all (connect, headers and body)."""
    retries: int = 2
    """Further tries after a retryable failure (connection error, timeout, 408, 429, 5xx)."""
    backoff_s: float = 1.0
    """First wait before a retry; it doubles each time (with jitter)."""
    max_redirects: int = 5
    """Redirects followed before giving up (`too_many_redirects`)."""
    max_bytes: int = 20_000_000
    """Largest body accepted (`too_large`)."""
    respect_robots_headers: bool = True
    """Skip images whose X-Robots-Tag says noai, noimageai, noindex or noimageindex (`robots`)."""


@dataclass(frozen=True)
class Fetched:
    """A downloaded body, or the reason there is none."""

    body: bytes | None = None
    reason: str | None = None
    detail: str = ""
    status: int | None = None
    attempts: int = 1


class _Failed(Exception):
    def __init__(self, reason: str, detail: str = "", status: int | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.status, self.retry_after = reason, detail, status, retry_after


_pool_lock = threading.Lock()
_pool_by_process: dict[int, urllib3.PoolManager] = {}


def _pool(threads: int) -> urllib3.PoolManager:
    """This process's connection pool (a forked child makes its own)."""
    with _pool_lock:
        pool = _pool_by_process.get(os.getpid())
        if pool is None:
            pool = urllib3.PoolManager(num_pools=256, maxsize=max(1, threads), block=False,
                                       headers={"User-Agent": USER_AGENT}, retries=False)
            _pool_by_process.clear()  # a forked child does not use its parent's sockets
            _pool_by_process[os.getpid()] = pool
        return pool


def fetch(url: str, options: DownloadOptions) -> Fetched:
    """Download `url` with retries; see the module docstring for the rules."""
    attempt = 0
    while True:
        attempt += 1
        try:
            body, status = _fetch_once(url, options)
            return Fetched(body=body, status=status, attempts=attempt)
        except (ValueError, UnicodeError) as error:  # urlsplit/urljoin/IDNA on a malformed URL or Location
            return Fetched(reason="bad_url", detail=f"{type(error).__name__}: {error}", attempts=attempt)
        except _Failed as failure:
            if failure.reason not in RETRYABLE_REASONS or attempt > options.retries:
                return Fetched(reason=failure.reason, detail=failure.detail, status=failure.status, attempts=attempt)
            wait = options.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
            if failure.retry_after is not None:
                wait = max(wait, min(failure.retry_after, _MAX_RETRY_AFTER_S))
            time.sleep(wait)


def _fetch_once(url: str, options: DownloadOptions) -> tuple[bytes, int]:
    deadline = time.monotonic() + options.timeout_s
    pool = _pool(options.threads)
    for _ in range(options.max_redirects + 1):
        if urlsplit(url).scheme not in ("http", "https"):
            raise _Failed("bad_url", f"cannot download {url!r} (http and https only)")
        response = _request(pool, url, deadline)
        reusable = False  # a connection goes back to the pool only with its response read to the end
        try:
            if response.status != 200:
                reusable = _drained(response)
            if response.status in (301, 302, 303, 307, 308):
                location = response.headers.get("Location")
                if not location:
                    raise _Failed(f"http_{response.status}", "redirect without a Location", response.status)
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise _Failed(f"http_{response.status}", f"HTTP {response.status}", response.status,
                              _retry_after(response.headers.get("Retry-After")))
            if options.respect_robots_headers and disallowed_by_robots(response.headers.getlist("X-Robots-Tag")):
                raise _Failed("robots", "X-Robots-Tag forbids this use", response.status)
            body = _read_body(response, options, deadline)
            reusable = True
            return body, response.status
        finally:
            if reusable:
                response.release_conn()
            else:
                response.close()
    raise _Failed("too_many_redirects", f"more than {options.max_redirects} redirects")


def _request(pool: urllib3.PoolManager, url: str, deadline: float) -> urllib3.BaseHTTPResponse:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Failed("timeout", "no time left for the request")
    try:
        return pool.request("GET", url, preload_content=False, redirect=False, retries=False,
                            timeout=urllib3.Timeout(connect=left, read=left))
    except (urllib3.exceptions.TimeoutError, TimeoutError) as error:
        raise _Failed("timeout", str(error)) from None
    except urllib3.exceptions.LocationValueError as error:
        raise _Failed("bad_url", str(error)) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise _Failed("connection_error", str(error)) from None


def _drained(response: urllib3.BaseHTTPResponse) -> bool:
    """Read a redirect's or error's body if it is small; whether its connection can be reused."""
    try:
        return len(response.read(_READ_BYTES)) < _READ_BYTES
    except (urllib3.exceptions.HTTPError, OSError):
        return False


def _read_body(response: urllib3.BaseHTTPResponse, options: DownloadOptions, deadline: float) -> bytes:
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > options.max_bytes:
        raise _Failed("too_large", f"Content-Length {length} is over {options.max_bytes} bytes")
    parts, size = [], 0
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failed("timeout", "body not complete in time")
            if response.connection is not None and response.connection.sock is not None:
                response.connection.sock.settimeout(left)  # a server dripping bytes cannot outlast the deadline
            part = response.read1(_READ_BYTES)
            if not part:
                break
            size += len(part)
            if size > options.max_bytes:
                raise _Failed("too_large", f"body over {options.max_bytes} bytes")
            parts.append(part)
    except (urllib3.exceptions.TimeoutError, TimeoutError) as error:
        raise _Failed("timeout", str(error)) from None
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError, OSError) as error:
        raise _Failed("truncated", f"body cut short ({error})") from None
    body = b"".join(parts)
    encoded = response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
    if length and length.isdigit() and len(body) < int(length) and not encoded:  # gzip: Length counts the encoded
        raise _Failed("truncated", f"got {len(body)} of {length} bytes")
    return body


def _retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; an obsolete form may parse without a zone
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def disallowed_by_robots(values: list[str], token: str = USER_AGENT_TOKEN) -> bool:
    """Whether X-Robots-Tag header values forbid use by everyone or by `token` (`mmscale: noai`)."""
    for value in values:
        agent, _, directives = value.partition(":") if ":" in value else ("", "", value)
        if agent.strip() and agent.strip().lower() != token:
            continue
        if any(directive.strip().lower() in ROBOTS_DIRECTIVES for directive in directives.split(",")):
            return True
    return False
