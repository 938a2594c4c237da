"""A real HTTP server on 127.0.0.1 that serves bytes, and misbehaves on request, for download tests.

LoRAs reach the predictor as URLs it downloads with `requests`: following redirects itself, refusing
error statuses, cutting bodies off at a size limit. Mocking `requests` would test our idea of how it
behaves; a real socket tests what a user's URL does. Each path answers with registered bytes, a
redirect, an error status, a slow body, an oversized body or a lying Content-Length, and requests are
counted per path (query string ignored) so tests can tell what was downloaded and how often.

Requests' headers are kept per path too (names lower-cased), so a test can tell which Authorization
header reached which host. Paths under a prefix can be answered by a function of the request
(`handle`), which is how `tests.harness.fake_services` plays Replicate, Hugging Face and CivitAI. HEAD gets
GET's status and headers without the body, as `huggingface_hub` asks for file metadata with HEAD.
A route can take `Range: bytes=N-` requests (206 Partial Content, as CDNs do), and `cut_once` drops
the connection part-way through a path's next body, so resumed downloads can be tested; `gated`
holds a body open half-way until the test lets it finish.
"""

from __future__ import annotations

import re
import threading
import time
import traceback
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GATE_LIMIT_S = 60  # a gate a failed test never opened lets its download finish after this


@dataclass(frozen=True)
class Route:
    """How one path answers. `content_length` None sends the true length, -1 sends none."""

    status: int = 200
    chunks: tuple[bytes, ...] = ()
    location: str | None = None
    content_length: int | None = None
    delay_s: float = 0.0  # slept before every chunk
    headers: tuple[tuple[str, str], ...] = ()  # sent after Location and before Content-Length
    header_delay_s: float = 0.0  # slept before the status line: a host that accepts, then stalls
    ranges: bool = False  # honour `Range: bytes=start-[end]` with 206 and Content-Range
    gate: threading.Event | None = None  # the last chunk waits for it: a download held open mid-body

    def body(self) -> Iterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            time.sleep(self.delay_s)
            if self.gate is not None and index == len(self.chunks) - 1:
                self.gate.wait(GATE_LIMIT_S)
            yield chunk


@dataclass(frozen=True)
class Request:
    """One request as the server saw it: `path` as sent (still %-encoded, no query string),
    `query` parsed, `headers` with lower-cased names."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    def param(self, name: str) -> str | None:
        """The first value of query parameter `name`, if sent."""
        values = self.query.get(name)
        return values[0] if values else None

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


Responder = Callable[[Request], Route | None]  # None: 404
NOT_FOUND = Route(status=404, chunks=(b"not found",))


class HttpFiles:
    """`with HttpFiles() as files: url = files.serve("/a.safetensors", data)`; `files.hits["/a..."]`,
    `files.headers["/a..."][-1].get("authorization")`."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.handlers: dict[str, Responder] = {}
        self.hits: Counter[str] = Counter()
        self.headers: defaultdict[str, list[dict[str, str]]] = defaultdict(list)
        self.requests: list[Request] = []
        self.failures: list[str] = []  # tracebacks of handlers that raised (answered 500)
        self.cuts: dict[str, int] = {}  # path → bytes of body sent before the next GET is cut off
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HttpFiles:
        # A short poll: `shutdown` waits for the loop to look, and tests start and stop many servers.
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
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

    def handle(self, prefix: str, handler: Responder) -> None:
        """Answer paths under `prefix` that have no route of their own with `handler(request)`;
        the longest matching prefix wins."""
        self.handlers[prefix] = handler

    def authorization(self, path: str) -> list[str | None]:
        """The Authorization header of each request to `path`, in order (None where none was sent)."""
        with self._lock:
            return [headers.get("authorization") for headers in self.headers[path]]

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

    def gated(self, path: str, data: bytes) -> tuple[str, threading.Event]:
        """`data` whose first half is sent at once and the rest once the returned event is set."""
        gate = threading.Event()
        half = len(data) // 2
        return self.add(path, Route(chunks=(data[:half], data[half:]), gate=gate)), gate

    def cut_once(self, path: str, after: int) -> None:
        """The next GET of `path` announces its full length, sends `after` bytes of the body and
        closes the connection: a dropped download. Later requests are answered in full."""
        with self._lock:
            self.cuts[path] = after

    def _take_cut(self, path: str) -> int | None:
        with self._lock:
            return self.cuts.pop(path, None)

    def _record(self, request: Request) -> None:
        with self._lock:
            self.hits[request.path] += 1
            self.headers[request.path].append(request.headers)
            self.requests.append(request)

    def _route(self, request: Request) -> Route:
        route = self.routes.get(request.path)
        if route is not None:
            return route
        for prefix in sorted(self.handlers, key=len, reverse=True):
            if request.path.startswith(prefix):
                try:
                    return self.handlers[prefix](request) or NOT_FOUND
                except Exception:
                    self.failures.append(traceback.format_exc())
                    return Route(status=500, chunks=(b"the fake server failed",))
        return NOT_FOUND

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        files = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # HTTP/1.0: the connection closes after every response
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _answer(self, body: bool) -> None:
                parts = urllib.parse.urlsplit(self.path)
                request = Request(
                    method=self.command,
                    path=parts.path,
                    query=urllib.parse.parse_qs(parts.query, keep_blank_values=True),
                    headers={name.lower(): value for name, value in self.headers.items()},
                )
                files._record(request)
                route = _ranged(files._route(request), request.headers.get("range"))
                cut = files._take_cut(request.path) if body else None
                time.sleep(route.header_delay_s)
                self.send_response(route.status)
                if route.location is not None:
                    self.send_header("Location", route.location)
                for name, value in route.headers:
                    self.send_header(name, value)
                length = route.content_length
                if length is None:
                    length = sum(map(len, route.chunks))
                if length >= 0:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                if not body:
                    return
                try:
                    sent = 0
                    for chunk in route.body():
                        if cut is not None:
                            chunk = chunk[: max(cut - sent, 0)]
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        sent += len(chunk)
                        if cut is not None and sent >= cut:
                            break  # HTTP/1.0: returning closes the connection, short of its length
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (a size limit): what some tests want

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


def _ranged(route: Route, header: str | None) -> Route:
    """`route` as a CDN answers `Range: bytes=start-[end]` when it takes ranges: 206 with that slice and
    Content-Range, or 416 when the start is past the end. Other routes and requests are unchanged."""
    if not route.ranges or route.status != 200:
        return route
    accept = (*route.headers, ("Accept-Ranges", "bytes"))
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", (header or "").strip())
    if match is None:
        return replace(route, headers=accept)
    data = b"".join(route.chunks)
    start = int(match[1])
    end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
    if start >= len(data) or end < start:
        return Route(status=416, headers=(("Content-Range", f"bytes */{len(data)}"),))
    content_range = ("Content-Range", f"bytes {start}-{end}/{len(data)}")
    return replace(route, status=206, chunks=(data[start : end + 1],), headers=(*accept, content_range))
