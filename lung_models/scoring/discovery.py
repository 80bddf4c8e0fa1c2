"""Discovery: every scoreable item under the input folder, hashed once and classified.

Image suffixes, NIfTI suffixes, ``.dcm`` and extensionless files with a DICOM preamble are
considered; anything else (notes, checksums) is ignored. DICOM slices of one series in one folder
become one item (a scan); a slice alone is its own item. Nothing outside the input folder is ever
opened, and only regular files are read (a named pipe would block the night).

A night's cost grows with what arrived, not with the archive: a :class:`HashCache` (the ledger's
``file_hashes`` table) remembers each file's hash and what it is (tile or slice, DICOM series) under
its stat key (size, mtime, ctime, inode); a file whose stat key is unchanged is not read again.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lung_models import progress
from lung_models.data import dicom, readers
from lung_models.data.readers import file_kind_by_name
from lung_models.fileutil import is_undecodable, report_text, sha256_bytes, sha256_file, utf8_text
from lung_models.registry import CT_SLICE, CT_VOLUME, HISTOLOGY_TILE
from lung_models.scoring.items import (
    DICOM,
    DICOM_SERIES,
    ERROR,
    IMAGE,
    NIFTI,
    REFUSED,
    REJECTED,
    UNKNOWN_IMAGE,
    Incoming,
    Item,
)

log = logging.getLogger(__name__)

# input_kind: a pixel is coloured when its channels differ from their mean by more than this many
# grey levels on average (JPEG chroma noise in a grey slice stays under it); an image is a histology
# tile when at least this share of its pixels is coloured.
COLOUR_SPREAD = 4.0
HISTOLOGY_COLOURED_SHARE = 0.05


class HashCache(Protocol):
    """What discovery remembers between nights about each file, under its relative path and stat key:
    ``{"sha256", "kind", "source"}`` and, for a DICOM slice, ``"series"`` (the hash of its series key).
    ``kind`` is the item's input kind and ``source`` its file kind: the keys ledgers already hold."""

    def lookup(self, relative_path: str, stat_key: tuple[int, ...]) -> dict[str, Any] | None: ...

    def remember_facts(self, entries: Iterable[tuple[str, tuple[int, ...], dict[str, Any]]]) -> None: ...


# ------------------------------------------------------------------------------------------ discovery
def stat_key(st: os.stat_result) -> tuple[int, ...]:
    """What must stay the same between hashing and decoding: size, mtime, ctime and inode (a file
    replaced by a rename has a new inode even with the same size and mtime)."""
    return (int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino))


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _link_sha(path: Path, what: str) -> str:
    """An identity for an item that is refused without reading it (a link out of the folder, a pipe):
    what it is and where it points, so a changed link is looked at again."""
    try:
        target = os.readlink(path)
    except OSError:
        target = ""
    return sha256_bytes(f"{what} -> {target}".encode())


@dataclass
class _Walk:
    """State of one discovery walk."""

    root: Path
    real_root: str
    now: float
    settle_seconds: float
    found: Incoming = field(default_factory=Incoming)
    dicom_files: dict[Path, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    # Folders where a DICOM file was skipped or refused, or which changed recently: no series is
    # assembled there this run (a series missing its newest slices would be scored as complete).
    unsettled_folders: dict[Path, str] = field(default_factory=dict)
    newest_mtime: dict[Path, float] = field(default_factory=dict)
    undecodable: set[Path] = field(default_factory=set)  # scans refused for a name that is not UTF-8
    cache: HashCache | None = None
    new_facts: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = field(default_factory=dict)
    dicom_items: dict[Path, Item] = field(default_factory=dict)  # DICOM slices, until grouped into series
    known_series: dict[Path, str] = field(default_factory=dict)  # cached series key hash of a DICOM file

    def skip(self, rel: str, why: str) -> None:
        self.found.skipped.append((rel, why))

    def refuse(self, rel: str, kind: str, sha: str, status: str, why: str) -> None:
        self.found.items.append(Item(rel, kind, REFUSED, (rel,), sha, refusal_status=status, refusal=why))


def discover(input_dir: str | Path, settle_seconds: float = 0.0, now: float | None = None,
             cache: HashCache | None = None, output_dir: str | Path | None = None,
             own_file: Callable[[str], bool] = lambda name: False) -> Incoming:
    """Every scoreable item under ``input_dir`` (recursive; hidden files and folders skipped).

    Image suffixes, NIfTI suffixes, ``.dcm`` and extensionless files with a DICOM preamble are
    considered; anything else (notes, checksums) is ignored. A file modified less than
    ``settle_seconds`` ago, or that changes while it is hashed, is still arriving: skipped this run,
    and so is any DICOM series in its folder. A symbolic link is followed only if it stays inside
    the folder; nothing outside is ever opened. Only regular files are read (a named pipe would
    block the night). With a ``cache``, files whose stat key it holds are not read again, and what
    this walk learnt is remembered in it.

    The scorer's own files are never arrivals: an ``output_dir`` inside the input folder is not
    walked, and when it is the input folder itself, the names ``own_file`` accepts there (the
    ledger, the lock, the reports; a folder as its name with a trailing "/") are neither scored
    nor count as changes to the folder (a lock touched every night would otherwise keep a DICOM
    series there "still arriving" for ever).
    """
    root = Path(input_dir)
    walk = _Walk(root, os.path.realpath(root), datetime.now(timezone.utc).timestamp() if now is None else now,
                 settle_seconds, cache=cache)

    def unlistable(exc: OSError) -> None:
        rel = report_text(Path(exc.filename).relative_to(root).as_posix()) if exc.filename else "?"
        walk.skip(rel, f"folder cannot be listed ({exc.strerror}); give the scoring user read access to it")

    own_folder = os.path.realpath(output_dir) if output_dir is not None else None
    with progress.bar(f"finding files in {report_text(root.name)}", unit="files", transient=True) as files:
        _walk_folder(walk, root, own_folder, own_file, unlistable, files)
    walk.found.items.extend(_series_items(walk))
    walk.found.items.sort(key=lambda i: (i.key, i.series_uid_hash))
    if cache is not None and walk.new_facts:
        cache.remember_facts((rel, key, facts) for rel, (key, facts) in walk.new_facts.items())
    return walk.found


def _walk_folder(walk: _Walk, root: Path, own_folder: str | None, own_file: Callable[[str], bool],
                 unlistable: Callable[[OSError], None], files: progress.Bar) -> None:
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        folder = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            if (folder / d).is_symlink():  # os.walk does not descend into it; say so
                dirnames.remove(d)
                walk.skip(report_text((folder / d).relative_to(root).as_posix()),
                          "symbolic link to a folder: not followed; copy the files into the input folder")
            elif own_folder is not None and os.path.realpath(folder / d) == own_folder:
                dirnames.remove(d)  # the reports and ledger of this very scorer: not input
        if own_folder is not None and os.path.realpath(folder) == own_folder:
            filenames = [n for n in filenames if not own_file(n)]
            dirnames[:] = [d for d in dirnames if not own_file(d + "/")]  # e.g. the heat maps folder
        for name in sorted(filenames):
            files.advance()
            if not name.startswith("."):
                _discover_file(walk, folder / name)
            else:  # hidden files (e.g. a transfer's temp file) still tell that the folder is changing
                try:
                    mtime = (folder / name).lstat().st_mtime
                except OSError:
                    continue
                walk.newest_mtime[folder] = max(walk.newest_mtime.get(folder, 0.0), mtime)


def _discover_file(walk: _Walk, path: Path) -> None:
    """Classify, stat and hash one directory entry; add an item, a refusal or a skip to ``walk``."""
    raw_rel = path.relative_to(walk.root).as_posix()
    rel, name, folder = report_text(raw_rel), report_text(path.name), path.parent
    undecodable = is_undecodable(raw_rel)  # refused once it is known to be a regular file and a scan (below)
    by_name = file_kind_by_name(path)
    try:
        link = path.lstat()
    except OSError:
        walk.skip(rel, "vanished while the folder was being listed; a later run looks again")
        return
    walk.newest_mtime[folder] = max(walk.newest_mtime.get(folder, 0.0), link.st_mtime)
    if stat.S_ISLNK(link.st_mode):
        target = os.path.realpath(path)
        if not _inside(target, walk.real_root) or not os.path.exists(target):
            what = "a missing file or a link loop" if not os.path.exists(target) else "a file outside the input folder"
            if by_name is None and not name.lower().endswith(dicom.DICOM_SUFFIXES):
                # Cannot tell whether it is a slice without reading it: any series here waits until it is fixed.
                walk.unsettled_folders[folder] = f"{name} links out of the folder (replace the link by the file)"
                walk.skip(rel, f"symbolic link to {what}: not followed")
                return
            kind = _kind_by_name(by_name)
            if kind == CT_SLICE:
                walk.unsettled_folders[folder] = f"{name} links out of the folder (replace the link by the file)"
            walk.refuse(rel, kind, _link_sha(path, "symlink"), REJECTED, f"{name}: symbolic link to {what}, refused; "
                        "copy the file into the folder instead of linking it")
            return
    try:
        before = path.stat()
    except OSError:
        walk.skip(rel, "vanished while the folder was being listed; a later run looks again")
        return
    if not stat.S_ISREG(before.st_mode):
        if by_name is not None or name.lower().endswith(dicom.DICOM_SUFFIXES):
            walk.refuse(rel, _kind_by_name(by_name), _link_sha(path, "special file"), REJECTED,
                        f"{name}: not a regular file (a pipe, socket or device), refused; deliver scans as files")
        else:  # it may be an extensionless slice, but reading a pipe would block the night: never opened
            walk.skip(rel, "not a regular file (a pipe, socket or device): not read; deliver scans as files")
        return
    key = stat_key(before)
    facts = walk.cache.lookup(rel, key) if walk.cache is not None and not undecodable else None
    try:  # a cached file is known to be DICOM or not: its preamble is not read again
        is_dcm = facts["source"] == DICOM if facts else by_name is None and dicom.is_dicom_file(path)
    except OSError as exc:  # an extensionless file that cannot be read: is it a slice? cannot tell
        walk.unsettled_folders[folder] = f"{name} cannot be read"
        walk.skip(rel, f"cannot be read ({exc.strerror}) to tell whether it is a DICOM slice; give the scoring "
                       "user read access to it")
        return
    if by_name is None and not is_dcm:
        return
    kind = CT_VOLUME if by_name == NIFTI else CT_SLICE if is_dcm else UNKNOWN_IMAGE
    file_kind = NIFTI if by_name == NIFTI else DICOM if is_dcm else IMAGE
    age = walk.now - before.st_mtime
    if walk.settle_seconds and 0 <= age < walk.settle_seconds:  # a future mtime (clock skew) counts as settled
        walk.skip(rel, f"modified {age:.0f} s ago (under {walk.settle_seconds:.0f} s): may still be arriving; "
                       "a later run scores it")
        if is_dcm:
            walk.unsettled_folders[folder] = f"{name} is still arriving"
        return
    if facts:
        sha, kind = facts["sha256"], facts["kind"]
        walk.found.cached += 1
    else:
        try:
            sha = sha256_file(path)
        except OSError as exc:
            if is_dcm:
                walk.unsettled_folders[folder] = f"{name} cannot be read"
            walk.refuse(rel, kind, "", ERROR, f"{name}: cannot be read ({exc.strerror}); "
                                              "give the scoring user read access to it")
            return
        try:
            changed = stat_key(path.stat()) != key
        except OSError:
            changed = True
        if changed:
            walk.skip(rel, "changed while being read: still being written; a later run scores it")
            if is_dcm:
                walk.unsettled_folders[folder] = f"{name} is still being written"
            return
        if file_kind == IMAGE:
            kind = input_kind(path)
        walk.found.hashed += 1
        if not undecodable:
            walk.new_facts[rel] = (key, {"sha256": sha, "kind": kind, "source": file_kind})
    if undecodable:  # SQLite and a UTF-8 CSV cannot hold the name: one row naming it escaped, not a crashed night
        if file_kind == DICOM:
            walk.dicom_files[path] = (sha, key)  # still grouped: its series is then refused, not scored short
            walk.undecodable.add(path)
        walk.refuse(rel, kind, sha, REJECTED, f"{rel}: the file or folder name is not valid UTF-8 (shown here "
                                              "with \\x escapes), so reports cannot name it; rename it to UTF-8")
        return
    item = Item(rel, kind, file_kind, (raw_rel,), sha, (key,))
    if file_kind == DICOM:  # one item per scan: a slice of a series is held until the series is known
        walk.dicom_files[path] = (sha, key)
        walk.dicom_items[path] = item
        if facts and facts.get("series"):
            walk.known_series[path] = facts["series"]
    else:
        walk.found.items.append(item)


def _kind_by_name(by_name: str | None) -> str:
    """The input kind a file's name promises: NIfTI a volume, an image suffix an image, else a DICOM slice."""
    return CT_VOLUME if by_name == NIFTI else UNKNOWN_IMAGE if by_name == IMAGE else CT_SLICE


def _series_items(walk: _Walk) -> list[Item]:
    """One ct_volume item per DICOM series of two or more slices, and one ct_slice item per slice that
    is alone in its series (or whose header names none: its row says why). A folder with a slice
    still arriving or unreadable, or changed within the settling time, gets no series this run: it is
    named in the skipped list and a later run scores the whole scan."""
    series, unreadable = dicom.group_series(walk.dicom_files, known=walk.known_series)
    for s in series:  # remember each slice's series, so tomorrow its header is not read again
        for f in s.files:
            rel = report_text(f.relative_to(walk.root).as_posix())
            if rel in walk.new_facts:
                walk.new_facts[rel][1]["series"] = s.uid_hash
    # Per folder, the files that may be a missing slice of its series: broken content (empty,
    # truncated, not DICOM) or a name reports cannot hold. A readable file naming no series
    # (a DICOMDIR) is not one of them.
    suspects: dict[Path, dict[Path, str]] = {}
    for path, problem in unreadable.items():
        if isinstance(problem, dicom.SliceUnreadable):  # gone or unreadable since it was hashed
            walk.unsettled_folders[path.parent] = f"{report_text(path.name)} cannot be read"
        elif not isinstance(problem, dicom.SliceWithoutSeries):
            suspects.setdefault(path.parent, {})[path] = utf8_text(f"cannot be read as DICOM ({problem})")
    for path in walk.undecodable:  # DICOM files only
        suspects.setdefault(path.parent, {}).setdefault(path, "has a name that is not valid UTF-8")
    items = [walk.dicom_items[p] for p in unreadable if p in walk.dicom_items]
    for s in series:
        if len(s.files) < 2:
            items.extend(walk.dicom_items[f] for f in s.files if f in walk.dicom_items)
            continue
        raw_key = s.folder.relative_to(walk.root).as_posix()
        key, folder_undecodable = report_text(raw_key), is_undecodable(raw_key)
        age = walk.now - walk.newest_mtime.get(s.folder, 0.0)
        why = walk.unsettled_folders.get(s.folder) or (
            f"the folder changed {age:.0f} s ago" if walk.settle_seconds and 0 <= age < walk.settle_seconds else "")
        if why:
            walk.skip(f"{key} (series {s.uid_hash})", f"DICOM series not assembled this run: {why}; "
                                                      "a later run scores it")
            continue
        if folder_undecodable or s.folder in suspects:
            items.append(_refused_series(walk, s, key, suspects.get(s.folder, {}), folder_named=folder_undecodable))
            continue
        rels = tuple(f.relative_to(walk.root).as_posix() for f in s.files)
        items.append(Item(key, CT_VOLUME, DICOM_SERIES, rels, _series_digest(walk, s.files),
                          tuple(walk.dicom_files[f][1] for f in s.files), series_uid_hash=s.uid_hash))
    return items


def _series_digest(walk: _Walk, files: Iterable[Path], tag: str = "") -> str:
    """A series' identity: its slices' relative paths and content hashes (plus ``tag``)."""
    return sha256_bytes((tag + "\n".join(f"{report_text(f.relative_to(walk.root).as_posix())} {walk.dicom_files[f][0]}"
                                         for f in files)).encode())


def _refused_series(walk: _Walk, s: dicom.DicomSeries, key: str, suspects: dict[Path, str],
                    folder_named: bool) -> Item:
    """A series that is ``rejected`` rather than scored: its folder's name is not UTF-8, or the
    folder holds a file that may be one of its slices but cannot be read as one (a series missing
    a slice would be scored as complete). The hash covers those files too, so once they are fixed,
    renamed or removed the series is scored; unchanged, it is reported once."""
    files = sorted({*s.files, *suspects}, key=lambda p: (p.name, str(p)))
    if folder_named:
        why = (f"{key}: DICOM series not scored: the folder name is not valid UTF-8 (shown here with \\x "
               "escapes), so reports cannot name it; rename the folder to UTF-8")
    else:
        first, reason = sorted(suspects.items())[0]
        more = f" (and {len(suspects) - 1} more files)" if len(suspects) > 1 else ""
        why = (f"{key}: DICOM series not scored: {report_text(first.name)} in its folder {reason}{more}, so the "
               "series may be missing a slice; fix, rename or remove that file and a later run scores the series")
    return Item(key, CT_VOLUME, DICOM_SERIES, tuple(report_text(f.relative_to(walk.root).as_posix()) for f in files),
                _series_digest(walk, files, tag="broken series\n"), series_uid_hash=s.uid_hash,
                refusal_status=REJECTED, refusal=why)


def input_kind(path: Path) -> str:
    """``ct_slice`` (grey image), ``histology_tile`` (colour image) or ``image`` (an image that does
    not open, or is too large to decode for a look: its error is reported by the models that would
    score it)."""
    try:
        with readers.open_image(path) as img:
            if img.size[0] * img.size[1] > readers.MAX_TILE_PIXELS:
                return "image"
            if img.mode in ("1", "L", "LA") or img.mode.startswith(("I", "F")):
                return CT_SLICE
            img.draft("RGB", (128, 128))  # JPEG: decode at reduced size, it is only a colour check
            thumb = np.asarray(img.convert("RGB").resize((128, 128)), dtype=np.int16)
    except Exception:  # noqa: BLE001 - any failure: let the readers name the problem on the row
        return "image"
    # Stained tissue is colourful almost everywhere; a CT slice saved as RGB has (nearly) equal
    # channels, except where a coloured annotation (a ruler, a marker) is burnt in. So the share of
    # coloured pixels decides, not their mean: on ../shared/data it is at most 0.8% for the 685
    # chest CT slices and at least 44% for the 900 LC25000 tiles; 5% keeps a ruler over 3% of a
    # slice with the CT models and a tile at a tissue edge (10% tissue on glass) with the tile models.
    # (At 128 px a thin line stays thin; a 64 px thumbnail smeared a 3% ruler over 6%.)
    spread = np.abs(thumb - thumb.mean(axis=2, keepdims=True)).mean(axis=2)
    return HISTOLOGY_TILE if (spread > COLOUR_SPREAD).mean() >= HISTOLOGY_COLOURED_SHARE else CT_SLICE


