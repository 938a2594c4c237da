"""Errors a user can act on. Their messages name the input, the value and the fix, and reach the user."""


class FluxDayError(Exception):
    """Base of every error whose message is written for the person who sent the request."""


class InputError(FluxDayError, ValueError):
    """The request is wrong: the message names the input, what was given and what is allowed."""


class WeightsError(FluxDayError):
    """Base weights are missing or unreadable: the message names the folder and how to fill it."""


class ContentError(FluxDayError):
    """Every output was judged unsafe: the message says to try a different prompt."""


class SettingsError(FluxDayError):
    """A `FLUX_DAY_*` setting cannot be read: the message names the variable and what it takes."""
