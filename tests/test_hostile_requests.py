"""Hostile requests through the real Cog server: each is refused naming its input (or, for a gzip-encoded
LoRA, served), nothing internal reaches the user, the server stays READY, and the next prediction is
byte-identical to the one before.

Files are served by a real HTTP server on 127.0.0.1 (`tests.harness.http_files`).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.harness.cog_server import CogServer, data_uri, server_env
from tests.harness.fake_services import make_tar
from tests.harness.http_files import HttpFiles, Route
from tests.harness.image_files import gradient, png_bytes
from tests.harness.lora_files import FAST, kohya, random_lora, to_bytes
from tests.harness.lora_files import data_uri as lora_uri

MAX_LORA_BYTES = 2_000_000
MIN_RATE, RATE_WINDOW_S = 500, 1.0  # bytes/s over 1 s: a trickle is refused in about a second
LORA = to_bytes(kohya(random_lora(1)))
INTERNALS = ("Traceback", "site-packages", ".venv", "/tmp", "/work", "/etc", "SECRET")
# A Python class name, `SomethingError`/`...Exception`/`...Warning`; our own InputError is its message.
CLASS_NAME = re.compile(r"\b(?!InputError\b)[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+(?:Error|Exception|Warning)\b")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-tmp")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-cache")


@pytest.fixture(scope="module")
def server(
    tiny_weights: Path, tmp: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CogServer]:
    env = server_env(
        tiny_weights,
        tmp,
        FLUX_DAY_ALLOW_PRIVATE_URLS="1",
        FLUX_DAY_MAX_LORA_BYTES=str(MAX_LORA_BYTES),
        FLUX_DAY_MIN_LORA_RATE=str(MIN_RATE),
        FLUX_DAY_LORA_RATE_WINDOW=str(RATE_WINDOW_S),
        FLUX_DAY_LORA_CACHE=str(cache),
    )
    with CogServer.ready(env, tmp_path_factory.mktemp("hostile-logs") / "cog.log") as cog:
        yield cog


def shows_nothing_internal(text: str) -> None:
    for internal in INTERNALS:
        assert internal not in text, text
    assert not CLASS_NAME.search(text), text


def refused(server: CogServer, base: bytes, input_name: str, says: str, **inputs: object) -> str:
    """Send a hostile request; check the refusal and that the server serves as before; return the error."""
    result = server.predict(**{**FAST, **inputs})
    assert result["status"] == "failed", result
    error = result["error"]
    assert re.search(rf"\b{input_name}\b", error) and says in error, error
    shows_nothing_internal(error)
    shows_nothing_internal(result.get("logs") or "")
    assert server.becomes_ready()
    assert server.images(**FAST) == [base]
    return error


# 1. Files on the server's disk ---------------------------------------------------------------------


def test_an_image_path_on_the_server_is_refused_even_an_earlier_output(
    server: CogServer, base: bytes, tmp: Path
) -> None:
    (earlier,) = tmp.glob("flux-day-out-*/out-*.png")  # the last prediction's output, still on disk
    planted = tmp / "tmpplanted.png"  # named like the files Cog makes from uploads
    planted.write_bytes(png_bytes(gradient(256, 256)))
    upload = data_uri(png_bytes(gradient(256, 256)))
    for name, value, other in (
        ("image", str(earlier), {}),
        ("image", str(planted), {}),
        ("image", f"file://{planted}", {}),
        ("mask", str(planted), {"image": upload}),
    ):
        says = "give the image as an http(s) URL or a data: URI"
        error = refused(server, base, name, says, **{name: value}, **other)
        assert str(planted) not in error and "planted" not in error
    assert server.predict(**FAST, image=upload)["status"] == "succeeded"  # an upload still works


# 2. Unknown inputs (this server has no schema file; test_openapi has the one with it) ---------------


def test_an_unknown_input_is_refused_naming_it_and_listing_the_accepted_ones(
    server: CogServer, base: bytes
) -> None:
    error = refused(server, base, "foo", "not an input of this model", foo=1)
    assert "prompt, image, mask, aspect_ratio" in error and "extra_lora_scale" in error


# 3. A LoRA served gzip-encoded -----------------------------------------------------------------------


def test_a_gzip_encoded_lora_loads_like_the_same_file_plain(server: CogServer, files: HttpFiles) -> None:
    encoded = gzip.compress(LORA)
    url = files.add("/gzip.safetensors", Route(chunks=(encoded,), headers=(("Content-Encoding", "gzip"),)))
    (plain,) = server.images(**FAST, replicate_weights=lora_uri(LORA))
    assert server.images(**FAST, replicate_weights=url) == [plain]


# 4. Non-finite LoRAs, and fused weights past float32 -------------------------------------------------


def nan_lora() -> bytes:
    state = kohya(random_lora(2))
    state["lora_unet_single_blocks_1_linear1.lora_up.weight"][3, 1] = float("nan")
    return to_bytes(state)


def overflowing_lora() -> bytes:
    """Finite factors whose product (9e38) is past float32's largest value, the CPU model's dtype."""
    return to_bytes(
        {
            "transformer.proj_out.lora_A.weight": torch.full((1, 32), 3e19),
            "transformer.proj_out.lora_B.weight": torch.full((64, 1), 3e19),
        }
    )


def test_a_lora_with_nan_values_is_refused(server: CogServer, base: bytes) -> None:
    refused(server, base, "extra_lora", "holds NaN or infinite values", extra_lora=lora_uri(nan_lora()))


def test_a_lora_whose_fused_weight_overflows_is_refused_and_everything_restored(
    server: CogServer, base: bytes
) -> None:
    error = refused(
        server,
        base,
        "replicate_weights",
        "past the largest value",
        replicate_weights=lora_uri(overflowing_lora()),
        extra_lora=lora_uri(LORA),
    )
    assert error.split("InputError: ", 1)[-1].startswith("replicate_weights:"), error  # not extra_lora
    assert "lower lora_scale" in error


# 5. Python warnings --------------------------------------------------------------------------------


def palette_png_with_byte_transparency() -> bytes:
    """A palette PNG whose transparency is a byte table: Pillow warns when it is made RGB."""
    image = Image.new("P", (256, 256))
    image.putpalette([0, 0, 0, 255, 255, 255] * 128)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=bytes([0, 255, 128]))
    return buffer.getvalue()


def test_python_warnings_stay_out_of_prediction_logs_and_go_to_the_server_log_without_paths(
    server: CogServer,
) -> None:
    result = server.predict(**FAST, image=data_uri(palette_png_with_byte_transparency()))
    assert result["status"] == "succeeded", result.get("error")
    assert "Palette images" not in result["logs"] and "Warning" not in result["logs"], result["logs"]
    shows_nothing_internal(result["logs"])
    deadline = time.monotonic() + 10
    while "Palette images with Transparency" not in server.log_path.read_text():
        assert time.monotonic() < deadline, "the warning never reached the server log"
        time.sleep(0.1)
    line = next(line for line in server.log_path.read_text().splitlines() if "Palette images with" in line)
    assert "WARNING flux_day.server: python UserWarning" in line and "site-packages" not in line, line
    assert ".py" not in line and "/work" not in line, line


# 6. Refused LoRA files leave the disk cache ---------------------------------------------------------


def test_lora_files_refused_after_parsing_do_not_stay_in_the_cache(
    server: CogServer, files: HttpFiles, base: bytes, cache: Path
) -> None:
    before = set(cache.iterdir())
    for path, data, says in (
        ("/nan.safetensors", nan_lora(), "NaN"),
        ("/other-model.safetensors", to_bytes({"foo.lora_A.weight": torch.ones(2, 32)}), "LoRA"),
        ("/wrong-shape.safetensors", to_bytes(WRONG_SHAPE), "does not fit"),
    ):
        refused(server, base, "replicate_weights", says, replicate_weights=files.serve(path, data))
    assert set(cache.iterdir()) == before
    good = files.serve("/good.safetensors", LORA)
    server.images(**FAST, replicate_weights=good)
    assert len(set(cache.iterdir()) - before) == 1  # a good one is kept


# 7. Bodies larger than their header says, or than the limit ----------------------------------------


WRONG_SHAPE = {
    "transformer.proj_out.lora_A.weight": torch.ones(2, 7),
    "transformer.proj_out.lora_B.weight": torch.ones(64, 2),
}


def safetensors_header(elements: int) -> bytes:
    """The start of a safetensors file declaring one float32 tensor of `elements` values."""
    tensor = {"dtype": "F32", "shape": [elements], "data_offsets": [0, 4 * elements]}
    header = json.dumps({"w": tensor}).encode()
    return struct.pack("<Q", len(header)) + header


def gzip_of_zeros(head: bytes, zeros: int) -> bytes:
    """`head` then `zeros` zero bytes, gzip-compressed a megabyte at a time (never held whole)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    parts = [compressor.compress(head)]
    block = bytes(1 << 20)
    for _ in range(zeros >> 20):
        parts.append(compressor.compress(block))
    return b"".join([*parts, compressor.flush()])


def test_a_gzip_bomb_is_refused_by_its_header_before_it_is_inflated(
    server: CogServer, files: HttpFiles, base: bytes, cache: Path
) -> None:
    bomb = gzip_of_zeros(safetensors_header(25_000_000), 100 << 20)  # declares and inflates to 100 MB
    assert len(bomb) < MAX_LORA_BYTES
    url = files.add("/bomb.safetensors", Route(chunks=(bomb,), headers=(("Content-Encoding", "gzip"),)))
    says = "larger than 2000000 bytes by its own header"
    refused(server, base, "replicate_weights", says, replicate_weights=url)
    assert not list(cache.glob(".partial-*"))


def test_an_endless_body_is_refused_where_it_runs_past_its_header(
    server: CogServer, files: HttpFiles, base: bytes, cache: Path
) -> None:
    zeros = bytes(1 << 16)
    body = (safetensors_header(1000) + bytes(4000), *(zeros,) * 10_000)  # 655 MB, sent until we hang up
    url = files.add("/endless.safetensors", Route(chunks=body, content_length=-1))
    started = time.monotonic()
    declared = len(safetensors_header(1000)) + 4000
    says = f"runs past the {declared} bytes its safetensors header declares"
    refused(server, base, "extra_lora", says, extra_lora=url)
    assert time.monotonic() - started < 30
    assert not list(cache.glob(".partial-*"))


# 8. A trickling host ---------------------------------------------------------------------------------


def test_a_lora_trickled_byte_by_byte_is_refused_for_its_rate(
    server: CogServer, files: HttpFiles, base: bytes, cache: Path
) -> None:
    url = files.slow("/trickle.safetensors", LORA, pieces=len(LORA), delay_s=0.3)
    started = time.monotonic()
    refused(server, base, "replicate_weights", f"slowed below {MIN_RATE} bytes/s", replicate_weights=url)
    assert time.monotonic() - started < 20
    assert not list(cache.glob(".partial-*"))


# 9. Unsafe archives, in words ----------------------------------------------------------------------


def test_a_tar_slip_archive_is_refused_in_words_not_a_class_name(
    server: CogServer, files: HttpFiles, base: bytes
) -> None:
    url = files.serve("/slip.tar", make_tar({"../lora.safetensors": LORA}))
    error = refused(server, base, "extra_lora", "a path leading outside the archive", extra_lora=url)
    assert "OutsideDestination" not in error
