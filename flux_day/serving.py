"""What a user sees of a prediction: our own error messages as they are, nothing internal, and only the
inputs the predictor declares."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cog.input import FieldInfo

from flux_day.errors import FluxDayError
from flux_day.schema import refuse_unknown
from flux_day.server_log import log as server_log

INTERNAL_ERROR = "Generation failed because of an internal error; it was logged. Please try again."
Result = TypeVar("Result")


class InternalError(Exception):
    """Stands in for an unexpected failure, with a message safe to show to anyone."""


@contextmanager
def user_facing_errors() -> Iterator[None]:
    """Pass our own errors through (their messages are written for users); hide anything else.

    Library exceptions carry tracebacks, temp paths and class names: they go to the server's own log,
    and the user gets a plain sentence. Cog shows an error as `<class name>: <message>`, so our classes
    (`InputError`, ...) are named for what they tell the user.
    """
    try:
        yield
    except FluxDayError as error:
        raise error.with_traceback(None) from None
    except Exception:
        server_log.exception("prediction failed")
        raise InternalError(INTERNAL_ERROR) from None


def declared_inputs_only(run: Callable[..., Awaitable[Result]]) -> Callable[..., Awaitable[Result]]:
    """`run` (a bound, async predictor method) refusing any input it does not declare, by name.

    Without `.cog/openapi_schema.json` coglet 0.23 passes every key of the request to `run`, and an
    unknown one fails as Python's "TypeError: Predictor.run() got an unexpected keyword argument",
    a class and internal names. Omitted inputs get their `Input(default=...)` value, as coglet gives
    them with the schema. The wrapper stays a coroutine function: coglet runs only those concurrently.
    """
    parameters = inspect.signature(run).parameters
    defaults = {n: p.default.default for n, p in parameters.items() if isinstance(p.default, FieldInfo)}

    @functools.wraps(run)
    async def checked(**inputs: Any) -> Result:
        refuse_unknown(inputs, tuple(parameters))
        return await run(**defaults | inputs)

    return checked


def running_predictions_file() -> Path:
    """Where the server keeps how many predictions run, for `scripts/health_probe.py idle` (which
    computes the same path: /tmp, not TMPDIR, which a client's files share, and the server's port)."""
    return Path("/tmp") / f"flux-day-running-{os.environ.get('PORT') or 5000}"
