"""The LoRA cache shared by several processes, as replicas share a volume: real processes, real locks.

What a fleet relies on: a key asked of N processes at once is filled by one of them and read by all; a
process that starts while another fills leaves that fill alone, and the partial of a process killed
mid-fill is gone once the next one starts; eviction skips a file another process is reading; a lock
file deleted by its holder is never the one a waiter ends up holding.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flux_day import filelocks
from flux_day.loras.cache import LoraCache
from tests.harness.cache_process import CacheProcess

SIZE = 1000


@pytest.fixture
def spawn() -> Iterator[Callable[..., CacheProcess]]:
    """Start `CacheProcess`es; any still running when the test ends (a failed one) is killed."""
    started: list[CacheProcess] = []

    def start(*args: str | int | float | Path) -> CacheProcess:
        started.append(CacheProcess(*args))
        return started[-1]

    yield start
    for process in started:
        if process.process.poll() is None:
            process.kill()


def leftovers(root: Path) -> list[str]:
    """Partials and lock files in the cache folder."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".partial-", ".lock-")))


def content(key: str) -> bytes:
    return (key * SIZE).encode()[:SIZE]


def put(cache: LoraCache, key: str) -> None:
    def fill(partial: Path) -> None:
        partial.write_bytes(content(key))

    with cache.filled(key, fill):
        pass


def test_a_key_asked_of_three_processes_at_once_is_filled_once_and_read_by_all(
    tmp_path: Path, spawn: Callable[..., CacheProcess]
) -> None:
    root, count = tmp_path / "cache", tmp_path / "fills"
    processes = [spawn("fill", root, "new-lora", SIZE, 1.0, count) for _ in range(3)]
    answers = [process.line() for process in processes]
    for process in processes:
        process.finish()
    assert len(count.read_text().splitlines()) == 1
    assert len(set(answers)) == 1 and answers[0].startswith("done "), answers
    assert leftovers(root) == []


def test_a_start_leaves_a_live_fill_alone_and_clears_a_killed_one(
    tmp_path: Path, spawn: Callable[..., CacheProcess]
) -> None:
    root = tmp_path / "cache"
    filling = spawn("stall", root, "new-lora")
    assert filling.line() == "writing"
    (partial,) = root.glob(".partial-*")
    LoraCache(root, budget_bytes=10**6)  # another replica starts while the download runs
    assert partial.exists()
    filling.kill()  # SIGKILL: no clean-up of its own
    assert partial.exists()
    LoraCache(root, budget_bytes=10**6)  # the next replica to start
    assert leftovers(root) == []


def test_eviction_skips_a_file_another_process_is_reading_and_takes_it_once_free(
    tmp_path: Path, spawn: Callable[..., CacheProcess]
) -> None:
    cache = LoraCache(tmp_path, budget_bytes=int(SIZE * 2.5))
    put(cache, "read")
    reader = spawn("read", tmp_path, "read")
    assert reader.line() == "holding"
    put(cache, "b")
    put(cache, "c")  # over budget: "read" is the least recently used, but busy
    assert [cache.path(k).exists() for k in ("read", "b", "c")] == [True, False, True]
    assert cache.path("read").read_bytes() == content("read")
    reader.finish()
    put(cache, "d")
    assert [cache.path(k).exists() for k in ("read", "c", "d")] == [False, True, True]
    assert leftovers(tmp_path) == []


def test_a_waiter_never_ends_up_holding_a_lock_file_its_holder_deleted(
    tmp_path: Path, spawn: Callable[..., CacheProcess]
) -> None:
    path = tmp_path / ".lock-x"
    holder = spawn("lock", path)
    assert holder.line() == "locked"
    waiting = threading.Event()
    got: list[tuple[int, int]] = []

    def wait_for_it() -> None:
        with filelocks.hold(path, on_wait=waiting.set) as held:
            assert held is not None
            mine, named = os.fstat(held.file.fileno()), os.stat(path)
            got.append(((mine.st_ino, mine.st_dev), (named.st_ino, named.st_dev)))

    thread = threading.Thread(target=wait_for_it)
    thread.start()
    assert waiting.wait(10)  # the waiter has the old file open and polls its lock
    holder.tell("unlink")
    holder.finish()
    thread.join(10)
    (pair,) = got
    assert pair[0] == pair[1]  # it holds the file the path names now, not the deleted one


def test_a_busy_lock_is_not_taken_without_waiting_and_a_deadline_is_kept(
    tmp_path: Path, spawn: Callable[..., CacheProcess]
) -> None:
    path = tmp_path / ".lock-y"
    holder = spawn("lock", path)
    assert holder.line() == "locked"
    with filelocks.hold(path, wait=False) as held:
        assert held is None
    try:
        with filelocks.hold(path, timeout_s=0.3):
            raise AssertionError("got a lock another process holds")
    except filelocks.LockTimeout:
        pass
    holder.finish()
    with filelocks.hold(path, wait=False) as held:
        assert held is not None
