"""Encoding images to files: one fresh directory per prediction, removed once Cog has read it."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

from PIL import Image

OUTPUT_FORMATS: Final[dict[str, str]] = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
READ_GRACE_S: Final = 60.0  # while others run, coglet may still be reading a directory this recent
PREFIX: Final = "flux-day-out-"


def save_image(image: Image.Image, path: Path, output_format: str, quality: int) -> Path:
    """Encode `image` at `path`; png is lossless and ignores `quality`."""
    options = {} if output_format == "png" else {"quality": quality}
    image.save(path, format=OUTPUT_FORMATS[output_format], **options)
    return path


class OutputStore:
    """Each prediction's images in a directory of their own, removed at a later save: Cog reads the files
    after `run()` returns, so a save while others run leaves the recent ones."""

    def __init__(self, parent: Path | None = None) -> None:
        self._parent = parent
        self._saved: list[tuple[Path, float]] = []  # directories still on disk, and when each was made
        self._guard = threading.Lock()  # predictions save in threads of their own

    def save(
        self, images: list[Image.Image], output_format: str, quality: int, others_running: bool = False
    ) -> list[Path]:
        """`images` as `out-<token>-<i>.<format>` in a fresh directory; the random token keeps a plain upload
        server (`--upload-url` PUTs to the URL plus the name) from overwriting an output."""
        self._remove_read(others_running)
        if self._parent is not None:
            self._parent.mkdir(parents=True, exist_ok=True)
        current = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self._parent))
        token = current.name.removeprefix(PREFIX)
        try:
            saved = [
                save_image(image, current / f"out-{token}-{i}.{output_format}", output_format, quality)
                for i, image in enumerate(images)
            ]
        except BaseException:  # a failed or cancelled save leaves no half-written file
            shutil.rmtree(current, ignore_errors=True)
            raise
        with self._guard:
            self._saved.append((current, time.monotonic()))
        return saved

    def _remove_read(self, others_running: bool) -> None:
        """Remove the directories Cog is done with: all, or while others run those over `READ_GRACE_S`."""
        with self._guard:
            now = time.monotonic()
            recent = [(d, made) for d, made in self._saved if others_running and now - made < READ_GRACE_S]
            done = [directory for directory, made in self._saved if (directory, made) not in recent]
            self._saved = recent
        for directory in done:
            shutil.rmtree(directory, ignore_errors=True)

    def clear(self) -> None:
        self._remove_read(others_running=False)
