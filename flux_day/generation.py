"""What a request produces, and the pure pieces of producing it: the diffusers call for one output,
the metrics' timings, and the one summary line a request logs (LoRA sources shown without secrets)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from flux_day.loras.refs import DEFAULT_LORA_INPUT, LoraRequest
from flux_day.models import MODELS
from flux_day.request import GenerationRequest

log = logging.getLogger("flux_day.engine")  # the request's summary line belongs to the engine's log


@dataclass(frozen=True)
class Generation:
    """What a request produced: its images in output order, and its metrics (timings, counts)."""

    images: list[Image.Image]
    metrics: dict[str, float]


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to `timings[key]` (a step may run in parts)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


def log_summary(request: GenerationRequest, generation: Generation) -> None:
    """One line per request: what ran, with what, and how long each part took."""
    log.info(
        "request mode=%s model=%s%s size=%dx%d steps=%d seed=%d images=%d/%d loras=%s timings=%s",
        request.mode,
        request.model,
        " fp8" if request.fp8 else "",
        request.width,
        request.height,
        request.num_inference_steps,
        request.seed,
        len(generation.images),
        request.num_outputs,
        shown_loras(request.loras),
        {
            key.removeprefix("timing."): round(value, 3)
            for key, value in generation.metrics.items()
            if key.startswith("timing.")
        },
    )


def shown_loras(loras: tuple[LoraRequest, ...]) -> list[str] | str:
    """LoRAs as a log may show them: no query strings, tokens or data URI bodies."""
    shown = [
        f"{lora.input_name}={lora.ref.shown}x{lora.scale:g}"
        for lora in loras
        if lora.input_name != DEFAULT_LORA_INPUT
    ]
    return shown or "none"


def call_arguments(request: GenerationRequest, seed: int) -> dict[str, object]:
    """The diffusers call for one output; a CPU generator makes seeds device-independent."""
    arguments: dict[str, object] = {
        "width": request.width,
        "height": request.height,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "max_sequence_length": MODELS[request.model].max_sequence_length,
    }
    if request.image is not None:
        arguments.update(image=request.image, strength=request.prompt_strength)
    if request.mask is not None:
        arguments["mask_image"] = request.mask
    return arguments
