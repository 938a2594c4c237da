"""Encoding images to files: one fresh directory per prediction, the previous one removed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Final

from PIL import Image

# Schema choice -> Pillow format name.
OUTPUT_FORMATS: Final[dict[str, str]] = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def encode_options(output_format: str, quality: int) -> dict[str, object]:
    """Pillow save options: `quality` for the lossy formats, lossless PNG ignores it."""
    if output_format == "png":
        return {}
    return {"quality": quality}


class OutputStore:
    """Writes each prediction's images into its own directory and deletes the one before.

    Cog reads the returned files after `run()` returns, so a prediction's files may only go when
    the next prediction starts (or the store is closed).
    """

    def __init__(self, parent: Path | None = None, prefix: str = "flux-day-out-") -> None:
        self._parent = parent
        self._prefix = prefix
        self._current: Path | None = None

    def save(self, images: list[Image.Image], output_format: str, quality: int) -> list[Path]:
        """Encode `images` as `out-<i>.<format>` in a fresh directory; return their paths."""
        self.clear()
        if self._parent is not None:
            self._parent.mkdir(parents=True, exist_ok=True)
        self._current = Path(tempfile.mkdtemp(prefix=self._prefix, dir=self._parent))
        paths = []
        for i, image in enumerate(images):
            path = self._current / f"out-{i}.{output_format}"
            image.save(path, format=OUTPUT_FORMATS[output_format], **encode_options(output_format, quality))
            paths.append(path)
        return paths

    def clear(self) -> None:
        """Remove the last prediction's directory, if any."""
        if self._current is not None:
            shutil.rmtree(self._current, ignore_errors=True)
            self._current = None
