"""The LoRA disk cache: one ready .safetensors per resolved source; the folder is the index, shared by
any number of processes (replicas on one volume). A file is read under a shared lock, so eviction (which
takes it exclusively, skipping it when busy) never deletes it under a reader; it is written by
`filelocks.publish` under `.lock-<hash>`, which an evictor also takes. Least recently used files go first.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from flux_day import filelocks
from flux_day.filelocks import LOCK

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
EVICTION_WAIT_S = 60  # an eviction takes milliseconds: a longer wait means its holder is stuck


class LoraCache:
    """Ready LoRA files under `root`, at most `budget_bytes` of them (the newest file always stays)."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        filelocks.remove_abandoned(self.root)

    def path(self, key: str) -> Path:
        return file_path(self.root, key)

    def _key_lock(self, path: Path) -> Path:
        return self.root / f"{LOCK}{path.name.removesuffix(SUFFIX)}"

    @contextmanager
    def reading(self, key: str, timeout_s: float | None = None) -> Iterator[Path | None]:
        """The cached file for `key` (None when absent), marked as just used and kept from eviction
        until the block ends. An evictor holds it for an instant: `timeout_s` is a safety net."""
        path = self.path(key)
        with filelocks.hold(path, shared=True, create=False, timeout_s=timeout_s) as held:
            if held is not None:
                os.utime(path)
            yield None if held is None else path

    @contextmanager
    def filled(
        self,
        key: str,
        fill: Callable[[Path], None],
        timeout_s: float | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> Iterator[Path]:
        """The file for `key`, kept from eviction until the block ends; when absent, `fill(partial)`
        writes it in one process among all sharing the folder (the others wait; `LockTimeout`)."""
        with self.reading(key, timeout_s) as path:
            if path is not None:
                yield path
                return
        path = self.path(key)
        with ExitStack() as held:

            def read_held(wrote: bool) -> None:  # before the key lock goes, so no evictor comes between
                if wrote:
                    self.evict(keep=path)
                held.enter_context(self.reading(key, timeout_s))

            lock = self._key_lock(path)
            filelocks.publish(
                path, fill, lock=lock, timeout_s=timeout_s, on_wait=on_wait, before_unlock=read_held
            )
            yield path

    def evict(self, keep: Path) -> None:
        """Remove least recently used files until the cache fits its budget; `keep` stays, and so does
        a file being read or fetched (by any process) until a later eviction finds it free."""
        try:
            with filelocks.hold(self.root / f"{LOCK}evict", timeout_s=EVICTION_WAIT_S) as evicting:
                assert evicting is not None  # one evictor at a time
                try:
                    entries = []
                    for path in self.root.glob(f"*{SUFFIX}"):
                        with suppress(FileNotFoundError):
                            entries.append((path.stat(), path))
                    total = sum(stat.st_size for stat, _ in entries)
                    for stat, path in sorted(entries, key=lambda entry: entry[0].st_mtime):
                        if total <= self.budget_bytes:
                            break
                        if path != keep and self._remove_if_free(path):
                            total -= stat.st_size
                            log.info("LoRA cache over %d bytes: removed %s", self.budget_bytes, path.name)
                finally:
                    evicting.unlink()
        except filelocks.LockTimeout:
            log.warning(
                "LoRA cache: another process has been evicting for %d s; left to later", EVICTION_WAIT_S
            )

    def discard(self, path: Path) -> None:
        """Remove a cached file that turned out not to be a usable LoRA, so it is fetched afresh (left
        if another process holds it: refused there too, it goes with the next try)."""
        if self._remove_if_free(path):
            log.info("LoRA cache: removed %s, which was refused", path.name)

    def _remove_if_free(self, path: Path) -> bool:
        """Delete the cached file `path` unless a process reads it or holds its key; whether it went."""
        with filelocks.hold(self._key_lock(path), wait=False) as key_lock:
            if key_lock is None:
                return False
            try:
                with filelocks.hold(path, create=False, wait=False) as file_lock:
                    if file_lock is not None:
                        file_lock.unlink()
                    return file_lock is not None
            finally:
                key_lock.unlink()


def file_path(root: Path, key: str) -> Path:
    """Where the cache in `root` keeps the file for `key`."""
    return Path(root) / (hashlib.sha256(key.encode()).hexdigest()[:40] + SUFFIX)
