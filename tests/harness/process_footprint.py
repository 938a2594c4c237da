"""What a soak measures about a running server: its processes and the folders it writes.

RSS, threads and open descriptors of the server's processes; entries in its TMPDIR, files in the LoRA
cache and in coglet's per-prediction folders.

Kept apart from `scripts/soak.py` so that reading /proc and counting files is one piece, independent of
which requests are sent and how the report judges the numbers.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.harness.cog_server import CogServer

# coglet keeps a folder per prediction (`<id>/inputs`, `<id>/outputs`) here, whatever TMPDIR says.
COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")
THREAD_SETTLE_S = 12.0  # tokio ends an idle blocking-pool thread after 10 s


@dataclass(frozen=True)
class Snapshot:
    """The server's footprint at one moment."""

    fds: int
    fd_kinds: Counter[str]
    threads: int
    tmp_entries: list[str]
    coglet_dirs: int
    coglet_files: int
    lora_cache_files: int


def read_status(pid: int, name: str) -> int:
    """A number from /proc/<pid>/status (`VmRSS` in KiB, `Threads`); 0 for a process that has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_kind(target: str) -> str:
    """`socket:[123]` -> `socket`, a path -> its folder: fds grouped, so a diff says what leaked."""
    if target.startswith("/"):
        return f"{Path(target).parent}/*"
    if target.startswith("anon_inode:"):
        return target
    return target.split(":[", 1)[0]


def open_fds(pids: list[int]) -> Counter[str]:
    """Open descriptors of `pids`, counted by kind (see `fd_kind`)."""
    kinds: Counter[str] = Counter()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            entries = list(fd_dir.iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                kinds[fd_kind(str(entry.readlink()))] += 1
            except OSError:
                continue
    return kinds


def count_files(root: Path) -> int:
    """Files (not folders) under `root`; 0 when it does not exist."""
    return sum(1 for path in root.rglob("*") if not path.is_dir()) if root.exists() else 0


def tree(root: Path) -> list[str]:
    """Every file and folder under `root`, relative, sorted."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")) if root.exists() else []


class Footprint:
    """Reads a server's processes and folders; knows which coglet folders are this soak's (by id)."""

    def __init__(self, server: CogServer, tmp: Path, lora_cache: Path, id_prefix: str) -> None:
        self.server, self.tmp, self.lora_cache, self.id_prefix = server, tmp, lora_cache, id_prefix

    def coglet_dirs(self) -> list[Path]:
        return sorted(COGLET_PREDICTIONS.glob(f"{self.id_prefix}*")) if COGLET_PREDICTIONS.exists() else []

    def rss_kib(self) -> tuple[int, int]:
        """VmRSS of all the server's processes together and of the largest: cheap enough for every request."""
        rss = [read_status(pid, "VmRSS") for pid in self.server.worker_pids()]
        return sum(rss), max(rss, default=0)

    def take(self, threads_at_most: int | None = None) -> Snapshot:
        """RSS, descriptors and folder contents now.

        With `threads_at_most` (the count at the start), threads are looked at again for a while when
        there are more: coglet's runtime (tokio) keeps an idle blocking-pool thread for 10 s before it
        ends it, so a thread count right after a burst of requests is not yet what stays.
        """
        pids = self.server.worker_pids()
        threads = sum(read_status(pid, "Threads") for pid in pids)
        deadline = time.monotonic() + THREAD_SETTLE_S
        while threads_at_most is not None and threads > threads_at_most and time.monotonic() < deadline:
            time.sleep(0.5)
            threads = sum(read_status(pid, "Threads") for pid in pids)
        # Sockets of the response just sent close a moment later: the fewest of a few looks counts.
        looks = []
        for _ in range(4):
            looks.append(open_fds(pids))
            time.sleep(0.1)
        fd_kinds = min(looks, key=lambda kinds: kinds.total())
        coglet = self.coglet_dirs()
        return Snapshot(
            fds=fd_kinds.total(),
            fd_kinds=fd_kinds,
            threads=threads,
            tmp_entries=tree(self.tmp),
            coglet_dirs=len(coglet),
            coglet_files=sum(count_files(folder) for folder in coglet),
            lora_cache_files=count_files(self.lora_cache),
        )

    def remove_coglet_dirs(self) -> None:
        """coglet never removes its per-prediction folders (replicate/cog#3096): this soak's go here."""
        for path in self.coglet_dirs():
            shutil.rmtree(path, ignore_errors=True)
