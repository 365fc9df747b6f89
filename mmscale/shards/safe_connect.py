"""urllib3 connections for untrusted URLs: allowed addresses only, one deadline per request.

A web-scraped URL table can name any host. Run inside a cloud or a private network, a downloader
that fetches what it is given can be pointed at internal services (server-side request forgery):
the metadata service at 169.254.169.254, localhost, 10.x. And a server that sends its headers a
byte at a time keeps each socket read short, so per-read timeouts never end the request. Here:

- a connection resolves its host name itself, within the request's deadline (a thread does the
  lookup, so a stalled resolver cannot hold the request), keeps only the addresses the request's
  policy allows (by default `is_public_address`), and connects to one of those. The check applies
  to the address actually connected to: there is no second lookup a name could answer differently
  (DNS rebinding). A reused keep-alive connection's peer is checked again before each request.
- a watchdog thread shuts the sockets of a request down at its deadline, whatever the request is
  doing then (sending, waiting for the status line, reading headers or body). DNS and connect are
  bounded by the time left, and so is the TLS handshake: CPython times a handshake as one call.

TLS is urllib3's own: SNI and certificate checks use the URL's host name, not the address.

    pool = guarded_pool_manager(maxsize=16)
    with guard(deadline=time.monotonic() + 10, address_allowed=is_public_address) as request:
        response = pool.request("GET", url, preload_content=False)
        ...  # request.expired: the watchdog cut the request off
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: an IPv4 address behind a NAT64 gateway


def is_public_address(address: IPAddress) -> bool:
    """Whether `address` is a globally routable unicast address: not loopback, private, link-local
    (169.254.169.254, the cloud metadata service), unspecified, multicast, reserved or shared
    (100.64/10), nor an IPv6 form of one of those (IPv4-mapped, NAT64, 6to4), nor IPv6 site-local."""
    if address.version == 6:
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
        if address.is_site_local:  # fec0::/10: deprecated, but routed inside some networks; is_global says yes
            return False
    return address.is_global and not (address.is_private or address.is_loopback or address.is_link_local
                                      or address.is_multicast or address.is_reserved or address.is_unspecified)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def any_address(address: IPAddress) -> bool:
    """The policy of `--allow-private-urls`: every address is allowed."""
    return True


class AddressNotAllowed(urllib3.exceptions.HTTPError):
    """A host resolved only to addresses the request's policy refuses, or a connection's peer is one."""


_HINT = "allow private networks with --allow-private-urls (DownloadOptions.allow_private_urls)"


class RequestGuard:
    """One request's deadline and address policy, and the connections it is using.

    A connection belongs to the last guard that used it (keep-alive hands connections from one
    request to the next), so a guard that expires cuts only the connections still its own."""

    def __init__(self, *, deadline: float, address_allowed: AddressPolicy, watchdog: _Watchdog):
        self.deadline = deadline
        self.address_allowed = address_allowed
        self.expired = False  # the deadline passed before the guard was closed: its sockets were shut down
        self._watchdog = watchdog
        self._connections: list[HTTPConnection] = []
        self._closed = False

    def claim(self, connection: HTTPConnection, sock: socket.socket | None) -> None:
        """Make `connection` (whose socket is now `sock`) this request's: cut at the deadline."""
        with self._watchdog.lock:
            connection._mmscale_guard = self
            connection._mmscale_sock = sock
            if connection not in self._connections:
                self._connections.append(connection)
            if self.expired:
                _cut(sock)

    def expire(self) -> None:
        """Shut down the sockets of the connections this request still holds (the watchdog's call)."""
        with self._watchdog.lock:
            if self._closed:
                return
            self.expired = True
            for connection in self._connections:
                if getattr(connection, "_mmscale_guard", None) is self:
                    _cut(connection._mmscale_sock)

    def close(self) -> None:
        """The request is over: its connections are no longer cut at its deadline."""
        with self._watchdog.lock:
            self._closed = True
            for connection in self._connections:
                if getattr(connection, "_mmscale_guard", None) is self:
                    connection._mmscale_guard = connection._mmscale_sock = None
            self._connections.clear()


def _cut(sock: socket.socket | None) -> None:
    """Shut a socket down so that a thread blocked on it returns at once (it stays open to close)."""
    if sock is None:
        return
    try:  # socket.socket's own shutdown, not SSLSocket's, which would also drop the TLS state under a reader
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed, or detached by the TLS wrapper mid-handshake (bounded by its own timeout)


class _Watchdog:
    """One thread per process that expires guards at their deadlines."""

    def __init__(self):
        self.lock = threading.Lock()  # guards' claims and cuts, so a cut never lands on another's connection
        self._due: list[tuple[float, int, RequestGuard]] = []
        self._order = itertools.count()
        self._wake = threading.Condition(threading.Lock())
        threading.Thread(target=self._run, name="mmscale-download-watchdog", daemon=True).start()

    def watch(self, request: RequestGuard) -> None:
        """Expire `request` at its deadline unless it is closed first."""
        with self._wake:
            heapq.heappush(self._due, (request.deadline, next(self._order), request))
            if self._due[0][2] is request:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._wake.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, request = heapq.heappop(self._due)
            request.expire()


_watchdog_lock = threading.Lock()
_watchdog_by_process: dict[int, _Watchdog] = {}
_current = threading.local()


def _watchdog() -> _Watchdog:
    """This process's watchdog (a forked child, which has no copy of its parent's thread, starts its own)."""
    with _watchdog_lock:
        watchdog = _watchdog_by_process.get(os.getpid())
        if watchdog is None:
            _watchdog_by_process.clear()
            watchdog = _watchdog_by_process[os.getpid()] = _Watchdog()
        return watchdog


@contextlib.contextmanager
def guard(*, deadline: float, address_allowed: AddressPolicy = is_public_address) -> Iterator[RequestGuard]:
    """Run the requests of this thread inside the block under one deadline (time.monotonic()) and policy."""
    watchdog = _watchdog()
    request = RequestGuard(deadline=deadline, address_allowed=address_allowed, watchdog=watchdog)
    watchdog.watch(request)
    outer, _current.guard = getattr(_current, "guard", None), request
    try:
        yield request
    finally:
        _current.guard = outer
        request.close()


def _current_guard() -> RequestGuard | None:
    return getattr(_current, "guard", None)


def resolve(host: str, port: int, *, timeout: float) -> list[tuple]:
    """getaddrinfo for a TCP connection, given up after `timeout` seconds (socket.timeout).

    The lookup runs in a daemon thread: the C resolver has no timeout of its own, and a thread
    left behind by a stalled lookup ends when the resolver does."""
    try:
        ipaddress.ip_address(host)
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except ValueError:
        pass  # a name (or a numeric form only the resolver reads, such as 2130706433)
    answer: dict[str, object] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            answer["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as error:  # noqa: BLE001 - handed to the waiting thread
            answer["error"] = error
        done.set()

    threading.Thread(target=lookup, name=f"resolve {host}", daemon=True).start()
    if not done.wait(max(timeout, 0.0)):
        raise socket.timeout(f"resolving {host} took over {timeout:.2g} s")
    if "error" in answer:
        raise answer["error"]
    return answer["addresses"]


def _address(sockaddr: tuple) -> IPAddress:
    return ipaddress.ip_address(sockaddr[0].split("%")[0])  # drop an IPv6 zone (fe80::1%eth0)


class _GuardedConnection:
    """The socket side of urllib3's HTTP(S)Connection, under the current guard (see the module docstring)."""

    def _new_conn(self) -> socket.socket:
        current = _current_guard()
        allowed = current.address_allowed if current else is_public_address
        deadline = current.deadline if current else time.monotonic() + (self.timeout or 60.0)
        try:
            addresses = resolve(self._dns_host, self.port, timeout=deadline - time.monotonic())
        except socket.gaierror as error:
            raise NameResolutionError(self.host, self, error) from error
        except socket.timeout as error:
            raise ConnectTimeoutError(self, str(error)) from error
        usable = [address for address in addresses if allowed(_address(address[4]))]
        if not usable:
            found = ", ".join(sorted({str(_address(address[4])) for address in addresses}))
            raise AddressNotAllowed(f"{self.host} resolves to {found}, not a public address; {_HINT}")
        sock = self._connect_any(usable, deadline)
        if current:
            current.claim(self, sock)
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock

    def _connect_any(self, addresses: list[tuple], deadline: float) -> socket.socket:
        """A socket connected to the first of `addresses` that answers before the deadline."""
        error: OSError | None = None
        for family, kind, protocol, _, sockaddr in addresses:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock = socket.socket(family, kind, protocol)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(left)
                sock.connect(sockaddr)
                sock.settimeout(max(deadline - time.monotonic(), 0.001))  # bounds the TLS handshake as a whole
                return sock
            except OSError as failure:
                sock.close()
                error = failure
        if error is None or isinstance(error, socket.timeout):
            raise ConnectTimeoutError(self, f"connection to {self.host} timed out")
        raise NewConnectionError(self, f"Failed to establish a new connection: {error}") from error

    def request(self, *args, **kwargs):
        """Check a reused connection's peer against this request's policy, and claim the connection."""
        current = _current_guard()
        if self.sock is not None:
            allowed = current.address_allowed if current else is_public_address
            peer = _address(self.sock.getpeername())
            if not allowed(peer):
                raise AddressNotAllowed(f"{self.host} is connected to {peer}, not a public address; {_HINT}")
        if current:
            current.claim(self, self.sock)
        return super().request(*args, **kwargs)


class _GuardedHTTPConnection(_GuardedConnection, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnection, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


def guarded_pool_manager(**kwargs) -> urllib3.PoolManager:
    """A urllib3.PoolManager (same arguments) whose connections obey the current `guard`."""
    manager = urllib3.PoolManager(**kwargs)
    manager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}
    return manager
