"""`GenerationRequest`: every input checked once, before any work, and turned into what to run.

The Cog server enforces the schema only inside a built image, so this is the check that must be
enough on its own. Every failure is an `InputError` whose message names the input, the value given
and what is allowed; nothing here touches model state, so a refused request changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

from PIL import Image

from flux_day.errors import InputError
from flux_day.input_checks import (
    bounded,
    choice,
    fit_mask,
    flag,
    open_image,
    optional_text,
    seed_value,
    shown,
)
from flux_day.loras.refs import DEFAULT_LORA_INPUT, LoraRequest
from flux_day.models import transformer_component
from flux_day.schema import DEFAULTS
from flux_day.sizes import CUSTOM, aspect_ratio_size
from flux_day.sizes import custom_size as round_custom_size
from flux_day.sizes import image_size as image_generation_size

log = logging.getLogger(__name__)

Mode = Literal["txt2img", "img2img", "inpaint"]


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: what to generate, how, and how to save it."""

    prompt: str
    mode: Mode
    model: str
    width: int
    height: int
    image: Image.Image | None
    mask: Image.Image | None
    prompt_strength: float
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    output_format: str
    output_quality: int
    disable_safety_checker: bool
    go_fast: bool
    loras: tuple[LoraRequest, ...]  # parsed: a malformed reference never gets past `from_inputs`
    lora_scale: float  # also the scale of the default LoRA (COG_WEIGHTS) when replicate_weights is empty
    custom_size: bool  # aspect_ratio=custom: the schema promises these run in bf16, even with go_fast

    @property
    def fp8(self) -> bool:
        """Whether go_fast's fp8 transformer runs this request: go_fast asked, and not a custom size
        (the schema promises those run in full precision)."""
        return self.go_fast and not self.custom_size

    @property
    def transformer(self) -> str:
        """The component this request runs on (`dev-full`, `schnell-fp8`, ...)."""
        return transformer_component(self.model, self.fp8)

    @property
    def seeds(self) -> list[int]:
        """Output i uses seed + i, so any one image can be reproduced alone."""
        return [self.seed + i for i in range(self.num_outputs)]

    def with_default_lora(self, source: str | None) -> GenerationRequest:
        """This request with the operator's default LoRA (`COG_WEIGHTS`, or `setup(weights=...)`) first,
        at `lora_scale`, when `replicate_weights` is empty: how a trained model ships its style.
        The default is the operator's, not an input, so it is not part of the schema's `from_inputs`."""
        names = {lora.input_name for lora in self.loras}
        if not source or names & {"replicate_weights", DEFAULT_LORA_INPUT}:
            return self
        default = LoraRequest.operator_default(source, self.lora_scale)
        return replace(self, loras=(default, *self.loras))

    @classmethod
    def from_inputs(
        cls,
        *,
        prompt: Any = DEFAULTS["prompt"],
        image: Any = DEFAULTS["image"],
        mask: Any = DEFAULTS["mask"],
        aspect_ratio: Any = DEFAULTS["aspect_ratio"],
        height: Any = DEFAULTS["height"],
        width: Any = DEFAULTS["width"],
        prompt_strength: Any = DEFAULTS["prompt_strength"],
        model: Any = DEFAULTS["model"],
        num_outputs: Any = DEFAULTS["num_outputs"],
        num_inference_steps: Any = DEFAULTS["num_inference_steps"],
        guidance_scale: Any = DEFAULTS["guidance_scale"],
        seed: Any = DEFAULTS["seed"],
        output_format: Any = DEFAULTS["output_format"],
        output_quality: Any = DEFAULTS["output_quality"],
        disable_safety_checker: Any = DEFAULTS["disable_safety_checker"],
        go_fast: Any = DEFAULTS["go_fast"],
        megapixels: Any = DEFAULTS["megapixels"],
        replicate_weights: Any = DEFAULTS["replicate_weights"],
        lora_scale: Any = DEFAULTS["lora_scale"],
        extra_lora: Any = DEFAULTS["extra_lora"],
        extra_lora_scale: Any = DEFAULTS["extra_lora_scale"],
    ) -> GenerationRequest:
        """Check every input of the published schema (omitted ones take `flux_day.schema`'s defaults)
        and combine them, each input checked in turn."""
        prompt = _prompt(prompt)
        aspect_ratio = choice("aspect_ratio", aspect_ratio)
        megapixels = choice("megapixels", megapixels)
        sides = {
            name: None if v is None else bounded(name, v)
            for name, v in (("width", width), ("height", height))
        }
        strength = bounded("prompt_strength", prompt_strength)
        model = choice("model", model)
        num_outputs = bounded("num_outputs", num_outputs)
        steps = bounded("num_inference_steps", num_inference_steps)
        guidance = bounded("guidance_scale", guidance_scale)
        output_format = choice("output_format", output_format)
        quality = bounded("output_quality", output_quality)
        loras = _lora_requests(replicate_weights, lora_scale, extra_lora, extra_lora_scale)
        source, mask_image = _images(image, mask)
        width_out, height_out = _size(source, strength, aspect_ratio, megapixels, sides)
        return cls(
            prompt=prompt,
            mode="txt2img" if source is None else ("img2img" if mask_image is None else "inpaint"),
            model=model,
            width=width_out,
            height=height_out,
            image=source,
            mask=mask_image,
            prompt_strength=strength,
            num_outputs=num_outputs,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=seed_value(seed),
            output_format=output_format,
            output_quality=quality,
            disable_safety_checker=flag("disable_safety_checker", disable_safety_checker),
            go_fast=flag("go_fast", go_fast),
            loras=loras,
            lora_scale=bounded("lora_scale", lora_scale),
            custom_size=aspect_ratio == CUSTOM,
        )


def _prompt(prompt: Any) -> str:
    if prompt is None:
        raise InputError("prompt: missing; give a text prompt describing the image.")
    if not isinstance(prompt, str):
        raise InputError(f"prompt: {shown(prompt)} is not text; give a text prompt.")
    return prompt


def _images(image: Any, mask: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """The input image and mask, read upright; a mask needs an image, and takes its size."""
    if mask is not None and image is None:
        raise InputError(
            "mask: given without image; inpainting repaints `image` where the mask is white, "
            "so give the image too (or drop the mask)."
        )
    source = None if image is None else open_image("image", image, "RGB")
    mask_image = None if mask is None else open_image("mask", mask, "L")
    if source is not None and mask_image is not None:
        mask_image = fit_mask(mask_image, source)
    return source, mask_image


def _size(
    source: Image.Image | None,
    strength: float,
    aspect_ratio: str,
    megapixels: str,
    sides: dict[str, int | None],
) -> tuple[int, int]:
    """(width, height) to generate: the image's (the description promises aspect_ratio, width and
    height are ignored with one), the custom sides, or the aspect ratio's at `megapixels`."""
    if source is not None:
        if strength == 0:
            raise InputError(
                "prompt_strength: 0 leaves no denoising steps, so the input image would come "
                "back unchanged; use a value above 0 (0.8 is the default)."
            )
        return image_generation_size(*source.size)
    if aspect_ratio == CUSTOM:
        missing = [name for name, value in sides.items() if value is None]
        if missing:
            raise InputError(
                f"{' and '.join(missing)}: required when aspect_ratio is custom; give width "
                "and height from 256 to 1440 (rounded to the nearest multiple of 16)."
            )
        return round_custom_size(sides["width"], sides["height"])
    return aspect_ratio_size(aspect_ratio, megapixels)


def _lora_requests(
    replicate_weights: Any, lora_scale: Any, extra_lora: Any, extra_lora_scale: Any
) -> tuple[LoraRequest, ...]:
    """The LoRAs the request names, each reference parsed now (a malformed one is refused by name)."""
    named = (
        (
            "replicate_weights",
            optional_text("replicate_weights", replicate_weights),
            bounded("lora_scale", lora_scale),
        ),
        (
            "extra_lora",
            optional_text("extra_lora", extra_lora),
            bounded("extra_lora_scale", extra_lora_scale),
        ),
    )
    return tuple(LoraRequest.parse(name, source, scale) for name, source, scale in named if source)
