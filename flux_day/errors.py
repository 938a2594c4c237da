"""Errors a user can act on. Their messages name the input, the value and the fix, and reach the user."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class FluxDayError(Exception):
    """Base of every error whose message is written for the person who sent the request."""


class InputError(FluxDayError, ValueError):
    """The request is wrong: the message names the input, what was given and what is allowed."""


class LoraError(InputError):
    """A LoRA cannot be used: its reference, download or file is wrong, and the message says the fix.
    Raised without the input's name, which `for_input` adds once, so the message starts `<input>: `."""

    input_name: str | None = None

    @staticmethod
    @contextmanager
    def for_input(input_name: str) -> Iterator[None]:
        """Name `input_name` in every `LoraError` raised in the block that names no input yet."""
        try:
            yield
        except LoraError as error:
            if error.input_name is None:
                error.input_name = input_name
                error.args = (f"{input_name}: {error.args[0]}",)
            raise


class CapacityError(FluxDayError):
    """The request needs more GPU memory than this server has: the message says which input to change."""


class WeightsError(FluxDayError):
    """Base weights are missing or unreadable: the message names the folder and how to fill it."""


class ContentError(FluxDayError):
    """Every output was judged unsafe: the message says to try a different prompt."""


class SettingsError(FluxDayError):
    """A `FLUX_DAY_*` setting cannot be read: the message names the variable and what it takes."""
