"""A request's cancel, seen by the threads that work for it.

Cog cancels an async prediction's task, not the threads it waits on, so each request's threads run
under its cancel flag (a context variable `GpuScheduler.in_thread` copies into them), and long loops
(download chunks, waits, denoising steps) call `stop_if_cancelled`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class Cancelled(BaseException):
    """The request was cancelled; a BaseException, like Cog's CancelationException, so no `except
    Exception` on the way turns it into a failure."""


# A request's cancel flag: a `threading.Event` set once by whoever cancels it.
_current: ContextVar[threading.Event | None] = ContextVar("flux_day_cancel", default=None)


@contextmanager
def cancellable(flag: threading.Event) -> Iterator[None]:
    """Run the block, and the threads it starts with its context (`asyncio.to_thread`), under `flag`."""
    token = _current.set(flag)
    try:
        yield
    finally:
        _current.reset(token)


def stop_if_cancelled() -> None:
    """Raise `Cancelled` if the request this thread works for was cancelled."""
    flag = _current.get()
    if flag is not None and flag.is_set():
        raise Cancelled
