"""Connections to non-public addresses refused at connect time, whatever DNS said a moment before.

`Fetcher` checks every URL's addresses before it asks for it, but the HTTP client resolves the name
again when it connects: a host whose DNS answers a public address first and `127.0.0.1` next (DNS
rebinding) would get past that check. Here the socket's real peer is checked right after connecting,
before a byte of the request is sent. urllib3 has no hook for this, so its connection classes are
subclassed in this one place.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

DEFAULT_PORTS = {"http": 80, "https": 443}


class PrivateAddressError(ConnectionError):
    """A connection reached a loopback/private/link-local/reserved address that is not allowed."""


def is_public(address: str) -> bool:
    """Whether `address` is a globally routable IP (IPv4-mapped IPv6 judged as its IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


def _checked(connection: type[HTTPConnection], trusted: frozenset[tuple[str, int]]) -> type[HTTPConnection]:
    class CheckedConnection(connection):  # type: ignore[misc, valid-type]
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            peer = sock.getpeername()[0]
            if (self.host.lower(), self.port) not in trusted and not is_public(peer):
                sock.close()
                raise PrivateAddressError(f"{self.host} connected to a non-public address")
            return sock

    return CheckedConnection


class PublicOnlyAdapter(HTTPAdapter):
    """A requests adapter whose connections may only reach public addresses or `trusted` (host, port)s."""

    def __init__(self, trusted: frozenset[tuple[str, int]]) -> None:
        self.trusted = trusted
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        super().init_poolmanager(*args, **kwargs)
        plain = type(
            "CheckedPool", (HTTPConnectionPool,), {"ConnectionCls": _checked(HTTPConnection, self.trusted)}
        )
        tls = type(
            "CheckedTLSPool",
            (HTTPSConnectionPool,),
            {"ConnectionCls": _checked(HTTPSConnection, self.trusted)},
        )
        self.poolmanager.pool_classes_by_scheme = {"http": plain, "https": tls}


def endpoint(url_parts: urllib.parse.SplitResult) -> tuple[str, int]:
    """(host, port) of a URL, default ports filled in, so "https://x" and "https://x:443" are one host."""
    return ((url_parts.hostname or "").lower(), url_parts.port or DEFAULT_PORTS.get(url_parts.scheme, 443))


def caused_by(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether `error` or anything it wraps (requests and urllib3 nest causes in `reason`, `args[0]`,
    `__cause__` and `__context__`) is one of `kinds`."""
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return True
        reason = getattr(current, "reason", None)
        first_arg = current.args[0] if current.args else None
        pending += [
            e
            for e in (reason, first_arg, current.__cause__, current.__context__)
            if isinstance(e, BaseException)
        ]
    return False
