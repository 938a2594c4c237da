"""A LoRA file read as safetensors only, checked before any tensor is used; the format's header read
in one place. A pickle (.pt/.ckpt/.bin) is never opened (unpickling runs its code), only recognised
by its first bytes to say so. A file on disk is read from its path, never held whole as bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors

from flux_day.errors import LoraError
from flux_day.server_log import log as server_log

LoraSource = bytes | Path  # a data: URI's bytes, or a file
PICKLE_HEADS = frozenset({b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"})  # zip or protocol 2-5
UNREADABLE = (SafetensorError, ValueError, RuntimeError)


def header_length(head: bytes) -> int | None:
    """The JSON header's length if `head` (the first 9+ bytes) starts like safetensors, else None."""
    length = int.from_bytes(head[:8], "little")
    return length if len(head) >= 9 and head[8:9] == b"{" and length > 0 else None


def declared_size(head: bytes) -> tuple[int, int | None]:
    """(at least, total) bytes the safetensors file starting with `head` declares: the header alone
    bounds it below; the total is known once the whole header is in `head`. (0, None) if not safetensors."""
    length = header_length(head)
    if length is None:
        return 0, None
    if len(head) < 8 + length:
        return 8 + length, None
    try:
        header = json.loads(head[8 : 8 + length])
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        return 8 + length, 8 + length + max(ends, default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return 8 + length, None  # not a valid header: the parser says why once the body is in


def load_lora_file(source: LoraSource) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(float32 tensors by key, the header's metadata) of a safetensors LoRA; anything else is refused."""
    try:
        if isinstance(source, Path):
            with safe_open(source, framework="pt") as opened:
                metadata, state_dict = opened.metadata() or {}, opened.get_tensors()
        else:
            # safetensors reads metadata only from a file; a data: URI is not written out for its header.
            length = header_length(source) or 0
            state_dict = load_safetensors(source)
            metadata = json.loads(source[8 : 8 + length]).get("__metadata__") or {}
    except UNREADABLE as error:
        raise _refusal(source, error) from None
    bad = [key for key, value in state_dict.items() if not value.is_floating_point()]
    if bad:
        raise LoraError(f"tensor {bad[0]!r} is not floating point; this is not a LoRA file.")
    # NaN or infinity in any factor would turn the fused weights, and every image, into NaN (black).
    broken = next((key for key, value in state_dict.items() if not bool(value.isfinite().all())), None)
    if broken is not None:
        raise LoraError(
            f"tensor {broken[:80]!r} holds NaN or infinite values (the training diverged or "
            "the file is damaged); use another LoRA file."
        )
    return {key: value.to(torch.float32) for key, value in state_dict.items()}, metadata


def check_lora_file(path: Path) -> None:
    """Refuse `path` unless its safetensors header is sound, as `load_lora_file` would, without reading
    its tensors: a download is checked before it takes a name in the LoRA cache."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except UNREADABLE as error:
        raise _refusal(path, error) from None


def lora_file_identity(source: LoraSource) -> tuple[str, int]:
    """(a digest of the content, its size in bytes): a file is hashed as it streams, not read whole."""
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()[:16], len(source)
    with source.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()[:16]
    return digest, source.stat().st_size


def _refusal(source: LoraSource, error: Exception) -> LoraError:
    """Why a file is not usable, from its first bytes only: they are never handed to an unpickler."""
    if isinstance(source, Path):
        with source.open("rb") as handle:
            source = handle.read(2)
    if source[:2] in PICKLE_HEADS:
        return LoraError(
            "the file is not a safetensors file but a PyTorch pickle (.pt/.ckpt/.bin), "
            "which is never loaded because it can run code; give the LoRA as a .safetensors file."
        )
    # The library's reason names its own internals (HeaderTooLarge, ...): logged, not shown.
    server_log.info("safetensors refused a LoRA file: %s", str(error).splitlines()[:1])
    return LoraError(
        "the file is not a safetensors file, or a damaged or incomplete one; give an "
        "intact .safetensors LoRA."
    )
