"""A request's cancel, seen by the threads that work for it.

Cog cancels an async prediction by cancelling its task: the `CancelledError` lands at the task's
`await`, not in the threads the task waits on (a download, the GPU). So each request's threads run
under its cancel flag (a `threading.Event` in a context variable: `GpuScheduler.in_thread` copies
it into them), and the loops that can run long — a download's chunks, a wait on another's download,
the denoising steps — call `stop_if_cancelled`, which raises `Cancelled` there, as Cog's own cancel
of a sync predictor would.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class Cancelled(BaseException):
    """The request was cancelled; a BaseException, like Cog's CancelationException, so that no
    `except Exception` on the way turns it into a failure."""


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
    """Raise `Cancelled` if the request this thread works for was cancelled; else nothing."""
    flag = _current.get()
    if flag is not None and flag.is_set():
        raise Cancelled
