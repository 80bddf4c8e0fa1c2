"""Score incoming files with exported bundles on ONNX Runtime, in batches, one result row per (item, model).

An *item* is what one report row is about: an image file (histology tile or CT slice, PNG/JPEG/
TIFF or a DICOM slice), a NIfTI volume, or a DICOM series (the slices of one SeriesInstanceUID in
one folder, assembled into a volume). Preprocessing is rebuilt from the bundle's card alone.

Statuses: ``ok``; ``rejected`` (the input itself is bad: it would be bad again, so the ledger
counts it as done); ``error`` (something outside the file's content failed: permissions, the
model, the runtime; retried by the next run). A file still being written is *skipped*: no row,
named in the run's log and summary, scored by a later run. Rows name files by their path relative
to the input folder and their sha256, never by anything read from inside them (no patient data).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lung_models import preprocess
from lung_models.bundle import ModelBundle
from lung_models.data import dicom
from lung_models.data.readers import (
    InputError,
    check_ct_intensities,
    error_detail,
    file_kind,
    read_nifti_hu,
    read_rgb_image,
)
from lung_models.export import ort_session
from lung_models.fileutil import report_text, sha256_bytes, sha256_file
from lung_models.registry import CT_SLICE, CT_VOLUME, HISTOLOGY_TILE

log = logging.getLogger(__name__)

OK, REJECTED, ERROR = "ok", "rejected", "error"
# Which kinds of item each modality scores. An image whose kind cannot be told (it does not even
# open) goes to every image model, so each reports the problem on its row.
MODALITY_INPUTS = {HISTOLOGY_TILE: {HISTOLOGY_TILE, "image"}, CT_SLICE: {CT_SLICE, "image"},
                   CT_VOLUME: {CT_VOLUME}}
VOLUME_BATCH = 2
# input_kind: a pixel is coloured when its channels differ from their mean by more than this many
# grey levels on average (JPEG chroma noise in a grey slice stays under it); an image is a histology
# tile when at least this share of its pixels is coloured.
COLOUR_SPREAD = 4.0
HISTOLOGY_COLOURED_SHARE = 0.05
DEFAULT_SETTLE_SECONDS = 60.0


class FileChanged(RuntimeError):
    """A file changed between discovery and reading (still being written): skip it this run."""


@dataclass(frozen=True)
class Item:
    key: str  # relative path of the file, or of the folder holding a DICOM series ("." for the input folder)
    kind: str  # histology_tile | ct_slice | ct_volume | image (an image that does not open)
    source: str  # image | nifti | dicom | dicom_series | refused
    files: tuple[str, ...]  # relative paths of the files read to score it
    sha256: str  # content hash: the file's, or for a series a hash over its slices' names and hashes
    stats: tuple[tuple[int, ...], ...] = ()  # _stat_key of each file when it was hashed
    series_uid_hash: str = ""
    refusal: str = ""  # set when the item is refused without being read (symlink out of the folder...)
    refusal_status: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Item:
        return cls(**{**d, "files": tuple(d["files"]), "stats": tuple(tuple(s) for s in d["stats"])})


@dataclass
class Incoming:
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)


@dataclass
class LoadedModel:
    bundle: ModelBundle
    session: Any
    provider: str
    input_name: str
    onnx_sha256: str


def open_model(bundle: ModelBundle) -> LoadedModel:
    """Verify the ONNX file against the bundle, open a session, note the provider that runs."""
    onnx_sha = bundle.verify()
    session = ort_session(bundle.onnx_path)
    provider = session.get_providers()[0]
    log.info("%s %s runs on ONNX Runtime %s", bundle.name, bundle.version, provider)
    return LoadedModel(bundle, session, provider, session.get_inputs()[0].name, onnx_sha)


def predict(model: LoadedModel, batch: np.ndarray) -> np.ndarray:
    return model.session.run(None, {model.input_name: batch.astype(np.float32, copy=False)})[0]


# ------------------------------------------------------------------------------------------ discovery
def _stat_key(st: os.stat_result) -> tuple[int, ...]:
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

    def skip(self, rel: str, why: str) -> None:
        self.found.skipped.append((rel, why))

    def refuse(self, rel: str, kind: str, sha: str, status: str, why: str) -> None:
        self.found.items.append(Item(rel, kind, "refused", (rel,), sha, refusal_status=status, refusal=why))


def discover(input_dir: str | Path, settle_seconds: float = 0.0, now: float | None = None) -> Incoming:
    """Every scoreable item under ``input_dir`` (recursive; hidden files and folders skipped).

    Image suffixes, NIfTI suffixes, ``.dcm`` and extensionless files with a DICOM preamble are
    considered; anything else (notes, checksums) is ignored. A file modified less than
    ``settle_seconds`` ago, or that changes while it is hashed, is still arriving: skipped this run,
    and so is any DICOM series in its folder. A symbolic link is followed only if it stays inside
    the folder; nothing outside is ever opened. Only regular files are read (a named pipe would
    block the night).
    """
    root = Path(input_dir)
    walk = _Walk(root, os.path.realpath(root), datetime.now(timezone.utc).timestamp() if now is None else now,
                 settle_seconds)

    def unlistable(exc: OSError) -> None:
        rel = report_text(Path(exc.filename).relative_to(root).as_posix()) if exc.filename else "?"
        walk.skip(rel, f"folder cannot be listed ({exc.strerror}); give the scoring user read access to it")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        folder = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            if (folder / d).is_symlink():  # os.walk does not descend into it; say so
                dirnames.remove(d)
                walk.skip(report_text((folder / d).relative_to(root).as_posix()),
                          "symbolic link to a folder: not followed; copy the files into the input folder")
        for name in sorted(filenames):
            if not name.startswith("."):
                _discover_file(walk, folder / name)
            else:  # hidden files (e.g. a transfer's temp file) still tell that the folder is changing
                try:
                    mtime = (folder / name).lstat().st_mtime
                except OSError:
                    continue
                walk.newest_mtime[folder] = max(walk.newest_mtime.get(folder, 0.0), mtime)
    walk.found.items.extend(_series_items(walk))
    walk.found.items.sort(key=lambda i: (i.key, i.series_uid_hash))
    return walk.found


def _discover_file(walk: _Walk, path: Path) -> None:
    """Classify, stat and hash one directory entry; add an item, a refusal or a skip to ``walk``."""
    raw_rel = path.relative_to(walk.root).as_posix()
    rel, name, folder = report_text(raw_rel), report_text(path.name), path.parent
    undecodable = rel != raw_rel  # refused once it is known to be a regular file and a scan (below)
    by_name = file_kind(path)
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
        return
    try:
        is_dcm = by_name is None and dicom.is_dicom_file(path)
    except OSError as exc:  # an extensionless file that cannot be read: is it a slice? cannot tell
        walk.unsettled_folders[folder] = f"{name} cannot be read"
        walk.skip(rel, f"cannot be read ({exc.strerror}) to tell whether it is a DICOM slice; give the scoring "
                       "user read access to it")
        return
    if by_name is None and not is_dcm:
        return
    kind = CT_VOLUME if by_name == "volume" else CT_SLICE if is_dcm else "image"
    source = "nifti" if by_name == "volume" else "dicom" if is_dcm else "image"
    age = walk.now - before.st_mtime
    if walk.settle_seconds and 0 <= age < walk.settle_seconds:  # a future mtime (clock skew) counts as settled
        walk.skip(rel, f"modified {age:.0f} s ago (under {walk.settle_seconds:.0f} s): may still be arriving; "
                       "a later run scores it")
        if is_dcm:
            walk.unsettled_folders[folder] = f"{name} is still arriving"
        return
    try:
        sha = sha256_file(path)
    except OSError as exc:
        if is_dcm:
            walk.unsettled_folders[folder] = f"{name} cannot be read"
        walk.refuse(rel, kind, "", ERROR, f"{name}: cannot be read ({exc.strerror}); "
                                          "give the scoring user read access to it")
        return
    key = _stat_key(before)
    try:
        changed = _stat_key(path.stat()) != key
    except OSError:
        changed = True
    if changed:
        walk.skip(rel, "changed while being read: still being written; a later run scores it")
        if is_dcm:
            walk.unsettled_folders[folder] = f"{name} is still being written"
        return
    if source == "image":
        kind = input_kind(path)
    elif source == "dicom":
        walk.dicom_files[path] = (sha, key)  # still grouped: its series is then refused, not scored short
    if undecodable:  # SQLite and a UTF-8 CSV cannot hold the name: one row naming it escaped, not a crashed night
        if source == "dicom":
            walk.undecodable.add(path)
        walk.refuse(rel, kind, sha, REJECTED, f"{rel}: the file or folder name is not valid UTF-8 (shown here "
                                              "with \\x escapes), so reports cannot name it; rename it to UTF-8")
        return
    walk.found.items.append(Item(rel, kind, source, (rel,), sha, (key,)))


def _kind_by_name(by_name: str | None) -> str:
    """The item kind a file's name promises: NIfTI a volume, an image suffix an image, else a DICOM slice."""
    return CT_VOLUME if by_name == "volume" else "image" if by_name == "image" else CT_SLICE


def _series_items(walk: _Walk) -> list[Item]:
    """One ct_volume item per DICOM series of two or more slices (one slice alone is only a slice).
    A folder with a slice still arriving or unreadable, or changed within the settling time, gets
    no series this run: it is named in the skipped list and a later run assembles it."""
    series, unreadable = dicom.group_series(walk.dicom_files)  # bad headers: their slice rows say why
    # Per folder, the files that may be a missing slice of its series: broken content (empty,
    # truncated, not DICOM) or a name reports cannot hold. A readable file naming no series
    # (a DICOMDIR) is not one of them.
    suspects: dict[Path, dict[Path, str]] = {}
    for path, problem in unreadable.items():
        if isinstance(problem, dicom.SliceUnreadable):  # gone or unreadable since it was hashed
            walk.unsettled_folders[path.parent] = f"{report_text(path.name)} cannot be read"
        elif not isinstance(problem, dicom.SliceWithoutSeries):
            suspects.setdefault(path.parent, {})[path] = report_text(f"cannot be read as DICOM ({problem})")
    for path in walk.undecodable:  # DICOM files only
        suspects.setdefault(path.parent, {}).setdefault(path, "has a name that is not valid UTF-8")
    items = []
    for s in series:
        if len(s.files) < 2:
            continue
        raw_key = s.folder.relative_to(walk.root).as_posix()
        key = report_text(raw_key)
        age = walk.now - walk.newest_mtime.get(s.folder, 0.0)
        why = walk.unsettled_folders.get(s.folder) or (
            f"the folder changed {age:.0f} s ago" if walk.settle_seconds and 0 <= age < walk.settle_seconds else "")
        if why:
            walk.skip(f"{key} (series {s.uid_hash})", f"DICOM series not assembled this run: {why}; "
                                                      "a later run scores it")
            continue
        if key != raw_key or s.folder in suspects:
            items.append(_refused_series(walk, s, key, suspects.get(s.folder, {}), folder_named=key != raw_key))
            continue
        rels = tuple(f.relative_to(walk.root).as_posix() for f in s.files)
        items.append(Item(key, CT_VOLUME, "dicom_series", rels, _series_digest(walk, s.files),
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
    return Item(key, CT_VOLUME, "dicom_series", tuple(report_text(f.relative_to(walk.root).as_posix()) for f in files),
                _series_digest(walk, files, tag="broken series\n"), series_uid_hash=s.uid_hash,
                refusal_status=REJECTED, refusal=why)


def input_kind(path: Path) -> str:
    """``ct_slice`` (grey image), ``histology_tile`` (colour image) or ``image`` (an image that does
    not open: its error is reported by the models that would score it)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
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


def items_for(bundle: ModelBundle, items: Iterable[Item]) -> list[Item]:
    wanted = MODALITY_INPUTS[bundle.modality]
    return [i for i in items if i.kind in wanted]


# -------------------------------------------------------------------------------------------- reading
def _check_unchanged(item: Item, root: Path) -> None:
    for rel, then in zip(item.files, item.stats):
        try:
            now = _stat_key((root / rel).stat())
        except OSError:
            now = None
        if now != tuple(then):
            raise FileChanged(f"{rel}: changed or removed since it was hashed; a later run scores it")


def load_input(item: Item, root: Path, params: dict[str, Any]) -> np.ndarray:
    """Decode and preprocess one item for a model whose card holds ``params``."""
    path = root / item.files[0]
    if item.source == "image":
        data = read_rgb_image(path)
    elif item.source == "nifti":
        volume, _ = read_nifti_hu(path)
        data = check_ct_intensities(path, volume)
    elif item.source == "dicom":
        window = params.get("ct_window")
        if not window:
            raise BundleInputError(f"{path.name}: this model's bundle records no ct_window, so DICOM slices cannot be "
                                   "windowed like its training images; re-export the model with this version")
        data = dicom.slice_to_rgb(path, float(window["center"]), float(window["width"]))
    elif item.source == "dicom_series":
        series = dicom.DicomSeries(folder=path.parent, series_uid="", uid_hash=item.series_uid_hash,
                                   files=tuple(root / f for f in item.files))
        volume, _, _ = dicom.read_series_hu(series)
        data = check_ct_intensities(path.parent, volume)
    else:
        raise ValueError(f"unknown item source {item.source!r}")
    _check_unchanged(item, root)  # the bytes decoded are the bytes hashed
    return preprocess.model_input(data, params)


class BundleInputError(RuntimeError):
    """The bundle cannot take this kind of input (an error of the model, not of the file)."""


# -------------------------------------------------------------------------------------------- scoring
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def result_row(model: LoadedModel | ModelBundle, item: Item, **values: Any) -> dict[str, Any]:
    """One report row; ``values`` fill status, error, predicted class, probabilities, provider."""
    bundle = model.bundle if isinstance(model, LoadedModel) else model
    return {"relative_path": item.key, "file_sha256": item.sha256, "model": bundle.name,
            "model_version": bundle.version, "bundle_sha256": bundle.card["onnx_sha256"],
            "item_kind": item.source, "series_uid_hash": item.series_uid_hash,
            "provider": model.provider if isinstance(model, LoadedModel) else "",
            "scored_utc": _now(), "predicted_class": "", "error": "", **values}


def refused_rows(bundle: ModelBundle, items: Iterable[Item], reason: str) -> list[dict[str, Any]]:
    """Rows for items a model could not score at all (its bundle was refused): the report still
    lists every (item, model) pair and says why; ``error``, so the next run tries again."""
    return [result_row(bundle, item, status=ERROR, error=reason) for item in items]


def _failure_row(model: LoadedModel, item: Item, root: Path, exc: Exception) -> dict[str, Any] | None:
    """The row for an item that could not be loaded, or None if it is to be skipped this run.

    ``rejected`` only when the content is at fault (it would fail again); the system's faults
    (permissions, I/O, memory, the bundle) are ``error``, retried by the next run.
    """
    name = Path(item.key).name
    if isinstance(exc, FileChanged):
        return None
    if isinstance(exc, InputError):
        return result_row(model, item, status=REJECTED, error=str(exc))
    if isinstance(exc, BundleInputError):
        return result_row(model, item, status=ERROR, error=str(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        return result_row(model, item, status=ERROR, error=f"{name}: cannot be read ({exc.strerror}); check the "
                          "file system and the scoring user's permissions")
    if isinstance(exc, MemoryError):
        return result_row(model, item, status=ERROR, error=f"{name}: out of memory while decoding; score it on a "
                          "machine with more memory or with a smaller batch")
    return result_row(model, item, status=REJECTED, error=(
        f"{name}: cannot be decoded or preprocessed ({error_detail(exc, root / item.key)}); re-export or "
        "re-transfer the file"))


def score_items(model: LoadedModel, items: Iterable[Item], root: Path, batch_size: int = 8,
                skipped: list[tuple[str, str]] | None = None) -> Iterator[list[dict[str, Any]]]:
    """Yield the rows of each batch (so a caller can commit them batch by batch). Items are read
    and preprocessed one at a time and run in batches, so memory is bounded by the batch size."""
    bundle = model.bundle
    params = bundle.preprocessing
    if params["kind"] == "ct_volume":  # a batch of 3-D volumes costs gigabytes: keep it small
        batch_size = min(batch_size, VOLUME_BATCH)
    classes = bundle.class_names
    pending: list[tuple[Item, np.ndarray]] = []
    out: list[dict[str, Any]] = []

    def flush() -> None:
        try:
            probs = predict(model, np.stack([x for _, x in pending]))
        except Exception as exc:  # noqa: BLE001 - a runtime failure fails this batch's rows, not the night
            out.extend(result_row(model, item, status=ERROR, error=f"{Path(item.key).name}: inference failed "
                                  f"({error_detail(exc, root / item.key)}); check the model and the runtime")
                       for item, _ in pending)
        else:
            for (item, _), p in zip(pending, probs):
                out.append(result_row(model, item, status=OK, predicted_class=classes[int(np.argmax(p))],
                                      **{f"prob_{c}": float(v) for c, v in zip(classes, p)}))
        pending.clear()

    for item in items:
        if item.refusal:
            out.append(result_row(model, item, status=item.refusal_status, error=item.refusal))
        else:
            try:
                pending.append((item, load_input(item, root, params)))
            except Exception as exc:  # noqa: BLE001 - one bad file must never end the night
                failure: Exception = exc
                try:
                    _check_unchanged(item, root)  # a failure on a file that changed meanwhile says nothing of it
                except FileChanged as changed:
                    failure = changed
                row = _failure_row(model, item, root, failure)
                if row is not None:
                    out.append(row)
                else:
                    log.warning("skipped: %s", failure)
                    if skipped is not None:
                        skipped.append((item.key, str(failure)))
        if len(pending) >= batch_size:
            flush()
        if len(out) >= batch_size:
            yield list(out)
            out.clear()
    if pending:
        flush()
    if out:
        yield list(out)
