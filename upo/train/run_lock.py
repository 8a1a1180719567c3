"""The output dir's lock: one live run per ``--output-dir``.

``fcntl.flock`` on ``<output-dir>/.upo-train.lock``, held by rank 0 for the run's life. The
kernel drops the lock when the process ends, however it ends (SIGKILL and crashes included), so
a lock is never stale: a leftover file whose owner is gone is simply taken over. The owner's pid,
host and start time are written inside, for the message that refuses a second run.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from upo.train.errors import UserError

try:
    import fcntl
except ImportError:  # not Unix: no lock (the one-run-per-dir check still applies)
    fcntl = None

LOCK_NAME = ".upo-train.lock"


class RunLock:
    """An exclusive, non-blocking lock on a folder; :meth:`acquire` raises :class:`UserError` if taken."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> "RunLock":
        try:
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as err:
            raise UserError(f"--output-dir {self.path.parent} is not writable ({err.strerror or err})") from None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live process
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                raise UserError(f"--output-dir {self.path.parent} is in use by another upo-train run ({owner}); "
                                "wait for it to end, or choose another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        """Unlock (the file stays: removing it would race with a run that is opening it)."""
        if self._file is None:
            return
        if fcntl is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None
