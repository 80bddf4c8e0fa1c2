"""The kinds of data source: generated phantoms, archives at URLs, Kaggle, a local folder; and the
source for one ``DatasetSpec.sources`` entry.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from lung_models.data.sources.archives import safe_extract
from lung_models.data.sources.base import (
    MANUAL_FIX,
    MARKER_NAME,
    SOURCE_KINDS,
    DataSource,
    DataSourceError,
    Progress,
    jsonable,
    listing_fingerprint,
    say,
    short_hash,
)
from lung_models.data.sources.build_once import build_once, exclusive_lock, marker_payload, read_marker
from lung_models.data.sources.download import download_and_hash, normalise_sha256
from lung_models.fileutil import atomic_write_json


@dataclass
class GeneratedSource(DataSource):
    """Phantom data written by ``lung_models.data.phantoms.write_dataset`` (no download)."""

    source_kind: ClassVar[str] = "generated"

    dataset: str  # the phantom data set, one of phantoms.DATASET_KINDS
    n_per_class: int
    seed: int
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_per_class < 1:
            raise DataSourceError(
                f"generated {self.dataset!r} source: n_per_class must be at least 1, not {self.n_per_class}"
            )

    @property
    def folder_name(self) -> str:
        return f"generated-{self.dataset}-{self.n_per_class}-{self.seed}-{short_hash(self.params)}"

    def fetch(self, cache_dir: Path, progress: Progress | None = None) -> Path:
        def build(staging: Path) -> None:
            # ``staging`` exists and is empty. Imported here so that sources (and their tests) do not need the phantom
            # generator's dependencies unless phantoms are actually generated.
            phantoms = importlib.import_module("lung_models.data.phantoms")
            say(progress, f"generating {self.n_per_class} {self.dataset} phantoms per class (seed {self.seed})")
            phantoms.write_dataset(self.dataset, staging, self.n_per_class, self.seed, **self.params)
            if not any(staging.iterdir()):
                raise DataSourceError(
                    f"{staging}: phantoms.write_dataset({self.dataset!r}, ...) wrote nothing; "
                    "check that the kind is one the generator knows"
                )

        return build_once(Path(cache_dir), self.folder_name, self._key(), self.provenance, build, progress)

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": self.source_kind,
            "dataset": self.dataset,
            "n_per_class": self.n_per_class,
            "seed": self.seed,
            "params": jsonable(self.params),
            "params_sha256": short_hash(self.params, length=64),
            "generator": "lung_models.data.phantoms.write_dataset",
            "generator_version": self._generator_version(),
        }

    def _generator_version(self) -> int | None:
        """``phantoms.GENERATOR_VERSIONS`` for this data set (None for one the generator does not know)."""
        return importlib.import_module("lung_models.data.phantoms").GENERATOR_VERSIONS.get(self.dataset)

    def _key(self) -> dict[str, Any]:
        # The generator's version is part of the key: a folder written by an older generator has
        # a marker that no longer matches, so it is rebuilt rather than reused with old pictures.
        return {
            "dataset": self.dataset,
            "n_per_class": self.n_per_class,
            "seed": self.seed,
            "params": jsonable(self.params),
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
                f"{self.url!r}: not an http(s) URL; fix the url in the data set's sources config, {MANUAL_FIX}"
            )
        self.sha256 = normalise_sha256(self.sha256, self.url)
        if self.filename is None:
            name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(self.url).path)).name
            self.filename = name or f"archive-{short_hash(self.url)}"
        if self.filename in (".", "..") or "/" in self.filename or "\\" in self.filename:
            raise DataSourceError(
                f"{self.url}: filename {self.filename!r} must be a plain file name without folders"
            )

    @property
    def download_name(self) -> str:
        # Prefixed with a hash of the URL: two data sets may both call their file "data.zip",
        # and an unpinned download must never be mistaken for another URL's file.
        return f"{short_hash(self.url, length=8)}-{self.filename}"


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
        return f"url-{stem}-{short_hash(self._key())}"

    def fetch(self, cache_dir: Path, progress: Progress | None = None) -> Path:
        cache_dir = Path(cache_dir)
        downloads = cache_dir / "downloads"

        def build(staging: Path) -> None:
            fetched: list[Path] = []
            for archive in self.archives:
                path, digest = download_and_hash(
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
                say(progress, f"extracting {path.name}")
                safe_extract(path, staging)

        root = build_once(cache_dir, self.folder_name, self._key(), self.provenance, build, progress)
        marker = read_marker(root)
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
            say(progress, f"{self.slug}: already downloaded to {cached}; skipping")
            return cached
        with exclusive_lock(cache_dir / f".{self.folder_name}.lock"):
            cached = self._cached_path(out_dir)
            if cached is not None:
                return cached
            (out_dir / MARKER_NAME).unlink(missing_ok=True)  # stale: its recorded folder is gone
            say(progress, f"downloading Kaggle data set {self.slug}")
            path = self._download(out_dir)
            if not path.is_dir():
                raise DataSourceError(
                    f"kaggle source {self.slug}: kagglehub returned {path}, which is not a folder; "
                    f"delete {out_dir} and retry, {MANUAL_FIX}"
                )
            self._path = path
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out_dir / MARKER_NAME, marker_payload(self.provenance(), {"slug": self.slug}))
        return path

    def provenance(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": self.source_kind,
            "slug": self.slug,
            "url": f"https://www.kaggle.com/datasets/{self.slug.strip('/')}",
        }
        if self._path is not None:
            info["path"] = str(self._path)
            info.update(listing_fingerprint(self._path))
        return info  # never the key: provenance is written next to models and shared

    def _cached_path(self, out_dir: Path) -> Path | None:
        marker = read_marker(out_dir)
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
        say(progress, f"using local data folder {self.path}")
        return self.path

    def provenance(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.source_kind, "path": str(self.path.resolve())}
        if self.path.is_dir():
            info.update(listing_fingerprint(self.path))
        return info


# --------------------------------------------------------------------------------------------
# Building a source from a DatasetSpec.sources entry


def source_from_config(source_kind: str, config: dict[str, Any]) -> DataSource:
    """Build the source for one ``DatasetSpec.sources`` entry, e.g. ``("url", {"archives": [...]})``.

    A ``generated`` entry's ``kind`` names the phantom data set; its keys other than
    ``kind``/``n_per_class``/``seed``/``params`` are passed to the generator as parameters.
    Unknown keys of the other kinds are an error, so that a typo such as ``sha265`` cannot
    silently turn off verification.
    """
    where = f"sources[{source_kind!r}]"
    config = dict(config)
    if source_kind == "generated":
        _require(where, config, "kind", "n_per_class")
        params = dict(config.pop("params", None) or {})
        dataset = config.pop("kind")
        n_per_class = int(config.pop("n_per_class"))
        seed = int(config.pop("seed", 0))
        params.update(config)
        return GeneratedSource(dataset=dataset, n_per_class=n_per_class, seed=seed, params=params)
    if source_kind == "url":
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
    if source_kind == "kaggle":
        _require(where, config, "slug")
        _reject_unknown(where, config, {"slug", "credentials"})
        return KaggleSource(**config)
    if source_kind == "local":
        _require(where, config, "path")
        _reject_unknown(where, config, {"path"})
        return LocalFolderSource(path=Path(config["path"]))
    raise DataSourceError(f"{where}: unknown source kind {source_kind!r}; use one of {', '.join(SOURCE_KINDS)}")


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
