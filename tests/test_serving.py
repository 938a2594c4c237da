"""Errors that leave the predictor: ours pass through as written, anything else says nothing internal."""

from __future__ import annotations

import logging

import pytest

from flux_day.errors import InputError, LoraError
from flux_day.serving import INTERNAL_ERROR, InternalError, user_facing_errors


def test_input_errors_pass_through_unchanged() -> None:
    with pytest.raises(InputError, match=r"^num_outputs: 5 is out of range"), user_facing_errors():
        raise InputError("num_outputs: 5 is out of range; use an integer from 1 to 4.")


def test_lora_errors_are_named_once_by_the_innermost_input_and_pass_through() -> None:
    with (
        pytest.raises(InputError) as raised,
        user_facing_errors(),
        LoraError.for_input("extra_lora"),
        LoraError.for_input("replicate_weights"),
    ):
        raise LoraError("the file is not a safetensors file.")
    assert str(raised.value) == "replicate_weights: the file is not a safetensors file."
    assert isinstance(raised.value, LoraError) and raised.value.input_name == "replicate_weights"


def test_unexpected_errors_are_logged_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(InternalError) as raised, user_facing_errors():
        raise RuntimeError("CUDA error at /tmp/flux/secret-path/kernel.cu")
    assert str(raised.value) == INTERNAL_ERROR
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert "secret-path" in caplog.text  # the full story is in the log, for the operator
