"""A real HTTP server on 127.0.0.1 that serves bytes, and misbehaves on request, for download tests.

LoRAs reach the predictor as URLs it downloads with `requests`: following redirects itself, refusing
error statuses, cutting bodies off at a size limit. Mocking `requests` would test our idea of how it
behaves; a real socket tests what a user's URL does. Each path answers with registered bytes, a
redirect, an error status, a slow body, an oversized body or a lying Content-Length, and requests are
counted per path (query string ignored) so tests can tell what was downloaded and how often.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Route:
    """How one path answers. `content_length` None sends the true length, -1 sends none."""

    status: int = 200
    chunks: tuple[bytes, ...] = ()
    location: str | None = None
    content_length: int | None = None
    delay_s: float = 0.0  # slept before every chunk

    def body(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            time.sleep(self.delay_s)
            yield chunk


class HttpFiles:
    """`with HttpFiles() as files: url = files.serve("/a.safetensors", data)`; `files.hits["/a..."]`."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HttpFiles:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, route: Route) -> str:
        """Answer `path` with `route`; return its URL."""
        self.routes[path] = route
        return self.url(path)

    def serve(self, path: str, data: bytes, content_length: int | None = None) -> str:
        """`data` as a 200 response; `content_length` sends that header instead of the true one."""
        return self.add(path, Route(chunks=(data,), content_length=content_length))

    def redirect(self, path: str, to: str, status: int = 302) -> str:
        return self.add(path, Route(status=status, location=to))

    def error(self, path: str, status: int) -> str:
        return self.add(path, Route(status=status, chunks=(b"no",)))

    def slow(self, path: str, data: bytes, pieces: int = 5, delay_s: float = 0.05) -> str:
        """`data` in `pieces` chunks with `delay_s` before each."""
        size = -(-len(data) // pieces)
        chunks = tuple(data[i : i + size] for i in range(0, len(data), size))
        return self.add(path, Route(chunks=chunks, delay_s=delay_s))

    def oversized(self, path: str, over: int, announce: bool = True) -> str:
        """`over + 1` zero bytes, with their Content-Length if `announce`, else none (read to close)."""
        chunk = bytes(1 << 16)
        chunks = (chunk,) * (over // len(chunk)) + (bytes(over % len(chunk) + 1),)
        return self.add(path, Route(chunks=chunks, content_length=None if announce else -1))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        files = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # HTTP/1.0: the connection closes after every response
                path = urllib.parse.urlsplit(self.path).path
                with files._lock:
                    files.hits[path] += 1
                route = files.routes.get(path, Route(status=404, chunks=(b"not found",)))
                self.send_response(route.status)
                if route.location is not None:
                    self.send_header("Location", route.location)
                length = route.content_length
                if length is None:
                    length = sum(map(len, route.chunks))
                if length >= 0:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    for chunk in route.body():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (a size limit): what some tests want

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
