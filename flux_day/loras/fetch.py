"""Getting a LoRA's bytes: `data:` URIs decoded, http(s) URLs downloaded with limits.

Every hop of a redirect is checked: only http(s), and no loopback/private/link-local address unless
`FLUX_DAY_ALLOW_PRIVATE_URLS=1` (tests), so a request cannot make the server fetch its own network.
Bodies are read in chunks and cut off at `FLUX_DAY_MAX_LORA_BYTES`. URLs are shown without their query
string, which is where signed URLs keep their credentials.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import urllib.parse

import requests

from flux_day.config import Settings
from flux_day.errors import InputError
from flux_day.loras.refs import LoraRef, decode_data_uri, shown_source

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20


def fetch_bytes(ref: LoraRef, settings: Settings) -> bytes:
    """The file `ref` points at, or an `InputError` naming the input and what went wrong."""
    if ref.kind == "data":
        return decode_data_uri(ref, settings.max_lora_bytes)
    return _download(ref, settings)


def _download(ref: LoraRef, settings: Settings) -> bytes:
    url = ref.location
    with requests.Session() as session:
        for _ in range(MAX_REDIRECTS + 1):
            _check_destination(ref, url, settings)
            try:
                response = session.get(
                    url,
                    stream=True,
                    allow_redirects=False,
                    timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                )
            except requests.RequestException as error:
                raise InputError(
                    f"{ref.input_name}: could not download {shown_source(url)} "
                    f"({type(error).__name__}); check the URL is reachable."
                ) from None
            with response:
                if response.is_redirect:
                    url = urllib.parse.urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise InputError(
                        f"{ref.input_name}: downloading {shown_source(url)} failed with HTTP "
                        f"{response.status_code}; check the URL and that the file is public."
                    )
                return _read_body(ref, response, settings.max_lora_bytes)
    raise InputError(
        f"{ref.input_name}: {shown_source(ref.location)} redirects more than {MAX_REDIRECTS} times."
    )


def _read_body(ref: LoraRef, response: requests.Response, max_bytes: int) -> bytes:
    too_big = InputError(
        f"{ref.input_name}: {shown_source(ref.location)} is larger than {max_bytes} bytes, the LoRA size "
        "limit (FLUX_DAY_MAX_LORA_BYTES)."
    )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    body = bytearray()
    try:
        for chunk in response.iter_content(CHUNK_BYTES):
            body += chunk
            if len(body) > max_bytes:
                raise too_big
    except requests.RequestException as error:
        raise InputError(
            f"{ref.input_name}: the download of {shown_source(ref.location)} broke off "
            f"({type(error).__name__}); try again."
        ) from None
    log.info("downloaded %s for %s: %d bytes", shown_source(ref.location), ref.input_name, len(body))
    return bytes(body)


def _check_destination(ref: LoraRef, url: str, settings: Settings) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise InputError(f"{ref.input_name}: {shown_source(url)} is not an http(s) URL.")
    if settings.allow_private_urls:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except OSError:
        raise InputError(f"{ref.input_name}: the host of {shown_source(url)} cannot be resolved.") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise InputError(
                f"{ref.input_name}: {shown_source(url)} points to a private network address; give a "
                "public URL."
            )
