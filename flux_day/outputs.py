"""Encoding images to files: one fresh directory per prediction, the previous one removed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Final

from PIL import Image

# Schema choice -> Pillow format name.
OUTPUT_FORMATS: Final[dict[str, str]] = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def save_image(image: Image.Image, path: Path, output_format: str, quality: int) -> Path:
    """Encode `image` at `path`: `quality` applies to webp and jpg; png is lossless and ignores it."""
    options = {} if output_format == "png" else {"quality": quality}
    image.save(path, format=OUTPUT_FORMATS[output_format], **options)
    return path


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
        """Encode `images` as `out-<token>-<i>.<format>` in a fresh directory; return their paths.

        With `--upload-url`, Cog PUTs each file to that URL plus its name, so names differ between
        predictions (the directory's random token): a plain upload server never overwrites an output.
        """
        self.clear()
        if self._parent is not None:
            self._parent.mkdir(parents=True, exist_ok=True)
        self._current = Path(tempfile.mkdtemp(prefix=self._prefix, dir=self._parent))
        token = self._current.name.removeprefix(self._prefix)
        names = [f"out-{token}-{i}.{output_format}" for i in range(len(images))]
        try:
            return [
                save_image(image, self._current / name, output_format, quality)
                for image, name in zip(images, names, strict=True)
            ]
        except BaseException:  # a failed or cancelled save leaves no half-written file
            self.clear()
            raise

    def clear(self) -> None:
        """Remove the last prediction's directory, if any."""
        if self._current is not None:
            shutil.rmtree(self._current, ignore_errors=True)
            self._current = None
