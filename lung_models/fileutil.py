"""Small file helpers shared by every module: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second: the time stamp of report rows, ledger entries,
    lock holders and data-set markers."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def utc_stamp() -> str:
    """The current UTC time as ``YYYYMMDDTHHMMSSZ``: names of bundle versions, training runs and
    reports, which therefore sort by time."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def report_text(text: str) -> str:
    """A file or folder name as reports and the ledger show it: UTF-8, unique per name.

    The bytes of a name that is not valid UTF-8 (Python holds them as surrogates) become ``\\xNN``
    escapes; so that no real name can collide with an escaped one (a file literally named
    ``slice_\\xe9.png`` beside one whose name holds the byte 0xE9), a backslash in a name is
    doubled first. Every other name is unchanged."""
    if text.isascii() and "\\" not in text:  # nearly every name: nothing to escape
        return text
    return utf8_text(text.replace("\\", "\\\\"))


def utf8_text(text: str) -> str:
    """``text`` as UTF-8 (SQLite, a CSV) can hold it: surrogates (bytes of a name that is not valid
    UTF-8) become ``\\xNN`` escapes; anything else, backslashes included, is unchanged."""
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_undecodable(name: str) -> bool:
    """Whether a name (as os.listdir gives it) holds bytes that are not valid UTF-8."""
    return not name.isascii() and any("\udc80" <= ch <= "\udcff" for ch in name)


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# Put in front of such a cell (and of one that already starts with it, so the escape is reversible).
CSV_ESCAPE = "'"


def csv_cell(value: Any) -> Any:
    """A text cell made safe to open in a spreadsheet: a leading ``= + - @``, tab or CR (and a leading
    ``'``) gets a ``'`` in front, which spreadsheets show as text; dropping one leading ``'`` gives the
    true text back. Anything that is not a ``str`` is unchanged."""
    if isinstance(value, str) and value.startswith((*_FORMULA_START, CSV_ESCAPE)):
        return CSV_ESCAPE + value
    return value


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def host_tag() -> str:
    """This host's name as it appears in file names (letters, digits and '-')."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


@contextmanager
def atomic_writer(path: str | os.PathLike, binary: bool = False, encoding: str = "utf-8",
                  newline: str = "") -> Iterator[IO[Any]]:
    """Yield a handle on a temp file beside ``path``; on success flush, fsync, rename it over
    ``path`` and fsync the directory; on any failure remove the temp file and re-raise.

    Readers see the old file (or none) or the whole new one, never a partial file. The temp name
    carries the writer's pid and host (``.<name>.<pid>@<host>.<random>.tmp``) so a later run can
    tell a killed writer's leftover from a live one, and another host's from its own. Unlike a bare
    ``mkstemp`` file (mode 0600), the result gets the usual 0666 & ~umask, so ops staff can read reports.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{host_tag()}.", suffix=".tmp",
                               dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding=encoding, newline=newline)) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file (see :func:`atomic_writer`)."""
    with atomic_writer(path, binary=True) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022
