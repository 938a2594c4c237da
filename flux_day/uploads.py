"""Which files a request may make the server read: only the ones Cog made from what the client sent.

coglet 0.23 turns an `image`/`mask` sent as a URL or data: URI into a `cog.Path` to a file of its own
(`tempfile.NamedTemporaryFile`: `tmp...` directly in the temp directory), and passes any other string
through as a plain `str`, which would name a file on the server's disk (its weights, outputs, /etc).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from flux_day.errors import InputError


def client_file(name: str, value: Any) -> Path | None:
    """The file Cog made for input `name` from the client's upload (None when not given), or a refusal."""
    if value is None:
        return None
    refusal = InputError(
        f"{name}: give the image as an http(s) URL or a data: URI; a path on the server is not accepted."
    )
    if isinstance(value, str) or not isinstance(value, os.PathLike):
        raise refusal
    path = Path(value)
    try:
        mode = path.lstat().st_mode
    except OSError:
        raise refusal from None
    made_by_cog = (
        stat.S_ISREG(mode)
        and path.name.startswith("tmp")
        and path.parent.resolve() == Path(tempfile.gettempdir()).resolve()
    )
    if not made_by_cog:
        raise refusal
    return path
