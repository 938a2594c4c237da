"""Which files a request may make the server read: only the ones Cog made from what the client sent.

coglet 0.23 turns an `image`/`mask` sent as an http(s) URL or a data: URI into a file of its own
(`cog.types.URLPath.convert`: `tempfile.NamedTemporaryFile(suffix=<name>, delete=False)` in the worker's
temp directory, removed after the prediction) and passes that as a `cog.Path`. Any other string it
passes through untouched, as a plain `str`, which would be opened as a path on the server's disk: its
weights, its earlier outputs, /etc. So a file input is read only when it is a path object (never a
client's string) naming a regular file (not a link) directly in the temp directory, with the `tmp`
prefix NamedTemporaryFile gives; outputs, caches and everything else live elsewhere.
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
