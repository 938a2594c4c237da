"""`GenerationRequest`: every input checked once, before any work, and turned into what to run.

The Cog server enforces the schema only inside a built image, so this check must be enough on its own;
it touches no model state, so a refused request changes nothing.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from flux_day.errors import InputError
from flux_day.loras.refs import DEFAULT_LORA_INPUT, LoraRequest
from flux_day.models import transformer_component
from flux_day.schema import DEFAULTS, LORA_INPUTS, SCHEMA, refuse_unknown, shown
from flux_day.sizes import CUSTOM, aspect_ratio_size
from flux_day.sizes import custom_size as round_custom_size
from flux_day.sizes import image_size as image_generation_size

log = logging.getLogger(__name__)

Mode = Literal["txt2img", "img2img", "inpaint"]
RANDOM_SEED_BITS: Final = 32
MASK_ASPECT_TOLERANCE: Final = 0.02


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
    def from_inputs(cls, **inputs: Any) -> GenerationRequest:
        """Check every input of the published schema (omitted ones at the table's default), then combine
        them: the LoRA references, the files, the size."""
        refuse_unknown(inputs)
        given = {name: SCHEMA[name].check(value) for name, value in (DEFAULTS | inputs).items()}
        loras = tuple(
            LoraRequest.parse(name, given[name], given[scale])
            for name, scale in LORA_INPUTS.items()
            if given[name]
        )
        image, mask = _images(given["image"], given["mask"])
        width, height = _size(image, given)
        return cls(
            prompt=given["prompt"],
            mode="txt2img" if image is None else ("img2img" if mask is None else "inpaint"),
            model=given["model"],
            width=width,
            height=height,
            image=image,
            mask=mask,
            prompt_strength=given["prompt_strength"],
            num_outputs=given["num_outputs"],
            num_inference_steps=given["num_inference_steps"],
            guidance_scale=given["guidance_scale"],
            seed=_random_seed() if given["seed"] is None else given["seed"],
            output_format=given["output_format"],
            output_quality=given["output_quality"],
            disable_safety_checker=given["disable_safety_checker"],
            go_fast=given["go_fast"],
            loras=loras,
            lora_scale=given["lora_scale"],
            custom_size=given["aspect_ratio"] == CUSTOM,
        )


def _images(image: Any, mask: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """The input image and mask, read upright; a mask needs an image, and takes its size."""
    if mask is not None and image is None:
        raise InputError(
            "mask: given without image; inpainting repaints `image` where the mask is white, "
            "so give the image too (or drop the mask)."
        )
    source = None if image is None else _open_image("image", image, "RGB")
    mask_image = None if mask is None else _open_image("mask", mask, "L")
    if source is not None and mask_image is not None:
        mask_image = _fit_mask(mask_image, source)
    return source, mask_image


def _size(image: Image.Image | None, given: Mapping[str, Any]) -> tuple[int, int]:
    """(width, height) to generate: the image's (the description promises aspect_ratio, width and
    height are ignored with one), the custom sides, or the aspect ratio's at `megapixels`."""
    if image is not None:
        if given["prompt_strength"] == 0:
            raise InputError(
                "prompt_strength: 0 leaves no denoising steps, so the input image would come "
                "back unchanged; use a value above 0 (0.8 is the default)."
            )
        return image_generation_size(*image.size)
    if given["aspect_ratio"] == CUSTOM:
        missing = [name for name in ("width", "height") if given[name] is None]
        if missing:
            raise InputError(
                f"{' and '.join(missing)}: required when aspect_ratio is custom; give width "
                "and height from 256 to 1440 (rounded to the nearest multiple of 16)."
            )
        return round_custom_size(given["width"], given["height"])
    return aspect_ratio_size(given["aspect_ratio"], given["megapixels"])


def _random_seed() -> int:
    """A seed for a request that gave none, logged so its images can be made again."""
    drawn = secrets.randbits(RANDOM_SEED_BITS)
    log.info("seed not given; using random seed %d", drawn)
    return drawn


def _open_image(name: str, path: Any, mode: str) -> Image.Image:
    """Read an uploaded file as an image, upright (EXIF orientation applied), in `mode`."""
    if not isinstance(path, str | Path):
        raise InputError(f"{name}: {shown(path)} is not a file; give an image URL or upload.")
    try:
        with Image.open(path) as opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            return upright.convert(mode)
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(
            f"{name}: there is no such file; give the path of a PNG, JPEG or WebP image."
        ) from None
    except Image.DecompressionBombError:
        raise InputError(
            f"{name}: the image has too many pixels to read safely; give one under "
            f"{Image.MAX_IMAGE_PIXELS} pixels."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(
            f"{name}: the file is not an image that can be read; give a PNG, JPEG or WebP image."
        ) from None


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
