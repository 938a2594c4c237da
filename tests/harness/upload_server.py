"""An upload target on 127.0.0.1 for `--upload-url`: keeps what Cog PUTs, or fails on request.

Cog (coglet) PUTs each output file to the upload URL plus the file's name, with its content type,
and returns the response's `Location` (or the URL it PUT to) as the output. This server answers 201
with a `Location` under `/stored/`, so a test can tell the server's answer was used.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Upload:
    path: str
    content_type: str | None
    body: bytes


class UploadServer:
    """Records every PUT; `fail_with` set to a status makes every upload fail with it."""

    def __init__(self) -> None:
        self.uploads: list[Upload] = []
        self.fail_with: int | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> UploadServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def stored(self, url: str) -> bytes:
        """The body of the upload that `url` (a prediction's output) points at."""
        name = url.removeprefix(f"{self.base}/stored/")
        matches = [upload.body for upload in self.uploads if upload.path.rsplit("/", 1)[-1] == name]
        assert len(matches) == 1, (url, [upload.path for upload in self.uploads])
        return matches[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if owner.fail_with is not None:
                    self.send_response(owner.fail_with)
                else:
                    owner.uploads.append(Upload(self.path, self.headers.get("Content-Type"), body))
                    self.send_response(201)
                    self.send_header("Location", f"{owner.base}/stored/{self.path.rsplit('/', 1)[-1]}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
