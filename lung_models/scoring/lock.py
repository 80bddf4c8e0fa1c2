"""The output folder's scoring lock: one run at a time per output folder, released even on kill -9."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lung_models.fileutil import utc_now

LOCK_NAME = ".scoring.lock"
# How long a run waits for another run on the same output folder (a long night's run) before failing.
DEFAULT_LOCK_TIMEOUT = 6 * 3600.0


class ScoringLockTimeout(RuntimeError):
    """Another scoring run held the output folder's lock for longer than the timeout."""


# --------------------------------------------------------------------------------------------- lock
def _read_holder(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _lock_timeout_message(path: Path, timeout: float) -> str:
    info = _read_holder(path)
    if info.get("pid"):
        holder = (f"pid {info['pid']} on host {info.get('host', '?')}, started {info.get('started_utc', '?')}"
                  + (f", {info['label']}" if info.get("label") else ""))
        advice = (f"Let it finish, or, if that process is hung, stop it (`kill {info['pid']}` on "
                  f"{info.get('host', 'its host')}) and rerun")
    else:
        holder = "holder unknown: it has not written its pid yet"
        advice = "Let it finish, or find and stop it (`fuser -v <lock>` lists it) and rerun"
    return (f"another scoring run holds the lock {path} ({holder}); gave up after waiting {timeout:g} s. "
            f"{advice}. The lock is released automatically when its holder exits, even if killed; "
            "do not delete the lock file.")


class OutputNotWritable(PermissionError):
    """The output folder (or a file the scorer keeps in it) cannot be written by this user."""

    def __init__(self, directory: str | os.PathLike, detail: str) -> None:
        super().__init__(f"{directory}: the scoring output folder cannot be written ({detail}); give the user "
                         "that runs the scorer write access to it (and to the ledger, lock and CSVs in it), or "
                         "choose another output_dir")


@contextmanager
def scoring_lock(output_dir: str | os.PathLike, timeout: float = DEFAULT_LOCK_TIMEOUT, poll: float = 0.5, *,
                 label: str = "") -> Iterator[Path]:
    """Hold the exclusive scoring lock of ``output_dir`` (``flock`` on ``.scoring.lock``).

    Non-blocking attempts are polled every ``poll`` seconds until ``timeout`` (``0``: one attempt);
    then :class:`ScoringLockTimeout` names the holder. Once acquired, the holder's pid, host, start
    time (UTC) and ``label`` (e.g. the flow run id) are written into the lock file. The kernel drops
    the lock when the holding process exits, even on kill -9, so a crash never leaves a stale lock.
    Not re-entrant: taking it again in the same process (or thread) waits for itself.
    """
    directory = Path(output_dir)
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # os.open fds are non-inheritable (PEP 446): a child the holder exec()s does not keep the lock.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except (PermissionError, OSError) as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise OutputNotWritable(directory, f"{exc.strerror} on {LOCK_NAME}") from None
    try:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScoringLockTimeout(_lock_timeout_message(path, timeout))
            time.sleep(min(max(poll, 0.01), remaining))
        details = (f"pid={os.getpid()}\nhost={socket.gethostname()}\nstarted_utc={utc_now()}\n"
                   + (f"label={' '.join(label.split())}\n" if label else ""))
        os.ftruncate(fd, 0)
        os.pwrite(fd, details.encode("utf-8"), 0)
        try:
            yield path
        finally:
            try:
                os.ftruncate(fd, 0)  # the details describe the current holder only
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True
