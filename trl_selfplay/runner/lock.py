"""One run per `output_dir`: an exclusive `fcntl` lock on `<output_dir>/.lock`, held by the main process.

The kernel releases the lock when the process ends, however it ends (`kill -9` included), so a crashed run never
leaves a stale lock behind; the file itself stays and says who held it last. `flock` locks are not shared between
machines on every network filesystem: on several machines, launch each run once.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from trl_selfplay.errors import RecipeError

LOCK_NAME = ".lock"


class RunLock:
    """`with RunLock(output_dir):` or `acquire()` / `release()`; a held lock is one clear RecipeError."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RecipeError(
                f"{self.path.parent} is in use by another run ({holder}); two runs on one output_dir would overwrite "
                "each other's files. Wait for that run to finish (or stop it), or pass --output_dir=<another "
                "directory>."
            ) from None
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        owner = {}
    if not owner:
        return "its process is unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: {owner.get('command')}"
