"""The LoRA disk cache and .tar archives: budgets, restarts, partial files, unsafe members."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest

from flux_day.errors import InputError
from flux_day.loras.archive import extract_lora
from flux_day.loras.cache import LoraCache
from flux_day.loras.fetch import PARTIAL_PREFIX


def partial(cache: LoraCache, size: int) -> Path:
    path = cache.root / f"{PARTIAL_PREFIX}{size}-{time.monotonic_ns()}"
    path.write_bytes(b"x" * size)
    return path


def test_least_recently_used_files_go_first_when_over_budget(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=250)
    a = cache.put("a", partial(cache, 100))
    b = cache.put("b", partial(cache, 100))
    os.utime(a, (1, 1))
    os.utime(b, (2, 2))
    assert cache.get("a") == a  # a is used again: b is now the least recently used
    cache.put("c", partial(cache, 100))
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None


def test_a_file_larger_than_the_budget_is_kept_while_it_is_the_newest(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=50)
    cache.put("old", partial(cache, 10))
    big = cache.put("big", partial(cache, 100))
    assert big.exists() and cache.get("old") is None


def test_the_directory_is_the_index_across_restarts_and_partials_are_cleared(tmp_path: Path) -> None:
    first = LoraCache(tmp_path, budget_bytes=10**6)
    path = first.put("https://example.com/a.safetensors", partial(first, 10))
    leftover = partial(first, 5)  # as a crash mid-download would leave it
    second = LoraCache(tmp_path, budget_bytes=10**6)
    assert second.get("https://example.com/a.safetensors") == path
    assert not leftover.exists()
    assert second.get("https://example.com/b.safetensors") is None


def test_one_lock_per_key(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=10)
    locks = []
    threads = [threading.Thread(target=lambda: locks.append(cache.lock("k"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(lock) for lock in locks}) == 1 and cache.lock("other") is not locks[0]


def tar_bytes(members: dict[str, bytes], links: dict[str, tuple[str, bytes]] | None = None) -> bytes:
    """A tar with regular `members` and `links` {name: (link target, type)}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (target, kind) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return buffer.getvalue()


def extracted(data: bytes, max_bytes: int = 10**6) -> tuple[str, bytes]:
    target = io.BytesIO()
    name = extract_lora(io.BytesIO(data), target, "replicate_weights", max_bytes)
    return name, target.getvalue()


def test_the_trained_models_lora_member_is_taken_wherever_it_sits() -> None:
    data = tar_bytes(
        {"output/flux_train_replicate/lora.safetensors": b"LORA", "output/other.safetensors": b"X"}
    )
    assert extracted(data) == ("output/flux_train_replicate/lora.safetensors", b"LORA")
    assert extracted(tar_bytes({"weights/style.safetensors": b"ONE", "README.md": b"hi"}))[1] == b"ONE"
    # tarfile's data filter makes an absolute name relative; the member is only read, never written.
    assert extracted(tar_bytes({"/abs/lora.safetensors": b"ABS"}))[1] == b"ABS"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (tar_bytes({"a.safetensors": b"1", "b.safetensors": b"2"}), r"2 \.safetensors files \(a.safetensors"),
        (tar_bytes({"README.md": b"hi"}), r"no \.safetensors file"),
        (tar_bytes({"../lora.safetensors": b"ESCAPE"}), r"unsafe"),
        (tar_bytes({}, {"lora.safetensors": ("/etc/passwd", tarfile.SYMTYPE)}), r"unsafe|link"),
        (tar_bytes({"x": b"1"}, {"lora.safetensors": ("../../x", tarfile.SYMTYPE)}), r"unsafe|link"),
        (tar_bytes({"lora.safetensors": b"x" * 100}), r"larger than 50 bytes"),
        (tar_bytes({"lora.safetensors": b"x" * 10})[:600], r"damaged|larger|no \.safetensors"),
    ],
)
def test_unsafe_or_unclear_archives_are_refused_by_name(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=rf"^replicate_weights: .*({message})"):
        extracted(data, max_bytes=50)
