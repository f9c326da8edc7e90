"""The run folder: made writable before anything is written, one writer at a time, and set aside (never
deleted) when the user asks to start over.

One writer: ``train`` holds an OS-level lock on ``workdir/.lock`` (``fcntl.flock``) for as long as it runs.
The kernel drops the lock when the process ends in any way, kill -9 included, so a lock is never stale; the
file itself only records who holds it (PID, host, start time) for the error message. Multi-process runs take
it on process 0 only. ``flock`` works on local file systems and on NFSv4 (Linux emulates it there with POSIX
locks); on a file system without locks the lock is held by nobody and the run goes on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time

from fastgpu_jax.errors import WorkdirError

LOCK_FILE = ".lock"
# What --restart moves into workdir/restarted/N/ so that step 0 starts on a clean folder.
RUN_FILES = ("checkpoints", "checkpoints_corrupt", "checkpoints_best", "checkpoints_best_corrupt", "metrics.jsonl",
             "config.json", "tensorboard", "profile")


def prepare(workdir: str) -> str:
    """The absolute workdir, created if needed; a one-line WorkdirError if it is a file or not writable."""
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise WorkdirError(f"cannot create workdir {workdir}: {err.strerror or err}") from err
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir} is not writable by this user")
    ckpt = os.path.join(workdir, "checkpoints")
    if os.path.exists(ckpt) and not os.path.isdir(ckpt):
        raise WorkdirError(f"{ckpt} is not a directory; move that file away (it is not a checkpoint folder)")
    return workdir


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir's one-writer lock, or raises WorkdirError at once."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.workdir, self.enabled, self._fd = workdir, enabled, None

    def __enter__(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WorkdirError(f"cannot create the lock file {self.path}: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"workdir {self.workdir} is in use by another train process ({holder}); wait "
                                   "for it to end or stop it, or use another --workdir") from None
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return self  # no locks on this file system: documented above
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (unlinking it would race)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"PID {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"


def holds_run(workdir: str) -> bool:
    """Whether the workdir holds checkpoints, set-aside checkpoints or metrics of an earlier run."""
    for name in ("checkpoints", "checkpoints_corrupt"):
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and any(not n.startswith(".") for n in os.listdir(path)):
            return True
    return False


def remove_if_empty_run(workdir: str) -> bool:
    """Removes a workdir that this process created and that holds nothing of a run (no checkpoint, no
    metrics row): what a run that failed before logging anything leaves. Returns whether it was removed."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    if holds_run(workdir) or (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        return False
    shutil.rmtree(workdir, ignore_errors=True)
    return not os.path.exists(workdir)


def set_aside_for_restart(workdir: str) -> str | None:
    """--restart: moves the earlier run's files into ``workdir/restarted/N/`` (N = 1, 2, ...); returns that
    folder, or None when there was nothing to move. Nothing is deleted."""
    present = [n for n in RUN_FILES if os.path.exists(os.path.join(workdir, n))]
    present += sorted(n for n in os.listdir(workdir) if n.startswith("metrics.jsonl.") and n.endswith(".bak"))
    if not present:
        return None
    n = 1
    while os.path.exists(os.path.join(workdir, "restarted", str(n))):
        n += 1
    dest = os.path.join(workdir, "restarted", str(n))
    os.makedirs(dest)
    for name in present:
        shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
    return dest
