"""A loopback HTTP server of in-memory responses, with scripted faults.

The URL-list tests and `tools/bench/sharding.py` download from it: it serves bytes held in
memory over HTTP/1.1 with keep-alive (so a client that reuses connections can), on asyncio,
so thousands of requests a second cost little CPU. Any path can script a fault: a status,
extra headers, a delay before answering, a body cut short, or a sequence of responses for
successive requests (`500` then `200`). It binds 127.0.0.1 only.

    with ImageServer({"/a.jpg": Response(body=jpeg), "/flaky.jpg": [Response(500), Response(body=jpeg)]}) as server:
        server.url("/a.jpg")

`python -m mmscale.shards.serve FOLDER` serves a folder's files until killed and prints its base URL.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus


@dataclass(frozen=True)
class Response:
    """One scripted answer."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "image/jpeg"
    delay_s: float = 0.0
    """Seconds to wait before the status line (a client's timeout should fire first)."""
    truncate_to: int | None = None
    """Send only this many body bytes, with the full Content-Length, then close the connection."""
    drip_s: float = 0.0
    """Send the body a byte at a time, this many seconds apart (each read is quick; the whole is not)."""


_NOT_FOUND = Response(404, b"not found", content_type="text/plain")


class ImageServer:
    """Serve `routes` (path -> Response, or a list answered in turn) on 127.0.0.1 in a thread."""

    def __init__(self, routes: dict[str, Response | list[Response]]):
        self.routes = routes
        self._requests: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._port = 0

    @property
    def requests(self) -> dict[str, int]:
        """How many times each path was requested."""
        return dict(self._requests)

    def url(self, path: str) -> str:
        """The full URL of a path on this server."""
        return f"http://127.0.0.1:{self._port}{path}"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        self._started.wait()
        return self

    def __exit__(self, *exc_info) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024))
        self._port = server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    def _next(self, path: str) -> Response:
        count = self._requests[path]
        self._requests[path] += 1
        route = self.routes.get(path, _NOT_FOUND)
        return route[min(count, len(route) - 1)] if isinstance(route, list) else route

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                path = request_line.split(" ")[1].split("?")[0]
                closing = any(line.lower().replace(" ", "") == "connection:close" for line in header_lines) \
                    or request_line.endswith("HTTP/1.0")
                response = self._next(path)
                if response.delay_s:
                    await asyncio.sleep(response.delay_s)
                cut = response.truncate_to is not None
                lines = [f"HTTP/1.1 {response.status} {_reason(response.status)}",
                         f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}",
                         *(f"{name}: {value}" for name, value in response.headers.items())]
                if closing or cut:
                    lines.append("Connection: close")
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                body = response.body[: response.truncate_to] if cut else response.body
                if response.drip_s:
                    for index in range(len(body)):
                        writer.write(body[index:index + 1])
                        await writer.drain()
                        await asyncio.sleep(response.drip_s)
                else:
                    writer.write(body)
                await writer.drain()
                if closing or cut:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError, ConnectionError,
                IndexError):
            pass  # the client went away, or sent something that is not a request
        finally:
            writer.close()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def folder_routes(folder: str) -> dict[str, Response]:
    """`/NAME` -> the bytes of every file in a folder."""
    routes = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as handle:
            routes[f"/{name}"] = Response(body=handle.read())
    return routes


if __name__ == "__main__":
    with ImageServer(folder_routes(sys.argv[1])) as serving:
        print(serving.url("/"), flush=True)
        threading.Event().wait()
