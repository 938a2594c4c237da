"""`GenerationRequest`: every input checked once, before any work, and turned into what to run.

The Cog server enforces the schema only inside a built image, so this check must be enough on its own.
"""

from __future__ import annotations

import dataclasses
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
from flux_day.sizes import CUSTOM, aspect_ratio_size, custom_size, image_size

log = logging.getLogger(__name__)

Mode = Literal["txt2img", "img2img", "inpaint"]
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
        """go_fast's fp8 transformer runs this, unless a custom size (the schema promises bf16)."""
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
        """The operator's default LoRA (`COG_WEIGHTS`, not an input) first, at `lora_scale`, when
        `replicate_weights` is empty."""
        names = {lora.input_name for lora in self.loras}
        if not source or names & {"replicate_weights", DEFAULT_LORA_INPUT}:
            return self
        default = LoraRequest.operator_default(source, self.lora_scale)
        return replace(self, loras=(default, *self.loras))

    @classmethod
    def from_inputs(cls, **inputs: Any) -> GenerationRequest:
        """Check every published input (omitted ones at their default), then combine them."""
        refuse_unknown(inputs)
        given = {name: SCHEMA[name].check(value) for name, value in (DEFAULTS | inputs).items()}
        loras = tuple(
            LoraRequest.parse(name, given[name], given[scale])
            for name, scale in LORA_INPUTS.items()
            if given[name]
        )
        image, mask = _images(given["image"], given["mask"])
        width, height = _size(image, given)
        if given["seed"] is None:
            given["seed"] = secrets.randbits(32)
            log.info("seed not given; using random seed %d", given["seed"])
        mode = "txt2img" if image is None else ("img2img" if mask is None else "inpaint")
        made = dict(mode=mode, width=width, height=height, image=image, mask=mask, loras=loras)
        made["custom_size"] = given["aspect_ratio"] == CUSTOM
        return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name not in made}, **made)


def _images(image: Any, mask: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """The input image and mask, read upright; a mask needs an image, and takes its size."""
    if mask is not None and image is None:
        raise InputError(
            "mask: given without image; inpainting repaints `image` where the mask is white, "
            "so give the image too (or drop the mask)."
        )
    source = None if image is None else _open_image("image", image, "RGB")
    mask_image = None if mask is None else _open_image("mask", mask, "L")
    if source is None or mask_image is None or mask_image.size == source.size:
        return source, mask_image
    # A mask of another shape would repaint the wrong place.
    mask_ratio, image_ratio = mask_image.width / mask_image.height, source.width / source.height
    if abs(mask_ratio / image_ratio - 1) > MASK_ASPECT_TOLERANCE:
        raise InputError(
            f"mask: its size {mask_image.width}x{mask_image.height} does not have the image's aspect "
            f"ratio ({source.width}x{source.height}); give a mask of the image's shape."
        )
    return source, mask_image.resize(source.size, Image.Resampling.NEAREST)


def _size(image: Image.Image | None, given: Mapping[str, Any]) -> tuple[int, int]:
    """(width, height): the image's (the description promises the size inputs are then ignored), the
    custom sides, or the aspect ratio's at `megapixels`."""
    if image is not None:
        if given["prompt_strength"] == 0:
            raise InputError(
                "prompt_strength: 0 leaves no denoising steps, so the input image would come "
                "back unchanged; use a value above 0 (0.8 is the default)."
            )
        return image_size(*image.size)
    if given["aspect_ratio"] == CUSTOM:
        missing = [name for name in ("width", "height") if given[name] is None]
        if missing:
            raise InputError(
                f"{' and '.join(missing)}: required when aspect_ratio is custom; give width "
                "and height from 256 to 1440 (rounded to the nearest multiple of 16)."
            )
        return custom_size(given["width"], given["height"])
    return aspect_ratio_size(given["aspect_ratio"], given["megapixels"])


def _open_image(name: str, path: Any, mode: str) -> Image.Image:
    """An uploaded file as an image, upright (EXIF orientation applied), in `mode`."""
    if not isinstance(path, str | Path):
        raise InputError(f"{name}: {shown(path)} is not a file; give an image URL or upload.")
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened).convert(mode)
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
