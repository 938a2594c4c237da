"""LoRAs as the command line takes them: local files and folders, and any number with `--lora`.

The server refuses paths (a request must never read the server's disk); on their own machine a person
means their own files, read as the operator's default LoRA is (`LoraRef` kind `local`).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from flux_day.errors import InputError, LoraError
from flux_day.loras.refs import LoraRef, LoraRequest
from flux_day.request import GenerationRequest
from flux_day.schema import DEFAULTS, LORA_INPUTS, SCHEMA

LORA_OPTION = "--lora"
PATH_STARTS = ("/", "./", "../", "~", "file://")


def local_path(name: str, text: str) -> Path | None:
    """The local file or folder `text` names, or None for a reference; an existing path wins over a
    Replicate name spelt the same."""
    if text.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(text).path))
    else:
        path = Path(text).expanduser()
    if path.exists():
        return path.resolve()
    if text.startswith(PATH_STARTS):
        raise InputError(
            f"{name}: {text!r} is no such file or folder; give the path of a .safetensors LoRA or a "
            "folder holding one."
        )
    return None


def lora_option(text: str) -> LoraRequest:
    """One `--lora REF[:SCALE]`: SCALE follows the last colon when it is a number; 1 when absent."""
    ref, colon, tail = text.rpartition(":")
    scale = 1.0
    if colon and ref:
        with contextlib.suppress(ValueError):  # otherwise not a scale: a colon of the reference itself
            scale, text = float(tail), ref
    low, high = SCHEMA["lora_scale"].bounds  # type: ignore[misc]
    if not low <= scale <= high:
        raise InputError(
            f"{LORA_OPTION}: scale {tail} is out of range; use a number from {low:g} to {high:g}."
        )
    return lora_request(LORA_OPTION, text, scale)


def lora_request(name: str, text: str, scale: float) -> LoraRequest:
    """A LoRA given as input `name`: a local path, or any reference a request may give."""
    path = local_path(name, text.strip())
    if path is None:
        return LoraRequest.parse(name, text, scale)
    with LoraError.for_input(name):
        return LoraRequest(name, LoraRef("local", str(path)), scale)


def request_with_loras(inputs: dict[str, Any], options: Sequence[str]) -> GenerationRequest:
    """The checked request with its LoRAs: the schema's two in their order (local paths too, which the
    schema's checks would refuse), then every `--lora`."""
    local = {}
    for name, scale_name in LORA_INPUTS.items():
        text = inputs.get(name)
        if text and local_path(name, text.strip()) is not None:
            scale = SCHEMA[scale_name].check(inputs.get(scale_name, DEFAULTS[scale_name]))
            local[name] = lora_request(name, text, scale)
    extra = tuple(lora_option(option) for option in options)
    request = GenerationRequest.from_inputs(**inputs | dict.fromkeys(local))
    named = {lora.input_name: lora for lora in (*request.loras, *local.values())}
    return replace(request, loras=(*(named[name] for name in LORA_INPUTS if name in named), *extra))
