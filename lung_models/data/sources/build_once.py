"""Build a data set's folder once: in a staging folder, renamed into place, then a marker written last.

A folder whose marker matches is complete and is returned at once; anything else (no marker, an
old marker, a half-built staging folder of a killed run) is rebuilt. The build runs under an
exclusive lock, so several processes fetching one data set build it once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lung_models.data.sources.base import MARKER_NAME, Progress, jsonable, say
from lung_models.fileutil import atomic_write_json, utc_now

try:
    import fcntl
except ImportError:  # Windows has no flock; concurrent fetches of one data set are then unguarded.
    fcntl = None  # type: ignore[assignment]



def build_once(
    cache_dir: Path,
    name: str,
    key: dict[str, Any],
    provenance: Callable[[], dict[str, Any]],
    build: Callable[[Path], None],
    progress: Progress | None,
) -> Path:
    """Return ``cache_dir/name``, running ``build(staging)`` first unless a matching marker exists."""
    root = cache_dir / name
    if marker_matches(root, key):
        say(progress, f"{root}: already complete; skipping")
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache_dir / f".{name}.lock"):
        if marker_matches(root, key):  # another process finished while we waited for the lock
            return root
        # Under the lock nobody else is building this name, so leftovers are from a dead run.
        for leftover in cache_dir.glob(f".{name}.staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=cache_dir))
        try:
            build(staging)
            if root.exists():  # no (matching) marker: an earlier, unfinished or different build
                shutil.rmtree(root)
            os.rename(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        atomic_write_json(root / MARKER_NAME, marker_payload(provenance(), key))
    say(progress, f"{root}: complete")
    return root


def marker_payload(provenance: dict[str, Any], key: dict[str, Any]) -> dict[str, Any]:
    return {
        "provenance": provenance,
        "key": key,
        "completed_at": utc_now(),
    }


def read_marker(root: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or unreadable: the build did not finish, so it is redone
    return marker if isinstance(marker, dict) else None


def marker_matches(root: Path, key: dict[str, Any]) -> bool:
    marker = read_marker(root)
    return marker is not None and marker.get("key") == jsonable(key)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise fetches of one data set across threads and processes (several flows may share it)."""
    if fcntl is None:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
