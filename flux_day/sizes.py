"""Output sizes: the aspect-ratio table, megapixels, custom rounding and sizes that follow an image."""

from __future__ import annotations

from typing import Final

SIZE_STEP: Final = 16  # FLUX packs 2x2 latents of an 8x VAE: sides must be multiples of 16.
MAX_IMAGE_SIDE: Final = 1440

# (width, height) at megapixels "1"; FLUX.1's published sizes.
ASPECT_RATIOS: Final[dict[str, tuple[int, int]]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
CUSTOM: Final = "custom"
# How each megapixels choice scales the sides of the table.
MEGAPIXEL_SIDE_SCALE: Final[dict[str, float]] = {"1": 1.0, "0.25": 0.5}


def round_to_step(value: float, step: int = SIZE_STEP) -> int:
    """The multiple of `step` nearest to `value`, halves rounding up (1000 -> 1008, 1007 -> 1008)."""
    return int((value + step / 2) // step) * step


def aspect_ratio_size(aspect_ratio: str, megapixels: str) -> tuple[int, int]:
    width, height = ASPECT_RATIOS[aspect_ratio]
    scale = MEGAPIXEL_SIDE_SCALE[megapixels]
    return round_to_step(width * scale), round_to_step(height * scale)


def custom_size(width: int, height: int) -> tuple[int, int]:
    """Custom sides rounded to the nearest multiple of 16, as the schema's description promises."""
    return round_to_step(width), round_to_step(height)


def image_size(width: int, height: int, max_side: int = MAX_IMAGE_SIDE) -> tuple[int, int]:
    """An input image's generation size: aspect kept, never scaled up, sides multiples of 16 in
    [16, `max_side`]."""
    scale = min(1.0, max_side / max(width, height))
    top = max_side - max_side % SIZE_STEP
    width, height = (min(top, max(SIZE_STEP, round_to_step(side * scale))) for side in (width, height))
    return width, height
