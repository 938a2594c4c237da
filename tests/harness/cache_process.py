"""Another process using a LoRA cache folder or a lock file, as a replica on the same volume would.

`python -m tests.harness.cache_process COMMAND ROOT ARG...`, driven through `CacheProcess`:

- `read ROOT KEY`: hold the cached file of KEY as a reader; prints `holding` (or `absent`).
- `fill ROOT KEY SIZE PAUSE_S COUNT_FILE`: get KEY through `LoraCache.filled`; a fill appends a line to
  COUNT_FILE, writes SIZE bytes (its pid's digits) slowly over PAUSE_S; prints `done <sha256 of file>`.
- `stall ROOT KEY`: start filling KEY, print `writing` once part is written, then never finish.
- `lock PATH`: hold PATH exclusively; prints `locked`; on `unlink` deletes it while held.

Each waits for a line on stdin (or its closing) before it lets go and exits.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from flux_day import filelocks
from flux_day.loras.cache import LoraCache

ROOT = Path(__file__).resolve().parents[2]


class CacheProcess:
    """One child process running a command of this module; `line()` reads what it printed."""

    def __init__(self, *args: str | Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.cache_process", *map(str, args)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def tell(self, text: str = "go") -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def finish(self) -> str:
        """Let it go; return the rest of what it printed."""
        out, _ = self.process.communicate("go\n", timeout=60)
        return out.strip()

    def kill(self) -> None:
        self.process.kill()
        self.process.communicate(timeout=60)


def main(command: str, *args: str) -> None:
    if command == "lock":
        with filelocks.hold(Path(args[0])) as held:
            assert held is not None
            print("locked", flush=True)
            if sys.stdin.readline().strip() == "unlink":
                held.unlink()
                sys.stdin.readline()
        return
    cache = LoraCache(Path(args[0]), budget_bytes=10**9)
    key = args[1]
    if command == "read":
        with cache.reading(key) as path:
            print("absent" if path is None else "holding", flush=True)
            sys.stdin.readline()
    elif command == "fill":
        size, pause_s, count_file = int(args[2]), float(args[3]), Path(args[4])

        def fill(partial: Path) -> None:
            with count_file.open("a") as count:
                count.write(f"{os.getpid()}\n")
            data = str(os.getpid()).encode() * size
            with partial.open("wb") as out:
                for piece in range(10):
                    out.write(data[piece * size // 10 : (piece + 1) * size // 10])
                    time.sleep(pause_s / 10)

        with cache.filled(key, fill) as path:
            print(f"done {hashlib.sha256(path.read_bytes()).hexdigest()}", flush=True)
            sys.stdin.readline()
    elif command == "stall":

        def never(partial: Path) -> None:
            with partial.open("wb") as out:
                out.write(b"half a file")
                out.flush()
                print("writing", flush=True)
                sys.stdin.readline()
                time.sleep(3600)
            raise AssertionError("killed before this")

        with cache.filled(key, never):
            pass


if __name__ == "__main__":
    main(*sys.argv[1:])
