"""Checks of single inputs against the published schema, each refusing a bad value by name.

Each returns the value as it is used, or raises `InputError` naming the input, the value given and
what is allowed.

`GenerationRequest.from_inputs` combines them; the bounds and choices are `flux_day.schema`'s.
"""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path
from typing import Any, Final

from PIL import Image, ImageOps, UnidentifiedImageError

from flux_day.errors import InputError
from flux_day.schema import INPUTS

log = logging.getLogger(__name__)

# The published schema's bounds and choices, by input (`flux_day.schema` states them once).
NUMBER_BOUNDS: Final[dict[str, tuple[float, float]]] = {
    field.name: field.bounds for field in INPUTS if field.bounds is not None
}
INTEGER_INPUTS: Final = frozenset(field.name for field in INPUTS if field.kind == "integer")
CHOICES: Final[dict[str, tuple[str, ...]]] = {field.name: field.choices for field in INPUTS if field.choices}
MAX_SEED: Final = 2**63 - 1  # seed + i must stay a valid torch seed
RANDOM_SEED_BITS: Final = 32
MASK_ASPECT_TOLERANCE: Final = 0.02


def shown(value: Any) -> str:
    """A value as it may appear in an error: short, and never a local path or object repr."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(name: str, value: Any) -> int:
    # JSON clients may send 2.0 for 2; anything else that is not a whole number is refused.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{name}: {shown(value)} is not an integer; give a whole number.")
    if isinstance(value, float) and not value.is_integer():
        raise InputError(f"{name}: {shown(value)} is not an integer; give a whole number.")
    return int(value)


def real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{name}: {shown(value)} is not a number; give a number.")
    return float(value)


def bounded(name: str, value: Any) -> Any:
    """Check type and the schema's bounds for a numeric input; return it as int or float."""
    low, high = NUMBER_BOUNDS[name]
    number = integer(name, value) if name in INTEGER_INPUTS else real(name, value)
    if not low <= number <= high:
        kind = "an integer" if name in INTEGER_INPUTS else "a number"
        raise InputError(f"{name}: {shown(value)} is out of range; use {kind} from {low:g} to {high:g}.")
    return number


def choice(name: str, value: Any) -> str:
    allowed = CHOICES[name]
    if value not in allowed:
        raise InputError(
            f"{name}: {shown(value)} is not one of the choices; use one of {', '.join(allowed)}."
        )
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name}: {shown(value)} is not a boolean; give true or false.")
    return value


def optional_text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{name}: {shown(value)} is not text; give a string or leave it empty.")
    return value.strip() or None


def open_image(name: str, path: Any, mode: str) -> Image.Image:
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


def seed_value(seed: Any) -> int:
    if seed is None:
        drawn = secrets.randbits(RANDOM_SEED_BITS)
        log.info("seed not given; using random seed %d", drawn)
        return drawn
    value = integer("seed", seed)
    if not 0 <= value <= MAX_SEED:
        raise InputError(
            f"seed: {shown(seed)} is out of range; use an integer from 0 to {MAX_SEED}, "
            "or leave it empty for a random seed."
        )
    return value


def fit_mask(mask: Image.Image, image: Image.Image) -> Image.Image:
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
