"""The operator's log: what a hosted user must not read (tracebacks, library names, server paths).

coglet files what the worker writes to `sys.stderr` under the running prediction, which its sender
reads, and what reaches file descriptor 2 directly under the server's own log.
"""

from __future__ import annotations

import logging
import os
import warnings

log = logging.getLogger("flux_day.server")


def keep_internals_out_of_predictions() -> None:
    """Send `log` and Python warnings (one line each, without the file path) to the server's own log."""
    stream = open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - lives with the process
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    warnings.showwarning = _show_warning


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    log.warning("python %s: %s", category.__name__, " ".join(str(message).split()))
