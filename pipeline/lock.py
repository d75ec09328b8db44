"""One writer per workdir: a lock file holding the owner's PID, host and start time.

Two `run` commands on the same workdir would interleave manifest writes and overwrite each
other's artifacts, so the second one refuses with a clear message. A lock left by a process
that no longer exists (killed with SIGKILL, machine rebooted) is detected and replaced.
The lock is created with O_CREAT | O_EXCL, which is atomic on local file systems.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".pipeline.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """Context manager: hold `<workdir>/.pipeline.lock` for the duration of a run."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK_NAME
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Take the lock, replacing a stale one; raise :class:`ConfigError` if it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    # Being written this instant, or garbage: a lock without a readable PID
                    # older than a few seconds is stale.
                    if time.time() - self.path.stat().st_mtime < 5:
                        raise ConfigError(f"workdir {self.path.parent} is being locked by another run right now") from None
                elif holder.get("host") != me["host"]:
                    raise ConfigError(
                        f"workdir {self.path.parent} is locked by PID {holder.get('pid')} on host {holder.get('host')} "
                        f"(since {holder.get('started')}); if that run is gone, delete {self.path}"
                    ) from None
                elif _alive(int(holder.get("pid", -1))):
                    raise ConfigError(
                        f"workdir {self.path.parent} is in use by another run (PID {holder['pid']}, since "
                        f"{holder.get('started')}); wait for it to finish, or use another pipeline.workdir"
                    ) from None
                log.warning("removing a stale lock left by PID %s (no longer running)", holder and holder.get("pid"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise ConfigError(f"could not take the lock {self.path}: another run keeps re-creating it")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
