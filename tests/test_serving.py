"""Errors that leave the predictor: ours pass through as written, anything else says nothing internal."""

from __future__ import annotations

import logging

import pytest

from flux_day.errors import InputError
from flux_day.serving import INTERNAL_ERROR, InternalError, user_facing_errors


def test_input_errors_pass_through_unchanged() -> None:
    with pytest.raises(InputError, match=r"^num_outputs: 5 is out of range"), user_facing_errors():
        raise InputError("num_outputs: 5 is out of range; use an integer from 1 to 4.")


def test_unexpected_errors_are_logged_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(InternalError) as raised, user_facing_errors():
        raise RuntimeError("CUDA error at /tmp/flux/secret-path/kernel.cu")
    assert str(raised.value) == INTERNAL_ERROR
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert "secret-path" in caplog.text  # the full story is in the log, for the operator
