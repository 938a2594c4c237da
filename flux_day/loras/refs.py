"""What a `replicate_weights` / `extra_lora` value points at, and how to show it without leaking.

This build reads two kinds of reference: an http(s) URL of a .safetensors file and a `data:` URI of
one. Replicate model names, Hugging Face repos and CivitAI pages are refused with a message saying so.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from flux_day.errors import InputError

_DATA_URI = re.compile(r"^data:(?P<mediatype>[^,;]*)(?P<params>(;[^,;]*)*?),(?P<payload>.*)$", re.DOTALL)


@dataclass(frozen=True)
class LoraRef:
    """A parsed reference: `kind` says how to get the bytes, `location` is the URL or the data URI."""

    input_name: str
    kind: Literal["url", "data"]
    location: str

    @property
    def shown(self) -> str:
        """The reference as it may appear in logs and errors: no query string, no credentials, short."""
        return shown_source(self.location)


def shown_source(source: str) -> str:
    """`source` made safe to print: data URIs by size, URLs without user, password, query or fragment."""
    if source.startswith("data:"):
        return f"a data: URI of {len(source)} characters"
    try:
        parts = urllib.parse.urlsplit(source)
    except ValueError:
        return repr(source[:40])
    if parts.scheme and parts.netloc:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        path = parts.path if len(parts.path) <= 80 else parts.path[:77] + "..."
        return f"{parts.scheme}://{host}{path}"
    return repr(source if len(source) <= 40 else source[:37] + "...")


def parse_ref(input_name: str, source: str) -> LoraRef:
    """Classify `source`; refuse what this build cannot fetch, naming the input and what works."""
    source = source.strip()
    if source.startswith("data:"):
        return LoraRef(input_name, "data", source)
    scheme = urllib.parse.urlsplit(source).scheme.lower() if "://" in source else ""
    if scheme in {"http", "https"}:
        return LoraRef(input_name, "url", source)
    raise InputError(
        f"{input_name}: {shown_source(source)} is not a LoRA this build can load; give an http(s) URL "
        "of a .safetensors file or a data: URI of one."
    )


def decode_data_uri(ref: LoraRef, max_bytes: int) -> bytes:
    """The bytes of a `data:` URI (base64 or percent-encoded), refusing anything over `max_bytes`."""
    match = _DATA_URI.match(ref.location)
    if match is None:
        raise InputError(f"{ref.input_name}: the data: URI is malformed; write it as data:;base64,<bytes>.")
    payload = match["payload"]
    is_base64 = any(p.strip().lower() == "base64" for p in match["params"].split(";"))
    # base64 is 4 characters for every 3 bytes: refuse before decoding a payload that cannot fit.
    if (len(payload) * 3 // 4 if is_base64 else len(payload) // 3) > max_bytes:
        raise _too_big(ref, max_bytes)
    if is_base64:
        payload = urllib.parse.unquote("".join(payload.split()))
    try:
        data = (
            base64.b64decode(payload, validate=True) if is_base64 else urllib.parse.unquote_to_bytes(payload)
        )
    except (binascii.Error, ValueError):
        raise InputError(f"{ref.input_name}: the data: URI is not valid base64.") from None
    if len(data) > max_bytes:
        raise _too_big(ref, max_bytes)
    return data


def _too_big(ref: LoraRef, max_bytes: int) -> InputError:
    return InputError(
        f"{ref.input_name}: the data: URI holds more than {max_bytes} bytes, the LoRA size limit "
        "(FLUX_DAY_MAX_LORA_BYTES); give a URL of the file instead."
    )
