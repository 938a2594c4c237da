"""The soak's core: a Cog server on tiny weights, many mixed predictions, each judged, and what grew.

`scripts/soak.py` runs it and prints `soak_report.format_report`; `tests/test_soak.py` runs it short.
See that script's docstring for the targets and what each measurement means.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.random_weights.tree import write_tiny_weights
from tests.harness.cog_server import CogServer, decode_output, open_image, server_env
from tests.harness.http_files import HttpFiles
from tests.harness.process_footprint import Footprint, Snapshot
from tests.harness.soak_requests import CLOSING, PROBES, Images, Planned, plan, serve_loras, warm_up

RSS_TARGET = 0.05
READY_TIMEOUT_S = 30.0
CANCEL_JOIN_S = 120.0


@dataclass(frozen=True)
class Outcome:
    """What one request did; `problem` is set when it was an unexpected failure."""

    index: int
    kind: str
    expect: str
    status: str  # succeeded | failed | canceled | rejected (HTTP 422) | http <code>
    seconds: float
    problem: str | None = None


@dataclass(frozen=True)
class Metric:
    """One row of the result table; `met` None for rows shown for information only."""

    key: str
    name: str
    before: float
    after: float
    target: str
    met: bool | None


@dataclass
class SoakReport:
    """Everything a soak found: per-request outcomes, the measured rows, and timings."""

    count: int
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)  # the mix, in order
    framing: list[Outcome] = field(default_factory=list)  # warm-up and the closing request
    rss: list[tuple[int, int]] = field(default_factory=list)  # after each prediction: KiB of all, of largest
    metrics: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    setup_s: float = 0.0
    run_s: float = 0.0

    @property
    def unexpected(self) -> list[Outcome]:
        return [outcome for outcome in self.framing + self.outcomes if outcome.problem is not None]

    @property
    def ok(self) -> bool:
        return not self.unexpected and all(metric.met is not False for metric in self.metrics)

    def metric(self, key: str) -> Metric:
        return next(metric for metric in self.metrics if metric.key == key)


# ------------------------------------------------------------------------------------------- verdicts


def rss_windows(count: int) -> tuple[range, range]:
    """Predictions whose RSS is compared: around 1/6 of the run (26-75 of 300) and the last as many.

    RSS after a request depends on that request (large ones leave more mapped): a median over a window
    measures the trend, where a single sample after prediction 50 and 300 would swing by several percent.
    """
    at = max(1, round(count / 6))
    half = max(1, round(at / 2))
    around = range(max(1, at - half + 1), min(count, at + half) + 1)
    last = range(max(1, count - 2 * half + 1), count + 1)
    return around, last


def rss_rows(rss: list[tuple[int, int]]) -> list[Metric]:
    """RSS (all processes, largest process) as the median over each window; growth under RSS_TARGET."""
    before_window, after_window = rss_windows(len(rss))
    rows = []
    for column, key, name in ((0, "rss_total", "server processes"), (1, "rss_largest", "largest process")):
        before = statistics.median(rss[i - 1][column] for i in before_window) / 1024 if rss else 0.0
        after = statistics.median(rss[i - 1][column] for i in after_window) / 1024 if rss else 0.0
        growth = (after - before) / before if before else 0.0
        rows.append(
            Metric(key, f"RSS, {name} (MiB)", before, after, f"< {RSS_TARGET:.0%}", growth < RSS_TARGET)
        )
    return rows


def compare(start: Snapshot, end: Snapshot, requests: int) -> list[Metric]:
    """The rows that must not grow from the end of warm-up to the end of the run (and coglet's, shown)."""

    def same(key: str, name: str, before: int, after: int) -> Metric:
        return Metric(key, name, before, after, "no growth", after <= before)

    return [
        same("fds", "open fds, server processes", start.fds, end.fds),
        same("threads", "threads, server processes", start.threads, end.threads),
        same("tmp", "files+dirs in server TMPDIR", len(start.tmp_entries), len(end.tmp_entries)),
        same("coglet_files", "files in coglet prediction dirs", start.coglet_files, end.coglet_files),
        same("lora_cache", "files in LoRA cache", start.lora_cache_files, end.lora_cache_files),
        Metric(
            "coglet_dirs",
            "coglet prediction dirs (upstream leak)",
            start.coglet_dirs,
            end.coglet_dirs,
            f"info: +{requests} expected",
            None,
        ),
    ]


# ------------------------------------------------------------------------------------------- running


def error_text(result: dict[str, Any]) -> str:
    """The error a client sees: `error` of a failed prediction, or `detail` of a rejected request."""
    if result.get("error"):
        return str(result["error"])
    return json.dumps(result.get("detail", ""))


def status_of(result: dict[str, Any]) -> str:
    """The prediction's status, or what the HTTP answer was when there is no prediction."""
    code = result.get("http_status")
    if code == 422:
        return "rejected"  # the server's own schema check (with .cog/openapi_schema.json in place)
    if code is not None:
        return f"http {code}"
    return str(result.get("status"))


def problem_with(request: Planned, result: dict[str, Any], probes: dict[str, list[bytes]]) -> str | None:
    """Why this response is an unexpected failure, or None when it is what the request kind expects."""
    status, error = status_of(result), error_text(result)
    if (result.get("http_status") or 0) >= 500:
        return f"HTTP {result['http_status']}: {error[:300]}"
    if "traceback" in error.lower() or "internal error" in error.lower():
        return f"internal error: {error[:300]}"
    category = "failed" if status == "rejected" else status
    if category != request.expect:
        return f"expected {request.expect}, got {status}: {error[:300]}"
    if request.expect == "failed" and request.names and request.names not in error:
        return f"error does not name {request.names}: {error[:300]}"
    if request.expect == "succeeded":
        return output_problem(request, result, probes)
    return None


def output_problem(request: Planned, result: dict[str, Any], probes: dict[str, list[bytes]]) -> str | None:
    """What is wrong with a success: output count, undecodable files, or a probe that changed bytes."""
    outputs = [decode_output(uri) for uri in result.get("output") or []]
    wanted = request.inputs.get("num_outputs", 1)
    if len(outputs) != wanted:
        return f"{len(outputs)} outputs, asked for {wanted}"
    try:
        for raw in outputs:
            open_image(raw)
    except Exception as error:  # any decoding error is the finding
        return f"an output is not an image: {error}"
    if request.kind in PROBES:
        first = probes.setdefault(request.kind, outputs)
        if outputs != first:
            return f"{request.kind} gave different bytes than its first run (state left behind)"
    return None


def send(server: CogServer, request: Planned, prediction_id: str) -> dict[str, Any]:
    """One request; a cancel runs the slow request in a thread and cancels it by id after a delay."""
    if request.cancel_after_s is None:
        return server.predict(timeout=300, prediction_id=prediction_id, **request.inputs)
    box: dict[str, dict[str, Any]] = {}
    worker = threading.Thread(
        target=lambda: box.setdefault(
            "result", server.predict(timeout=300, prediction_id=prediction_id, **request.inputs)
        ),
        daemon=True,
    )
    worker.start()
    time.sleep(request.cancel_after_s)
    server.cancel(prediction_id)
    worker.join(CANCEL_JOIN_S)
    return box.get(
        "result", {"status": "no response", "error": f"no response {CANCEL_JOIN_S:.0f} s after cancel"}
    )


class Driver:
    """Sends planned requests from `clients` concurrent clients (each one request at a time) and judges
    each response."""

    def __init__(self, server: CogServer, id_prefix: str, clients: int = 1) -> None:
        self.server, self.id_prefix, self.clients = server, id_prefix, clients
        self.probes: dict[str, list[bytes]] = {}
        self.sent = 0
        self._counting = threading.Lock()

    def run_all(self, requests: list[Planned], first: int = 1, step: int = 1) -> Iterator[Outcome]:
        """Each request's outcome, in order (request `i` numbered `first + i * step`)."""
        numbered = [(request, first + i * step) for i, request in enumerate(requests)]
        with ThreadPoolExecutor(self.clients) as clients:
            yield from clients.map(lambda pair: self.run(*pair), numbered)

    def run(self, request: Planned, index: int) -> Outcome:
        with self._counting:
            self.sent += 1
            prediction_id = f"{self.id_prefix}{self.sent:05d}"
        # The previous response's slot frees a moment after it was sent; a cancel must not race that.
        # Alone, the server is READY between requests; with other clients it may stay BUSY.
        alone = self.clients == 1
        if alone:
            self.ready_again()
        started = time.monotonic()
        result = send(self.server, request, prediction_id)
        seconds = time.monotonic() - started
        with self._counting:  # the first run of a probe is what the others must equal
            problem = problem_with(request, result, self.probes)
        if problem is None and alone and not self.ready_again():
            problem = f"server not READY within {READY_TIMEOUT_S:.0f} s after the response"
        return Outcome(index, request.kind, request.expect, status_of(result), seconds, problem)

    def ready_again(self) -> bool:
        """Whether the health check says READY within the timeout (False if it cannot be reached)."""
        try:
            return self.server.becomes_ready(timeout=READY_TIMEOUT_S)
        except OSError:
            return False


@contextmanager
def soak_server(workdir: Path) -> Iterator[tuple[CogServer, HttpFiles, Path, Path]]:
    """A Cog server on fresh tiny weights in `workdir`, and an HTTP server for its LoRA URLs."""
    weights = write_tiny_weights(workdir / "weights")
    server_tmp, lora_cache = workdir / "server-tmp", workdir / "lora-cache"
    server_tmp.mkdir(exist_ok=True)
    env = server_env(
        weights, server_tmp, FLUX_DAY_ALLOW_PRIVATE_URLS="1", FLUX_DAY_LORA_CACHE=str(lora_cache)
    )
    with HttpFiles() as files, CogServer.ready(env, workdir / "cog.log") as server:
        yield server, files, server_tmp, lora_cache


def run_soak(
    count: int,
    seed: int,
    workdir: Path,
    progress: Callable[[str], None] = lambda _: None,
    clients: int = 1,
) -> SoakReport:
    """Start a server in `workdir`, warm it up, drive `count` mixed requests from `clients` concurrent
    clients, and measure what grew."""
    report = SoakReport(count, seed)
    started = time.monotonic()
    images = Images.make()
    id_prefix = f"soak-{uuid.uuid4().hex[:8]}-"
    with soak_server(workdir) as (server, files, server_tmp, lora_cache):
        footprint = Footprint(server, server_tmp, lora_cache, id_prefix)
        try:
            loras = serve_loras(files)
            driver = Driver(server, id_prefix, clients)
            report.setup_s = time.monotonic() - started
            report.framing += list(driver.run_all(warm_up(loras, images, count, seed), first=0, step=0))
            start, warm_up_sent = footprint.take(), driver.sent
            run_started = time.monotonic()
            drive(driver, plan(count, seed, loras, images), footprint, report, progress)
            # The warm-up's last request again, so the output folder holds what it held at the start.
            report.framing.append(driver.run(CLOSING, count + 1))
            report.run_s = time.monotonic() - run_started
            end = footprint.take(threads_at_most=start.threads)
            report.metrics = rss_rows(report.rss) + compare(start, end, driver.sent - warm_up_sent)
            report.notes += growth_notes(start, end)
        finally:
            footprint.remove_coglet_dirs()
    return report


def drive(
    driver: Driver,
    requests: list[Planned],
    footprint: Footprint,
    report: SoakReport,
    progress: Callable[[str], None],
) -> None:
    """Send the mix, recording each outcome and the server's RSS after it."""
    for index, outcome in enumerate(driver.run_all(requests), start=1):
        report.outcomes.append(outcome)
        report.rss.append(footprint.rss_kib())
        if index % 25 == 0 or index == len(requests):
            progress(f"{index}/{len(requests)} predictions, {len(report.unexpected)} unexpected")
        if driver.server.process.poll() is not None:
            report.notes.append(f"server exited after prediction {index}")
            break


def growth_notes(start: Snapshot, end: Snapshot) -> list[str]:
    """What the new fds and files are, when there are more: the lead a leak hunt starts from."""
    notes = []
    if end.fds > start.fds:
        notes.append(f"new fds: {dict(end.fd_kinds - start.fd_kinds)}")
    if len(end.tmp_entries) > len(start.tmp_entries):
        notes.append(f"TMPDIR now holds: {end.tmp_entries[:20]}")
    return notes
