"""The predictor as a service, through the real Cog server: cancels, uploads and setup failures."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import lora_files as lf
from tests.harness.cog_server import CogServer, decode_output, health_probe, server_env
from tests.harness.upload_server import UploadServer

SMALL = {
    "prompt": "a fox",
    "num_inference_steps": 2,
    "megapixels": "0.25",
    "seed": 21,
    "output_format": "png",
}
LORA = {"replicate_weights": lf.data_uri(lf.to_bytes(lf.kohya(lf.random_lora(31)))), "lora_scale": 0.8}
# Big enough that a cancel lands mid-denoise on 2 cores (a few seconds in all on tiny weights).
SLOW = {**SMALL, "aspect_ratio": "custom", "width": 1024, "height": 1024, "num_inference_steps": 50}
CANCELLED = re.compile(r"request cancelled after (\d+) of (\d+) denoising steps; ")


def leftovers(root: Path) -> set[Path]:
    """Files under the server's TMPDIR other than the last prediction's output folder."""
    return {path for path in root.rglob("*") if path.is_file() and "flux-day-out-" not in str(path)}


def cancellations(server: CogServer) -> list[tuple[int, int]]:
    """(steps done, steps asked) for each cancel the predictor logged so far."""
    return [(int(a), int(b)) for a, b in CANCELLED.findall(server.log_path.read_text())]


def in_background(
    server: CogServer, prediction_id: str, inputs: dict[str, Any]
) -> tuple[threading.Thread, dict]:
    """A sync prediction in another thread; its response lands in the returned dict."""
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(server.predict(prediction_id=prediction_id, **inputs)), daemon=True
    )
    thread.start()
    return thread, result


def wait_until_logged(server: CogServer, pattern: str, since: int, timeout: float = 60) -> None:
    """Wait until the server's log after offset `since` matches `pattern` (e.g. a step done)."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, server.log_path.read_text()[since:]):
        assert time.monotonic() < deadline, f"never logged: {pattern}"
        time.sleep(0.05)


def by_index(uploads: UploadServer, urls: list[str]) -> list[bytes]:
    """The uploaded files of one prediction in output order, by the index that ends each name."""
    names = [re.search(r"-(\d+)\.\w+$", url) for url in urls]
    indexed = {int(name[1]): uploads.stored(url) for name, url in zip(names, urls, strict=True) if name}
    assert sorted(indexed) == list(range(len(urls))), urls
    return [indexed[i] for i in range(len(urls))]


def test_cancel_stops_denoising_and_leaves_nothing_behind(cog_server: CogServer, server_tmp: Path) -> None:
    base, styled = cog_server.images(**SMALL), cog_server.images(**SMALL, **LORA)
    files_before, cancels_before = leftovers(server_tmp), len(cancellations(cog_server))
    since = len(cog_server.log_path.read_text())
    thread, result = in_background(cog_server, "cancel-me", {**SLOW, **LORA})
    wait_until_logged(cog_server, r"\b[1-9]\d*/50 \[", since)  # the progress bar: a step is done
    assert cog_server.cancel("cancel-me") == 200
    thread.join(60)
    assert result["status"] == "canceled", result
    assert not result.get("output")
    # An async prediction is answered "canceled" at once; its thread stops at its next step.
    wait_until_logged(cog_server, CANCELLED.pattern, since)
    done, asked = cancellations(cog_server)[cancels_before]
    assert 1 <= done < asked == 50
    assert "CancelationException" not in result.get("logs", "") + cog_server.log_path.read_text()[since:]
    assert cog_server.becomes_ready()
    # Nothing of the cancelled request is left: same bytes with and without the LoRA, no new files.
    assert cog_server.images(**SMALL) == base
    assert cog_server.images(**SMALL, **LORA) == styled
    assert leftovers(server_tmp) == files_before
    assert len(list(server_tmp.glob("flux-day-out-*"))) == 1


def test_a_client_that_goes_away_cancels_its_prediction(cog_server: CogServer) -> None:
    base = cog_server.images(**SMALL)
    cancels_before = len(cancellations(cog_server))
    body = json.dumps({"input": SLOW}).encode()
    since = len(cog_server.log_path.read_text())
    with socket.create_connection(("127.0.0.1", cog_server.port)) as client:
        client.sendall(
            b"POST /predictions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until_logged(cog_server, r"\b[1-9]\d*/50 \[", since)  # denoising under way
    # The client has gone away (its connection closed) without reading an answer.
    deadline = time.monotonic() + 30
    while len(cancellations(cog_server)) == cancels_before:
        assert time.monotonic() < deadline, "the abandoned prediction ran on"
        time.sleep(0.1)
    done, asked = cancellations(cog_server)[cancels_before]
    assert done < asked
    assert cog_server.becomes_ready()
    assert cog_server.images(**SMALL) == base


def test_outputs_are_uploaded_to_the_upload_url(
    cog_server: CogServer, tiny_weights: Path, tmp_path: Path
) -> None:
    expected = cog_server.images(**SMALL, num_outputs=2)
    env = server_env(tiny_weights, tmp_path)
    with UploadServer() as uploads:
        args = ["--upload-url", f"{uploads.base}/uploads/"]
        with CogServer.ready(env, tmp_path / "cog.log", args) as server:
            first = server.predict(**SMALL, num_outputs=2)
            second = server.predict(**SMALL, num_outputs=2)
            assert first["status"] == second["status"] == "succeeded", first
            # The outputs are the upload server's URLs, never data URIs, each file once.
            urls = first["output"] + second["output"]
            assert all(url.startswith(f"{uploads.base}/stored/") for url in urls)
            assert len(set(urls)) == 4 and len(uploads.uploads) == 4
            assert all(
                u.path.startswith("/uploads/") and u.content_type == "image/png" for u in uploads.uploads
            )
            # coglet 0.23 lists uploaded outputs in the order their uploads finish, so each file's name
            # ends in its index: output i (seed + i) is the one named `-<i>`, whatever its place.
            assert by_index(uploads, first["output"]) == expected
            assert by_index(uploads, second["output"]) == expected

            uploads.fail_with = 500
            failed = server.predict(**SMALL)
            assert failed["status"] == "failed", failed
            assert "Traceback" not in str(failed.get("error"))
            uploads.fail_with = None
            assert server.becomes_ready()
            again = server.predict(**SMALL)
            assert again["status"] == "succeeded"
            assert by_index(uploads, again["output"]) == expected[:1]


def test_without_an_upload_url_outputs_are_data_uris(cog_server: CogServer) -> None:
    result = cog_server.predict(**SMALL)
    assert result["output"][0].startswith("data:image/png;base64,")
    assert decode_output(result["output"][0]).startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("offline-without-weights", "Base weights are missing under"),
        ("broken-default-lora", "COG_WEIGHTS: "),
        ("bad-setting", "FLUX_DAY_DEVICE='gpu' is not a device; set auto, cuda or cpu."),
    ],
)
def test_a_setup_failure_says_why_in_the_setup_logs(
    case: str, reason: str, tiny_weights: Path, tmp_path: Path
) -> None:
    env = server_env(tiny_weights, tmp_path)
    if case == "offline-without-weights":
        env["FLUX_DAY_WEIGHTS"] = str(tmp_path / "empty")
    elif case == "bad-setting":
        env["FLUX_DAY_DEVICE"] = "gpu"
    else:
        (tmp_path / "junk.safetensors").write_bytes(b"not a LoRA")
        env["COG_WEIGHTS"] = str(tmp_path / "junk.safetensors")
    server = CogServer(env, tmp_path / "cog.log")
    try:
        health = server.wait_until_settled()
        assert health["status"] == "SETUP_FAILED", health
        assert health["setup"]["status"] == "failed"
        assert reason in health["setup"]["logs"]
        assert "Traceback" not in health["setup"]["logs"].split(reason, 1)[1][:300]
        refused = server.predict(**SMALL, timeout=10)
        assert refused.get("status") != "succeeded"
        # What Kubernetes sees (deploy/kubernetes): setup has ended, and the pod is not alive.
        assert health_probe(server.port, "started") == (0, "SETUP_FAILED")
        assert health_probe(server.port, "alive") == (1, "SETUP_FAILED")
    finally:
        server.stop()
