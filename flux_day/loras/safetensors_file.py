"""A LoRA file's tensors and metadata, read as safetensors only and checked before any is used.

A file on disk (the LoRA cache's, the operator's) is read from its path (one `safe_open`), so
a 2 GB download is never held as Python bytes besides its tensors; a data: URI's bytes, already in
memory, by `safetensors.torch.load`. A pickle (.pt/.ckpt/.bin) is never opened, because unpickling
downloaded data runs its code: it is only recognised by its first bytes, to say so.
"""

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


def load_lora_file(source: LoraSource) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(float32 tensors by key, the header's metadata) of a safetensors LoRA; anything else is refused."""
    try:
        if isinstance(source, Path):
            with safe_open(source, framework="pt") as opened:
                metadata = opened.metadata() or {}
                state_dict = opened.get_tensors()
        else:
            state_dict, metadata = load_safetensors(source), _metadata(source)
    except UNREADABLE as error:
        raise _refusal(_head(source), error) from None
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
        raise _refusal(_head(path), error) from None


def lora_file_identity(source: LoraSource) -> tuple[str, int]:
    """(a digest of the content, its size in bytes): a file is hashed as it streams, not read whole."""
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()[:16], len(source)
    with source.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()[:16]
    return digest, source.stat().st_size


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of bytes `load` has just accepted. safetensors reads metadata only from a file
    named by path (`safe_open`), and a data: URI is not written to disk for the sake of its header."""
    header_bytes = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_bytes]).get("__metadata__") or {}


def _head(source: LoraSource) -> bytes:
    if isinstance(source, bytes):
        return source[:2]
    with source.open("rb") as handle:
        return handle.read(2)


def _refusal(head: bytes, error: Exception) -> LoraError:
    """Why a file is not usable, from its first bytes only: they are never handed to an unpickler."""
    if head in PICKLE_HEADS:
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
