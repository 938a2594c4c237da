"""The LoRA disk cache: one ready .safetensors per resolved source, the directory is the index.

A file is named by a hash of its source key, so a restarted server finds what it downloaded before.
Files are written as partials and renamed into place, so a crash never leaves a half file under a real
name (partials left by a crash are removed at start). The least recently used files go when the total
passes `FLUX_DAY_LORA_CACHE_BYTES`. One lock per key makes two requests for one source download once
(Cog runs one worker process, so threads are the concurrency to guard).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from flux_day.loras.fetch import PARTIAL_PREFIX

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


class LoraCache:
    """Ready LoRA files under `root`, at most `budget_bytes` of them (the newest file always stays)."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        for partial in self.root.glob(f"{PARTIAL_PREFIX}*"):
            partial.unlink(missing_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def path(self, key: str) -> Path:
        """Where the file for `key` lives (whether or not it is there yet)."""
        return self.root / (hashlib.sha256(key.encode()).hexdigest()[:40] + SUFFIX)

    def get(self, key: str) -> Path | None:
        """The cached file for `key`, marked as just used; None when absent."""
        path = self.path(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def put(self, key: str, partial: Path) -> Path:
        """Move a finished partial file into place for `key` and evict beyond the budget."""
        path = self.path(key)
        os.replace(partial, path)
        self.evict(keep=path)
        return path

    def discard(self, path: Path) -> None:
        """Remove a cached file that turned out not to be a usable LoRA, so it is fetched afresh."""
        path.unlink(missing_ok=True)
        log.info("LoRA cache: removed %s, which was refused", path.name)

    def lock(self, key: str) -> threading.Lock:
        """The lock held while `key` is being fetched."""
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def evict(self, keep: Path) -> None:
        """Remove least recently used files until the cache fits its budget; `keep` always stays."""
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
            path.unlink(missing_ok=True)
            total -= size
            log.info("LoRA cache over %d bytes: removed %s (%d bytes)", self.budget_bytes, path.name, size)
