"""LoRA references: what is accepted, how it is shown (never with secrets), and data: URI limits."""

from __future__ import annotations

import base64

import pytest

from flux_day.config import Settings
from flux_day.errors import InputError, LoraError
from flux_day.loras.fetch import Fetcher
from flux_day.loras.refs import LoraRequest, decode_data_uri, parse_ref, shown_source


def test_urls_are_shown_without_credentials_query_or_fragment() -> None:
    shown = shown_source("https://user:pa55@example.com:8443/loras/a.safetensors?token=SECRET#frag")
    assert shown == "https://example.com:8443/loras/a.safetensors"
    assert "data: URI of" in shown_source("data:;base64," + "A" * 5000)


@pytest.mark.parametrize(
    "source",
    ["lora", "a/b/c/d", "ftp://example.com/a.safetensors", "/etc/passwd", "file:///x", "huggingface.co/x"],
)
def test_unknown_reference_shapes_are_refused_listing_the_forms(source: str) -> None:
    with pytest.raises(InputError, match=r"^extra_lora: .* is not a LoRA reference; give a Replicate model"):
        LoraRequest.parse("extra_lora", source, 1.0)


@pytest.mark.parametrize(
    ("source", "kind", "parts", "shown"),
    [
        ("fofr/flux-pixar-cars", "replicate", ("fofr", "flux-pixar-cars", "", ""), "fofr/flux-pixar-cars"),
        (
            "replicate.com/fofr/cars/versions/abc123",
            "replicate",
            ("fofr", "cars", "abc123", ""),
            "fofr/cars/abc123",
        ),
        (
            "https://replicate.com/fofr/cars/abc123",
            "replicate",
            ("fofr", "cars", "abc123", ""),
            "fofr/cars/abc123",
        ),
        ("huggingface.co/XLabs-AI/flux-lora", "huggingface", ("XLabs-AI", "flux-lora", "", ""), None),
        (
            "https://huggingface.co/o/r/blob/main/sub/x.safetensors",
            "huggingface",
            ("o", "r", "main", "sub/x.safetensors"),
            "huggingface.co/o/r/blob/main/sub/x.safetensors",
        ),
        (
            "huggingface.co/o/r/resolve/0a1b/x.safetensors",
            "huggingface",
            ("o", "r", "0a1b", "x.safetensors"),
            None,
        ),
        ("civitai.com/models/1234/some-style", "civitai", ("", "1234", "", ""), "civitai.com/models/1234"),
        (
            "https://civitai.com/models/1234?modelVersionId=99",
            "civitai",
            ("", "1234", "99", ""),
            "civitai.com/models/1234?modelVersionId=99",
        ),
        ("https://example.com/x.tar?sig=SECRET", "url", ("", "", "", ""), "https://example.com/x.tar"),
        ("example.com/x.safetensors", "url", ("", "", "", ""), "https://example.com/x.safetensors"),
        (
            "civitai.com/api/download/models/55",
            "url",
            ("", "", "", ""),
            "https://civitai.com/api/download/models/55",
        ),
        (
            "huggingface.co/o/r/blob/main/style%20one.safetensors",
            "huggingface",
            ("o", "r", "main", "style one.safetensors"),
            "huggingface.co/o/r/blob/main/style one.safetensors",
        ),
    ],
)
def test_every_form_the_schema_promises_is_recognised(source, kind, parts, shown) -> None:
    ref = parse_ref(source)
    assert (ref.kind, (ref.owner, ref.name, ref.version, ref.path)) == (kind, parts)
    if shown is not None:
        assert ref.shown == shown


def test_two_spellings_of_one_file_share_the_parsed_lora_key() -> None:
    assert parse_ref("o/m").identity_digest == parse_ref("https://replicate.com/o/m/").identity_digest
    assert parse_ref("o/m").identity_digest != parse_ref("o/m/v1").identity_digest


def test_data_uris_decode_base64_with_line_breaks_and_percent_encoding() -> None:
    payload = base64.b64encode(b"\x00safetensors bytes\xff").decode()
    wrapped = payload[:8] + "\n" + payload[8:].replace("+", "%2B")
    ref = parse_ref(f"data:application/octet-stream;base64,{wrapped}")
    assert decode_data_uri(ref, 1000) == b"\x00safetensors bytes\xff"


def test_data_uris_over_the_size_limit_or_malformed_are_refused() -> None:
    def decoded(source: str) -> bytes:
        with LoraError.for_input("replicate_weights"):
            return decode_data_uri(parse_ref(source), 2000)

    big = "data:;base64," + base64.b64encode(b"x" * 3000).decode()
    with pytest.raises(InputError, match=r"^replicate_weights: .*more than 2000 bytes"):
        decoded(big)
    with pytest.raises(InputError, match=r"^replicate_weights: .*not valid base64"):
        decoded("data:;base64,@@@@")
    with pytest.raises(InputError, match=r"^replicate_weights: .*malformed"):
        decoded("data:no-comma")


def test_private_addresses_are_refused_unless_allowed() -> None:
    settings = Settings.from_env({})
    for url in ("http://127.0.0.1:9/a.safetensors?sig=SECRET", "http://10.0.0.1/a", "http://[::1]/a"):
        with (
            pytest.raises(InputError, match=r"^replicate_weights: .*private network address") as error,
            LoraError.for_input("replicate_weights"),
        ):
            Fetcher(settings).open(parse_ref(url), url)
        assert "SECRET" not in str(error.value)
