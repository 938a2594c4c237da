"""HTTP for LoRAs: every hop checked, bodies capped and streamed to disk, tokens kept to their host.

Every hop of a redirect is checked: only http(s), and no loopback/private/link-local/metadata address
unless `FLUX_DAY_ALLOW_PRIVATE_URLS=1` (tests) or the host is one the operator configured as a service
(`FLUX_DAY_REPLICATE_URL`, `FLUX_DAY_CIVITAI_URL`, `HF_ENDPOINT`), so a request cannot make the server
fetch its own network. A token is sent only to the host it belongs to and is dropped on a redirect to
another host. Bodies are cut off at `FLUX_DAY_MAX_LORA_BYTES` (declared or streamed) and at a total
deadline, and as soon as their safetensors header declares more, or they run past what it declares,
or they trickle below `FLUX_DAY_MIN_LORA_RATE` (see `transfer`). URLs are shown without their query
string, which is where signed URLs keep credentials.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import requests
import urllib3

from flux_day.cancel import stop_if_cancelled
from flux_day.config import Settings
from flux_day.errors import LoraError
from flux_day.loras.netguard import PrivateAddressError, PublicOnlyAdapter, caused_by, endpoint, is_public
from flux_day.loras.refs import LoraRef, shown_source
from flux_day.loras.transfer import HeaderSize, TransferRate
from flux_day.server_log import log as server_log

log = logging.getLogger(__name__)

MAX_REDIRECTS = 10
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
DOWNLOAD_DEADLINE_S = 1800  # 2 GB at ~10 Mbit/s; a body that trickles forever is cut off
CHUNK_BYTES = 1 << 20
TIMEOUTS = (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
PROGRESS_EVERY_BYTES = 256 << 20


@dataclass(frozen=True)
class Credential:
    """A bearer token and the one host (netloc) it may be sent to."""

    host: str
    token: str


class Fetcher:
    """GETs for one settings object: JSON from service APIs, files streamed to a directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.session = requests.Session()
        self.session.trust_env = False  # no ~/.netrc credentials or proxies picked up behind our back
        services = [
            urllib.parse.urlsplit(url)
            for url in (settings.replicate_url, settings.civitai_url, settings.hf_endpoint)
        ]
        # The operator's own service hosts may be internal; every other host must be public.
        self.trusted = frozenset(endpoint(parts) for parts in services)
        if not settings.allow_private_urls:
            for scheme in ("http://", "https://"):
                self.session.mount(scheme, PublicOnlyAdapter(self.trusted))

    def open(
        self, ref: LoraRef, url: str, credential: Credential | None = None, follow: bool = True
    ) -> requests.Response:
        """A streaming response with status 200 (or a redirect when `follow` is False); errors named."""
        for _ in range(MAX_REDIRECTS + 1):
            self._check_destination(ref, url)
            netloc = urllib.parse.urlsplit(url).netloc.lower()
            headers = {"User-Agent": "flux-day"}
            if credential is not None and credential.token and netloc == credential.host:
                headers["Authorization"] = f"Bearer {credential.token}"
            try:
                response = self.session.get(
                    url,
                    headers=headers,
                    stream=True,
                    allow_redirects=False,
                    timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                )
            except requests.RequestException as error:
                if caused_by(error, (PrivateAddressError,)):
                    raise self._private(ref, url) from None
                if caused_by(error, (ConnectionRefusedError,)):
                    raise LoraError(
                        f"{shown_source(url)} refused the connection for {ref.shown}: nothing listens "
                        "there; check the host and port of the reference."
                    ) from None
                # urllib3 2 makes every failed connect a NewConnectionError, a subclass of its timeout
                # error: only a connect that ran out of time is a timeout.
                if caused_by(error, TIMEOUTS) and not caused_by(
                    error, (urllib3.exceptions.NewConnectionError,)
                ):
                    raise LoraError(
                        f"{shown_source(url)} did not answer {ref.shown} within "
                        f"{READ_TIMEOUT_S} s; the host is slow or down: try again later."
                    ) from None
                server_log.info("could not reach %s: %s", shown_source(url), type(error).__name__)
                raise LoraError(
                    f"could not reach {shown_source(url)} for {ref.shown}; check the reference and try again."
                ) from None
            if response.is_redirect and follow:
                response.close()
                url = urllib.parse.urljoin(url, response.headers.get("location", ""))
                continue
            if response.status_code != 200 and not (response.is_redirect and not follow):
                response.close()
                raise LoraError(_status_message(response.status_code, ref, url))
            return response
        raise LoraError(f"{ref.shown} redirects more than {MAX_REDIRECTS} times.")

    def json(self, ref: LoraRef, url: str, credential: Credential | None = None) -> Any:
        """The JSON body at `url` (a service API), or an error naming the input."""
        with self.open(ref, url, credential) as response:
            try:
                return response.json()
            except ValueError:
                raise LoraError(
                    f"{shown_source(url)} did not answer with JSON for {ref.shown}; check the reference."
                ) from None

    def download(
        self, ref: LoraRef, url: str, directory: Path, prefix: str, credential: Credential | None = None
    ) -> Path:
        """Stream `url` into a new file in `directory` whose name starts with `prefix`; the caller
        renames or removes it, and removes it too when the download fails or is cancelled (the LoRA
        cache's `filled` removes every partial of a failed fill)."""
        started = time.monotonic()
        with self.open(ref, url, credential) as response:
            # Content-Length counts the bytes on the wire: compressed ones under a Content-Encoding.
            declared = response.headers.get("content-length", "")
            encoded = response.headers.get("content-encoding", "identity").strip().lower() != "identity"
            if declared.isdigit() and not encoded and int(declared) > self.settings.max_lora_bytes:
                raise self._too_big(ref)
            descriptor, name = tempfile.mkstemp(dir=directory, prefix=prefix)
            path = Path(name)
            try:
                with os.fdopen(descriptor, "wb") as handle:
                    written = self._stream(ref, response, handle, started)
                received = response.raw.tell()
                if declared.isdigit() and received != int(declared):
                    raise LoraError(
                        f"the download of {ref.shown} broke off after {received} of "
                        f"{declared} bytes; try again."
                    )
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
                if caused_by(error, TIMEOUTS):
                    raise LoraError(
                        f"the download of {ref.shown} stalled for more than "
                        f"{READ_TIMEOUT_S} s; the host is slow or down: try again later."
                    ) from None
                server_log.info("download of %s broke off: %s", ref.shown, type(error).__name__)
                raise LoraError(f"the download of {ref.shown} broke off before its end; try again.") from None
        log.info("downloaded %s: %d bytes in %.1fs", ref.shown, written, time.monotonic() - started)
        return path

    def _stream(self, ref: LoraRef, response: requests.Response, handle: BinaryIO, started: float) -> int:
        """Copy the (decoded) body into `handle` as it arrives, refusing it as soon as it is too large
        (by its bytes, or by what its safetensors header declares), runs past its declared size, trickles
        below the minimum rate, or passes the deadline; return the bytes written."""
        limit = self.settings.max_lora_bytes
        declared, rate = (
            HeaderSize(),
            TransferRate(self.settings.min_lora_rate, self.settings.lora_rate_window_s),
        )
        written, next_report = 0, PROGRESS_EVERY_BYTES
        while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
            stop_if_cancelled()
            written += len(chunk)
            declared.feed(chunk)
            if written > limit:
                raise self._too_big(ref)
            if max(declared.at_least, declared.total or 0) > limit:
                raise LoraError(
                    f"{ref.shown} is larger than {limit} bytes by its own header "
                    f"({max(declared.at_least, declared.total or 0)} bytes), the LoRA size limit "
                    "(FLUX_DAY_MAX_LORA_BYTES)."
                )
            if declared.total is not None and written > declared.total:
                raise LoraError(
                    f"{ref.shown} runs past the {declared.total} bytes its safetensors "
                    "header declares; the file is damaged or not a LoRA."
                )
            if rate.too_slow(len(chunk)):
                raise LoraError(
                    f"downloading {ref.shown} slowed below {self.settings.min_lora_rate} "
                    f"bytes/s (FLUX_DAY_MIN_LORA_RATE); the host is too slow: try again or use a faster host."
                )
            if time.monotonic() - started > DOWNLOAD_DEADLINE_S:
                raise LoraError(
                    f"downloading {ref.shown} took longer than "
                    f"{DOWNLOAD_DEADLINE_S} s; try again or use a faster host."
                )
            handle.write(chunk)
            if written >= next_report:
                log.info("downloading %s: %d MB so far", ref.shown, written >> 20)
                next_report += PROGRESS_EVERY_BYTES
        return written

    def _too_big(self, ref: LoraRef) -> LoraError:
        return LoraError(
            f"{ref.shown} is larger than {self.settings.max_lora_bytes} bytes, the LoRA "
            "size limit (FLUX_DAY_MAX_LORA_BYTES)."
        )

    def _check_destination(self, ref: LoraRef, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise LoraError(f"{shown_source(url)} is not an http(s) URL.")
        if self.settings.allow_private_urls or endpoint(parts) in self.trusted:
            return
        try:
            infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
        except OSError:
            raise LoraError(f"the host of {shown_source(url)} cannot be resolved.") from None
        if not all(is_public(str(info[4][0])) for info in infos):
            raise self._private(ref, url)

    @staticmethod
    def _private(ref: LoraRef, url: str) -> LoraError:
        return LoraError(
            f"{shown_source(url)} points to a private network address; give a public URL (for a "
            "self-hosted LoRA store on the server's own network, its operator sets "
            "FLUX_DAY_ALLOW_PRIVATE_URLS=1)."
        )


def _status_message(status: int, ref: LoraRef, url: str) -> str:
    where = f"{ref.shown}" if ref.kind != "url" else shown_source(url)
    if status in {401, 403}:
        return (
            f"{where} answered HTTP {status} (not allowed); the LoRA is private or gated: make it public, "
            "or give the server a token (REPLICATE_API_TOKEN, HF_TOKEN or CIVITAI_API_TOKEN)."
        )
    if status == 404:
        return f"{where} answered HTTP 404 (not found); check the reference."
    if status >= 500:
        return f"{where} answered HTTP {status} (a server error there); try again later."
    return f"downloading {where} failed with HTTP {status}; check the reference."
