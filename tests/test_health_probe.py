"""scripts/health_probe.py against real Cog servers: what Kubernetes' probes and preStop hook will see.

coglet answers /health-check with HTTP 200 whatever its state, so the probes read the status: a ready
server is started, ready and alive, also while it runs a prediction with slots to spare (BUSY, alive
but not ready, is every slot taken), and the preStop wait returns only once its predictions are done;
none at all is not alive. A server whose setup failed has started
(so that liveness takes over at once) but is not alive: tests/test_serving_server.py checks that on
the failed setups it starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness.cog_server import CogServer, free_port, health_probe, server_env
from tests.harness.http_files import HttpFiles
from tests.harness.lora_files import FAST, kohya, random_lora, to_bytes


@pytest.fixture(scope="module")
def server(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    """A server that may fetch LoRAs from 127.0.0.1: a held LoRA download keeps it BUSY at will."""
    env = server_env(tiny_weights, FLUX_DAY_ALLOW_PRIVATE_URLS="1")
    with CogServer.ready(env, tmp_path_factory.mktemp("probe-logs") / "cog.log") as cog:
        yield cog


def test_a_ready_server_passes_every_health_probe(server: CogServer) -> None:
    for check in ("started", "ready", "alive"):
        assert health_probe(server.port, check) == (0, "READY")


def test_a_server_running_a_prediction_is_ready_for_more_and_the_prestop_hook_waits_for_it(
    server: CogServer,
) -> None:
    with HttpFiles() as files, ThreadPoolExecutor(2) as pool:
        url, gate = files.gated("/held.safetensors", to_bytes(kohya(random_lora(1))))
        prediction = pool.submit(server.predict, **FAST, replicate_weights=url)
        deadline = time.monotonic() + 30
        while files.hits["/held.safetensors"] == 0:
            assert time.monotonic() < deadline, "the prediction never started"
            time.sleep(0.02)
        # One slot of several taken: still ready for more, alive, started.
        assert health_probe(server.port, "ready") == (0, "READY")
        assert health_probe(server.port, "alive") == (0, "READY")
        assert health_probe(server.port, "started") == (0, "READY")
        waiting = pool.submit(health_probe, server.port, "idle", "--settle", "0")
        time.sleep(1.5)
        assert not waiting.done()  # the hook holds the pod's shutdown while the prediction runs
        gate.set()
        assert waiting.result(60) == (0, "READY")
        assert prediction.done() and prediction.result()["status"] == "succeeded"


def test_no_server_is_not_alive_and_leaves_nothing_to_wait_for() -> None:
    assert health_probe(free_port(), "alive") == (1, "UNREACHABLE")
    assert health_probe(free_port(), "idle", "--settle", "0") == (0, "UNREACHABLE")
