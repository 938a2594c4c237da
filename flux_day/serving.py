"""What a user sees of a prediction: our own error messages as they are, nothing internal.

Errors: ours pass through, anything else becomes one plain sentence, its traceback in the server's
own log (`user_facing_errors`). Inputs: only the declared ones (`declared_inputs_only`).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cog.input import FieldInfo

from flux_day.errors import FluxDayError, InputError
from flux_day.server_log import log as server_log

INTERNAL_ERROR = "Generation failed because of an internal error; it was logged. Please try again."


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


Result = TypeVar("Result")


def declared_inputs_only(run: Callable[..., Result]) -> Callable[..., Result]:
    """`run` (a bound predictor method) refusing any input it does not declare, by name.

    Without `.cog/openapi_schema.json` coglet 0.23 passes every key of the request to `run`, and an
    unknown one fails as Python's "TypeError: Predictor.run() got an unexpected keyword argument",
    a class and internal names (with the schema coglet drops unknown keys before the worker). Omitted
    inputs get their `Input(default=...)` value, as coglet gives them.
    """
    parameters = inspect.signature(run).parameters
    accepted = ", ".join(parameters)

    def completed(inputs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(inputs) - set(parameters))
        if unknown:
            raise InputError(
                f"{unknown[0]}: not an input of this model; leave it out. The inputs are: {accepted}."
            )
        defaults = {
            name: parameter.default.default
            for name, parameter in parameters.items()
            if name not in inputs and isinstance(parameter.default, FieldInfo)
        }
        return inputs | defaults

    if inspect.iscoroutinefunction(run):  # coglet runs an async `run` concurrently only if it is one

        @functools.wraps(run)
        async def checked_async(**inputs: Any) -> Any:
            return await run(**completed(inputs))

        return checked_async  # type: ignore[return-value]

    @functools.wraps(run)
    def checked(**inputs: Any) -> Result:
        return run(**completed(inputs))

    return checked


def running_predictions_file() -> Path:
    """Where the server keeps how many predictions run, for `scripts/health_probe.py idle` (which
    computes the same path: /tmp, not TMPDIR, which a client's files share, and the server's port)."""
    return Path("/tmp") / f"flux-day-running-{os.environ.get('PORT') or 5000}"
