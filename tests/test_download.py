"""The downloader against untrusted URLs: which addresses it connects to, one deadline per request,
and X-Robots-Tag read directive by directive. Servers are local; nothing here needs the network."""

from __future__ import annotations

import http.server
import ipaddress
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import urllib3
from corpus import image_bytes

from mmscale.shards.download import DownloadOptions, disallowed_by_robots, fetch
from mmscale.shards.safe_connect import any_address, guard, guarded_pool_manager, is_public_address
from mmscale.shards.serve import ImageServer, Response

STRICT = DownloadOptions(threads=1, timeout_s=2, retries=0)  # the defaults, but quick
OPEN = DownloadOptions(threads=1, timeout_s=2, retries=0, allow_private_urls=True)
JPEG = image_bytes((30, 30))
_recording: list[list[tuple]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect" and _recording:
        _recording[-1].append(args[1])


sys.addaudithook(_audit)  # hooks cannot be removed: this one records only inside `connects`


@pytest.fixture
def connects():
    """The addresses this process's sockets try to connect to during the test (Python audit events)."""
    _recording.append([])
    yield _recording[-1]
    _recording.pop()


def loopback_only(address) -> bool:
    """A policy for tests: 127.0.0.1 (the test servers) counts as public, nothing else private does."""
    return address == ipaddress.ip_address("127.0.0.1") or is_public_address(address)


@pytest.fixture(scope="module")
def server():
    routes = {"/ok.jpg": Response(body=JPEG),
              "/to-metadata": Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}),
              "/noai-dated.jpg": Response(body=JPEG, headers={
                  "X-Robots-Tag": "noai, unavailable_after: 25 Jun 2010 15:00:00 PST"})}
    with ImageServer(routes) as serving:
        yield serving


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "10.1.2.3", "172.16.0.1", "192.168.1.1",
                                     "169.254.169.254", "0.0.0.0", "100.64.0.1", "224.0.0.1", "240.0.0.1",
                                     "255.255.255.255", "::1", "::", "fc00::1", "fd12::1", "fe80::1", "ff02::1",
                                     "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe",
                                     "2002:7f00:1::", "2001:db8::1", "fec0::1"])
def test_non_public_addresses(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808", "2002:808:808::"])
def test_public_addresses(address):
    assert is_public_address(ipaddress.ip_address(address))


def test_private_loopback_and_link_local_addresses_are_refused_by_default_without_connecting(server, connects):
    port = server.url("/").split(":")[2].split("/")[0]
    urls = [server.url("/ok.jpg"), f"http://127.0.0.2:{port}/ok.jpg", "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/a.jpg", f"http://0.0.0.0:{port}/ok.jpg", f"http://2130706433:{port}/ok.jpg",
            f"http://[::1]:{port}/ok.jpg", "http://[::ffff:169.254.169.254]/", "http://[fe80::1]/a.jpg",
            "http://[fd00:ec2::254]/latest/meta-data/"]
    started = time.monotonic()
    for url in urls:
        fetched = fetch(url, DownloadOptions(threads=1, retries=2, backoff_s=1))
        assert (fetched.reason, fetched.attempts) == ("private_address", 1), (url, fetched)
        assert "--allow-private-urls" in fetched.detail
    assert time.monotonic() - started < 1 and connects == [] and server.requests == {}
    assert fetch(server.url("/ok.jpg"), OPEN).body == JPEG  # the opt-in


def test_a_name_that_resolves_to_loopback_is_refused(server, connects):
    url = server.url("/ok.jpg").replace("127.0.0.1", "localhost")
    before = server.requests.get("/ok.jpg", 0)
    fetched = fetch(url, STRICT)
    assert fetched.reason == "private_address" and "localhost resolves to" in fetched.detail
    assert connects == [] and server.requests.get("/ok.jpg", 0) == before
    assert fetch(url, OPEN).body == JPEG  # localhost may list ::1 first; the server is on 127.0.0.1 only


def test_a_redirect_to_a_private_address_is_refused_at_that_hop(server, connects):
    """127.0.0.1 plays a public server here (its policy says so); it redirects to 127.0.0.2, where a
    listener stands, and to the metadata service. Neither second hop is connected to."""
    with socket.create_server(("127.0.0.2", 0)) as internal:
        hop = f"http://127.0.0.2:{internal.getsockname()[1]}/secret.jpg"
        routes = {"/to-internal": Response(302, headers={"Location": hop}), "/ok.jpg": Response(body=JPEG)}
        with ImageServer(routes) as public:
            assert fetch(public.url("/ok.jpg"), STRICT, address_allowed=loopback_only).body == JPEG
            fetched = fetch(public.url("/to-internal"), STRICT, address_allowed=loopback_only)
            assert fetched.reason == "private_address" and "127.0.0.2" in fetched.detail
            assert public.requests == {"/ok.jpg": 1, "/to-internal": 1}
        assert select.select([internal], [], [], 0)[0] == []  # no connection waits to be accepted
    fetched = fetch(server.url("/to-metadata"), STRICT, address_allowed=loopback_only)
    assert fetched.reason == "private_address" and "169.254.169.254" in fetched.detail
    assert {address[0] for address in connects} == {"127.0.0.1"}


def test_a_kept_alive_connection_is_checked_again_under_a_stricter_policy(server):
    assert fetch(server.url("/ok.jpg"), OPEN).body == JPEG  # leaves a pooled connection to 127.0.0.1
    assert fetch(server.url("/ok.jpg"), STRICT).reason == "private_address"


class _DrippingServer:
    """Answers every request with `start`, then one byte every `every_s` seconds for `for_s`."""

    def __init__(self, start: bytes, every_s: float = 0.3, for_s: float = 10.0):
        self.start, self.every_s, self.for_s = start, every_s, for_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self._listener.getsockname()[1]}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(client,), daemon=True).start()

    def _drip(self, client: socket.socket) -> None:
        with client:
            try:
                client.recv(65536)
                client.sendall(self.start)
                ends = time.monotonic() + self.for_s
                while time.monotonic() < ends and not self._stop.wait(self.every_s):
                    client.sendall(b"a")
            except OSError:
                pass  # the client hung up: what the test wants

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.mark.parametrize("scheme,start", [
    ("http", b"HTTP/1.1 200 OK\r\nX-Slow: "),  # headers a byte at a time
    ("http", b""),  # the status line a byte at a time
    ("https", b"\x16\x03\x03\x40\x00"),  # a TLS handshake record of 16 KiB, a byte at a time
])
def test_a_response_sent_a_byte_at_a_time_is_cut_off_at_the_timeout(scheme, start):
    """Each byte comes well within the 1 s timeout of one read; the request as a whole must not."""
    dripping = _DrippingServer(start, every_s=0.3, for_s=10)
    try:
        started = time.monotonic()
        fetched = fetch(dripping.url("/slow.jpg", scheme), DownloadOptions(threads=1, timeout_s=1, retries=0,
                                                                           allow_private_urls=True))
        elapsed = time.monotonic() - started
    finally:
        dripping.close()
    assert fetched.reason == "timeout" and elapsed < 1 + 1.5, (fetched, elapsed)


def test_a_stalled_name_lookup_is_cut_off_at_the_timeout(monkeypatch):
    real = socket.getaddrinfo

    def stalled(host, *args, **kwargs):
        if host == "stalled.example":
            time.sleep(5)
            raise socket.gaierror(socket.EAI_AGAIN, "stalled")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", stalled)
    started = time.monotonic()
    fetched = fetch("http://stalled.example/a.jpg", DownloadOptions(threads=1, timeout_s=1, retries=0))
    assert fetched.reason == "timeout" and time.monotonic() - started < 1 + 1.5, fetched


def test_a_refused_connection_is_a_connection_error_not_a_timeout():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    assert fetch(f"http://127.0.0.1:{port}/a.jpg", OPEN).reason == "connection_error"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 whose certificate names localhost only; the names its clients sent (SNI)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    names: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda connection, name, _: names.append(name)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path == "/drip":
                return self.drip()
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def drip(self):
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(30):
                time.sleep(0.3)
                self.wfile.write(b"a")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.handle_error = lambda *args: None  # the refused handshake below is expected
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], str(cert), names
    httpd.shutdown()


def test_https_checks_the_certificate_against_the_host_name_not_the_address(tls_server):
    port, cert, names = tls_server
    pool = guarded_pool_manager(ca_certs=cert, retries=False)
    with guard(deadline=time.monotonic() + 5, address_allowed=any_address):
        response = pool.request("GET", f"https://localhost:{port}/")
        assert (response.status, response.data) == (200, b"ok") and names == ["localhost"]
        with pytest.raises(urllib3.exceptions.SSLError, match="127.0.0.1"):
            pool.request("GET", f"https://127.0.0.1:{port}/")
        assert pool.request("GET", f"https://localhost:{port}/").data == b"ok"
    assert names == ["localhost", None]  # the second request reused the first connection


def test_the_watchdog_cuts_a_tls_connection_that_drips_its_headers(tls_server):
    port, cert, _ = tls_server
    pool = guarded_pool_manager(ca_certs=cert, retries=False)
    started = time.monotonic()
    with guard(deadline=started + 1, address_allowed=any_address) as request:
        try:
            pool.request("GET", f"https://localhost:{port}/drip", timeout=5)
        except urllib3.exceptions.HTTPError:
            pass  # a cut shows as an error or as a response that ends early: request.expired tells which
    assert request.expired and time.monotonic() - started < 1 + 1.5


def test_robots_directives_are_read_one_by_one():
    assert disallowed_by_robots(["noai, unavailable_after: 25 Jun 2010 15:00:00 PST"])
    assert disallowed_by_robots(["max-snippet: 50, noimageai"])
    assert not disallowed_by_robots(["googlebot: noai"]) and disallowed_by_robots(["mmscale: noai"])
    assert not disallowed_by_robots(["googlebot: noindex, nofollow"])


@pytest.mark.parametrize("value,forbidden", [
    ("unavailable_after: 25 Jun 2010 15:00:00 PST", True),
    ("unavailable_after: Friday, 25-Jun-10 15:00:00 GMT", True),
    ("unavailable_after: 2010-06-25", True),
    ("unavailable_after: 25 Jun 2999 15:00:00 GMT", False),
    ("unavailable_after: 2999-06-25T15:00:00+00:00", False),
    ("unavailable_after: someday", False),
    ("googlebot: unavailable_after: 2010-06-25", False),
    ("mmscale: unavailable_after: 2010-06-25", True),
])
def test_unavailable_after_forbids_once_its_date_has_passed(value, forbidden):
    assert disallowed_by_robots([value]) is forbidden


def test_a_dated_robots_header_is_honoured_when_downloading(server):
    assert fetch(server.url("/noai-dated.jpg"), OPEN).reason == "robots"
