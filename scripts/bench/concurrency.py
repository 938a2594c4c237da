"""`concurrency`: a burst of requests, each with its own cold LoRA from a slow host, through the real
Cog server at concurrency N against concurrency 1: the makespan, the 409s clients met (and retried),
and whether every image is byte-identical to the same request run alone.

With concurrency 1 each request downloads its LoRA while the GPU idles; with N the downloads overlap
and the GPU runs the requests one after another as their LoRAs arrive. Each server gets an empty LoRA
cache, so every LoRA is cold in both runs.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scripts.bench.timing import print_table, progress
from tests.harness import lora_files as lf
from tests.harness.cog_server import CogServer, decode_output, server_env
from tests.harness.http_files import HttpFiles, Route

PIECES = 20  # each LoRA file is sent in this many chunks, spread over --file-seconds


def concurrency(args: argparse.Namespace) -> None:
    """Run the burst at `--concurrency` and at 1, then each request alone; print one table."""
    with HttpFiles() as files, tempfile.TemporaryDirectory(prefix="flux-day-burst-") as scratch:
        requests = burst_requests(files, args.burst, args.file_seconds)
        rows, refusals, images = [], {}, {}
        for slots in (args.concurrency, 1):
            name = f"concurrency {slots}"
            progress(f"{name}: a burst of {args.burst} requests, each LoRA {args.file_seconds:g} s to fetch")
            with serving(args.weights, Path(scratch), slots) as server:
                seconds, refusals[name], images[name] = run_burst(server, requests)
                if slots == 1:
                    alone = [one(server, request)[0] for request in requests]
            rows.append((name, [seconds]))
        same = {name: str(outputs == alone) for name, outputs in images.items()}
        print_table(
            f"a burst of {args.burst} requests, each with its own cold LoRA "
            f"({args.file_seconds:g} s per file): makespan through the Cog server",
            rows,
            baseline="concurrency 1",
            columns=(("409s", {k: str(v) for k, v in refusals.items()}), ("same as alone", same)),
        )
        makespans = {name: seconds[0] for name, seconds in rows}
        assert all(outputs == alone for outputs in images.values()), "an image differs from its lone run"
        assert makespans[f"concurrency {args.concurrency}"] < makespans["concurrency 1"] / 2, makespans
        assert refusals[f"concurrency {args.concurrency}"] == 0, "a request of the burst met a 409"


def burst_requests(files: HttpFiles, count: int, file_seconds: float) -> list[dict[str, Any]]:
    """`count` small requests, each with its own seed and its own LoRA served in `file_seconds`."""
    requests = []
    for i in range(count):
        data = lf.to_bytes(lf.kohya(lf.random_lora(500 + i)))
        size = -(-len(data) // PIECES)
        chunks = tuple(data[at : at + size] for at in range(0, len(data), size))
        url = files.add(f"/burst-{i}.safetensors", Route(chunks=chunks, delay_s=file_seconds / len(chunks)))
        requests.append({**lf.FAST, "seed": 60 + i, "replicate_weights": url})
    return requests


@contextlib.contextmanager
def serving(weights: Path, scratch: Path, slots: int) -> Iterator[CogServer]:
    """A Cog server on `weights` with `slots` concurrent predictions and an empty LoRA cache."""
    folder = scratch / f"slots-{slots}"
    (folder / "tmp").mkdir(parents=True)
    env = server_env(
        weights,
        folder / "tmp",
        FLUX_DAY_ALLOW_PRIVATE_URLS="1",
        FLUX_DAY_LORA_CACHE=str(folder / "lora-cache"),
        COG_MAX_CONCURRENCY=str(slots),
    )
    with CogServer.ready(env, folder / "cog.log") as server:
        yield server


def run_burst(server: CogServer, requests: list[dict[str, Any]]) -> tuple[float, int, list[bytes]]:
    """Send every request at once, each client retrying on 409: the makespan, the 409s, the images."""
    results: list[tuple[bytes, int]] = [(b"", 0)] * len(requests)

    def client(index: int) -> None:
        results[index] = one(server, requests[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, sum(n for _, n in results), [image for image, _ in results]


def one(server: CogServer, request: dict[str, Any]) -> tuple[bytes, int]:
    """`request`'s image, sent until the server takes it, and how many times it answered 409."""
    refused = 0
    while True:
        response = server.predict(retry_at_capacity=False, **request)
        if response.get("http_status") != 409:
            break
        refused += 1
        time.sleep(0.05)
    assert response.get("status") == "succeeded", response.get("error") or response
    (uri,) = response["output"]
    return decode_output(uri), refused
