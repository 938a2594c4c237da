"""A request's cancel, seen by the threads that work for it.

Cog cancels an async prediction by cancelling its task: the `CancelledError` lands at the task's
`await`, not in the threads the task waits on (a download, the GPU). So each request's threads run
under its `CancelFlag` (a context variable: `GpuScheduler.in_thread` copies it into them), and the loops
that can run long — a download's chunks, a wait on another's download, the denoising steps — call
`stop_if_cancelled`, which raises `Cancelled` there, as Cog's own cancel of a sync predictor would.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class Cancelled(BaseException):
    """The request was cancelled; a BaseException, like Cog's CancelationException, so that no
    `except Exception` on the way turns it into a failure."""


class CancelFlag:
    """Set once by whoever cancels a request; its threads stop at their next check."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        """Tell the request's threads to stop."""
        self._event.set()

    def is_set(self) -> bool:
        """Whether the request was cancelled."""
        return self._event.is_set()


_current: ContextVar[CancelFlag | None] = ContextVar("flux_day_cancel", default=None)


@contextmanager
def cancellable(flag: CancelFlag) -> Iterator[None]:
    """Run the block, and the threads it starts with its context (`asyncio.to_thread`), under `flag`."""
    token = _current.set(flag)
    try:
        yield
    finally:
        _current.reset(token)


def stop_if_cancelled() -> None:
    """Raise `Cancelled` if the request this thread works for was cancelled; else nothing."""
    flag = _current.get()
    if flag is not None and flag.is_set():
        raise Cancelled
