"""A lock per VM and target SR, held across threads and processes, so that two runs (a daemon's
overlapping ticks, another job, a `xencr run` started by hand) never replicate the same VM to the
same SR at once.

Each lock is a file ``<locks dir>/<vm uuid>_<sr uuid>.lock`` taken with ``flock`` on a fresh open:
flock belongs to the open file description, so two holders in one process conflict exactly like
two processes do, and the kernel releases it when its holder dies (no stale lock after a kill).
The holder writes who it is into the file so that a refused run can name it. The files are never
deleted: unlinking a lock file races with a process that has just opened it.

The runner takes its locks through a `Locker`: `FileLocker` (these files: one host), or with a
PostgreSQL state the database's leases (`xencr.coordination.leases`: several hosts).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol


def lock_dir(state_path: Path) -> Path:
    """Where the locks of the runs sharing a state database live."""
    return state_path.parent / "locks"


def _path(directory: Path, vm_uuid: str, sr_uuid: str) -> Path:
    return directory / f"{vm_uuid.lower()}_{sr_uuid.lower()}.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the job, its process (or the cluster worker running it), and since when."""

    job_id: str
    job_name: str
    pid: int
    since: datetime
    worker: str | None = None  # a database lease's holder (`coordination.leases`)

    def describe(self) -> str:
        since = self.since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        if self.worker is not None:
            return f"job {self.job_name} on worker {self.worker} since {since}"
        return f"job {self.job_name} (pid {self.pid}) since {since}"


class Held(Protocol):
    """A lock taken: ``release()`` frees it (idempotent)."""

    def release(self) -> None: ...


class Locker(Protocol):
    """Where the per-(VM, SR) locks live, as the runner uses them."""

    def try_lock(self, vm_uuid: str, sr_uuid: str, job_name: str, *, job_id: str = "") -> Held | None:
        """Take the lock without waiting; ``None`` when someone holds it."""
        ...

    def read_holder(self, vm_uuid: str, sr_uuid: str) -> Holder | None:
        """Who holds it, or ``None`` if nobody says so."""
        ...

    def still_held(self, vm_uuid: str, sr_uuid: str) -> bool:
        """Whether a lock this locker took is still its own (asked before a commit: a lease
        can lapse, a flock cannot while its process lives)."""
        ...


@dataclass(frozen=True)
class FileLocker:
    """The flock files of one host (`try_lock`, `read_holder` on ``directory``)."""

    directory: Path

    def try_lock(self, vm_uuid: str, sr_uuid: str, job_name: str, *, job_id: str = "") -> Held | None:
        return try_lock(self.directory, vm_uuid, sr_uuid, job_name, job_id=job_id)

    def read_holder(self, vm_uuid: str, sr_uuid: str) -> Holder | None:
        return read_holder(self.directory, vm_uuid, sr_uuid)

    def still_held(self, vm_uuid: str, sr_uuid: str) -> bool:
        return True


class Lock:
    """A held lock; ``release()`` (or leaving the ``with`` block) frees it. Idempotent."""

    def __init__(self, path: Path, fd: int, holder: Holder) -> None:
        self.path = path
        self.holder = holder
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            # Emptied first, so a reader never names a holder that has gone.
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the description drops the flock

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock(directory: Path, vm_uuid: str, sr_uuid: str, job_name: str, *, job_id: str = "") -> Lock | None:
    """Take the lock of (VM, SR) for ``job_name`` without waiting; ``None`` when someone holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = _path(directory, vm_uuid, sr_uuid)
    # os.open descriptors are not inherited by child processes: a spawned helper cannot keep a lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    holder = Holder(job_id, job_name, os.getpid(), datetime.now(UTC))
    text = json.dumps(
        {
            "job_id": holder.job_id,
            "job": holder.job_name,
            "pid": holder.pid,
            "since": holder.since.isoformat(),
        }
    )
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (text + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return Lock(path, fd, holder)


def read_holder(directory: Path, vm_uuid: str, sr_uuid: str, *, wait: float = 1.0) -> Holder | None:
    """Who holds the lock of (VM, SR), or ``None`` if nobody says so. A holder writes its line
    just after taking the lock, so an empty file is read again for up to ``wait`` seconds."""
    path = _path(directory, vm_uuid, sr_uuid)
    deadline = time.monotonic() + wait
    while True:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return Holder(
                str(data["job_id"]), str(data["job"]), int(data["pid"]), datetime.fromisoformat(data["since"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def holder(directory: Path, vm_uuid: str, sr_uuid: str) -> str:
    """One phrase naming the holder: ``job web (pid 123) since 2026-01-02 03:04:05Z``."""
    h = read_holder(directory, vm_uuid, sr_uuid)
    return h.describe() if h is not None else "another run (holder unknown)"
