"""What a user sees when a prediction fails: our own messages as they are, nothing internal."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flux_day.errors import FluxDayError

log = logging.getLogger(__name__)

INTERNAL_ERROR = "Generation failed because of an internal error; it was logged. Please try again."


class InternalError(Exception):
    """Stands in for an unexpected failure, with a message safe to show to anyone."""


@contextmanager
def user_facing_errors() -> Iterator[None]:
    """Pass our own errors through (their messages are written for users); hide anything else.

    Library exceptions carry tracebacks, temp paths and class names: they go to the log, and the
    user gets a plain sentence. Cog shows an error as `<class name>: <message>`, so our classes
    (`InputError`, ...) are named for what they tell the user.
    """
    try:
        yield
    except FluxDayError as error:
        raise error.with_traceback(None) from None
    except Exception:
        log.exception("prediction failed")
        raise InternalError(INTERNAL_ERROR) from None
