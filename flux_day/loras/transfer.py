"""Guards a LoRA download checks chunk by chunk, so a hostile body is stopped early, not at 2 GB.

`HeaderSize` reads the size a safetensors file declares from its first bytes (an 8-byte header length,
the JSON header, and the end of the last tensor's data): a body declaring more than the size limit is
refused at once, and one that runs past what it declared (an endless body, a gzip bomb) is refused at
that point. `TransferRate` refuses a body that trickles, which a per-read timeout never catches: a byte
every few seconds keeps every read alive.
"""

from __future__ import annotations

import json
import time

SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers


class HeaderSize:
    """What a safetensors download declares about its size, learnt from its first bytes.

    `at_least` is known from the 8-byte header length alone (a bomb may declare a header larger than
    the limit); `total` once the JSON header has arrived. A body that does not start like safetensors
    (a .tar archive) declares nothing: both stay unknown.
    """

    def __init__(self) -> None:
        self._head = bytearray()
        self._finished = False
        self.at_least = 0
        self.total: int | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the body."""
        if self._finished:
            return
        self._head += chunk[: 8 + SAFETENSORS_MAX_HEADER - len(self._head)]
        if len(self._head) < 9:
            return
        if self._head[8:9] != b"{":
            self._finished = True  # not safetensors: nothing declared
            return
        header_bytes = int.from_bytes(self._head[:8], "little")
        self.at_least = 8 + header_bytes
        if header_bytes > SAFETENSORS_MAX_HEADER:
            self._finished = True  # no real header is this large; `at_least` is all it declares
            return
        if len(self._head) < 8 + header_bytes:
            return
        self._finished = True
        try:
            header = json.loads(bytes(self._head[8 : 8 + header_bytes]))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            self.total = self.at_least + max(ends, default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            pass  # not a valid header: the parser says why once the body is in
        self._head = bytearray()


class TransferRate:
    """Refuses a body slower than `minimum` bytes/s over any `window_s`-second stretch."""

    def __init__(self, minimum: int, window_s: float) -> None:
        self.minimum = minimum
        self.window_s = window_s
        self._start = time.monotonic()
        self._bytes = 0

    def too_slow(self, received: int) -> bool:
        """Count `received` bytes; True when the window just closed below the minimum rate."""
        self._bytes += received
        now = time.monotonic()
        elapsed = now - self._start
        if elapsed < self.window_s:
            return False
        slow = self._bytes < self.minimum * elapsed
        self._start, self._bytes = now, 0
        return slow
