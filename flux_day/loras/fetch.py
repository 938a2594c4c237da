"""HTTP for LoRAs: every hop http(s) to public addresses only (checked before the request and again on
the connected socket, against DNS rebinding), unless allowed (`FLUX_DAY_ALLOW_PRIVATE_URLS`) or an
operator's service; bodies guarded as they stream to disk; a token sent to its own host only."""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
import urllib.parse
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
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


def endpoint(parts: urllib.parse.SplitResult) -> tuple[str, int]:
    """(host, port) of a URL, default ports filled in, so "https://x" and "https://x:443" are one host."""
    return ((parts.hostname or "").lower(), parts.port or (80 if parts.scheme == "http" else 443))


class PublicOnlyAdapter(HTTPAdapter):
    """Connections only to public addresses or `trusted` (host, port)s, checked once connected, before
    a byte is sent (urllib3 has no hook for it: its classes are subclassed)."""

    def __init__(self, trusted: frozenset[tuple[str, int]]) -> None:
        self.trusted = trusted
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        super().init_poolmanager(*args, **kwargs)
        trusted = self.trusted

        def checked(base: type[HTTPConnection]) -> type[HTTPConnection]:
            class Checked(base):  # type: ignore[misc, valid-type]
                def _new_conn(self) -> socket.socket:
                    sock = super()._new_conn()
                    if (self.host.lower(), self.port) not in trusted and not is_public(sock.getpeername()[0]):
                        sock.close()
                        raise PrivateAddressError(f"{self.host} connected to a non-public address")
                    return sock

            return Checked

        pools = {
            "http": (HTTPConnectionPool, HTTPConnection),
            "https": (HTTPSConnectionPool, HTTPSConnection),
        }
        self.poolmanager.pool_classes_by_scheme = {
            scheme: type("CheckedPool", (pool,), {"ConnectionCls": checked(connection)})
            for scheme, (pool, connection) in pools.items()
        }


def caused_by(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether `error` or anything it wraps (in `reason`, `args[0]`, `__cause__`, `__context__`, as
    requests and urllib3 nest them) is one of `kinds`."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        wrapped = (getattr(current, "reason", None), current.args[0] if current.args else None)
        pending += [
            e
            for e in (*wrapped, current.__cause__, current.__context__)
            if isinstance(e, BaseException) and id(e) not in seen
        ]
    return False


class BodyGuard:
    """Everything a LoRA body is held to, chunk by chunk, so a hostile one stops early, not at 2 GB:
    the size limit (by its bytes, or by the size its safetensors header declares), that size itself
    (an endless body or a gzip bomb runs past it), a minimum rate over every window (a trickle keeps
    each read alive), the total deadline, and the request's cancel."""

    def __init__(self, ref: LoraRef, settings: Settings) -> None:
        self.ref, self.limit, self.rate = ref, settings.max_lora_bytes, settings.min_lora_rate
        self.window_s = settings.lora_rate_window_s
        self.started = self.window_start = time.monotonic()
        self.head, self.written, self.window_bytes = bytearray(), 0, 0
        self.declared: tuple[int, int | None] = (0, None)

    def check(self, chunk: bytes) -> None:
        """Take the next bytes of the body; raise `LoraError` as soon as one rule is broken."""
        stop_if_cancelled()
        self.written += len(chunk)
        at_least, total = self.declared
        if len(self.head) < 9 or (0 < at_least <= HEAD_BYTES and len(self.head) < at_least):
            self.head += chunk[: HEAD_BYTES - len(self.head)]  # until the header is in, or is not there
            self.declared = at_least, total = declared_size(self.head)
        shown = self.ref.shown
        if self.written > self.limit:
            raise self.too_big()
        if max(at_least, total or 0) > self.limit:
            raise LoraError(
                f"{shown} is larger than {self.limit} bytes by its own header ({max(at_least, total or 0)} "
                "bytes), the LoRA size limit (FLUX_DAY_MAX_LORA_BYTES)."
            )
        if total is not None and self.written > total:
            raise LoraError(
                f"{shown} runs past the {total} bytes its safetensors header declares; the file is "
                "damaged or not a LoRA."
            )
        now, self.window_bytes = time.monotonic(), self.window_bytes + len(chunk)
        if now - self.window_start >= self.window_s:
            if self.window_bytes < self.rate * (now - self.window_start):
                raise LoraError(
                    f"downloading {shown} slowed below {self.rate} bytes/s (FLUX_DAY_MIN_LORA_RATE); the "
                    "host is too slow: try again or use a faster host."
                )
            self.window_start, self.window_bytes = now, 0
        if now - self.started > DOWNLOAD_DEADLINE_S:
            raise LoraError(
                f"downloading {shown} took longer than {DOWNLOAD_DEADLINE_S} s; try again or use a "
                "faster host."
            )

    def too_big(self) -> LoraError:
        return LoraError(
            f"{self.ref.shown} is larger than {self.limit} bytes, the LoRA size limit "
            "(FLUX_DAY_MAX_LORA_BYTES)."
        )


class Fetcher:
    """GETs for one settings object: JSON from service APIs, files streamed to disk."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.session = requests.Session()
        self.session.trust_env = False  # no ~/.netrc credentials or proxies picked up behind our back
        services = {"replicate": settings.replicate_url, "civitai": settings.civitai_url}
        services["hugging_face"] = settings.hf_endpoint
        self.services = {urllib.parse.urlsplit(url).netloc.lower(): name for name, url in services.items()}
        # The operator's own service hosts may be internal; every other host must be public.
        self.trusted = frozenset(endpoint(urllib.parse.urlsplit(url)) for url in services.values())
        if not settings.allow_private_urls:
            for scheme in ("http://", "https://"):
                self.session.mount(scheme, PublicOnlyAdapter(self.trusted))

    def open(
        self, ref: LoraRef, url: str, tokens: Credentials | None = None, follow: bool = True
    ) -> requests.Response:
        """A streaming response with status 200 (or a redirect when `follow` is False), each hop sent the
        token of its own service only (none to a CDN it redirects to); errors named."""
        for _ in range(MAX_REDIRECTS + 1):
            self._check_destination(ref, url)
            headers = {"User-Agent": "flux-day"}
            service = self.services.get(urllib.parse.urlsplit(url).netloc.lower())
            if tokens is not None and service is not None and (token := getattr(tokens, service)):
                headers["Authorization"] = f"Bearer {token}"
            try:
                response = self.session.get(
                    url,
                    headers=headers,
                    stream=True,
                    allow_redirects=False,
                    timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                )
            except requests.RequestException as error:
                raise self._unreachable(ref, url, error) from None
            if response.is_redirect and follow:
                response.close()
                url = urllib.parse.urljoin(url, response.headers.get("location", ""))
                continue
            if response.status_code != 200 and not (response.is_redirect and not follow):
                response.close()
                raise LoraError(_status_message(response.status_code, ref, url))
            return response
        raise LoraError(f"{ref.shown} redirects more than {MAX_REDIRECTS} times.")

    def _unreachable(self, ref: LoraRef, url: str, error: Exception) -> LoraError:
        if caused_by(error, (PrivateAddressError,)):
            return self._private(url)
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

    def download(self, ref: LoraRef, url: str, partial: Path, tokens: Credentials | None = None) -> None:
        """Stream `url` into the file `partial`, under a `BodyGuard`; the caller removes it on failure."""
        guard = BodyGuard(ref, self.settings)
        with self.open(ref, url, tokens) as response:
            # Content-Length counts the bytes on the wire: compressed ones under a Content-Encoding.
            declared = response.headers.get("content-length", "")
            encoded = response.headers.get("content-encoding", "identity").strip().lower() != "identity"
            if declared.isdigit() and not encoded and int(declared) > guard.limit:
                raise guard.too_big()
            try:
                with partial.open("wb") as handle:
                    while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
                        guard.check(chunk)
                        handle.write(chunk)
                        if guard.written % PROGRESS_EVERY_BYTES < len(chunk):
                            log.info("downloading %s: %d MB so far", ref.shown, guard.written >> 20)
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
            "downloaded %s: %d bytes in %.1fs", ref.shown, guard.written, time.monotonic() - guard.started
        )

    def _check_destination(self, ref: LoraRef, url: str) -> None:
        """Only http(s), and hosts whose every address is public (checked again at connect)."""
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
            raise self._private(url)

    @staticmethod
    def _private(url: str) -> LoraError:
        return LoraError(
            f"{shown_source(url)} points to a private network address; give a public URL (for a "
            "self-hosted LoRA store on the server's own network, its operator sets "
            "FLUX_DAY_ALLOW_PRIVATE_URLS=1)."
        )


def _status_message(status: int, ref: LoraRef, url: str) -> str:
    where = ref.shown if ref.kind != "url" else shown_source(url)
    private = (
        "(not allowed); the LoRA is private or gated: make it public, or give the server a token "
        "(REPLICATE_API_TOKEN, HF_TOKEN or CIVITAI_API_TOKEN)."
    )
    why = {401: private, 403: private, 404: "(not found); check the reference."}.get(status)
    why = why or ("(a server error there); try again later." if status >= 500 else None)
    return (
        f"{where} answered HTTP {status} {why}"
        if why
        else f"downloading {where} failed with HTTP {status}; check the reference."
    )
