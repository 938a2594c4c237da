"""Three replicas on one machine: real Cog servers sharing one weights folder and one LoRA cache.

This is how the predictor scales out (one container per GPU, or pods on one volume): each replica is
its own process, and only file locks on the shared cache folder keep them from tripping over each
other. The LoRAs come from a real HTTP server on 127.0.0.1 that can hold a body open half-way
(`HttpFiles.gated`), so a test knows a download is under way while it starts or kills a replica. The
cache budget holds one LoRA, so every new LoRA evicts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from flux_day.loras.cache import LoraCache, file_path
from flux_day.loras.refs import parse_ref
from tests.harness.cog_server import CogServer, decode_output, server_env
from tests.harness.http_files import HttpFiles
from tests.harness.lora_files import FAST, data_uri, kohya, random_lora, to_bytes

LORAS = {name: to_bytes(kohya(random_lora(seed))) for seed, name in enumerate("ABCDEFGH", start=30)}
BUDGET = len(LORAS["A"]) * 3 // 2  # one LoRA fits, two do not


class Fleet:
    """Cog servers started together on the same weights and LoRA cache; `replace` starts a new one."""

    def __init__(self, weights: Path, cache: Path, logs: Path, size: int) -> None:
        self.cache, self.logs = cache, logs
        self.env = server_env(
            weights,
            FLUX_DAY_ALLOW_PRIVATE_URLS="1",
            FLUX_DAY_LORA_CACHE=str(cache),
            FLUX_DAY_LORA_CACHE_BYTES=str(BUDGET),
        )
        self.started = 0
        self.servers = [self._start() for _ in range(size)]
        for server in self.servers:
            assert server.wait_until_settled()["status"] == "READY"

    def _start(self) -> CogServer:
        self.started += 1
        return CogServer(self.env, self.logs / f"replica-{self.started}.log")

    def replace(self, index: int) -> CogServer:
        """A new replica in place of `index` (which is gone or going), once it is ready."""
        self.servers[index] = self._start()
        assert self.servers[index].wait_until_settled()["status"] == "READY"
        return self.servers[index]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="module")
def fleet(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("replicas")
    (root / "logs").mkdir()
    fleet = Fleet(tiny_weights, root / "lora-cache", root / "logs", size=3)
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def expected(fleet: Fleet) -> dict[str, bytes]:
    """Each LoRA's image, from a data: URI (which never touches the cache)."""
    return {name: image(fleet.servers[0], replicate_weights=data_uri(data)) for name, data in LORAS.items()}


def image(server: CogServer, **inputs: Any) -> bytes:
    (raw,) = server.images(**FAST, **inputs)
    return raw


def cache_file(fleet: Fleet, url: str) -> Path:
    """The cached file for `url`, found without a `LoraCache` (whose start would clear leaked partials)."""
    return file_path(fleet.cache, parse_ref(url).identity)


def partials(fleet: Fleet) -> list[Path]:
    return sorted(fleet.cache.glob(".partial-*"))


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def logged(server: CogServer, text: str) -> int:
    return server.log_path.read_text(errors="replace").count(text)


def predict_until_killed(server: CogServer, url: str) -> None:
    """A request whose server is killed under it: the connection error is the expected end."""
    with contextlib.suppress(OSError):
        server.predict(**FAST, replicate_weights=url)


def test_one_new_lora_asked_of_three_replicas_at_once_is_downloaded_once(
    fleet: Fleet, files: HttpFiles, expected: dict[str, bytes]
) -> None:
    url, gate = files.gated("/together.safetensors", LORAS["A"])
    waits = [logged(server, "another process is downloading it; waiting") for server in fleet.servers]
    with ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(server.predict, **FAST, replicate_weights=url) for server in fleet.servers]
        # One replica has the body half-way; the other two wait on its lock, and say so.
        wait_for(lambda: files.hits["/together.safetensors"] >= 1, "a replica downloads")
        wait_for(
            lambda: (
                sum(
                    logged(server, "another process is downloading it; waiting") > before
                    for server, before in zip(fleet.servers, waits, strict=True)
                )
                == 2
            ),
            "the two others wait for it",
        )
        gate.set()
        results = [answer.result() for answer in answers]
    assert [result["status"] for result in results] == ["succeeded"] * 3, results
    assert files.hits["/together.safetensors"] == 1
    assert [result["output"] for result in results] == [results[0]["output"]] * 3
    assert image(fleet.servers[0], replicate_weights=url) == expected["A"]
    assert cache_file(fleet, url).read_bytes() == LORAS["A"]
    assert partials(fleet) == []


def test_a_starting_replica_leaves_live_downloads_alone_and_clears_a_killed_ones(
    fleet: Fleet, files: HttpFiles, expected: dict[str, bytes]
) -> None:
    live_url, live_gate = files.gated("/live.safetensors", LORAS["B"])
    killed_url, _ = files.gated("/killed.safetensors", LORAS["C"])
    background = ThreadPoolExecutor(2)
    live = background.submit(fleet.servers[0].predict, **FAST, replicate_weights=live_url)
    wait_for(lambda: len(partials(fleet)) == 1, "replica 0 writes its partial")
    (live_partial,) = partials(fleet)
    dying = fleet.servers[2]
    background.submit(predict_until_killed, dying, killed_url)
    wait_for(lambda: len(partials(fleet)) == 2, "replica 2 writes its partial")
    (killed_partial,) = set(partials(fleet)) - {live_partial}
    pids = dying.worker_pids()
    os.killpg(dying.process.pid, signal.SIGKILL)  # server and worker: no chance to clean up
    dying.stop()
    for pid in pids:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), f"process {pid} is gone", timeout=10)
    assert killed_partial.exists()

    fleet.replace(2)  # its successor starts while replica 0 is still downloading
    assert partials(fleet) == [live_partial]
    assert files.hits["/live.safetensors"] == 1
    live_gate.set()
    assert live.result()["status"] == "succeeded"
    background.shutdown()
    assert files.hits["/live.safetensors"] == 1
    assert image(fleet.servers[0], replicate_weights=live_url) == expected["B"]
    files.serve("/killed.safetensors", LORAS["C"])
    assert image(fleet.servers[2], replicate_weights=killed_url) == expected["C"]
    assert partials(fleet) == []


def test_eviction_under_a_small_budget_never_breaks_a_reader(
    fleet: Fleet, files: HttpFiles, expected: dict[str, bytes]
) -> None:
    urls = {name: files.serve(f"/evict-{name}.safetensors", data) for name, data in LORAS.items()}
    first, second, third = fleet.servers
    assert image(first, replicate_weights=urls["D"]) == expected["D"]
    held = cache_file(fleet, urls["D"])
    # Another process reads D (as a replica mid-read would): new LoRAs evict around it.
    with LoraCache(fleet.cache, BUDGET).reading(parse_ref(urls["D"]).identity) as path:
        assert path == held
        assert image(second, replicate_weights=urls["E"]) == expected["E"]
        assert image(third, replicate_weights=urls["F"]) == expected["F"]
        assert held.read_bytes() == LORAS["D"]
        assert not cache_file(fleet, urls["E"]).exists()  # E went instead, though newer
    assert image(second, replicate_weights=urls["G"]) == expected["G"]
    assert not held.exists()  # free again, D was evicted
    # All three replicas switch among more LoRAs than the budget holds, at once: files are evicted
    # and fetched again while other replicas read them, and no prediction fails or differs.
    names = ["D", "E", "F", "G", "H"]

    def switch(index: int) -> list[tuple[str, dict[str, Any]]]:
        server, asks = fleet.servers[index], [names[(index + k) % len(names)] for k in range(4)]
        return [(name, server.predict(**FAST, replicate_weights=urls[name])) for name in asks]

    with ThreadPoolExecutor(3) as pool:
        results = [step for steps in pool.map(switch, range(3)) for step in steps]
    for name, result in results:
        assert result["status"] == "succeeded", result.get("error")
        assert decode_output(result["output"][0]) == expected[name]
    assert partials(fleet) == []
