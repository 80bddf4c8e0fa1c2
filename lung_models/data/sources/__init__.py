"""Where a data set comes from: generated phantoms, URL archives, Kaggle, or a local folder.

Every source has the same two methods. ``fetch(cache_dir)`` makes the data set available and
returns its root folder; ``provenance()`` says, as JSON-able data, exactly what was used. Fetching
is idempotent: a finished fetch leaves ``.complete.json`` (holding the provenance) in its root, and
a later fetch that finds it returns at once (a local folder is used in place and needs no
marker). Data is built in a hidden staging folder beside the
root and renamed into place, and the marker is written last, so an interrupted run never leaves
anything a later run would trust.

Pure library code: no Prefect imports. Retries here are HTTP retries inside one download; the
Prefect task around a fetch may add its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.parse
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import requests

from lung_models.fileutil import atomic_write_json, sha256_file

try:
    import fcntl
except ImportError:  # Windows has no flock; concurrent fetches of one data set are then unguarded.
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MARKER_NAME",
    "DataSource",
    "DataSourceError",
    "GeneratedSource",
    "KaggleSource",
    "LocalFolderSource",
    "Progress",
    "UrlArchive",
    "UrlSource",
    "download_url",
    "safe_extract",
    "source_from_config",
]

Progress = Callable[[str], None]

MARKER_NAME = ".complete.json"
SOURCE_KINDS = ("generated", "url", "kaggle", "local")

_CHUNK = 1 << 16
_REPORT_EVERY_BYTES = 16 << 20  # progress cadence when the server sends no Content-Length
_RETRY_STATUSES = frozenset({408, 429})  # the only 4xx worth retrying: the server asked us to come back
_MAX_RETRY_AFTER = 60.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MANUAL_FIX = "or download the data manually and use the local source with --data-dir <folder>"


class DataSourceError(RuntimeError):
    """A data set could not be made available; the message names the file or URL and the fix."""


# --------------------------------------------------------------------------------------------
# The interface


class DataSource(ABC):
    """One place a data set can come from.

    ``source_kind`` is the key of this source in ``DatasetSpec.sources`` (``generated``, ``url``,
    ``kaggle``, ``local``). It is not called ``kind`` because :class:`GeneratedSource` already
    uses ``kind`` for the phantom data set it generates.
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


# --------------------------------------------------------------------------------------------
# Generated phantoms


@dataclass
class GeneratedSource(DataSource):
    """Phantom data written by ``lung_models.data.phantoms.write_dataset`` (no download)."""

    source_kind: ClassVar[str] = "generated"

    kind: str  # the phantom data set, one of phantoms.DATASET_KINDS
    n_per_class: int
    seed: int
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_per_class < 1:
            raise DataSourceError(
                f"generated {self.kind!r} source: n_per_class must be at least 1, not {self.n_per_class}"
            )

    @property
    def folder_name(self) -> str:
        return f"generated-{self.kind}-{self.n_per_class}-{self.seed}-{_short_hash(self.params)}"

    def fetch(self, cache_dir: Path, progress: Progress | None = None) -> Path:
        def build(staging: Path) -> None:
            # ``staging`` exists and is empty. Imported here so that sources (and their tests) do not need the phantom
            # generator's dependencies unless phantoms are actually generated.
            phantoms = importlib.import_module("lung_models.data.phantoms")
            _say(progress, f"generating {self.n_per_class} {self.kind} phantoms per class (seed {self.seed})")
            phantoms.write_dataset(self.kind, staging, self.n_per_class, self.seed, **self.params)
            if not any(staging.iterdir()):
                raise DataSourceError(
                    f"{staging}: phantoms.write_dataset({self.kind!r}, ...) wrote nothing; "
                    "check that the kind is one the generator knows"
                )

        return _build_once(Path(cache_dir), self.folder_name, self._key(), self.provenance, build, progress)

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": self.source_kind,
            "dataset": self.kind,
            "n_per_class": self.n_per_class,
            "seed": self.seed,
            "params": _jsonable(self.params),
            "params_sha256": _short_hash(self.params, length=64),
            "generator": "lung_models.data.phantoms.write_dataset",
            "generator_version": self._generator_version(),
        }

    def _generator_version(self) -> int | None:
        """``phantoms.GENERATOR_VERSIONS`` for this kind (None for a kind the generator does not know)."""
        return importlib.import_module("lung_models.data.phantoms").GENERATOR_VERSIONS.get(self.kind)

    def _key(self) -> dict[str, Any]:
        # The generator's version is part of the key: a folder written by an older generator has
        # a marker that no longer matches, so it is rebuilt rather than reused with old pictures.
        return {
            "dataset": self.kind,
            "n_per_class": self.n_per_class,
            "seed": self.seed,
            "params": _jsonable(self.params),
            "generator_version": self._generator_version(),
        }


# --------------------------------------------------------------------------------------------
# Archives at URLs


@dataclass
class UrlArchive:
    """One archive to download. ``sha256`` pins its content; ``None`` records it unverified."""

    url: str
    sha256: str | None = None
    filename: str | None = None

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in ("http", "https"):
            raise DataSourceError(
                f"{self.url!r}: not an http(s) URL; fix the url in the data set's sources config, {_MANUAL_FIX}"
            )
        self.sha256 = _normalise_sha256(self.sha256, self.url)
        if self.filename is None:
            name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(self.url).path)).name
            self.filename = name or f"archive-{_short_hash(self.url)}"
        if self.filename in (".", "..") or "/" in self.filename or "\\" in self.filename:
            raise DataSourceError(
                f"{self.url}: filename {self.filename!r} must be a plain file name without folders"
            )

    @property
    def download_name(self) -> str:
        # Prefixed with a hash of the URL: two data sets may both call their file "data.zip",
        # and an unpinned download must never be mistaken for another URL's file.
        return f"{_short_hash(self.url, length=8)}-{self.filename}"


@dataclass
class UrlSource(DataSource):
    """Archives downloaded over HTTP(S), verified and extracted into one root folder."""

    source_kind: ClassVar[str] = "url"

    archives: list[UrlArchive]
    name: str | None = None  # root folder name under cache_dir; derived from the archives if None
    keep_archives: bool = True  # keep downloads so a re-extraction never needs the network
    retries: int = 4
    backoff: float = 1.0
    timeout: float = 60.0
    _recorded: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.archives = [a if isinstance(a, UrlArchive) else UrlArchive(**a) for a in self.archives]
        if not self.archives:
            raise DataSourceError(
                "url source: 'archives' is empty; list at least one {'url': ..., 'sha256': ...}"
            )
        names = [a.download_name for a in self.archives]
        if len(set(names)) != len(names):
            raise DataSourceError(
                "url source: the same URL is listed twice in 'archives'; remove the duplicate"
            )
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise DataSourceError(
                f"url source: name {self.name!r} must be a plain folder name (letters, digits, . _ -)"
            )

    @property
    def folder_name(self) -> str:
        if self.name:
            return self.name
        stem = re.sub(r"(\.tar)?\.[A-Za-z0-9]+$", "", self.archives[0].filename or "archive")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "archive"
        return f"url-{stem}-{_short_hash(self._key())}"

    def fetch(self, cache_dir: Path, progress: Progress | None = None) -> Path:
        cache_dir = Path(cache_dir)
        downloads = cache_dir / "downloads"

        def build(staging: Path) -> None:
            fetched: list[Path] = []
            for archive in self.archives:
                path, digest = _download(
                    archive.url,
                    downloads / archive.download_name,
                    archive.sha256,
                    retries=self.retries,
                    backoff=self.backoff,
                    timeout=self.timeout,
                    progress=progress,
                )
                self._recorded[archive.url] = digest
                fetched.append(path)
            for path in fetched:
                _say(progress, f"extracting {path.name}")
                safe_extract(path, staging)

        root = _build_once(cache_dir, self.folder_name, self._key(), self.provenance, build, progress)
        marker = _read_marker(root)
        if marker:  # a cached fetch: the recorded hashes come from the run that downloaded
            for entry in marker.get("provenance", {}).get("archives", []):
                if entry.get("sha256"):
                    self._recorded.setdefault(entry["url"], entry["sha256"])
        if not self.keep_archives:
            for archive in self.archives:
                (downloads / archive.download_name).unlink(missing_ok=True)
        return root

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": self.source_kind,
            "archives": [
                {
                    "url": a.url,
                    "filename": a.filename,
                    "sha256": a.sha256 or self._recorded.get(a.url),
                    "sha256_pinned": a.sha256 is not None,
                }
                for a in self.archives
            ],
        }

    def _key(self) -> dict[str, Any]:
        return {"archives": [[a.url, a.sha256] for a in self.archives]}


# --------------------------------------------------------------------------------------------
# Kaggle


@dataclass
class KaggleSource(DataSource):
    """A Kaggle data set downloaded with ``kagglehub.dataset_download(slug)``.

    ``credentials`` (``{"username", "key"}``) are put in the environment only for the duration
    of the download; without them kagglehub reads ``KAGGLE_USERNAME``/``KAGGLE_KEY`` or
    ``~/.kaggle/kaggle.json`` itself.
    """

    source_kind: ClassVar[str] = "kaggle"

    slug: str
    credentials: dict[str, str] | None = field(default=None, repr=False)
    _path: Path | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = self.slug.strip("/").split("/")
        if len(parts) < 2 or not all(parts):
            raise DataSourceError(
                f"kaggle source: slug {self.slug!r} must look like 'owner/dataset' "
                "(as in https://www.kaggle.com/datasets/owner/dataset)"
            )
        if self.credentials is not None and not {"username", "key"} <= set(self.credentials):
            raise DataSourceError(
                f"kaggle source {self.slug}: credentials need both 'username' and 'key' "
                "(the two fields of kaggle.json)"
            )

    @property
    def folder_name(self) -> str:
        return "kaggle-" + re.sub(r"[^A-Za-z0-9._-]+", "-", self.slug.strip("/"))

    def fetch(self, cache_dir: Path, progress: Progress | None = None) -> Path:
        cache_dir = Path(cache_dir)
        out_dir = cache_dir / self.folder_name
        # The marker sits in out_dir even when kagglehub returns another folder (e.g. a Kaggle
        # notebook's read-only mount), and records that folder.
        cached = self._cached_path(out_dir)
        if cached is not None:
            _say(progress, f"{self.slug}: already downloaded to {cached}; skipping")
            return cached
        with _exclusive_lock(cache_dir / f".{self.folder_name}.lock"):
            cached = self._cached_path(out_dir)
            if cached is not None:
                return cached
            (out_dir / MARKER_NAME).unlink(missing_ok=True)  # stale: its recorded folder is gone
            _say(progress, f"downloading Kaggle data set {self.slug}")
            path = self._download(out_dir)
            if not path.is_dir():
                raise DataSourceError(
                    f"kaggle source {self.slug}: kagglehub returned {path}, which is not a folder; "
                    f"delete {out_dir} and retry, {_MANUAL_FIX}"
                )
            self._path = path
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out_dir / MARKER_NAME, _marker_payload(self.provenance(), {"slug": self.slug}))
        return path

    def provenance(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": self.source_kind,
            "slug": self.slug,
            "url": f"https://www.kaggle.com/datasets/{self.slug.strip('/')}",
        }
        if self._path is not None:
            info["path"] = str(self._path)
            info.update(_listing_fingerprint(self._path))
        return info  # never the key: provenance is written next to models and shared

    def _cached_path(self, out_dir: Path) -> Path | None:
        marker = _read_marker(out_dir)
        if not marker or marker.get("key") != {"slug": self.slug}:
            return None
        path = Path(marker.get("provenance", {}).get("path", ""))
        if not str(path) or not path.is_dir():
            return None
        self._path = path
        return path

    def _download(self, out_dir: Path) -> Path:
        import kagglehub  # imported late: only this source needs it

        def call(force: bool) -> str:
            try:
                return kagglehub.dataset_download(self.slug, output_dir=str(out_dir), force_download=force)
            except TypeError as exc:  # kagglehub < 0.3.12 has no output_dir; it uses its own cache
                if "output_dir" not in str(exc):
                    raise
                return kagglehub.dataset_download(self.slug, force_download=force)

        try:
            with _kaggle_environment(self.credentials):
                try:
                    return Path(call(force=False))
                except FileExistsError:
                    # A previous download into out_dir was interrupted; kagglehub will not
                    # overwrite it unless forced.
                    return Path(call(force=True))
        except Exception as exc:  # kagglehub raises many types (HTTP, auth, network): all fixable alike
            raise DataSourceError(
                f"Kaggle data set {self.slug!r}: download failed ({type(exc).__name__}: {exc}). Fix one of: "
                "(1) set the KAGGLE_USERNAME and KAGGLE_KEY environment variables (an API token from "
                "https://www.kaggle.com/settings, 'Create New Token'); "
                "(2) create a Prefect Secret block named 'kaggle-credentials' holding JSON "
                '{"username": "...", "key": "..."}; '
                f"(3) download https://www.kaggle.com/datasets/{self.slug.strip('/')} manually, unpack it "
                "and use the local source with --data-dir <folder>. "
                "If the data set has terms of use, accept them on its Kaggle page first."
            ) from exc


@contextlib.contextmanager
def _kaggle_environment(credentials: dict[str, str] | None) -> Iterator[None]:
    """Expose credentials to kagglehub (which reads the environment) only while it runs."""
    if not credentials:
        yield
        return
    names = {"KAGGLE_USERNAME": credentials["username"], "KAGGLE_KEY": credentials["key"]}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------------------------
# A folder that is already there


@dataclass
class LocalFolderSource(DataSource):
    """A data set already on disk (e.g. downloaded by hand); used in place, never copied."""

    source_kind: ClassVar[str] = "local"

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()

    def fetch(self, cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
        if not self.path.exists():
            raise DataSourceError(
                f"{self.path}: data folder not found; pass an existing folder with --data-dir "
                "(the unpacked data set, holding its class folders)"
            )
        if not self.path.is_dir():
            raise DataSourceError(
                f"{self.path}: is a file, not a folder; unpack the archive and pass the folder with --data-dir"
            )
        _say(progress, f"using local data folder {self.path}")
        return self.path

    def provenance(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.source_kind, "path": str(self.path.resolve())}
        if self.path.is_dir():
            info.update(_listing_fingerprint(self.path))
        return info


# --------------------------------------------------------------------------------------------
# Building a source from a DatasetSpec.sources entry


def source_from_config(kind: str, config: dict[str, Any]) -> DataSource:
    """Build the source for one ``DatasetSpec.sources`` entry, e.g. ``("url", {"archives": [...]})``.

    ``generated`` keys other than ``kind``/``n_per_class``/``seed``/``params`` are passed to the
    generator as parameters. Unknown keys of the other kinds are an error, so that a typo such
    as ``sha265`` cannot silently turn off verification.
    """
    where = f"sources[{kind!r}]"
    config = dict(config)
    if kind == "generated":
        _require(where, config, "kind", "n_per_class")
        params = dict(config.pop("params", None) or {})
        dataset = config.pop("kind")
        n_per_class = int(config.pop("n_per_class"))
        seed = int(config.pop("seed", 0))
        params.update(config)
        return GeneratedSource(kind=dataset, n_per_class=n_per_class, seed=seed, params=params)
    if kind == "url":
        if "url" in config and "archives" not in config:  # shorthand for a single archive
            config["archives"] = [{k: config.pop(k) for k in ("url", "sha256", "filename") if k in config}]
        _require(where, config, "archives")
        _reject_unknown(where, config, {"archives", "name", "keep_archives", "retries", "backoff", "timeout"})
        archives = []
        for i, entry in enumerate(config.pop("archives")):
            if isinstance(entry, str):
                entry = {"url": entry}
            _require(f"{where}['archives'][{i}]", entry, "url")
            _reject_unknown(f"{where}['archives'][{i}]", entry, {"url", "sha256", "filename"})
            archives.append(UrlArchive(**entry))
        return UrlSource(archives=archives, **config)
    if kind == "kaggle":
        _require(where, config, "slug")
        _reject_unknown(where, config, {"slug", "credentials"})
        return KaggleSource(**config)
    if kind == "local":
        _require(where, config, "path")
        _reject_unknown(where, config, {"path"})
        return LocalFolderSource(path=Path(config["path"]))
    raise DataSourceError(f"{where}: unknown source kind {kind!r}; use one of {', '.join(SOURCE_KINDS)}")


def _require(where: str, config: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in config]
    if missing:
        raise DataSourceError(
            f"{where}: missing {', '.join(map(repr, missing))}; add it to the data set's sources"
        )


def _reject_unknown(where: str, config: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise DataSourceError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}"
        )


# --------------------------------------------------------------------------------------------
# Downloads


class _TransientError(Exception):
    """A failure worth retrying (5xx, 408/429, cut connection, timeout)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def download_url(
    url: str,
    dest: Path,
    sha256: str | None,
    *,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60,
    progress: Progress | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resumably, and verify its sha256; return ``dest``.

    Bytes go to ``<dest>.part``; an existing ``.part`` is resumed with a ``Range`` request (a
    server that answers 200 instead of 206 restarts it from zero). Transient failures (5xx, 408,
    429, connection errors, timeouts) are retried ``retries`` times with exponential backoff
    (``backoff * 2**n`` seconds); other 4xx fail at once. ``timeout`` bounds each connect and
    each read, not the whole download. ``dest`` appears, atomically, only once its sha256
    matches; on a mismatch the ``.part`` is deleted too. An existing ``dest`` whose sha256
    matches is kept without any request. With ``sha256=None`` the hash is computed and reported
    through ``progress`` as unverified.
    """
    return _download(
        url, Path(dest), sha256, retries=retries, backoff=backoff, timeout=timeout, progress=progress
    )[0]


def _download(
    url: str,
    dest: Path,
    sha256: str | None,
    *,
    retries: int,
    backoff: float,
    timeout: float,
    progress: Progress | None,
) -> tuple[Path, str]:
    """:func:`download_url`, also returning the file's sha256 (so callers need not hash it twice)."""
    expected = _normalise_sha256(sha256, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    with _exclusive_lock(dest.parent / f".{dest.name}.lock"):
        if dest.exists():
            actual = sha256_file(dest)
            if expected is None:
                _say(
                    progress,
                    f"{dest.name}: already downloaded; no sha256 pinned for {url}; recorded {actual}",
                )
                return dest, actual
            if actual == expected:
                _say(progress, f"{dest.name}: already downloaded and verified; skipping {url}")
                return dest, actual
            _say(progress, f"{dest}: sha256 {actual} is not the pinned {expected}; downloading again")
            dest.unlink()

        _download_to_part(url, part, retries=retries, backoff=backoff, timeout=timeout, progress=progress)

        actual = sha256_file(part)
        if expected is not None and actual != expected:
            part.unlink(missing_ok=True)
            raise DataSourceError(
                f"{url}: sha256 mismatch: expected {expected}, got {actual}; the download was deleted. "
                "If the file changed upstream on purpose, update the pinned sha256 in the data set's "
                f"sources config; otherwise retry later (a server or proxy served a different file), {_MANUAL_FIX}"
            )
        if expected is None:
            _say(progress, f"no sha256 pinned for {url}; recorded {actual}")
        else:
            _say(progress, f"{dest.name}: sha256 verified")
        os.replace(part, dest)
    return dest, actual


def _download_to_part(
    url: str, part: Path, *, retries: int, backoff: float, timeout: float, progress: Progress | None
) -> None:
    attempts = max(0, retries) + 1
    last: Exception | None = None
    with requests.Session() as session:
        for attempt in range(1, attempts + 1):
            try:
                _download_attempt(session, url, part, timeout=timeout, progress=progress)
                return
            except (
                _TransientError,
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                last = exc
                if attempt == attempts:
                    break
                delay = backoff * 2 ** (attempt - 1)
                if isinstance(exc, _TransientError) and exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, _MAX_RETRY_AFTER))
                _say(progress, f"{url}: {_reason(exc)}; retry {attempt} of {attempts - 1} in {delay:.1f} s")
                time.sleep(delay)
            except requests.RequestException as exc:  # invalid URL, too many redirects, ...
                raise DataSourceError(
                    f"{url}: cannot download ({type(exc).__name__}: {exc}); fix the url in the data set's "
                    f"sources config, {_MANUAL_FIX}"
                ) from exc
    kept = part.stat().st_size if part.exists() else 0
    raise DataSourceError(
        f"{url}: download failed after {attempts} attempts (last error: {_reason(last)}); "
        f"{part} keeps the {_size(kept)} received so the next run resumes. Check the network "
        f"connection or proxy and retry, {_MANUAL_FIX}"
    ) from last


def _download_attempt(
    session: requests.Session, url: str, part: Path, *, timeout: float, progress: Progress | None
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    # identity: with gzip transfer-encoding the Range offsets would not match the bytes on disk.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status == 416 and offset:
            total = _content_range_total(response.headers.get("Content-Range"))
            if total == offset:  # the .part was already complete; only the rename was missing
                return
            part.unlink()
            raise _TransientError(f"server refused to resume at byte {offset}; restarting from zero")
        if status in _RETRY_STATUSES or status >= 500:
            raise _TransientError(f"HTTP {status} {response.reason}", _retry_after(response))
        if status not in (200, 206):
            raise DataSourceError(f"{url}: HTTP {status} {response.reason}; {_http_fix(status)}")

        length = response.headers.get("Content-Length")
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _TransientError(f"server resumed at byte {start}, not {offset}; restarting from zero")
            mode = "ab"
            _say(progress, f"{url}: resuming at {_size(offset)}")
        else:
            if offset:
                _say(progress, f"{url}: server does not support resuming; restarting from zero")
            mode, offset = "wb", 0
        total = offset + int(length) if length and length.isdigit() else None

        written = offset
        step = max(total // 10, 1) if total else _REPORT_EVERY_BYTES
        next_report = (written // step + 1) * step
        with open(part, mode) as handle:
            try:
                for chunk in response.iter_content(chunk_size=_CHUNK):
                    handle.write(chunk)
                    written += len(chunk)
                    if written >= next_report:
                        next_report = (written // step + 1) * step
                        done = (
                            f"{100 * written // total}% ({_size(written)} of {_size(total)})"
                            if total
                            else _size(written)
                        )
                        _say(progress, f"downloading {url}: {done}")
            finally:
                # Keep whatever arrived, durably, so the next attempt can resume after it.
                handle.flush()
                os.fsync(handle.fileno())
        if total is not None and written < total:
            raise _TransientError(f"connection closed after {_size(written)} of {_size(total)}")


def _http_fix(status: int) -> str:
    if status in (404, 410):
        return f"the file is not at that address; fix the url in the data set's sources config, {_MANUAL_FIX}"
    if status in (401, 403):
        return (
            "the server refused access (it may need a login or accepted terms); "
            f"download it in a browser, {_MANUAL_FIX}"
        )
    return f"the server rejected the request; check the url in the data set's sources config, {_MANUAL_FIX}"


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", header or "")
    return int(match.group(1)) if match else None


def _content_range_total(header: str | None) -> int | None:
    match = re.match(r"bytes [^/]+/(\d+)", header or "")
    return int(match.group(1)) if match else None


def _reason(exc: Exception | None) -> str:
    if isinstance(exc, _TransientError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _normalise_sha256(sha256: str | None, url: str) -> str | None:
    if sha256 is None or sha256 == "":
        return None
    value = sha256.strip().lower()
    if not _SHA256_RE.match(value):
        raise DataSourceError(
            f"{url}: pinned sha256 {sha256!r} is not 64 hex digits; copy it from `sha256sum <file>`"
        )
    return value


# --------------------------------------------------------------------------------------------
# Archives


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Extract a zip or tar archive (detected by content) into ``target``; return the files written.

    Every member is checked before anything is extracted: absolute paths, ``..`` components,
    symlinks, hardlinks, device files and fifos are refused, so no file outside ``target`` is ever
    written. Files are extracted into a temporary folder beside ``target`` and moved into place
    afterwards; if ``target`` already exists the archive's contents are merged into it.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise DataSourceError(f"{archive}: archive not found; download it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _open_archive(archive) as reader:
            members = reader.validated_members()
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extracting-", dir=target.parent))
            try:
                written = [rel for rel, is_dir in members if not is_dir]
                for rel, is_dir in members:
                    out = tmp.joinpath(*rel.parts)
                    if is_dir:
                        out.mkdir(parents=True, exist_ok=True)
                    else:
                        out.parent.mkdir(parents=True, exist_ok=True)
                        reader.extract_file(rel, out)
                _move_into(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except DataSourceError:
        raise
    except OSError as exc:
        if exc.errno is not None:  # the file system failed (disk full, permissions), not the archive
            raise DataSourceError(
                f"{archive}: extracting into {target.parent} failed ({exc}); free disk space or fix "
                "permissions there and fetch again"
            ) from exc
        raise DataSourceError(
            f"{archive}: corrupt or truncated archive ({type(exc).__name__}: {exc}); delete it and download again"
        ) from exc
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, ValueError) as exc:
        raise DataSourceError(
            f"{archive}: corrupt or truncated archive ({type(exc).__name__}: {exc}); "
            "delete it and download again"
        ) from exc
    return [target.joinpath(*rel.parts) for rel in dict.fromkeys(written)]


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[_ArchiveReader]:
    if tarfile.is_tarfile(archive):  # before zip: an uncompressed tar ending in a .zip looks like a zip
        with tarfile.open(archive, "r:*") as tar:
            yield _TarReader(archive, tar)
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zip_file:
            yield _ZipReader(archive, zip_file)
    else:
        raise DataSourceError(
            f"{archive}: not a zip or tar archive (or truncated); delete it and download again. "
            "For other formats (.7z, .rar) unpack it yourself and use the local source with --data-dir"
        )


class _ArchiveReader(ABC):
    """Shared validation; subclasses list their raw members and copy one file out."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self._by_path: dict[PurePosixPath, Any] = {}

    @abstractmethod
    def raw_members(self) -> Iterator[tuple[str, str, Any]]:
        """Yield (name, type, member) with type one of file, dir, symlink, hardlink, device."""

    @abstractmethod
    def copy_member(self, member: Any, out: Path) -> None:
        """Copy one file member's bytes to ``out``."""

    def validated_members(self) -> list[tuple[PurePosixPath, bool]]:
        members: list[tuple[PurePosixPath, bool]] = []
        files: set[PurePosixPath] = set()
        dirs: set[PurePosixPath] = set()
        for name, kind, member in self.raw_members():
            if kind != "file" and kind != "dir":
                raise DataSourceError(
                    f"{self.archive}: member {name!r} is a {kind}, which is refused (it could write outside "
                    "the target folder); nothing was extracted. Unpack it yourself after checking it, and "
                    "use the local source with --data-dir"
                )
            rel = _member_path(self.archive, name)
            if rel is None:
                continue
            members.append((rel, kind == "dir"))
            (dirs if kind == "dir" else files).add(rel)
            dirs.update(rel.parents)
            if kind == "file":
                self._by_path[rel] = member  # a repeated name: the last one wins, as with tar itself
        clash = sorted(files & dirs)
        if clash:
            raise DataSourceError(
                f"{self.archive}: member {str(clash[0])!r} is both a file and a folder; nothing was extracted. "
                "The archive is malformed; download it again"
            )
        return members

    def extract_file(self, rel: PurePosixPath, out: Path) -> None:
        self.copy_member(self._by_path[rel], out)


class _ZipReader(_ArchiveReader):
    def __init__(self, archive: Path, zip_file: zipfile.ZipFile) -> None:
        super().__init__(archive)
        self._zip = zip_file

    def raw_members(self) -> Iterator[tuple[str, str, Any]]:
        for info in self._zip.infolist():
            mode = info.external_attr >> 16  # Unix mode bits, when the zip was made on Unix
            if stat.S_ISLNK(mode):
                kind = "symlink"
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                kind = "device file"
            elif info.is_dir() or stat.S_ISDIR(mode):
                kind = "dir"
            else:
                kind = "file"
            if info.flag_bits & 0x1:
                raise DataSourceError(
                    f"{self.archive}: member {info.filename!r} is encrypted; unpack it yourself with its "
                    "password and use the local source with --data-dir"
                )
            yield info.filename, kind, info

    def copy_member(self, member: Any, out: Path) -> None:
        with self._zip.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)


class _TarReader(_ArchiveReader):
    def __init__(self, archive: Path, tar: tarfile.TarFile) -> None:
        super().__init__(archive)
        self._tar = tar

    def raw_members(self) -> Iterator[tuple[str, str, Any]]:
        for info in self._tar.getmembers():
            if info.issym():
                kind = "symlink"
            elif info.islnk():
                kind = "hardlink"
            elif info.ischr() or info.isblk() or info.isfifo():
                kind = "device file"
            elif info.isdir():
                kind = "dir"
            elif info.isreg():
                kind = "file"
            else:
                kind = f"special member (tar type {info.type!r})"
            yield info.name, kind, info

    def copy_member(self, member: Any, out: Path) -> None:
        src = self._tar.extractfile(member)
        if src is None:  # only for non-regular members, which validation refused
            raise DataSourceError(f"{self.archive}: member {member.name!r} has no data; download it again")
        with src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)


def _member_path(archive: Path, name: str) -> PurePosixPath | None:
    """The member's path relative to the target, or None for the archive's root entry."""
    # Backslashes count as separators: zips made on Windows use them, and "..\\x" must not slip by.
    posix = name.replace("\\", "/")
    if "\x00" in posix or posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise DataSourceError(
            f"{archive}: member {name!r} has an absolute path, which is refused; nothing was extracted. "
            "Unpack it yourself after checking it, and use the local source with --data-dir"
        )
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DataSourceError(
            f"{archive}: member {name!r} contains '..' and could write outside the target folder; "
            "nothing was extracted. Unpack it yourself after checking it, and use the local source "
            "with --data-dir"
        )
    return PurePosixPath(*parts) if parts else None


def _move_into(src: Path, dst: Path) -> None:
    """Move the contents of ``src`` into ``dst``: a rename if ``dst`` is new, else a merge."""
    if not dst.exists():
        try:
            os.rename(src, dst)
            return
        except OSError:
            if not dst.exists():
                raise
    if not dst.is_dir():
        raise DataSourceError(f"{dst}: exists and is not a folder; move it away and retry")
    for entry in src.iterdir():
        out = dst / entry.name
        if entry.is_dir() and out.is_dir():
            _move_into(entry, out)
        elif entry.is_dir() != out.is_dir() and out.exists():
            raise DataSourceError(
                f"{out}: the archive has a {'folder' if entry.is_dir() else 'file'} where {dst} already has "
                "the other; the archives overlap. Delete the folder and fetch again"
            )
        else:
            os.replace(entry, out)


# --------------------------------------------------------------------------------------------
# Markers, staging and locks


def _build_once(
    cache_dir: Path,
    name: str,
    key: dict[str, Any],
    provenance: Callable[[], dict[str, Any]],
    build: Callable[[Path], None],
    progress: Progress | None,
) -> Path:
    """Return ``cache_dir/name``, running ``build(staging)`` first unless a matching marker exists."""
    root = cache_dir / name
    if _marker_matches(root, key):
        _say(progress, f"{root}: already complete; skipping")
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{name}.lock"):
        if _marker_matches(root, key):  # another process finished while we waited for the lock
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
        atomic_write_json(root / MARKER_NAME, _marker_payload(provenance(), key))
    _say(progress, f"{root}: complete")
    return root


def _marker_payload(provenance: dict[str, Any], key: dict[str, Any]) -> dict[str, Any]:
    return {
        "provenance": provenance,
        "key": key,
        "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or unreadable: the build did not finish, so it is redone
    return marker if isinstance(marker, dict) else None


def _marker_matches(root: Path, key: dict[str, Any]) -> bool:
    marker = _read_marker(root)
    return marker is not None and marker.get("key") == _jsonable(key)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# Small helpers


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _jsonable(value: Any) -> Any:
    """A JSON round trip: tuples become lists and unknown objects strings, as they are stored."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short_hash(value: Any, length: int = 10) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _listing_fingerprint(root: Path) -> dict[str, Any]:
    """File count and a hash of (path, size) of every file: cheap evidence of which copy was used."""
    digest = hashlib.sha256()
    count = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER_NAME):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
        count += 1
    return {"files": count, "listing_sha256": digest.hexdigest()}


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"
