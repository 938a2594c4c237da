"""Checks of single inputs, driven by `flux_day.schema`'s table: each returns the value as it is used, or
raises `InputError` naming the input, the value given and what is allowed."""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path
from typing import Any, Final

from PIL import Image, ImageOps, UnidentifiedImageError

from flux_day.errors import InputError
from flux_day.schema import SCHEMA, SchemaInput

log = logging.getLogger(__name__)

MAX_SEED: Final = 2**63 - 1  # seed + i must stay a valid torch seed
RANDOM_SEED_BITS: Final = 32
MASK_ASPECT_TOLERANCE: Final = 0.02


def shown(value: Any) -> str:
    """A value as it may appear in an error: short, and never a local path or object repr."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def checked(name: str, value: Any) -> Any:
    """Input `name`'s `value` as it is used, checked against the table's kind, choices and bounds. Files
    pass as they are: `open_image` reads them once the request knows which it needs."""
    field = SCHEMA[name]
    if value is None and field.default is None:
        if field.required:  # the prompt
            raise InputError(f"{name}: missing; give a text prompt describing the image.")
        return None  # left empty, as the schema allows
    if field.kind == "file":
        return value
    if field.kind == "boolean":
        if not isinstance(value, bool):
            raise InputError(f"{name}: {shown(value)} is not a boolean; give true or false.")
        return value
    if field.choices:
        if value not in field.choices:
            allowed = ", ".join(field.choices)
            raise InputError(f"{name}: {shown(value)} is not one of the choices; use one of {allowed}.")
        return value
    if field.kind == "text":
        if not isinstance(value, str):
            fix = "give a text prompt" if field.required else "give a string or leave it empty"
            raise InputError(f"{name}: {shown(value)} is not text; {fix}.")
        return value if field.required else value.strip() or None
    return _number(field, value)


def _number(field: SchemaInput, value: Any) -> int | float:
    """A number within the field's bounds; JSON clients may send 2.0 for the integer 2."""
    whole = field.kind == "integer"
    kind = "an integer" if whole else "a number"
    wrong = isinstance(value, bool) or not isinstance(value, int | float)
    if isinstance(value, float):
        wrong = not (value.is_integer() if whole else math.isfinite(value))
    if wrong:
        fix = "a whole number" if whole else kind
        raise InputError(f"{field.name}: {shown(value)} is not {kind}; give {fix}.")
    low, high = field.bounds or (0, MAX_SEED)  # the seed, unbounded in the schema: any valid torch seed
    if not low <= value <= high:
        empty = ", or leave it empty for a random seed" if field.name == "seed" else ""
        raise InputError(
            f"{field.name}: {shown(value)} is out of range; use {kind} from {low} to {high}{empty}."
        )
    return int(value) if whole else float(value)


def random_seed() -> int:
    """A seed for a request that gave none, logged so its images can be made again."""
    drawn = secrets.randbits(RANDOM_SEED_BITS)
    log.info("seed not given; using random seed %d", drawn)
    return drawn


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
