"""The LoRA disk cache and .tar archives: budgets, restarts, partial files, unsafe members.

How the cache behaves when several processes share it (one download, owned partials, eviction that
skips what is being read) is in tests/test_lora_cache_processes.py and, through real servers, in
tests/test_replicas.py.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from flux_day.errors import InputError, LoraError
from flux_day.loras.archive import extract_lora
from flux_day.loras.cache import LoraCache


def write_partial(root: Path, name: str, size: int) -> Path:
    """`size` bytes in the partial `name` under `root`, as a download writes them."""
    path = root / name
    path.write_bytes(b"x" * size)
    return path


def put(cache: LoraCache, key: str, size: int) -> Path:
    with cache.filled(key, lambda partial: write_partial(cache.root, partial.name, size)) as path:
        return path


def present(cache: LoraCache, key: str) -> bool:
    with cache.reading(key) as path:
        return path is not None


def test_least_recently_used_files_go_first_when_over_budget(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=250)
    a = put(cache, "a", 100)
    b = put(cache, "b", 100)
    os.utime(a, (1, 1))
    os.utime(b, (2, 2))
    assert present(cache, "a")  # a is used again: b is now the least recently used
    put(cache, "c", 100)
    assert not present(cache, "b")
    assert present(cache, "a") and present(cache, "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, cache.path("c").name])


def test_a_file_larger_than_the_budget_is_kept_while_it_is_the_newest(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=50)
    put(cache, "old", 10)
    big = put(cache, "big", 100)
    assert big.exists() and not present(cache, "old")


def test_a_present_file_is_not_filled_again(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=1000)
    first = put(cache, "k", 10)

    def refuse(partial: Path) -> None:
        raise AssertionError("filled twice")

    with cache.filled("k", refuse) as again:
        assert again == first and again.read_bytes() == b"x" * 10


def test_a_failed_fill_leaves_nothing_and_the_next_one_fills(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, budget_bytes=1000)

    def broken(partial: Path) -> None:
        write_partial(tmp_path, partial.name, 5)  # as a download cut off half-way, leaving its partial
        raise OSError("the connection broke")

    with pytest.raises(OSError, match="broke"), cache.filled("k", broken):
        pass
    assert [p.name for p in tmp_path.iterdir()] == []  # the partial went with the failure
    assert put(cache, "k", 7).read_bytes() == b"x" * 7
    assert [p.name for p in tmp_path.iterdir()] == [cache.path("k").name]


def test_the_directory_is_the_index_across_restarts_and_abandoned_partials_are_cleared(
    tmp_path: Path,
) -> None:
    first = LoraCache(tmp_path, budget_bytes=10**6)
    path = put(first, "https://example.com/a.safetensors", 10)
    # As a process killed mid-download leaves them: a partial of a key whose lock nobody holds (and its
    # lock file), and one named otherwise, which no lock can keep.
    write_partial(tmp_path, f".partial-{'0' * 40}-some-host-1-abcd", 5)
    (tmp_path / f".lock-{'0' * 40}").touch()
    write_partial(tmp_path, ".partial-5", 5)
    second = LoraCache(tmp_path, budget_bytes=10**6)
    with second.reading("https://example.com/a.safetensors") as found:
        assert found == path
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert not present(second, "https://example.com/b.safetensors")


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
    with LoraError.for_input("replicate_weights"):
        name = extract_lora(io.BytesIO(data), target, max_bytes)
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
