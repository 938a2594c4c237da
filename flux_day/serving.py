"""The Cog server's edges: only declared inputs in, only files Cog made from the client's upload read,
and only our own error messages out (anything internal goes to the operator's log)."""

from __future__ import annotations

import functools
import inspect
import os
import stat
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cog.input import FieldInfo

from flux_day.errors import FluxDayError, InputError
from flux_day.schema import refuse_unknown
from flux_day.server_log import log as server_log

INTERNAL_ERROR = "Generation failed because of an internal error; it was logged. Please try again."
Result = TypeVar("Result")


class InternalError(Exception):
    """Stands in for an unexpected failure, with a message safe to show to anyone."""


@contextmanager
def user_facing_errors() -> Iterator[None]:
    """Pass our own errors through (written for users); hide anything else, which goes to the server log.

    Cog shows an error as `<class name>: <message>`, so our classes are named for what they tell the user.
    """
    try:
        yield
    except FluxDayError as error:
        raise error.with_traceback(None) from None
    except Exception:
        server_log.exception("prediction failed")
        raise InternalError(INTERNAL_ERROR) from None


def declared_inputs_only(run: Callable[..., Awaitable[Result]]) -> Callable[..., Awaitable[Result]]:
    """`run` (a bound, async predictor method) refusing undeclared inputs by name and filling in defaults,
    as coglet 0.23 does only with `.cog/openapi_schema.json`. Stays a coroutine function: coglet runs only
    those concurrently."""
    parameters = inspect.signature(run).parameters
    defaults = {n: p.default.default for n, p in parameters.items() if isinstance(p.default, FieldInfo)}

    @functools.wraps(run)
    async def checked(**inputs: Any) -> Result:
        refuse_unknown(inputs, tuple(parameters))
        return await run(**defaults | inputs)

    return checked


def client_file(name: str, value: Any) -> Path | None:
    """The file Cog made for input `name` from the client's upload (None when not given), or a refusal.

    coglet 0.23 turns a URL or data: URI into a `cog.Path` to its own `tmp...` file directly in the temp
    directory, and passes any other string through as `str`: a file on the server's disk (weights, /etc).
    """
    if value is None:
        return None
    refusal = InputError(
        f"{name}: give the image as an http(s) URL or a data: URI; a path on the server is not accepted."
    )
    if isinstance(value, str) or not isinstance(value, os.PathLike):
        raise refusal
    path = Path(value)
    try:
        mode = path.lstat().st_mode
    except OSError:
        raise refusal from None
    temp = Path(tempfile.gettempdir()).resolve()
    if not (stat.S_ISREG(mode) and path.name.startswith("tmp") and path.parent.resolve() == temp):
        raise refusal
    return path


def running_predictions_file() -> Path:
    """Where the server counts running predictions, as `scripts/health_probe.py idle` computes it: /tmp,
    not TMPDIR (a client's files share that), and the server's port."""
    return Path("/tmp") / f"flux-day-running-{os.environ.get('PORT') or 5000}"
