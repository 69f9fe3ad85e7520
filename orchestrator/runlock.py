"""One driver per run directory: a lock file held (flock) for as long as the driver lives.

The kernel drops the lock when the process ends, however it ends, so a crashed driver never
leaves a stale lock behind; the file itself only says who holds it.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path


class RunLocked(RuntimeError):
    """Another driver holds this run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "driver.lock"
        self._file = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLocked(f"run directory {self.path.parent} is in use by {holder}; stop that driver first "
                            "(or give this run another name)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
