"""Locks across processes sharing a volume (`flock`, shared or exclusive, polled so a cancel lands),
and `publish`: write a file or folder into a shared folder once (lock, partial, atomic rename, sweep).

`fcntl.flock` directly: readers need shared locks beside exclusive ones, and the `filelock` package's
reader/writer lock is SQLite, unsafe on network filesystems. Assumed of the filesystem: `flock` is seen
by every client and dies with its holder (local disks, NFSv4, NFSv3 with lockd, CephFS, EFS; not NFS
`nolock`/`local_lock=`, s3fs/gcsfuse, Lustre without `-o flock`; an NFS client cut off past its ~90 s
lease loses its locks unwarned); `rename`/`unlink` in one folder are atomic. NFS locks are per process,
so one thread per process holds a path at a time. A holder may delete its lock file: a taker checks the
path still names the file it locked, else starts again.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import secrets
import shutil
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from flux_day.cancel import stop_if_cancelled

FIRST_POLL_S, LAST_POLL_S = 0.01, 0.25
PARTIAL, LOCK = ".partial-", ".lock-"


class LockTimeout(TimeoutError):
    """The lock was still held by another process when the caller's deadline passed."""


class HeldLock:
    """A lock this thread holds on `path`, through the open descriptor `file`."""

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path, self.file = path, file

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
    """Hold a lock on `path` for the block; None when `wait` is False and it is busy, or when `create`
    is False and the file is absent. Waiting calls `on_wait` once; `LockTimeout` after `timeout_s`."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def until(attempt: Callable[[], bool]) -> bool:
        nonlocal on_wait
        pause = FIRST_POLL_S
        while not attempt():
            if not wait:
                return False
            if deadline is not None and time.monotonic() > deadline:
                raise LockTimeout(f"{path} is still locked by another process")
            if on_wait is not None:
                on_wait()
                on_wait = None
            stop_if_cancelled()
            time.sleep(pause)
            pause = min(pause * 2, LAST_POLL_S)
        return True

    with _threads_guard:  # pass `timeout_s` to never hang: a cancel between acquire and `try` leaks it
        thread_lock = _thread_locks.setdefault(str(Path(path).absolute()), threading.Lock())
    if not until(lambda: thread_lock.acquire(blocking=False)):
        yield None
        return
    try:
        held = _lock(Path(path), shared, create, until)
        try:
            yield held
        finally:
            if held is not None:
                held.file.close()  # closing the descriptor releases the lock
    finally:
        thread_lock.release()


def _lock(
    path: Path, shared: bool, create: bool, until: Callable[[Callable[[], bool]], bool]
) -> HeldLock | None:
    flags = (os.O_RDONLY if shared else os.O_RDWR) | (os.O_CREAT if create else 0)
    operation = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    while True:
        try:
            file = os.fdopen(os.open(path, flags, 0o644), "rb" if shared else "r+b", buffering=0)
        except FileNotFoundError:
            return None
        try:
            if not until(functools.partial(_try_flock, file, operation)):
                file.close()
                return None
            if _names(path, file):
                return HeldLock(path, file)
        except BaseException as error:
            if getattr(error, "errno", None) != errno.ESTALE:  # NFS: deleted on another client
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


def publish(
    target: Path,
    write: Callable[[Path], None],
    *,
    lock: Path | None = None,
    partial: Path | None = None,
    missing: Callable[[], bool] | None = None,
    wait: bool = True,
    timeout_s: float | None = None,
    on_wait: Callable[[], None] | None = None,
    before_unlock: Callable[[bool], object] | None = None,
) -> bool | None:
    """Write `target` once among the processes sharing its folder, never showing a half one: under
    `lock`, if `missing()`, `write(partial)` then one rename. A failed write's partial is removed (a
    `partial` the caller names is kept, to resume); `before_unlock(wrote)` runs under the lock.
    Whether this call wrote `target`; None when `wait` is False and the lock is busy."""
    lock = lock or target.with_name(f"{LOCK}{target.name}")
    owned = f"{PARTIAL}{lock.name.removeprefix(LOCK)}-"
    with hold(lock, wait=wait, timeout_s=timeout_s, on_wait=on_wait) as held:
        if held is None:
            return None
        try:
            wrote = missing() if missing is not None else not target.exists()
            if wrote:
                _remove(target.parent, owned)  # their writers are gone: this process holds the lock
                host = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:40] or "host"
                path = partial or target.with_name(f"{owned}{host}-{os.getpid()}-{secrets.token_hex(4)}")
                try:
                    write(path)
                    _replace(path, target)
                except BaseException:
                    _remove(target.parent, owned)  # whatever the failed (or cancelled) write left
                    raise
            if before_unlock is not None:
                before_unlock(wrote)
            return wrote
        finally:
            held.unlink()


def _replace(partial: Path, target: Path) -> None:
    """Rename `partial` onto `target`; a folder already there is moved aside first, then deleted."""
    aside = partial.with_name(f"{partial.name}.replaced") if target.is_dir() else None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(partial, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_abandoned(folder: Path) -> None:
    """Delete the partials and lock files in `folder` whose owners are gone (their locks can be taken):
    a replica killed mid-write leaves nothing behind."""
    for partial in folder.glob(f"{PARTIAL}*"):
        name = partial.name.removeprefix(PARTIAL)
        # `<name>-<host>-<pid>-<random>`, where names and hosts may hold "-": try every split.
        if not any(_busy(folder / f"{LOCK}{name[:i]}") for i, c in enumerate(name) if c == "-"):
            partial.unlink(missing_ok=True)  # its writer held the lock until it renamed or removed it
    for lock_file in folder.glob(f"{LOCK}*"):
        with hold(lock_file, create=False, wait=False) as left:
            if left is not None:
                left.unlink()


def _busy(lock_file: Path) -> bool:
    with hold(lock_file, create=False, wait=False) as free:
        return free is None and lock_file.exists()


def _remove(folder: Path, prefix: str) -> None:
    for partial in folder.glob(f"{prefix}*"):
        partial.unlink(missing_ok=True)
