"""HTTP for LoRAs: every hop http(s) to public addresses only (checked before the request and again on
the connected socket, against DNS rebinding), unless allowed (`FLUX_DAY_ALLOW_PRIVATE_URLS`) or an
operator's service; bodies guarded as they stream to disk; a token sent to its own host only."""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from flux_day.cancel import stop_if_cancelled
from flux_day.config import Credentials, Settings
from flux_day.errors import LoraError
from flux_day.loras.refs import LoraRef, shown_source
from flux_day.loras.safetensors_file import declared_size
from flux_day.server_log import log as server_log

log = logging.getLogger(__name__)

MAX_REDIRECTS, CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 10, 60
DOWNLOAD_DEADLINE_S = 1800  # 2 GB at ~10 Mbit/s; a body that trickles forever is cut off
CHUNK_BYTES, PROGRESS_EVERY_BYTES = 1 << 20, 256 << 20
HEAD_BYTES = 8 + 100_000_000  # the safetensors library refuses larger headers
TIMEOUTS = (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)


class PrivateAddressError(ConnectionError):
    """A connection reached an address that is not public, and not allowed."""


def is_public(address: str) -> bool:
    """Whether `address` is a globally routable IP (IPv4-mapped IPv6 judged as its IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


def endpoint(url: str) -> tuple[str, int]:
    """(host, port) of a URL, default ports filled in, so "https://x" and "https://x:443" are one host."""
    parts = urllib.parse.urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or (80 if parts.scheme == "http" else 443)


def _checked_pool(pool: type[HTTPConnectionPool], trusted: frozenset[tuple[str, int]]) -> type:
    class Connection(pool.ConnectionCls):  # type: ignore[misc, name-defined]
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            if (self.host.lower(), self.port) not in trusted and not is_public(sock.getpeername()[0]):
                sock.close()
                raise PrivateAddressError(f"{self.host} connected to a non-public address")
            return sock

    return type(f"Checked{pool.__name__}", (pool,), {"ConnectionCls": Connection})


class PublicOnlyAdapter(HTTPAdapter):
    """Connections only to public addresses or `trusted` (host, port)s, checked once connected, before
    a byte is sent (urllib3 has no hook for it: its connection classes are subclassed)."""

    def __init__(self, trusted: frozenset[tuple[str, int]]) -> None:
        self.trusted = trusted  # before super().__init__, which calls init_poolmanager
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        pools = {"http": HTTPConnectionPool, "https": HTTPSConnectionPool}
        checked = {scheme: _checked_pool(pool, self.trusted) for scheme, pool in pools.items()}
        self.poolmanager.pool_classes_by_scheme = checked


def caused_by(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether `error` or anything it wraps (as requests and urllib3 nest them) is one of `kinds`."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        wrapped = (
            *current.args[:1],
            getattr(current, "reason", None),
            current.__cause__,
            current.__context__,
        )
        pending += [e for e in wrapped if isinstance(e, BaseException) and id(e) not in seen]
    return False


def guarded(ref: LoraRef, settings: Settings, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """`chunks` of a LoRA body, each held to every rule so a hostile body stops early, not at 2 GB: the
    size limit (by its bytes, or by its safetensors header), the size that header declares (an endless
    body or a gzip bomb runs past it), a minimum rate over every window (a trickle keeps each read
    alive), the total deadline, and the request's cancel."""
    limit, rate, shown = settings.max_lora_bytes, settings.min_lora_rate, ref.shown
    started = window_start = time.monotonic()
    head, written, window_bytes = bytearray(), 0, 0
    at_least, total = 0, None
    for chunk in chunks:
        stop_if_cancelled()
        written += len(chunk)
        if len(head) < 9 or (0 < at_least <= HEAD_BYTES and len(head) < at_least):
            head += chunk[: HEAD_BYTES - len(head)]  # until the header is in, or is not there
            at_least, total = declared_size(head)
        if written > limit:
            raise too_big(ref, limit)
        if max(at_least, total or 0) > limit:
            raise LoraError(
                f"{shown} is larger than {limit} bytes by its own header ({max(at_least, total or 0)} "
                "bytes), the LoRA size limit (FLUX_DAY_MAX_LORA_BYTES)."
            )
        if total is not None and written > total:
            raise LoraError(
                f"{shown} runs past the {total} bytes its safetensors header declares; the file is "
                "damaged or not a LoRA."
            )
        now, window_bytes = time.monotonic(), window_bytes + len(chunk)
        if now - window_start >= settings.lora_rate_window_s:
            if window_bytes < rate * (now - window_start):
                raise LoraError(
                    f"downloading {shown} slowed below {rate} bytes/s (FLUX_DAY_MIN_LORA_RATE); the "
                    "host is too slow: try again or use a faster host."
                )
            window_start, window_bytes = now, 0
        if now - started > DOWNLOAD_DEADLINE_S:
            raise LoraError(
                f"downloading {shown} took longer than {DOWNLOAD_DEADLINE_S} s; try again or use a "
                "faster host."
            )
        if written % PROGRESS_EVERY_BYTES < len(chunk):
            log.info("downloading %s: %d MB so far", shown, written >> 20)
        yield chunk


def too_big(ref: LoraRef, limit: int) -> LoraError:
    return LoraError(
        f"{ref.shown} is larger than {limit} bytes, the LoRA size limit (FLUX_DAY_MAX_LORA_BYTES)."
    )


class Fetcher:
    """GETs for one settings object: JSON from service APIs, files streamed to disk."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.session = requests.Session()
        self.session.trust_env = False  # no ~/.netrc credentials or proxies picked up behind our back
        urls = {"replicate": settings.replicate_url, "civitai": settings.civitai_url}
        urls["hugging_face"] = settings.hf_endpoint
        # A token goes to its service's scheme, host and port only: never in clear text to a redirect.
        self.services = {
            (urllib.parse.urlsplit(url).scheme, *endpoint(url)): name for name, url in urls.items()
        }
        self.trusted = frozenset(
            endpoint(url) for url in urls.values()
        )  # the operator's services may be internal
        if not settings.allow_private_urls:
            for scheme in ("http://", "https://"):
                self.session.mount(scheme, PublicOnlyAdapter(self.trusted))

    def open(
        self, ref: LoraRef, url: str, tokens: Credentials | None = None, follow: bool = True
    ) -> requests.Response:
        """A streaming response with status 200 (or a redirect when `follow` is False), each hop sent the
        token of its own service only (none to a CDN it redirects to); errors named."""
        for _ in range(MAX_REDIRECTS + 1):
            self._check_destination(url)
            headers = {"User-Agent": "flux-day"}
            service = self.services.get((urllib.parse.urlsplit(url).scheme, *endpoint(url)))
            if tokens is not None and service is not None and (token := getattr(tokens, service)):
                headers["Authorization"] = f"Bearer {token}"
            try:
                timeout = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
                response = self.session.get(
                    url, headers=headers, stream=True, allow_redirects=False, timeout=timeout
                )
            except requests.RequestException as error:
                raise _unreachable(ref, url, error) from None
            if response.is_redirect and follow:
                response.close()
                url = urllib.parse.urljoin(url, response.headers.get("location", ""))
                continue
            if response.status_code != 200 and not response.is_redirect:
                response.close()
                raise LoraError(_status_message(response.status_code, ref, url))
            return response
        raise LoraError(f"{ref.shown} redirects more than {MAX_REDIRECTS} times.")

    def download(self, ref: LoraRef, url: str, partial: Path, tokens: Credentials | None = None) -> None:
        """Stream `url` into the file `partial`, under `guarded`; the caller removes it on failure."""
        started = time.monotonic()
        with self.open(ref, url, tokens) as response:
            # Content-Length counts the bytes on the wire: compressed ones under a Content-Encoding.
            declared = response.headers.get("content-length", "")
            encoded = response.headers.get("content-encoding", "identity").strip().lower() != "identity"
            if declared.isdigit() and not encoded and int(declared) > self.settings.max_lora_bytes:
                raise too_big(ref, self.settings.max_lora_bytes)
            body = iter(lambda: response.raw.read1(CHUNK_BYTES, decode_content=True), b"")
            try:
                with partial.open("wb") as handle:
                    for chunk in guarded(ref, self.settings, body):
                        handle.write(chunk)
                if declared.isdigit() and response.raw.tell() != int(declared):
                    raise LoraError(
                        f"the download of {ref.shown} broke off after {response.raw.tell()} of "
                        f"{declared} bytes; try again."
                    )
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
                if caused_by(error, TIMEOUTS):
                    raise LoraError(
                        f"the download of {ref.shown} stalled for more than {READ_TIMEOUT_S} s; the host "
                        "is slow or down: try again later."
                    ) from None
                server_log.info("download of %s broke off: %s", ref.shown, type(error).__name__)
                raise LoraError(f"the download of {ref.shown} broke off before its end; try again.") from None
        log.info(
            "downloaded %s: %d bytes in %.1fs", ref.shown, partial.stat().st_size, time.monotonic() - started
        )

    def _check_destination(self, url: str) -> None:
        """Only http(s), and hosts whose every address is public (checked again at connect)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise LoraError(f"{shown_source(url)} is not an http(s) URL.")
        if self.settings.allow_private_urls or endpoint(url) in self.trusted:
            return
        try:
            infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
        except OSError:
            raise LoraError(f"the host of {shown_source(url)} cannot be resolved.") from None
        if not all(is_public(str(info[4][0])) for info in infos):
            raise _private(url)


def _private(url: str) -> LoraError:
    return LoraError(
        f"{shown_source(url)} points to a private network address; give a public URL (for a "
        "self-hosted LoRA store on the server's own network, its operator sets "
        "FLUX_DAY_ALLOW_PRIVATE_URLS=1)."
    )


def _unreachable(ref: LoraRef, url: str, error: Exception) -> LoraError:
    if caused_by(error, (PrivateAddressError,)):
        return _private(url)
    if caused_by(error, (ConnectionRefusedError,)):
        return LoraError(
            f"{shown_source(url)} refused the connection for {ref.shown}: nothing listens there; "
            "check the host and port of the reference."
        )
    # urllib3 2 makes every failed connect a NewConnectionError, a subclass of its timeout error.
    if caused_by(error, TIMEOUTS) and not caused_by(error, (urllib3.exceptions.NewConnectionError,)):
        return LoraError(
            f"{shown_source(url)} did not answer {ref.shown} within {READ_TIMEOUT_S} s; the host is "
            "slow or down: try again later."
        )
    server_log.info("could not reach %s: %s", shown_source(url), type(error).__name__)
    return LoraError(
        f"could not reach {shown_source(url)} for {ref.shown}; check the reference and try again."
    )


def _status_message(status: int, ref: LoraRef, url: str) -> str:
    where = ref.shown if ref.kind != "url" else shown_source(url)
    private = (
        "(not allowed); the LoRA is private or gated: make it public, or give the server a token "
        "(REPLICATE_API_TOKEN, HF_TOKEN or CIVITAI_API_TOKEN)."
    )
    why = {401: private, 403: private, 404: "(not found); check the reference."}.get(status)
    why = why or ("(a server error there); try again later." if status >= 500 else None)
    if why:
        return f"{where} answered HTTP {status} {why}"
    return f"downloading {where} failed with HTTP {status}; check the reference."
