"""A trained model's .tar archive → its LoRA file, checked with `tarfile`'s data filter.

Replicate's trainers ship `output/flux_train_replicate/lora.safetensors` inside a tar; other archives
hold one .safetensors somewhere. Only that one member is read (streamed to the caller's file), after
`tarfile.data_filter` has accepted it: absolute paths, `..` and links are refused, so nothing can be
written outside the cache whatever the archive says.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from flux_day.errors import LoraError

LORA_MEMBER = "lora.safetensors"
# What `tarfile.data_filter` found, in words (its exception class names mean nothing to a user).
UNSAFE_MEMBERS: tuple[tuple[type[tarfile.FilterError], str], ...] = (
    (tarfile.AbsolutePathError, "an absolute path"),
    (tarfile.OutsideDestinationError, "a path leading outside the archive"),
    (tarfile.AbsoluteLinkError, "a link to an absolute path"),
    (tarfile.LinkOutsideDestinationError, "a link leading outside the archive"),
    (tarfile.SpecialFileError, "a device or other special file"),
)


def is_safetensors(head: bytes) -> bool:
    """Whether `head` (the first 9+ bytes) starts like a safetensors file: a size, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def is_archive(path_or_file: Path | BinaryIO) -> bool:
    """Whether `tarfile` can open it (plain or compressed tar)."""
    try:
        return tarfile.is_tarfile(path_or_file)
    except OSError:
        return False


def unpacked(source: Path | bytes, max_bytes: int) -> Path | bytes:
    """`source` itself, or the LoRA inside it (in memory) when it is a .tar archive: for a data: URI or
    the operator's own file, which are not in the LoRA cache."""
    if isinstance(source, bytes):
        head, archive = source[:9], io.BytesIO(source)
    else:
        with source.open("rb") as handle:
            head, archive = handle.read(9), source
    if is_safetensors(head) or not is_archive(archive):
        return source
    target = io.BytesIO()
    extract_lora(archive, target, max_bytes)
    return target.getvalue()


def extract_lora(source: Path | BinaryIO, target: BinaryIO, max_bytes: int) -> str:
    """Copy the archive's LoRA member into `target`; return the member's name."""
    try:
        with tarfile.open(**({"name": source} if isinstance(source, Path) else {"fileobj": source})) as tar:
            member = _lora_member(tar)
            try:
                tarfile.data_filter(member, "/nonexistent-extraction-root")
            except tarfile.FilterError as error:
                why = next(
                    (why for kind, why in UNSAFE_MEMBERS if isinstance(error, kind)), "not a plain file"
                )
                raise LoraError(
                    f"the archive's {member.name!r} is unsafe ({why}); give an archive whose "
                    "LoRA is a plain file inside it."
                ) from None
            if not member.isreg():
                raise LoraError(f"the archive's {member.name!r} is a link, not a file.")
            if member.size > max_bytes:
                raise LoraError(
                    f"the archive's {member.name!r} is larger than {max_bytes} bytes, the "
                    "LoRA size limit (FLUX_DAY_MAX_LORA_BYTES)."
                )
            stream = tar.extractfile(member)
            assert stream is not None  # a regular member always has a stream
            shutil.copyfileobj(stream, target)
            return member.name
    except (tarfile.TarError, EOFError):
        raise LoraError("the .tar archive is damaged or incomplete; give an intact one.") from None


def _lora_member(tar: tarfile.TarFile) -> tarfile.TarInfo:
    """`lora.safetensors` wherever it sits, else the only .safetensors member."""
    candidates = [m for m in tar.getmembers() if m.name.endswith(".safetensors")]
    named = [m for m in candidates if PurePosixPath(m.name).name == LORA_MEMBER]
    if len(named) == 1:
        return named[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise LoraError("the .tar archive holds no .safetensors file; it is not a LoRA.")
    listed = ", ".join(m.name for m in candidates[:5])
    raise LoraError(
        f"the .tar archive holds {len(candidates)} .safetensors files ({listed}) and none is "
        f"the only {LORA_MEMBER}; give a URL of the one LoRA file."
    )
