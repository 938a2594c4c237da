"""LoRAs end to end: URLs and data: URIs through the real Cog server, fused, combined, undone, refused.

The LoRA files come from `tests.harness.lora_files` and are served by a real HTTP server on 127.0.0.1
(`tests.harness.http_files`), which the predictor may reach because FLUX_DAY_ALLOW_PRIVATE_URLS=1.
"""

from __future__ import annotations

import io
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.harness.cog_server import CogServer, server_env
from tests.harness.http_files import HttpFiles
from tests.harness.lora_files import (
    FAST,
    Factors,
    ai_toolkit,
    bfl,
    data_uri,
    kohya,
    peft,
    random_lora,
    to_bytes,
)

MAX_LORA_BYTES = 2_000_000
LORA_A = to_bytes(kohya(random_lora(1)))
LORA_B = to_bytes(bfl(random_lora(2)))
LORA_C = to_bytes(*peft(random_lora(3)))
LORA_D = to_bytes(ai_toolkit(random_lora(4)))


@pytest.fixture(scope="module")
def lora_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-server-tmp")


@pytest.fixture(scope="module")
def server(
    tiny_weights: Path, lora_tmp: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CogServer]:
    env = server_env(
        tiny_weights, lora_tmp, FLUX_DAY_ALLOW_PRIVATE_URLS="1", FLUX_DAY_MAX_LORA_BYTES=str(MAX_LORA_BYTES)
    )
    with CogServer.ready(env, tmp_path_factory.mktemp("lora-logs") / "cog.log") as cog:
        yield cog


def image(server: CogServer, **loras: object) -> bytes:
    (raw,) = server.images(**FAST, **loras)
    return raw


def test_url_lora_changes_the_image_and_a_data_uri_of_it_gives_the_same(
    server: CogServer, files: HttpFiles, base: bytes
) -> None:
    from_url = image(server, replicate_weights=files.serve("/a.safetensors", LORA_A))
    assert from_url != base
    assert image(server, replicate_weights=data_uri(LORA_A)) == from_url


@pytest.mark.parametrize("lora", [LORA_B, LORA_C, LORA_D], ids=["bfl", "peft", "ai-toolkit"])
def test_every_layout_changes_the_image(
    server: CogServer, files: HttpFiles, base: bytes, lora: bytes
) -> None:
    assert image(server, replicate_weights=data_uri(lora)) != base


def test_main_and_extra_combine_and_their_order_does_not_matter(
    server: CogServer, files: HttpFiles, base: bytes
) -> None:
    a, b = files.serve("/a.safetensors", LORA_A), files.serve("/b.safetensors", LORA_B)
    only_a = image(server, replicate_weights=a, lora_scale=0.8)
    only_b = image(server, extra_lora=b, extra_lora_scale=0.8)
    both = image(server, replicate_weights=a, lora_scale=0.8, extra_lora=b, extra_lora_scale=0.8)
    assert len({base, only_a, only_b, both}) == 4
    swapped = image(server, replicate_weights=b, lora_scale=0.8, extra_lora=a, extra_lora_scale=0.8)
    assert swapped == both


def test_lora_scale_zero_is_the_base_image(server: CogServer, files: HttpFiles, base: bytes) -> None:
    a = files.serve("/a.safetensors", LORA_A)
    assert image(server, replicate_weights=a, lora_scale=0) == base
    assert image(server, replicate_weights=a, lora_scale=1, extra_lora=a, extra_lora_scale=0) != base


def test_go_fast_loras_differ_from_full_precision_except_at_custom_sizes(
    server: CogServer, files: HttpFiles
) -> None:
    """fp8 with 1.5x scales (exactness is in test_fast); custom sizes run full precision at 1x."""
    a = files.serve("/a.safetensors", LORA_A)
    assert image(server, replicate_weights=a, lora_scale=0.5, go_fast=True) != image(
        server, replicate_weights=a, lora_scale=0.5
    )
    custom = {**FAST, "aspect_ratio": "custom", "width": 256, "height": 256, "replicate_weights": a}
    (fast,) = server.images(**custom, lora_scale=0.5, go_fast=True)
    assert [fast] == server.images(**custom, lora_scale=0.5)


def test_the_same_url_is_downloaded_once(server: CogServer, files: HttpFiles) -> None:
    url = files.serve("/once.safetensors", to_bytes(kohya(random_lora(5))))
    first = image(server, replicate_weights=url)
    assert image(server, extra_lora=url) == first
    assert image(server, replicate_weights=url) == first
    assert files.hits["/once.safetensors"] == 1


def test_a_redirect_to_a_lora_is_followed(server: CogServer, files: HttpFiles) -> None:
    direct = image(server, replicate_weights=files.serve("/a.safetensors", LORA_A))
    files.redirect("/moved-for-good", "/moved", status=301)
    files.redirect("/moved", files.url("/a.safetensors?copy=1"), status=302)
    assert image(server, replicate_weights=files.url("/moved-for-good")) == direct
    assert files.hits["/moved-for-good"] == files.hits["/moved"] == 1


def test_a_slow_download_still_works(server: CogServer, files: HttpFiles) -> None:
    direct = image(server, replicate_weights=files.serve("/a.safetensors", LORA_A))
    assert image(server, replicate_weights=files.slow("/slow.safetensors", LORA_A)) == direct


def pickle_file() -> bytes:
    buffer = io.BytesIO()
    torch.save(kohya(random_lora(1)), buffer)
    return buffer.getvalue()


def no_module_matches() -> bytes:
    return to_bytes({"foo.lora_A.weight": torch.randn(4, 32), "foo.lora_B.weight": torch.randn(32, 4)})


def wrong_in_features() -> bytes:
    lora = random_lora(6, modules=("double_blocks.0.img_attn.qkv",))
    f = lora["double_blocks.0.img_attn.qkv"]
    lora["double_blocks.0.img_attn.qkv"] = Factors(torch.randn(4, 16), f.up, f.alpha)  # the model has 32
    return to_bytes(kohya(lora))


# name -> (how to make the reference on the HTTP server, what the error must say)
BAD: dict[str, tuple[Callable[[HttpFiles], str], str]] = {
    "random-bytes": (
        lambda f: f.serve("/random.safetensors", random.Random(0).randbytes(5000)),
        "not a safetensors file",
    ),
    "pickle": (lambda f: f.serve("/lora.pt", pickle_file()), "pickle"),
    "truncated": (lambda f: f.serve("/cut.safetensors", LORA_A[:-200]), "not a safetensors file"),
    "no-module-matches": (lambda f: f.serve("/foo.safetensors", no_module_matches()), "match"),
    "wrong-shape": (lambda f: f.serve("/shape.safetensors", wrong_in_features()), "does not fit"),
    "http-404": (lambda f: f.error("/gone.safetensors", 404), "HTTP 404"),
    "http-401": (lambda f: f.error("/private.safetensors", 401), "HTTP 401"),
    "http-500": (lambda f: f.error("/broken.safetensors", 500), "HTTP 500"),
    "over-limit": (lambda f: f.oversized("/big.safetensors", MAX_LORA_BYTES), "larger than"),
    "over-limit-unannounced": (
        lambda f: f.oversized("/big-stream.safetensors", MAX_LORA_BYTES, announce=False),
        "larger than",
    ),
    "content-length-lies": (
        lambda f: f.serve("/short.safetensors", LORA_A, content_length=len(LORA_A) + 1000),
        "broke off",
    ),
    "data-uri-over-limit": (lambda f: data_uri(bytes(MAX_LORA_BYTES + 1)), "limit"),
    "replicate-model": (lambda f: "owner/model", "http"),
    "secret-query-404": (
        lambda f: f.error("/signed.safetensors", 404) + "?token=SECRET123&X-Amz-Signature=SECRET123",
        "HTTP 404",
    ),
}
CASES = [(name, input_name) for name in BAD for input_name in ("replicate_weights", "extra_lora")]


@pytest.mark.parametrize(("name", "input_name"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_a_bad_lora_fails_naming_its_input_and_changes_nothing(
    server: CogServer, files: HttpFiles, name: str, input_name: str
) -> None:
    make_ref, says = BAD[name]
    # A working LoRA is fused before, stays named in the failing request (as the other input), and
    # after: the failure must leave exactly it in place.
    good = {"replicate_weights": files.serve("/a.safetensors", LORA_A), "lora_scale": 0.7}
    if input_name == "replicate_weights":
        good = {"extra_lora": files.url("/a.safetensors"), "extra_lora_scale": 0.7}
    before = image(server, **good)
    result = server.predict(**FAST, **good, **{input_name: make_ref(files)})
    assert result["status"] == "failed", result
    error = result["error"]
    assert re.search(rf"\b{input_name}\b", error), error
    assert says in error, error
    for leak in ("Traceback", "/tmp", "site-packages", "SECRET123", "token="):
        assert leak not in error, error
    assert "SECRET123" not in (result.get("logs") or "")
    assert server.becomes_ready()
    assert image(server, **good) == before


def test_nothing_stays_fused_and_nothing_is_left_in_tmpdir(
    server: CogServer, files: HttpFiles, base: bytes, lora_tmp: Path
) -> None:
    a, b = files.serve("/a.safetensors", LORA_A), files.serve("/b.safetensors", LORA_B)
    schnell = image(server, model="schnell")
    assert image(server, model="schnell", replicate_weights=a) != schnell
    image(server, replicate_weights=a, extra_lora=b)
    assert image(server, model="schnell") == schnell
    assert image(server) == base
    image(server, replicate_weights=data_uri(LORA_B))
    server.predict(**FAST, replicate_weights=files.error("/gone.safetensors", 404))
    assert image(server) == base
    # Only the last prediction's output folder remains (see test_server); no downloads or copies.
    left = [p for p in lora_tmp.rglob("*") if not p.name.startswith("flux-day-out-")]
    assert all(p.parent.name.startswith("flux-day-out-") for p in left), left
    assert len(list(lora_tmp.glob("flux-day-out-*"))) <= 1


def test_a_trained_models_default_lora_from_cog_weights(
    server: CogServer, files: HttpFiles, tiny_weights: Path, tmp_path: Path
) -> None:
    """COG_WEIGHTS names the trainer's .tar; it styles requests whose replicate_weights is empty."""
    from tests.harness.fake_services import REPLICATE_MEMBER, make_tar

    url = files.serve("/trained_model.tar", make_tar({REPLICATE_MEMBER: LORA_A}))
    env = server_env(
        tiny_weights,
        FLUX_DAY_ALLOW_PRIVATE_URLS="1",
        FLUX_DAY_LORA_CACHE=str(tmp_path / "cache"),
        COG_WEIGHTS=url,
    )
    with CogServer.ready(env, tmp_path / "cog.log") as trained:
        assert image(trained, lora_scale=0.7) == image(
            server, replicate_weights=data_uri(LORA_A), lora_scale=0.7
        )
        assert image(trained, replicate_weights=data_uri(LORA_B)) == image(
            server, replicate_weights=data_uri(LORA_B)
        )
    assert files.hits["/trained_model.tar"] == 1


def test_metrics_and_one_summary_line_per_request(server: CogServer, files: HttpFiles) -> None:
    url = files.serve("/metrics.safetensors", LORA_A) + "?token=SECRET_IN_QUERY"
    response = server.predict(**{**FAST, "num_outputs": 2}, replicate_weights=url)
    assert response["status"] == "succeeded", response.get("error")
    metrics = response["metrics"]
    assert (metrics["images"], metrics["steps"], metrics["megapixels"]) == (
        2,
        2 * FAST["num_inference_steps"],
        0.5243,
    )
    assert all(metrics["timing"][key] >= 0 for key in ("loras", "generate", "safety"))
    summary = [line for line in response["logs"].splitlines() if "request mode=" in line]
    assert len(summary) == 1 and "replicate_weights=http://127.0.0.1" in summary[0]
    assert "SECRET_IN_QUERY" not in response["logs"]


def test_a_cancel_during_a_lora_download_leaves_no_partial_file(
    server: CogServer, files: HttpFiles, tiny_weights: Path, base: bytes
) -> None:
    """A cancel stops the download loop: the part already written goes, nothing is cached."""
    data = to_bytes(kohya(random_lora(9)))
    url = files.slow("/slow-cancelled.safetensors", data, pieces=50, delay_s=0.1)  # five seconds
    cache = tiny_weights / "lora-cache"
    before = set(cache.rglob("*")) if cache.exists() else set()
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            server.predict(prediction_id="cancel-download", **FAST, replicate_weights=url)
        )
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not files.hits["/slow-cancelled.safetensors"]:
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)
    time.sleep(0.5)  # a few chunks written to the partial file
    assert server.cancel("cancel-download") == 200
    thread.join(30)
    assert result["status"] == "canceled", result
    # An async prediction is answered "canceled" at once; its download stops at its next chunk.
    deadline = time.monotonic() + 10
    while (set(cache.rglob("*")) if cache.exists() else set()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (set(cache.rglob("*")) if cache.exists() else set()) == before
    assert server.becomes_ready()
    assert image(server) == base
