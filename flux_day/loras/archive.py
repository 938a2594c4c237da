"""A trained model's .tar archive → its LoRA file. Only that one member is read (streamed to the
caller's file), after `tarfile.data_filter` accepted it: absolute paths, `..` and links are refused,
so nothing is written outside the cache whatever the archive says."""

from __future__ import annotations

import io
import shutil
import tarfile
from contextlib import nullcontext
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from flux_day.errors import LoraError
from flux_day.loras.safetensors_file import header_length

LORA_MEMBER = "lora.safetensors"  # Replicate's trainers: output/flux_train_replicate/lora.safetensors
UNSAFE_MEMBERS = {  # what `tarfile.data_filter` found, in words (its class names mean nothing to a user)
    tarfile.AbsolutePathError: "an absolute path",
    tarfile.OutsideDestinationError: "a path leading outside the archive",
    tarfile.AbsoluteLinkError: "a link to an absolute path",
    tarfile.LinkOutsideDestinationError: "a link leading outside the archive",
    tarfile.SpecialFileError: "a device or other special file",
}


def is_archive(source: Path | BinaryIO) -> bool:
    """Whether `source` is a (plain or compressed) tar, not safetensors; a file object is not moved."""
    try:
        with source.open("rb") if isinstance(source, Path) else nullcontext(source) as handle:
            head = handle.read(9)
            handle.seek(-len(head), io.SEEK_CUR)
        return header_length(head) is None and tarfile.is_tarfile(source)
    except OSError:
        return False


def unpacked(source: Path | bytes, max_bytes: int) -> Path | bytes:
    """`source` itself, or the LoRA inside it (in memory) when it is a .tar: for a data: URI or the
    operator's own file, which are not in the LoRA cache."""
    archive = io.BytesIO(source) if isinstance(source, bytes) else source
    if not is_archive(archive):
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
                why = UNSAFE_MEMBERS.get(type(error), "not a plain file")
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
            shutil.copyfileobj(tar.extractfile(member), target)  # type: ignore[misc]  # a regular member
            return member.name
    except (tarfile.TarError, EOFError):
        raise LoraError("the .tar archive is damaged or incomplete; give an intact one.") from None


def _lora_member(tar: tarfile.TarFile) -> tarfile.TarInfo:
    """`lora.safetensors` wherever it sits, else the only .safetensors member."""
    candidates = [m for m in tar.getmembers() if m.name.endswith(".safetensors")]
    named = [m for m in candidates if PurePosixPath(m.name).name == LORA_MEMBER]
    if len(named) == 1 or len(candidates) == 1:
        return (named or candidates)[0]
    if not candidates:
        raise LoraError("the .tar archive holds no .safetensors file; it is not a LoRA.")
    listed = ", ".join(m.name for m in candidates[:5])
    raise LoraError(
        f"the .tar archive holds {len(candidates)} .safetensors files ({listed}) and none is "
        f"the only {LORA_MEMBER}; give a URL of the one LoRA file."
    )
