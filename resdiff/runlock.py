"""``RUN/.lock``: one process writes a run directory at a time (``RunLock``, a kernel lock on the file)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Callable

from .errors import UsageError
from .layout import LOCK

__all__ = ["RunLock"]


_OPEN: set[int] = set()  # the lock files' descriptors this process holds


def _close_in_child() -> None:
    """In a forked child (a DataLoader worker), close the inherited lock descriptors: the kernel lock then
    belongs to the process that took it alone, and goes the moment that process dies, not with its last child."""
    for fd in _OPEN:
        with contextlib.suppress(OSError):
            os.close(fd)
    _OPEN.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""


def _owner(text: str) -> str:
    """Who a lock file's text names ("pid 123 on host"), or "another process" when it names no one readable."""
    try:
        owner = json.loads(text)
        return f"pid {int(owner['pid'])} on {owner['host']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (its owner may have removed it while we opened it)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _release(path: Path, fd: int, pid: int) -> None:
    """Remove the lock file and let go of its kernel lock (at exit, on errors, or when the RunLock is collected).
    Only the process that took it does: a forked child has closed its copy, and its descriptor number means
    something else there."""
    if os.getpid() != pid or fd not in _OPEN:
        return
    _OPEN.discard(fd)
    if _same_file(fd, path):  # removed first, so that nobody can lock the file on its way out
        with contextlib.suppress(OSError):
            path.unlink()
    os.close(fd)  # this drops the kernel lock


class RunLock:
    """``RUN/.lock``: one process writes a run directory at a time.

    Ownership is a kernel lock (``flock``) on the file, held while the run lives: the kernel lets one open
    file hold it and drops it when its process ends, however it ends (SIGKILL, a crash, an elastic restart),
    so no process ID is ever judged. PIDs and host names mislead across PID namespaces (two containers
    with one host name) and across machines; the lock does not, on a local disk and on network filesystems
    with working locks (NFS). The file also names the holder, for the message a second run gets:
    a one-line UsageError. A file left by a dead run is taken over with a warning. ``release`` (also run at
    interpreter exit and when the object is collected) removes the file and lets go of the lock.
    """

    def __init__(self, run_dir: str | Path, warn: Callable[[str], None] = print):
        self.run_dir, self.path, self.warn = Path(run_dir), Path(run_dir) / LOCK, warn
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> None:
        if self.held:
            return
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UsageError(f"cannot write to run directory {self.run_dir}: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                owner = _owner(_read(fd))
                os.close(fd)
                if isinstance(err, BlockingIOError):
                    raise UsageError(
                        f"{self.run_dir} is in use by {owner}, which holds the lock on {self.path}; "
                        f"wait for that run to end or stop it"
                    ) from None
                raise UsageError(f"cannot lock {self.path} ({err.strerror}); put the run directory on a filesystem "
                                 f"with file locks") from None
            if not _same_file(fd, self.path):  # its owner removed it on the way out: lock the file there now
                os.close(fd)
                continue
            left = _read(fd)
            token = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": round(time.time())})
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, token.encode(), 0)
            except OSError as err:
                os.close(fd)
                raise UsageError(f"cannot write to run directory {self.run_dir}: {err.strerror}") from None
            _OPEN.add(fd)
            self._finalizer = weakref.finalize(self, _release, self.path, fd, os.getpid())  # runs at exit too
            if left.strip():
                self.warn(f"warning: {self.path} was left by {_owner(left)}, which is no longer running; taking it over")
            return
        raise UsageError(f"cannot take {self.path}: other processes keep creating it; is another run starting on {self.run_dir}?")

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # calls _release once, and not again at exit
        self._finalizer = None
