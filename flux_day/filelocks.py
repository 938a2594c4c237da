"""Locks that hold across processes sharing one volume: whole-file `flock`, shared or exclusive, polled.

Replicas of the server may share the weights root and the LoRA cache. They coordinate through locks on
files in those folders: an exclusive lock while one of them writes something the others would also
write, a shared lock while one reads a file another might delete. `fcntl.flock` is called directly
rather than through the `filelock` package because readers need shared locks beside exclusive ones,
and filelock's reader/writer lock is SQLite, which is unsafe on network filesystems.

What this assumes of the filesystem under the shared folders:

- `flock` is seen by every process that mounts it, and a holder that dies (killed, OOM, node lost on a
  local disk) loses its locks, because the kernel closes its descriptors. True of local filesystems
  (ext4, xfs, and the bind mounts and overlayfs of containers on one machine), of NFSv4 and of NFSv3
  with lockd, where Linux turns `flock` into POSIX byte-range locks that the server keeps, and of
  CephFS. Not true with the NFS mount options `nolock`, `local_lock=flock` or `local_lock=all`, which
  keep locks on one client, nor of object-store FUSE mounts (s3fs, gcsfuse) or Lustre without
  `-o flock`: put the shared folders on a volume that has them.
- On NFS a client cut off from its server for longer than the lease (about 90 s) loses its locks
  without being told; the next replica can then take over what it was doing. Keep replicas and the
  server on one reliable network.
- `rename` and `unlink` within one directory are atomic.

Because NFS gives POSIX semantics (locks per process, not per descriptor, and dropped when the process
closes any descriptor of the file), each process also lets only one of its threads hold a given path
at a time, with one descriptor. Waiting polls rather than blocking in the kernel, so that a cancel Cog
raises into the waiting thread lands within a fraction of a second. A lock file may be deleted by the
holder of its exclusive lock: whoever takes a lock checks afterwards that the path still names the file
it locked, and starts again if not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO

from flux_day.cancel import stop_if_cancelled

FIRST_POLL_S = 0.01
LAST_POLL_S = 0.25


class LockTimeout(TimeoutError):
    """The lock was still held by another process when the caller's deadline passed."""


class HeldLock:
    """A lock this thread holds on `path`, through the open descriptor `file`."""

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path = path
        self.file = file

    def unlink(self) -> None:
        """Delete the locked file while still holding it: waiters on it see the change and start over."""
        if _names(self.path, self.file):
            os.unlink(self.path)


_threads_guard = threading.Lock()
_thread_locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()


@contextmanager
def hold(
    path: Path,
    *,
    shared: bool = False,
    create: bool = True,
    wait: bool = True,
    timeout_s: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[HeldLock | None]:
    """Hold a lock on `path` for the `with` block; None instead when it cannot be had.

    None when `wait` is False and another holder has it, or when `create` is False and the file is
    absent. With `wait`, waits (calling `on_wait` once if it has to) until it has it, or raises
    `LockTimeout` after `timeout_s`. Shared locks open the file read-only, exclusive ones read-write.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _threads_guard:
        thread_lock = _thread_locks.setdefault(str(Path(path).absolute()), threading.Lock())
    waiting = _Waiting(path, wait, deadline, on_wait)
    # A cancel Cog raises in the instant between this acquire and the `try` below would leave the
    # thread lock taken; callers that must never hang pass `timeout_s` (the LoRA cache does).
    if not waiting.until(lambda: thread_lock.acquire(blocking=False)):
        yield None
        return
    try:
        held = _lock(Path(path), shared, create, waiting)
        try:
            yield held
        finally:
            if held is not None:
                held.file.close()  # closing the descriptor releases the lock
    finally:
        thread_lock.release()


class _Waiting:
    """Retries an attempt with growing pauses, within a deadline, telling `on_wait` the first time."""

    def __init__(
        self, path: Path, wait: bool, deadline: float | None, on_wait: Callable[[], None] | None
    ) -> None:
        self.path, self.wait, self.deadline, self.on_wait = path, wait, deadline, on_wait

    def until(self, attempt: Callable[[], bool]) -> bool:
        pause = FIRST_POLL_S
        while not attempt():
            if not self.wait:
                return False
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise LockTimeout(f"{self.path} is still locked by another process")
            if self.on_wait is not None:
                self.on_wait()
                self.on_wait = None
            stop_if_cancelled()
            time.sleep(pause)
            pause = min(pause * 2, LAST_POLL_S)
        return True


def _lock(path: Path, shared: bool, create: bool, waiting: _Waiting) -> HeldLock | None:
    flags = (os.O_RDONLY if shared else os.O_RDWR) | (os.O_CREAT if create else 0)
    operation = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    while True:
        try:
            file = os.fdopen(os.open(path, flags, 0o644), "rb" if shared else "r+b", buffering=0)
        except FileNotFoundError:
            return None
        try:
            if not waiting.until(partial(_try_flock, file, operation)):
                file.close()
                return None
            if _names(path, file):
                return HeldLock(path, file)
        except OSError as error:
            if error.errno != errno.ESTALE:  # NFS: the file was deleted on another client
                file.close()
                raise
        except BaseException:
            file.close()
            raise
        file.close()  # the file was deleted or replaced while we waited: lock what the path names now


def _try_flock(file: BinaryIO, operation: int) -> bool:
    try:
        fcntl.flock(file.fileno(), operation)
    except BlockingIOError:
        return False
    return True


def _names(path: Path, file: BinaryIO) -> bool:
    """Whether `path` still names the file open as `file`."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(file.fileno())
    return (mine.st_ino, mine.st_dev) == (now.st_ino, now.st_dev)
