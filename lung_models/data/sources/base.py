"""What every data source is: the DataSource interface, its error, and the helpers all sources share."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

Progress = Callable[[str], None]

MARKER_NAME = ".complete.json"
SOURCE_KINDS = ("generated", "url", "kaggle", "local")
CHUNK = 1 << 16  # bytes copied at a time, downloads and extraction alike
MANUAL_FIX = "or download the data manually and use the local source with --data-dir <folder>"


class DataSourceError(RuntimeError):
    """A data set could not be made available; the message names the file or URL and the fix."""


class DataSource(ABC):
    """One place a data set can come from.

    ``source_kind`` is the key of this source in ``DatasetSpec.sources`` (``generated``, ``url``,
    ``kaggle``, ``local``), and the ``kind`` its provenance records.
    """

    source_kind: ClassVar[str]

    @abstractmethod
    def fetch(self, cache_dir: Path, progress: Progress | None = None) -> Path:
        """Make the data set available under ``cache_dir`` and return its root folder.

        Idempotent: once ``<root>/.complete.json`` exists a second call returns at once.
        """

    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """JSON-able description of what was (or will be) fetched: kind, URLs, hashes, seed, ..."""


def say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def jsonable(value: Any) -> Any:
    """A JSON round trip: tuples become lists and unknown objects strings, as they are stored."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def short_hash(value: Any, length: int = 10) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def listing_fingerprint(root: Path) -> dict[str, Any]:
    """File count and a hash of (path, size) of every file: cheap evidence of which copy was used."""
    digest = hashlib.sha256()
    count = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER_NAME):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
        count += 1
    return {"files": count, "listing_sha256": digest.hexdigest()}
