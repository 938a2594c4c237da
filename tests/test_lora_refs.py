"""LoRA references: what is accepted, how it is shown (never with secrets), and data: URI limits."""

from __future__ import annotations

import base64

import pytest

from flux_day.config import Settings
from flux_day.errors import InputError
from flux_day.loras.fetch import fetch_bytes
from flux_day.loras.refs import decode_data_uri, parse_ref, shown_source


def test_urls_are_shown_without_credentials_query_or_fragment() -> None:
    shown = shown_source("https://user:pa55@example.com:8443/loras/a.safetensors?token=SECRET#frag")
    assert shown == "https://example.com:8443/loras/a.safetensors"
    assert "data: URI of" in shown_source("data:;base64," + "A" * 5000)


@pytest.mark.parametrize(
    "source", ["owner/model", "ftp://example.com/a.safetensors", "/etc/passwd", "file:///x"]
)
def test_references_this_build_cannot_fetch_are_refused_by_name(source: str) -> None:
    with pytest.raises(InputError, match=r"^extra_lora: .*http\(s\) URL .* data: URI"):
        parse_ref("extra_lora", source)


def test_data_uris_decode_base64_with_line_breaks_and_percent_encoding() -> None:
    payload = base64.b64encode(b"\x00safetensors bytes\xff").decode()
    wrapped = payload[:8] + "\n" + payload[8:].replace("+", "%2B")
    ref = parse_ref("replicate_weights", f"data:application/octet-stream;base64,{wrapped}")
    assert decode_data_uri(ref, 1000) == b"\x00safetensors bytes\xff"


def test_data_uris_over_the_size_limit_or_malformed_are_refused() -> None:
    big = parse_ref("replicate_weights", "data:;base64," + base64.b64encode(b"x" * 3000).decode())
    with pytest.raises(InputError, match=r"^replicate_weights: .*more than 2000 bytes"):
        decode_data_uri(big, 2000)
    with pytest.raises(InputError, match=r"^replicate_weights: .*not valid base64"):
        decode_data_uri(parse_ref("replicate_weights", "data:;base64,@@@@"), 2000)
    with pytest.raises(InputError, match=r"^replicate_weights: .*malformed"):
        decode_data_uri(parse_ref("replicate_weights", "data:no-comma"), 2000)


def test_private_addresses_are_refused_unless_allowed() -> None:
    settings = Settings.from_env({})
    for url in ("http://127.0.0.1:9/a.safetensors?sig=SECRET", "http://10.0.0.1/a", "http://[::1]/a"):
        with pytest.raises(InputError, match=r"^replicate_weights: .*private network address") as error:
            fetch_bytes(parse_ref("replicate_weights", url), settings)
        assert "SECRET" not in str(error.value)
