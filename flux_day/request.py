"""`GenerationRequest`: every input checked once, before any work, and turned into what to run.

The Cog server enforces the schema only inside a built image, so this is the check that must be
enough on its own. Every failure is an `InputError` whose message names the input, the value given
and what is allowed; nothing here touches model state, so a refused request changes nothing.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from flux_day.components import transformer_component
from flux_day.errors import InputError
from flux_day.loras.refs import DEFAULT_LORA_INPUT, LoraRequest
from flux_day.model_specs import MODELS
from flux_day.outputs import OUTPUT_FORMATS
from flux_day.sizes import ASPECT_RATIOS, CUSTOM, MEGAPIXEL_SIDE_SCALE, aspect_ratio_size
from flux_day.sizes import custom_size as round_custom_size
from flux_day.sizes import image_size as image_generation_size

log = logging.getLogger(__name__)

Mode = Literal["txt2img", "img2img", "inpaint"]

# Numeric bounds of the published schema (a test holds them equal to the seed's).
NUMBER_BOUNDS: Final[dict[str, tuple[float, float]]] = {
    "height": (256, 1440),
    "width": (256, 1440),
    "prompt_strength": (0, 1),
    "num_outputs": (1, 4),
    "num_inference_steps": (1, 50),
    "guidance_scale": (0, 10),
    "output_quality": (0, 100),
    "lora_scale": (-1, 3),
    "extra_lora_scale": (-1, 3),
}
INTEGER_INPUTS: Final = frozenset(
    {"height", "width", "num_outputs", "num_inference_steps", "output_quality", "seed"}
)
CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "aspect_ratio": (*ASPECT_RATIOS, CUSTOM),
    "model": tuple(MODELS),
    "output_format": tuple(OUTPUT_FORMATS),
    "megapixels": tuple(MEGAPIXEL_SIDE_SCALE),
}
MAX_SEED: Final = 2**63 - 1  # seed + i must stay a valid torch seed
RANDOM_SEED_BITS: Final = 32
MASK_ASPECT_TOLERANCE: Final = 0.02


def _shown(value: Any) -> str:
    """A value as it may appear in an error: short, and never a local path or object repr."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(name: str, value: Any) -> int:
    # JSON clients may send 2.0 for 2; anything else that is not a whole number is refused.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{name}: {_shown(value)} is not an integer; give a whole number.")
    if isinstance(value, float) and not value.is_integer():
        raise InputError(f"{name}: {_shown(value)} is not an integer; give a whole number.")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{name}: {_shown(value)} is not a number; give a number.")
    return float(value)


def _bounded(name: str, value: Any) -> Any:
    """Check type and the schema's bounds for a numeric input; return it as int or float."""
    low, high = NUMBER_BOUNDS[name]
    number = _integer(name, value) if name in INTEGER_INPUTS else _number(name, value)
    if not low <= number <= high:
        kind = "an integer" if name in INTEGER_INPUTS else "a number"
        raise InputError(f"{name}: {_shown(value)} is out of range; use {kind} from {low:g} to {high:g}.")
    return number


def _choice(name: str, value: Any) -> str:
    allowed = CHOICES[name]
    if value not in allowed:
        raise InputError(
            f"{name}: {_shown(value)} is not one of the choices; use one of {', '.join(allowed)}."
        )
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name}: {_shown(value)} is not a boolean; give true or false.")
    return value


def _optional_text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{name}: {_shown(value)} is not text; give a string or leave it empty.")
    return value.strip() or None


def _open_image(name: str, path: Any, mode: str) -> Image.Image:
    """Read an uploaded file as an image, upright (EXIF orientation applied), in `mode`."""
    if not isinstance(path, str | Path):
        raise InputError(f"{name}: {_shown(path)} is not a file; give an image URL or upload.")
    try:
        with Image.open(path) as opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            return upright.convert(mode)
    except Image.DecompressionBombError:
        raise InputError(
            f"{name}: the image has too many pixels to read safely; give one under "
            f"{Image.MAX_IMAGE_PIXELS} pixels."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(
            f"{name}: the file is not an image that can be read; give a PNG, JPEG or WebP image."
        ) from None


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
        prompt: Any = None,
        image: Any = None,
        mask: Any = None,
        aspect_ratio: Any = "1:1",
        height: Any = None,
        width: Any = None,
        prompt_strength: Any = 0.8,
        model: Any = "dev",
        num_outputs: Any = 1,
        num_inference_steps: Any = 28,
        guidance_scale: Any = 3,
        seed: Any = None,
        output_format: Any = "webp",
        output_quality: Any = 80,
        disable_safety_checker: Any = False,
        go_fast: Any = False,
        megapixels: Any = "1",
        replicate_weights: Any = None,
        lora_scale: Any = 1,
        extra_lora: Any = None,
        extra_lora_scale: Any = 1,
    ) -> GenerationRequest:
        """Check every input of the published schema (defaults are the schema's) and combine them."""
        if prompt is None:
            raise InputError("prompt: missing; give a text prompt describing the image.")
        if not isinstance(prompt, str):
            raise InputError(f"prompt: {_shown(prompt)} is not text; give a text prompt.")

        aspect_ratio = _choice("aspect_ratio", aspect_ratio)
        megapixels = _choice("megapixels", megapixels)
        sides = {
            name: None if value is None else _bounded(name, value)
            for name, value in (("width", width), ("height", height))
        }
        strength = _bounded("prompt_strength", prompt_strength)
        model = _choice("model", model)
        num_outputs = _bounded("num_outputs", num_outputs)
        steps = _bounded("num_inference_steps", num_inference_steps)
        guidance = _bounded("guidance_scale", guidance_scale)
        output_format = _choice("output_format", output_format)
        quality = _bounded("output_quality", output_quality)
        loras = _lora_requests(replicate_weights, lora_scale, extra_lora, extra_lora_scale)

        if mask is not None and image is None:
            raise InputError(
                "mask: given without image; inpainting repaints `image` where the mask is white, "
                "so give the image too (or drop the mask)."
            )
        source = None if image is None else _open_image("image", image, "RGB")
        mask_image = None if mask is None else _open_image("mask", mask, "L")
        if source is not None and mask_image is not None:
            mask_image = _fit_mask(mask_image, source)

        if source is not None:
            # The description promises aspect_ratio, width and height are ignored with an image.
            width_out, height_out = image_generation_size(*source.size)
            if strength == 0:
                raise InputError(
                    "prompt_strength: 0 leaves no denoising steps, so the input image would come "
                    "back unchanged; use a value above 0 (0.8 is the default)."
                )
        elif aspect_ratio == CUSTOM:
            missing = [name for name, value in sides.items() if value is None]
            if missing:
                raise InputError(
                    f"{' and '.join(missing)}: required when aspect_ratio is custom; give width "
                    "and height from 256 to 1440 (rounded to the nearest multiple of 16)."
                )
            width_out, height_out = round_custom_size(sides["width"], sides["height"])
        else:
            width_out, height_out = aspect_ratio_size(aspect_ratio, megapixels)

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
            seed=_seed(seed),
            output_format=output_format,
            output_quality=quality,
            disable_safety_checker=_flag("disable_safety_checker", disable_safety_checker),
            go_fast=_flag("go_fast", go_fast),
            loras=loras,
            lora_scale=_bounded("lora_scale", lora_scale),
            custom_size=aspect_ratio == CUSTOM,
        )


def _seed(seed: Any) -> int:
    if seed is None:
        drawn = secrets.randbits(RANDOM_SEED_BITS)
        log.info("seed not given; using random seed %d", drawn)
        return drawn
    value = _integer("seed", seed)
    if not 0 <= value <= MAX_SEED:
        raise InputError(
            f"seed: {_shown(seed)} is out of range; use an integer from 0 to {MAX_SEED}, "
            "or leave it empty for a random seed."
        )
    return value


def _fit_mask(mask: Image.Image, image: Image.Image) -> Image.Image:
    """The mask at the image's size; a mask of another shape would repaint the wrong place."""
    if mask.size == image.size:
        return mask
    mask_ratio, image_ratio = mask.width / mask.height, image.width / image.height
    if abs(mask_ratio / image_ratio - 1) > MASK_ASPECT_TOLERANCE:
        raise InputError(
            f"mask: its size {mask.width}x{mask.height} does not have the image's aspect ratio "
            f"({image.width}x{image.height}); give a mask of the image's shape."
        )
    return mask.resize(image.size, Image.Resampling.NEAREST)


def _lora_requests(
    replicate_weights: Any, lora_scale: Any, extra_lora: Any, extra_lora_scale: Any
) -> tuple[LoraRequest, ...]:
    """The LoRAs the request names, each reference parsed now (a malformed one is refused by name)."""
    named = (
        (
            "replicate_weights",
            _optional_text("replicate_weights", replicate_weights),
            _bounded("lora_scale", lora_scale),
        ),
        (
            "extra_lora",
            _optional_text("extra_lora", extra_lora),
            _bounded("extra_lora_scale", extra_lora_scale),
        ),
    )
    return tuple(LoraRequest.parse(name, source, scale) for name, source, scale in named if source)
