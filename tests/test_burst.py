"""A burst through the real Cog server at its declared concurrency (cog.yaml): LoRA downloads overlap,
the GPU runs one request at a time, and nothing of one request reaches another.

The LoRA host holds every download open mid-body (a gate) until the test lets them go, so "they overlap"
is seen, not timed: all of them are in flight at once. The speed-up itself is measured by
`scripts/benchmark.py concurrency`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import lora_files as lf
from tests.harness.cog_server import CogServer, declared_concurrency, decode_output, server_env
from tests.harness.http_files import HttpFiles

BURST = declared_concurrency()
SLOW = {**lf.FAST, "aspect_ratio": "custom", "width": 1024, "height": 1024, "num_inference_steps": 50}
CANCELLED = re.compile(r"request cancelled after (\d+) of (\d+) denoising steps; ")


@pytest.fixture(scope="module")
def server(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    env = server_env(tiny_weights, tmp_path_factory.mktemp("burst-tmp"), FLUX_DAY_ALLOW_PRIVATE_URLS="1")
    with CogServer.ready(env, tmp_path_factory.mktemp("burst-logs") / "cog.log") as cog:
        yield cog


def in_background(server: CogServer, **inputs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """A prediction sent from another thread; its response lands in the dict (`refused`: the 409s it
    met first and retried, as any client does: coglet answers one now and then right after a
    prediction even with slots free; `exception`: what the client raised, if it did)."""
    result: dict[str, Any] = {"refused": 0}

    def send() -> None:
        try:
            while True:
                response = server.predict(retry_at_capacity=False, **inputs)
                if response.get("http_status") != 409:
                    result.update(response)
                    return
                result["refused"] += 1
                time.sleep(0.05)
        except Exception as error:  # the test shows it
            result["exception"] = repr(error)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, result


def wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def lone(server: CogServer, **inputs: Any) -> bytes:
    """The image of `inputs` with nothing else running."""
    wait_for(server.becomes_ready, "ready")
    (raw,) = server.images(**inputs)
    return raw


def test_a_burst_downloads_its_loras_at_once_and_only_the_excess_gets_409(
    server: CogServer, files: HttpFiles
) -> None:
    """BURST requests, each with its own cold LoRA (two share one: one download) and its own seed,
    all download at once; two more, sent meanwhile, get 409; every image is its lone run's."""
    gates, inputs = [], []
    for i in range(BURST - 1):
        url, gate = files.gated(f"/burst-{i}.safetensors", lf.to_bytes(lf.kohya(lf.random_lora(100 + i))))
        gates.append(gate)
        inputs.append({**lf.FAST, "seed": 40 + i, "replicate_weights": url})
    inputs.append({**inputs[-1], "seed": 99})  # the same LoRA as the one before: downloaded once
    lone(server, **lf.FAST)  # a first prediction, then every slot free again
    time.sleep(0.5)
    # Clients retry a 409, as any client does: one request of a simultaneous burst never reached the
    # predictor in 2 of about 8 runs on a loaded 2-core machine (cause not found; a plain burst of 8
    # got none in 4 tries). The benchmark (`scripts/benchmark.py concurrency`) counts and asserts
    # them; this test holds the overlap.
    burst = [in_background(server, **request) for request in inputs]
    paths = [f"/burst-{i}.safetensors" for i in range(BURST - 1)]
    wait_for(lambda: all(files.hits[path] for path in paths), "every LoRA download in flight at once")
    excess = [server.predict(retry_at_capacity=False, **lf.FAST) for _ in range(2)]
    assert [response.get("http_status") for response in excess] == [409, 409]
    for gate in gates:
        gate.set()
    for thread, _ in burst:
        thread.join(120)
    results = [result for _, result in burst]
    assert [result.get("status") for result in results] == ["succeeded"] * BURST, [
        result.get("error") or result.get("http_status") or result.get("exception") for result in results
    ]
    print("409s met by the burst:", sum(result["refused"] for result in results))
    assert all(files.hits[path] == 1 for path in paths), dict(files.hits)
    waited = [result["metrics"]["timing"]["queue"] for result in results]
    assert all(seconds >= 0 for seconds in waited) and max(waited) > 0
    for request, result in zip(inputs, results, strict=True):
        assert [decode_output(uri) for uri in result["output"]] == [lone(server, **request)]


def test_cancels_of_waiting_and_running_requests_and_a_failed_download_touch_no_other(
    server: CogServer, files: HttpFiles
) -> None:
    """While one request denoises, one waits for the GPU and one's LoRA fails to download: cancelling
    the waiting one and then the running one, and the failure, leave the last request's image, and
    every later one, exactly its lone run's."""
    loras = [lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(200 + i)))) for i in range(3)]
    running_inputs = {**SLOW, "replicate_weights": loras[0]}
    waiting_inputs = {**lf.FAST, "replicate_weights": loras[1], "seed": 3}
    last_inputs = {**lf.FAST, "replicate_weights": loras[2], "seed": 5}
    broken = {**lf.FAST, "replicate_weights": files.error("/burst-missing.safetensors", 404)}
    expected_last, base = lone(server, **last_inputs), lone(server, **lf.FAST)
    since = len(server.log_path.read_text())
    running = in_background(server, prediction_id="running", **running_inputs)
    wait_for(lambda: re.search(r"\b[1-9]\d*/50 \[", server.log_path.read_text()[since:]), "a step done")
    waiting = in_background(server, prediction_id="waiting", **waiting_inputs)
    failing = in_background(server, **broken)
    last = in_background(server, **last_inputs)
    failing[0].join(60)
    assert failing[1].get("status") == "failed", failing[1]
    assert "replicate_weights: " in failing[1]["error"] and "404" in failing[1]["error"], failing[1]
    time.sleep(0.5)  # the waiting request has read its LoRA and waits for the GPU
    assert server.cancel("waiting") == 200
    waiting[0].join(60)
    assert waiting[1].get("status") == "canceled", waiting[1]
    assert server.cancel("running") == 200
    running[0].join(60)
    assert running[1].get("status") == "canceled", running[1]
    last[0].join(120)
    assert last[1].get("status") == "succeeded", last[1].get("error")
    shown = {key: str(value)[:300] for key, value in last[1].items()}
    assert [decode_output(uri) for uri in last[1]["output"]] == [expected_last], shown
    wait_for(lambda: CANCELLED.search(server.log_path.read_text()[since:]), "the running one stopped")
    # Only the running one had steps to stop: its line is in the operator's log (and in the
    # prediction's own too when that was still open), the same each time.
    logged = CANCELLED.findall(server.log_path.read_text()[since:])
    stops = {(int(done), int(asked)) for done, asked in logged}
    ((done, asked),) = stops
    assert 1 <= done < asked == 50
    assert lone(server, **lf.FAST) == base
    assert lone(server, **last_inputs) == expected_last


def test_a_request_waits_to_read_its_loras_while_those_of_waiting_requests_fill_the_budget(
    tiny_weights: Path, tmp_path: Path, files: HttpFiles
) -> None:
    """With FLUX_DAY_PARSED_LORA_BYTES full of a running request's LoRA, the next request's download
    starts only once that request is done with the GPU."""
    env = server_env(
        tiny_weights, tmp_path, FLUX_DAY_ALLOW_PRIVATE_URLS="1", FLUX_DAY_PARSED_LORA_BYTES="1000"
    )
    with CogServer.ready(env, tmp_path / "cog.log") as server:
        since = len(server.log_path.read_text())
        running_lora = lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(300))))
        running = in_background(server, prediction_id="big", **SLOW, replicate_weights=running_lora)
        wait_for(lambda: re.search(r"\b[1-9]\d*/50 \[", server.log_path.read_text()[since:]), "a step done")
        url, gate = files.gated("/budget.safetensors", lf.to_bytes(lf.kohya(lf.random_lora(301))))
        gate.set()
        waiting = in_background(server, **lf.FAST, replicate_weights=url)
        time.sleep(1.0)
        assert files.hits["/budget.safetensors"] == 0 and "status" not in running[1]  # no room: no download
        assert server.cancel("big") == 200
        running[0].join(60)
        waiting[0].join(60)
        assert waiting[1].get("status") == "succeeded", waiting[1].get("error")
        assert files.hits["/budget.safetensors"] == 1
