"""Whether a downloaded file is the one the Hub lists: size, then sha256 (LFS files) or git blob id."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 8 << 20


def mismatch(local: Path, size: int | None, sha256: str | None, blob_id: str | None) -> str | None:
    """ "" when `local` matches what the Hub says, a description of the difference when it does not,
    None when the Hub said nothing to check it against."""
    actual_size = local.stat().st_size
    if size is not None and actual_size != size:
        return f"it has {actual_size} bytes, the Hub says {size}"
    if sha256:
        actual = file_sha256(local)
        return "" if actual == sha256 else f"sha256 {actual}, the Hub says {sha256}"
    if blob_id:
        actual = git_blob_sha1(local, actual_size)
        return "" if actual == blob_id else f"git blob id {actual}, the Hub says {blob_id}"
    return "" if size is not None else None  # a size and no checksum: the size matched


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: Path, size: int) -> str:
    """The id git (and the Hub) gives a file's contents: sha1 of `blob <size>\\0` + the bytes."""
    digest = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
