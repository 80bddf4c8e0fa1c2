"""Safe extraction of zip and tar archives: nothing is written outside the target folder."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from lung_models.data.sources.base import CHUNK, DataSourceError


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
            shutil.copyfileobj(src, dst, CHUNK)


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
            shutil.copyfileobj(src, dst, CHUNK)


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
