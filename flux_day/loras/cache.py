"""The LoRA disk cache: one ready .safetensors per resolved source, the directory is the index, and
any number of processes may share it (replicas on one volume).

A file is named by a hash of its source key, so a restarted server finds what it downloaded before.
The least recently used files go when the total passes `FLUX_DAY_LORA_CACHE_BYTES`. The processes
sharing the folder coordinate through file locks (`flux_day.filelocks` says what they assume of the
filesystem):

- `<hash>.safetensors` is held with a shared lock by whoever reads it, so eviction, which takes it
  exclusively without waiting and skips it when busy, never deletes a file under a reader.
- `.lock-<hash>` is held exclusively by whoever changes whether `<hash>.safetensors` exists: the one
  process that downloads it (the others wait, then read what it wrote: a LoRA asked of N replicas at
  once is downloaded once) and an evictor removing it. A lock file exists only while it is held.
- A download is written to `.partial-<hash>-<host>-<pid>-<random>` (host and pid for whoever looks;
  pids repeat across containers) and renamed into place, so no half file ever has a real name. Only
  the holder of `.lock-<hash>` writes such partials, so a partial whose key lock can be taken has no
  owner left (it crashed or was killed): the next process to start, or to fetch that key, removes it,
  and leaves alone every partial whose owner is still downloading.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from flux_day import filelocks

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
PARTIAL_PREFIX = ".partial-"
LOCK_PREFIX = ".lock-"
EVICTION_LOCK = f"{LOCK_PREFIX}evict"
EVICTION_WAIT_S = 60  # an eviction takes milliseconds: a longer wait means its holder is stuck
# Partials named otherwise come from an older version of this code, which had no owner lock: they are
# removed once older than any download can last (a live download writes to its partial continually).
UNOWNED_PARTIAL_AGE_S = 2 * 3600


class LoraCache:
    """Ready LoRA files under `root`, at most `budget_bytes` of them (the newest file always stays)."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_abandoned()

    def path(self, key: str) -> Path:
        """Where the file for `key` lives (whether or not it is there yet)."""
        return file_path(self.root, key)

    @contextmanager
    def reading(self, key: str, timeout_s: float | None = None) -> Iterator[Path | None]:
        """The cached file for `key`, marked as just used and kept from eviction until the block
        ends; None when absent. An evictor holds it for an instant: `timeout_s` is a safety net."""
        path = self.path(key)
        with filelocks.hold(path, shared=True, create=False, timeout_s=timeout_s) as held:
            if held is None:
                yield None
                return
            os.utime(path)
            yield path

    @contextmanager
    def filled(
        self,
        key: str,
        fill: Callable[[str], Path],
        timeout_s: float | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> Iterator[Path]:
        """The file for `key`, kept from eviction until the block ends. When absent, `fill(prefix)` writes
        it as a partial named with that prefix (in `root`): in one process only, among all that share the
        folder; the others wait for it (`on_wait` called once, `filelocks.LockTimeout` after `timeout_s`).
        Every file a failed fill wrote under that prefix is removed here, so `fill` need not clean up."""
        with self.reading(key, timeout_s) as path:
            if path is not None:
                yield path
                return
        digest = _digest(key)
        with ExitStack() as held:
            lock_file = self.root / f"{LOCK_PREFIX}{digest}"
            with filelocks.hold(lock_file, timeout_s=timeout_s, on_wait=on_wait) as key_lock:
                assert key_lock is not None  # waited for
                try:
                    if not self.path(key).exists():  # not filled by another process while this one waited
                        self._remove_partials(digest)  # their writers are gone: this process holds the key
                        try:
                            self._put(key, fill(f"{PARTIAL_PREFIX}{digest}-{_host()}-{os.getpid()}-"))
                        except BaseException:
                            self._remove_partials(digest)  # whatever the failed (or cancelled) fill wrote
                            raise
                    # Read-held before the key lock goes, so no evictor comes between.
                    path = held.enter_context(self.reading(key, timeout_s))
                finally:
                    key_lock.unlink()
            assert path is not None  # nobody removes it while its key lock is held
            yield path

    def _put(self, key: str, partial: Path) -> None:
        """Move a finished partial file into place for `key` (its key lock held) and evict beyond the
        budget."""
        path = self.path(key)
        os.replace(partial, path)
        self.evict(keep=path)

    def evict(self, keep: Path) -> None:
        """Remove least recently used files until the cache fits its budget; `keep` always stays, and so
        does a file being read or fetched (by any process) until a later eviction finds it free."""
        try:
            with filelocks.hold(self.root / EVICTION_LOCK, timeout_s=EVICTION_WAIT_S) as evicting:
                assert evicting is not None  # one evictor at a time
                try:
                    self._evict(keep)
                finally:
                    evicting.unlink()
        except filelocks.LockTimeout:
            log.warning(
                "LoRA cache: another process has been evicting for %d s; eviction left to later",
                EVICTION_WAIT_S,
            )

    def _evict(self, keep: Path) -> None:
        entries = []
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.budget_bytes:
                break
            if path == keep:
                continue
            if self._remove_if_free(path):
                total -= size
                log.info(
                    "LoRA cache over %d bytes: removed %s (%d bytes)", self.budget_bytes, path.name, size
                )
            else:
                log.info("LoRA cache over %d bytes: %s is in use, kept for now", self.budget_bytes, path.name)

    def discard(self, path: Path) -> None:
        """Remove a cached file that turned out not to be a usable LoRA, so it is fetched afresh (left
        for now if another process holds it: it is refused there too, and goes with the next try)."""
        if self._remove_if_free(path):
            log.info("LoRA cache: removed %s, which was refused", path.name)

    def _remove_if_free(self, path: Path) -> bool:
        """Delete the cached file `path` unless a process reads it or holds its key; whether it went."""
        with filelocks.hold(self.root / f"{LOCK_PREFIX}{path.name[: -len(SUFFIX)]}", wait=False) as key_lock:
            if key_lock is None:
                return False
            try:
                with filelocks.hold(path, create=False, wait=False) as file_lock:
                    if file_lock is None:
                        return False
                    file_lock.unlink()
                    return True
            finally:
                key_lock.unlink()

    def remove_abandoned(self) -> None:
        """Delete partials and lock files whose owners are gone (their locks can be taken); leave every
        one a live process holds. Runs at start, so a replica killed mid-download leaves nothing."""
        for partial in self.root.glob(f"{PARTIAL_PREFIX}*"):
            match = re.match(rf"{re.escape(PARTIAL_PREFIX)}([0-9a-f]{{40}})-", partial.name)
            if match is not None:
                with filelocks.hold(self.root / f"{LOCK_PREFIX}{match[1]}", wait=False) as key_lock:
                    if key_lock is not None:
                        try:
                            self._remove_partials(match[1])
                        finally:
                            key_lock.unlink()
            elif _age_s(partial) > UNOWNED_PARTIAL_AGE_S:
                partial.unlink(missing_ok=True)
        for lock_file in self.root.glob(f"{LOCK_PREFIX}*"):
            with filelocks.hold(lock_file, create=False, wait=False) as left:
                if left is not None:
                    left.unlink()

    def _remove_partials(self, digest: str) -> None:
        """Delete the partials of one key; the caller holds its key lock, so none has a live writer."""
        for partial in self.root.glob(f"{PARTIAL_PREFIX}{digest}-*"):
            partial.unlink(missing_ok=True)
            log.info("LoRA cache: removed %s, left by a download that did not finish", partial.name)


def file_path(root: Path, key: str) -> Path:
    """Where the cache in `root` keeps the file for `key`; reads nothing (a `LoraCache` clears partials)."""
    return Path(root) / (_digest(key) + SUFFIX)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:40] or "host"


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
