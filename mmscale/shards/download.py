"""Download one image URL politely and robustly, or name why not.

Each worker process keeps one urllib3 pool (connections are reused: keep-alive) shared by its
download threads. A request:
- sends a user agent naming mmscale, follows redirects up to a limit (relative ones too),
- connects only to public addresses unless `allow_private_urls`: the check is made after DNS, on
  the address connected to, at every redirect hop (see mmscale.shards.safe_connect),
- gives up after `timeout_s` for the whole request, DNS, connect, headers and body together,
- retries connection errors, timeouts, cut-short bodies, 408, 429 and 5xx with exponential
  backoff (honouring a short `Retry-After`, delay-seconds or an HTTP date),
- refuses a body over `max_bytes` (from Content-Length before reading, else while reading),
- honours `X-Robots-Tag: noai / noimageai / noindex / noimageindex` unless told not to,
  for every agent or for `mmscale` (img2dataset's rule, with its token), and
  `unavailable_after: DATE` once that date has passed.

Failures are reasons, never exceptions: `timeout`, `connection_error`, `http_<code>`,
`too_many_redirects`, `too_large`, `robots`, `truncated`, `bad_url`, and `private_address` (the
host, or a redirect's, resolves only to loopback, private, link-local or other non-public addresses).
"""

from __future__ import annotations

import datetime
import email.utils
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3

from mmscale import __version__
from mmscale.shards.safe_connect import (AddressNotAllowed, AddressPolicy, RequestGuard, any_address, guard,
                                       guarded_pool_manager, is_public_address)

USER_AGENT_TOKEN = "mmscale"
USER_AGENT = f"{USER_AGENT_TOKEN}/{__version__} (image-text dataset downloader; +https://github.com/mmscale)"
ROBOTS_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
# directives written `name: value`: their colon does not introduce a user agent
_ROBOTS_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
# a comma inside a date ("Fri, 25 Jun 2010 ..." or "Friday, 25-Jun-10 ...") does not end a directive
_ROBOTS_SPLIT = re.compile(r",(?!\s*\d{1,2}[ -][A-Za-z]{3})")
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
    """Skip images whose X-Robots-Tag says noai, noimageai, noindex or noimageindex, or whose
    unavailable_after date has passed (`robots`)."""
    allow_private_urls: bool = False
    """Also download from loopback, private and link-local addresses (off: `private_address`), e.g.
    from a server on your own network; off by default, as a scraped table may name internal hosts."""


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
            pool = guarded_pool_manager(num_pools=256, maxsize=max(1, threads), block=False,
                                       headers={"User-Agent": USER_AGENT}, retries=False)
            _pool_by_process.clear()  # a forked child does not use its parent's sockets
            _pool_by_process[os.getpid()] = pool
        return pool


def fetch(url: str, options: DownloadOptions, *, address_allowed: AddressPolicy | None = None) -> Fetched:
    """Download `url` with retries; see the module docstring for the rules.

    `address_allowed` decides which resolved addresses may be connected to; by default public ones
    (`safe_connect.is_public_address`), or any with `options.allow_private_urls`."""
    if address_allowed is None:
        address_allowed = any_address if options.allow_private_urls else is_public_address
    attempt = 0
    while True:
        attempt += 1
        try:
            body, status = _fetch_once(url, options, address_allowed)
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


def _fetch_once(url: str, options: DownloadOptions, address_allowed: AddressPolicy) -> tuple[bytes, int]:
    with guard(deadline=time.monotonic() + options.timeout_s, address_allowed=address_allowed) as request:
        try:
            return _follow_redirects(url, options, request)
        except _Failed:
            if request.expired:  # the watchdog cut the response off: whatever it said may be incomplete
                raise _Failed("timeout", f"no complete response within {options.timeout_s:g} s") from None
            raise


def _follow_redirects(url: str, options: DownloadOptions, request: RequestGuard) -> tuple[bytes, int]:
    deadline = request.deadline
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
            if request.expired:  # cut off: a body without Content-Length would look complete
                raise _Failed("timeout", f"body not complete within {options.timeout_s:g} s")
            reusable = True
            return body, response.status
        finally:
            if reusable and not request.expired:
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
    except AddressNotAllowed as error:
        raise _Failed("private_address", str(error)) from None
    except urllib3.exceptions.NewConnectionError as error:  # a ConnectTimeoutError subclass: not a timeout
        raise _Failed("connection_error", str(error)) from None
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


def disallowed_by_robots(values: list[str], token: str = USER_AGENT_TOKEN, now: float | None = None) -> bool:
    """Whether X-Robots-Tag header values forbid use by everyone or by `token` (`mmscale: noai`).

    Each value is a comma-separated list of directives; `agent: directive` names the agent for it
    and those after it in the value, unless the text before the colon is a directive that takes a
    value (`unavailable_after: 25 Jun 2010 15:00:00 PST`). A passed unavailable_after date forbids."""
    for value in values:
        agent = ""
        for part in _ROBOTS_SPLIT.split(value):
            name, colon, rest = (text.strip() for text in part.partition(":"))
            if colon and name.lower() not in _ROBOTS_VALUED_DIRECTIVES:
                agent, part = name.lower(), rest
                name, colon, rest = (text.strip() for text in part.partition(":"))
            if agent and agent != token:
                continue
            if name.lower() in ROBOTS_DIRECTIVES and not colon:
                return True
            if name.lower() == "unavailable_after" and _passed(rest, now):
                return True
    return False


def _passed(date: str, now: float | None = None) -> bool:
    """Whether an unavailable_after date (RFC 822/850 or ISO 8601; GMT if no zone) is before `now`."""
    try:
        when = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        try:
            when = datetime.datetime.fromisoformat(date)
        except ValueError:
            return False  # unreadable: ignored, as Google does
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp() < (time.time() if now is None else now)
