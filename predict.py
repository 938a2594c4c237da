"""The Cog surface of flux-day: the published inputs (stated once, in `flux_day.schema`) and delegation.

No logic lives here: `GenerationRequest` checks every input (the server enforces the schema only in a
built image), `client_file` lets a request read only what it uploaded, `Engine` generates,
`OutputStore` writes the files Cog turns into URLs.
"""

from __future__ import annotations

import logging
from typing import Any

from cog import BaseRunner, Input, Path

from flux_day.config import Settings
from flux_day.engine import Engine
from flux_day.outputs import OutputStore
from flux_day.request import GenerationRequest
from flux_day.schema import SCHEMA
from flux_day.server_log import keep_internals_out_of_predictions
from flux_day.serving import declared_inputs_only, user_facing_errors
from flux_day.uploads import client_file


def declared(name: str) -> Any:
    """The Cog declaration of published input `name`, from the one table of the schema."""
    field = SCHEMA[name]
    low, high = field.bounds or (None, None)
    choices = list(field.choices) or None
    return Input(default=field.default, ge=low, le=high, choices=choices, description=field.description)


class Predictor(BaseRunner):
    """FLUX.1 [dev] and [schnell]: text-to-image, image-to-image and inpainting."""

    def setup(self, weights: str | None = None) -> None:
        """Load both models once; `weights` (or COG_WEIGHTS) names a default LoRA."""
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        keep_internals_out_of_predictions()
        self.engine = Engine(Settings.from_env(), default_lora=str(weights) if weights else None)
        self.outputs = OutputStore()
        # Without a schema file coglet hands run() every key of the request: refuse unknown ones by name.
        self.run = declared_inputs_only(self.run)  # type: ignore[method-assign]

    def run(
        self,
        prompt: str = declared("prompt"),
        image: Path | None = declared("image"),
        mask: Path | None = declared("mask"),
        aspect_ratio: str = declared("aspect_ratio"),
        height: int | None = declared("height"),
        width: int | None = declared("width"),
        prompt_strength: float = declared("prompt_strength"),
        model: str = declared("model"),
        num_outputs: int = declared("num_outputs"),
        num_inference_steps: int = declared("num_inference_steps"),
        guidance_scale: float = declared("guidance_scale"),
        seed: int | None = declared("seed"),
        output_format: str = declared("output_format"),
        output_quality: int = declared("output_quality"),
        disable_safety_checker: bool = declared("disable_safety_checker"),
        go_fast: bool = declared("go_fast"),
        megapixels: str = declared("megapixels"),
        replicate_weights: str | None = declared("replicate_weights"),
        lora_scale: float = declared("lora_scale"),
        extra_lora: str | None = declared("extra_lora"),
        extra_lora_scale: float = declared("extra_lora_scale"),
    ) -> list[Path]:
        """Generate images; see the input descriptions."""
        with user_facing_errors():
            request = GenerationRequest.from_inputs(
                prompt=prompt,
                image=client_file("image", image),  # only files Cog made from the client's upload
                mask=client_file("mask", mask),
                aspect_ratio=aspect_ratio,
                height=height,
                width=width,
                prompt_strength=prompt_strength,
                model=model,
                num_outputs=num_outputs,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                seed=seed,
                output_format=output_format,
                output_quality=output_quality,
                disable_safety_checker=disable_safety_checker,
                go_fast=go_fast,
                megapixels=megapixels,
                replicate_weights=replicate_weights,
                lora_scale=lora_scale,
                extra_lora=extra_lora,
                extra_lora_scale=extra_lora_scale,
            ).with_default_lora(self.engine.default_lora)
            generation = self.engine.generate(request)
            for key, value in generation.metrics.items():
                self.record_metric(key, value)
            saved = self.outputs.save(generation.images, request.output_format, request.output_quality)
            return [Path(p) for p in saved]
