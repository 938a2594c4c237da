"""What a request produces: the diffusers call for one output, its metrics, its one summary log line."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image

from flux_day.loras.formats import LoraWeights
from flux_day.loras.refs import DEFAULT_LORA_INPUT
from flux_day.models import MODELS
from flux_day.request import GenerationRequest

log = logging.getLogger("flux_day.engine")  # the request's summary line belongs to the engine's log


@dataclass
class PreparedRequest:
    """A request with its LoRAs read (None for scale 0), and the seconds each part took so far."""

    request: GenerationRequest
    loras: list[LoraWeights | None]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    images: list[Image.Image]
    metrics: dict[str, float]

    @classmethod
    def logged(
        cls, request: GenerationRequest, images: list[Image.Image], timings: dict[str, float]
    ) -> Generation:
        """The generation of `request`, its one summary line logged (LoRA sources shown without secrets)."""
        steps, pixels = request.num_inference_steps * request.num_outputs, request.width * request.height
        counts = {"images": len(images), "steps": steps, "megapixels": round(pixels * len(images) / 1e6, 4)}
        loras = [
            f"{lora.input_name}={lora.ref.shown}x{lora.scale:g}"
            for lora in request.loras
            if lora.input_name != DEFAULT_LORA_INPUT
        ]
        log.info(
            "request mode=%s model=%s%s size=%dx%d steps=%d seed=%d images=%d/%d loras=%s timings=%s",
            request.mode,
            request.model,
            " fp8" if request.fp8 else "",
            request.width,
            request.height,
            request.num_inference_steps,
            request.seed,
            len(images),
            request.num_outputs,
            loras or "none",
            {key: round(value, 3) for key, value in timings.items()},
        )
        return cls(images, {f"timing.{key}": value for key, value in timings.items()} | counts)


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to `timings[key]` (a step may run in parts)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


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
