"""A real Cog HTTP server (coglet) running `predict.py` in a subprocess, for end-to-end tests."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_uri(path_or_bytes: Path | bytes, mime: str = "image/png") -> str:
    """A file (or bytes) as a `data:` URI, the way a client sends an upload inline."""
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def decode_output(uri: str) -> bytes:
    """The bytes of one returned output (a data URI when the server has no upload URL)."""
    assert uri.startswith("data:"), uri[:80]
    return base64.b64decode(uri.split(",", 1)[1])


def open_image(raw: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def health_probe(port: int, *args: str) -> tuple[int, str]:
    """`scripts/health_probe.py` run as Kubernetes runs it against the server on `port`: its exit
    status and what it printed."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "health_probe.py"), *args, "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout.strip()


def declared_concurrency() -> int:
    """cog.yaml's `concurrency.max`, which `cog build` bakes into the image as COG_MAX_CONCURRENCY."""
    return int(yaml.safe_load((ROOT / "cog.yaml").read_text())["concurrency"]["max"])


def server_env(weights: Path, tmp: Path | None = None, **settings: str) -> dict[str, str]:
    """A test server's environment: these weights and never a base-weight download; `tmp` its TMPDIR
    (so a test can see what the server leaves behind); `settings` more variables (FLUX_DAY_*, tokens,
    COG_MAX_CONCURRENCY). The concurrency is cog.yaml's, as a built image has it, unless given."""
    env = {
        "FLUX_DAY_WEIGHTS": str(weights),
        "FLUX_DAY_OFFLINE": "1",
        "COG_MAX_CONCURRENCY": str(declared_concurrency()),
    }
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return env | settings


def linked_root(dest: Path) -> Path:
    """The repository root as links in `dest`, all but `.cog/`: a Cog server there finds no schema file."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name != ".cog":
            (dest / entry.name).symlink_to(entry)
    return dest


class CogServer:
    """`python -m cog.server.http` on 127.0.0.1 with the virtualenv's python first on PATH.

    It runs in `cwd`, where coglet finds `predict.py` and, if there, `.cog/openapi_schema.json`, the
    schema it then checks every input against. Unless told, that is the repository root, or, when a
    schema was written there (by `scripts/write_openapi_schema.py` or `cog build`), a linked copy
    without it: these servers test that the predictor alone turns bad input away.
    """

    def __init__(
        self, env: Mapping[str, str], log_path: Path, args: Sequence[str] = (), cwd: Path | None = None
    ) -> None:
        self._linked: Path | None = None
        if cwd is None and (ROOT / ".cog").exists():
            self._linked = linked_root(Path(tempfile.mkdtemp(prefix="flux-day-root-")))
        cwd = cwd or self._linked or ROOT
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        bin_dir = str(Path(sys.executable).parent)
        full_env = {
            **os.environ,
            **env,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PORT": str(self.port),
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        }
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *args],
            cwd=cwd,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/health-check", timeout=5) as response:
            return json.load(response)

    @classmethod
    @contextlib.contextmanager
    def ready(
        cls, env: Mapping[str, str], log_path: Path, args: Sequence[str] = (), cwd: Path | None = None
    ) -> Iterator[CogServer]:
        """A server that has finished setup successfully, stopped on exit; `args` go to its command line."""
        server = cls(env, log_path, args, cwd)
        try:
            health = server.wait_until_settled()
            assert health["status"] == "READY", health
            yield server
        finally:
            server.stop()

    def wait_until_settled(self, timeout: float = 180) -> dict[str, Any]:
        """Wait until setup has succeeded or failed; return the last health-check body."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                last = self.health()
                if last.get("status") in {"READY", "SETUP_FAILED", "DEFUNCT"}:
                    return last
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready: {last} {self.log_path.read_text()[-3000:]}")

    def becomes_ready(self, timeout: float = 10) -> bool:
        """True once the health check says READY (BUSY lingers a moment after a response)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health().get("status") == "READY":
                return True
            time.sleep(0.05)
        return False

    def predict(
        self,
        timeout: float = 300,
        prediction_id: str | None = None,
        retry_at_capacity: bool = True,
        **inputs: Any,
    ) -> dict[str, Any]:
        """Run a prediction synchronously; return the response body (status, output, error, logs).

        With `prediction_id` it is `PUT /predictions/<id>`, so another thread can cancel it by id.
        coglet frees a slot a moment after a sync response is sent, so a request sent at once may be
        answered "At capacity" (409); like any client of a busy server, we retry, unless told not to
        (then the body has `http_status` 409).
        """
        body = json.dumps({"input": inputs}).encode()
        path, method = (
            ("/predictions", "POST") if prediction_id is None else (f"/predictions/{prediction_id}", "PUT")
        )
        deadline = time.monotonic() + timeout
        while True:
            request = urllib.request.Request(
                f"{self.url}{path}", data=body, method=method, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.load(response)
            except urllib.error.HTTPError as error:
                result = json.loads(error.read() or b"{}") | {"http_status": error.code}
            if result["http_status"] != 409 or not retry_at_capacity or time.monotonic() > deadline:
                return result
            time.sleep(0.05)

    def cancel(self, prediction_id: str) -> int:
        """POST /predictions/<id>/cancel; the HTTP status (200 also for one not started yet)."""
        request = urllib.request.Request(f"{self.url}/predictions/{prediction_id}/cancel", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def worker_pids(self) -> list[int]:
        """The server's process and its descendants (the Python worker), from /proc."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, queue = [], [self.process.pid]
        while queue:
            pid = queue.pop()
            found.append(pid)
            queue.extend(children.get(pid, []))
        return found

    def images(self, **inputs: Any) -> list[bytes]:
        """Predict and return the output files' bytes, failing loudly if the prediction failed."""
        result = self.predict(**inputs)
        assert result.get("status") == "succeeded", result.get("error") or result
        return [decode_output(uri) for uri in result["output"]]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        if self._linked is not None:
            shutil.rmtree(self._linked)  # links only: their targets stay
