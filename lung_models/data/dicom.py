"""DICOM CT input: single slices to Hounsfield units or display RGB, series to RAS volumes, and a series writer.

Hospitals send CT as DICOM, not as the PNGs and NIfTI volumes the models were trained on. This module turns a
DICOM slice into what the 2-D models saw (a windowed greyscale image repeated to RGB) and a DICOM series into
what the 3-D model sees (a float32 HU volume in the same closest-canonical RAS layout that
``nib.as_closest_canonical`` gives a NIfTI file), so that the same scan scores the same whichever format it came in.

As in :mod:`lung_models.data.readers`, every bad input is an :class:`InputError` whose message names the file
(or the series folder), says what is wrong and what to do, so that a scoring run can report it and go on.
Messages never carry patient identifiers: files are named by file name, series by ``uid_hash`` (a hash of the
SeriesInstanceUID), and nothing is copied from PatientName, PatientID, dates or other header text. Nor do pydicom's
own warnings and log records, which quote invalid values and full paths: every read in this module runs with them
silenced (``_quiet_pydicom``).

Decoding is pydicom's: uncompressed and RLE data always work, JPEG and JPEG 2000 through Pillow, anything else
(JPEG-LS, lossless JPEG process 14, ...) needs a pydicom decoder plugin (pylibjpeg-*, gdcm or pyjpegls).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from nibabel import orientations
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from lung_models.data import readers
from lung_models.data.readers import InputError, error_detail

DICOM_SUFFIXES = (".dcm", ".dicom")
MIN_SERIES_SLICES = 8  # fewer slices than this cannot be a volume for the 3-D model

MIN_SLICE_SIZE = 32  # a smaller image is an icon or a localiser fragment, not a CT slice
# Decoding allocates rows * columns * BitsAllocated/8 bytes whatever the file size: a kilobyte RLE file claiming
# 65535x65535 would take 8.6 GB and can get the nightly run OOM-killed. CT is reconstructed at 512x512 (at most
# 1024 or 2048 for high-resolution and micro-CT), so 4096 a side is ample; the worst accepted slice then decodes
# to 64 MiB (32 bits) and about 256 MiB with its float64/float32 HU copies.
MAX_SLICE_SIDE = 4096
BITS_ALLOCATED = (8, 16, 32)  # what a CT slice is stored in (32: float or 32-bit integer pixel data)
ORIENTATION_TOLERANCE = 1e-3  # direction cosines: unit length, perpendicular, equal between slices
PIXEL_SPACING_TOLERANCE = 1e-3  # relative: slices of one series share one in-plane grid
SAME_POSITION_MM = 0.01  # two slices closer than this along the normal are at the same position
GAP_TOLERANCE = 0.10  # relative agreement of each slice gap with the median gap ...
GAP_TOLERANCE_MM = 0.10  # ... or this absolute agreement, whichever is larger

_BLANK_UID_KEY = "frame-of-reference:"  # grouping key prefix for anonymised slices with a blanked SeriesInstanceUID
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_RETRANSFER = "re-transfer the file from its source (PACS or scanner export)"
_UNCOMPRESSED = "re-export it uncompressed (Explicit VR Little Endian)"


_pydicom_logger = logging.getLogger("pydicom")
_quiet_lock = threading.Lock()
_quiet_depth = 0  # nesting (and threads) of _quiet_pydicom; pydicom's settings are restored when it drops to 0
_quiet_saved: tuple[int, int] = (pydicom.config.WARN, logging.NOTSET)


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's value validation, its warnings and its logger below ERROR for the duration.

    pydicom quotes invalid values (``Invalid value for VR UI: '1.2.826.MRN12345...'``) and full file paths (which
    may name the patient) in warnings it also logs through the 'pydicom' logger, so they would reach stderr and
    the run logs. Every dataset read and value access of this module runs inside this. Warnings recorded by a
    nested ``catch_warnings(record=True)`` (the truncation check of ``_read_dataset``) are still seen there.
    The settings are process-wide: the first of nested or concurrent users saves them, the last restores them.
    (``catch_warnings`` itself is not thread-safe: under threads another thread's warnings may be hidden too.)
    """
    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = (pydicom.config.settings.reading_validation_mode, _pydicom_logger.level)
            pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
            _pydicom_logger.setLevel(max(logging.ERROR, _pydicom_logger.getEffectiveLevel()))
        _quiet_depth += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                pydicom.config.settings.reading_validation_mode, level = _quiet_saved
                _pydicom_logger.setLevel(level)


class _Problem(Exception):
    """What is wrong and what to do, before it is attributed to a file (read_slice_hu) or a series (read_series_hu)."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


# ---------------------------------------------------------------------------------------------------
# Files and headers
# ---------------------------------------------------------------------------------------------------


def is_dicom_file(path: Path) -> bool:
    """True for a .dcm/.dicom suffix, or any file (typically without extension) whose bytes 128:132 are b"DICM".

    PACS exports and CDs often name slices without an extension (``IM0001``, ``1.2.840...``), so the suffix alone
    would miss them; the 'DICM' magic after the 128-byte preamble is what DICOM Part 10 guarantees. An
    extensionless file that cannot be read raises OSError: whether it is a slice cannot be told, and a caller
    assembling series must know that (a series missing that slice would look complete).
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return not path.is_dir()
    with open(path, "rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM"


@dataclass(frozen=True)
class DicomHeader:
    """The geometry and identity of one slice, read without pixel data; deliberately no patient attributes."""

    path: Path
    series_uid: str  # SeriesInstanceUID as stored ("" when an anonymiser blanked it)
    instance_number: int | None
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm, DICOM LPS
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row then column direction cosines (6)
    pixel_spacing: tuple[float, float] | None  # PixelSpacing: (between rows, between columns) in mm
    rows: int | None
    columns: int | None
    modality: str
    transfer_syntax: str


def _read_dataset(path: Path, *, pixels: bool) -> Dataset:
    """dcmread with every failure turned into a _Problem: missing, empty, not DICOM, truncated."""
    size = path.stat().st_size  # OSError (missing, permissions, I/O) is the system's fault, not the file's: raised
    if size == 0:
        raise _Problem("empty file (0 bytes)", "re-export or re-transfer the DICOM file")
    # pydicom only warns when the data end inside an element (e.g. encapsulated pixel data cut short), and then
    # hands back a partial or empty dataset: record the warnings to call that what it is, a truncated file.
    # (catch_warnings is process-global: under threads a warning may be missed, and the empty or partial
    # dataset is then still refused below or by the missing-element checks, with a less precise message.)
    with _quiet_pydicom(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
            except InvalidDicomError:
                ds = _read_without_preamble(path, pixels=pixels)
        except (_Problem, MemoryError):
            raise
        except RecursionError:  # pydicom parses nested sequences recursively
            raise _Problem("sequences nested too deeply to parse (thousands of levels; no scanner or PACS writes "
                           "that)", "re-export the slice from the scanner or PACS") from None
        except OSError as exc:
            if exc.errno is not None:
                raise  # permissions or I/O: the caller reports an error and retries later
            raise _Problem(f"not a readable DICOM file ({error_detail(exc, path)})",
                           f"check it is a DICOM image and {_RETRANSFER}") from None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad bytes
            raise _Problem(f"not a readable DICOM file ({error_detail(exc, path)})",
                           f"check it is a DICOM image and {_RETRANSFER}") from None
    if len(ds) == 0 or any("end of file" in str(w.message).lower() for w in caught):
        raise _Problem("truncated DICOM file (the data end before the last element is complete)", _RETRANSFER)
    return ds


def _read_without_preamble(path: Path, *, pixels: bool) -> Dataset:
    """Read a raw dataset without the 128-byte preamble and 'DICM' (old ACR-NEMA style exports), or refuse.

    ``force=True`` parses almost any bytes into some elements, so the result only counts as DICOM if it holds
    elements every image has; its transfer syntax is then the encoding pydicom detected.
    """
    ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
    if not any(keyword in ds for keyword in ("SOPClassUID", "Modality", "Rows", "SeriesInstanceUID", *_PIXEL_KEYWORDS)):
        raise _Problem("not a DICOM file (no 'DICM' marker at byte 128 and no recognisable DICOM elements)",
                       "check the file is a DICOM image; re-export it from the PACS or viewer as DICOM")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        ds.file_meta = meta if meta is not None else FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit is not False
                                          else ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
    return ds


def _value(ds: Dataset, keyword: str) -> object:
    """An element's value, None if absent, empty or unparsable (pydicom may raise on access to a bad value)."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - malformed value strings
        return None
    return None if value is None or value == "" else value


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    """Exactly ``n`` finite numbers from a DS/FD element, else None (the caller says it is missing or invalid)."""
    value = _value(ds, keyword)
    if value is None:
        return None
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n and all(math.isfinite(v) for v in numbers) else None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _value(ds, keyword)
    try:
        return None if value is None else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = _value(ds, keyword)
    return "" if value is None else str(value).strip()


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _header(path: Path, ds: Dataset) -> DicomHeader:
    position = _floats(ds, "ImagePositionPatient", 3)
    spacing = _floats(ds, "PixelSpacing", 2)
    return DicomHeader(
        path=path,
        series_uid=_text(ds, "SeriesInstanceUID"),
        instance_number=_int(ds, "InstanceNumber"),
        position=(position[0], position[1], position[2]) if position else None,
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        pixel_spacing=(spacing[0], spacing[1]) if spacing and min(spacing) > 0 else None,
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        modality=_text(ds, "Modality").upper(),
        transfer_syntax=_transfer_syntax(ds),
    )


@_quiet_pydicom()
def read_header(path: Path) -> DicomHeader:
    """The slice's geometry and identity from its header alone (no pixel data), e.g. to group and sort a series."""
    path = Path(path)
    try:
        return _header(path, _read_dataset(path, pixels=False))
    except _Problem as p:
        raise InputError(path, p.problem, p.fix) from None


# ---------------------------------------------------------------------------------------------------
# Single slices
# ---------------------------------------------------------------------------------------------------


_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")  # PS3.5 9.1: digits and dots, at most 64
_CODE_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # a Code String (CS): Modality, PhotometricInterpretation


def _syntax_name(uid: UID) -> str:
    """A transfer syntax for a message: its name and UID when pydicom knows it, the UID when it is a
    well-formed unknown one; anything else from the header is not quoted (reports copy no free text)."""
    if uid.name != str(uid):
        return f"'{uid.name}' ({uid})"
    return f"{uid} (unknown)" if len(uid) <= 64 and _UID_RE.match(str(uid)) else "(a malformed UID, not shown)"


def _code(value: str) -> str:
    """A Code String value for a message, quoted only when it is a valid one."""
    return repr(value) if _CODE_RE.match(value) else "(an invalid code, not shown)"


def _check_side(rows: int | None, columns: int | None, bits: str = "") -> None:
    """Refuse a slice larger than MAX_SLICE_SIDE either way (from the header: before anything is decoded)."""
    if max(rows or 0, columns or 0) > MAX_SLICE_SIDE:
        size = f"{rows}x{columns} pixels" + (f" of {bits}" if bits else "")
        raise _Problem(f"image header claims {size}, larger than the {MAX_SLICE_SIDE}x{MAX_SLICE_SIDE} a CT slice "
                       "can be (refused before decoding: it could exhaust the memory)",
                       "check that it is a CT slice and not a scanned film, photo or stitched image; a genuine "
                       f"larger slice must be downsampled to at most {MAX_SLICE_SIDE}x{MAX_SLICE_SIDE} before scoring")


def _check_image_header(ds: Dataset) -> None:
    """Refuse from the header what cannot be a single CT slice, before spending time (and memory) on decoding."""
    modality = _text(ds, "Modality").upper()
    if modality and modality != "CT":
        raise _Problem(f"modality {_code(modality)} is not CT",
                       "only CT is scored here; send the CT series (not the MR/PET/X-ray or report object)")
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise _Problem("no pixel data (the PixelData element is absent): a header-only object or a truncated file",
                       f"send the image slices of the series, or {_RETRANSFER}")
    frames = _int(ds, "NumberOfFrames")
    if frames is not None and frames > 1:
        raise _Problem(f"multi-frame image ({frames} frames in one file)",
                       "export the series as single-frame CT slices (one file per slice)")
    samples = _int(ds, "SamplesPerPixel") or 1
    if samples != 1:
        raise _Problem(f"colour image ({samples} samples per pixel, {_code(_text(ds, 'PhotometricInterpretation'))})",
                       "send the original greyscale CT slice, not a screenshot or secondary capture")
    bits = _int(ds, "BitsAllocated")
    if bits not in BITS_ALLOCATED:
        raise _Problem(f"BitsAllocated {bits if bits is not None else 'missing'}: pixel data are not stored in "
                       "8, 16 or 32 bits, as CT slices are", "re-export the slice from the scanner or PACS")
    _check_side(_int(ds, "Rows"), _int(ds, "Columns"), f"{bits} bits")


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """pixel_array, with the transfer syntax checked first so that 'no decoder' and 'corrupt data' differ."""
    uid = UID(_transfer_syntax(ds))
    if not uid:
        raise _Problem("no transfer syntax in the file meta information", f"{_RETRANSFER}, or {_UNCOMPRESSED}")
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise _Problem(f"unsupported transfer syntax {_syntax_name(uid)}", f"{_UNCOMPRESSED}") from None
    if not decoder.is_available:
        plugins = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise _Problem(f"pixel data compressed as {_syntax_name(uid)}, which no installed decoder can read",
                       f"{_UNCOMPRESSED}, or install a pydicom decoder plugin for it ({plugins})")
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on bad data
        detail = error_detail(exc, path)
        if uid.is_compressed:
            raise _Problem(f"{_syntax_name(uid)} pixel data cannot be decoded ({detail})",
                           f"the file may be truncated or corrupt: {_RETRANSFER}, or {_UNCOMPRESSED}") from None
        raise _Problem(f"pixel data do not match the image header, the file is truncated or corrupt ({detail})",
                       _RETRANSFER) from None


def _rescale(ds: Dataset) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) with the DICOM defaults 1 and 0 when absent; invalid ones are refused."""
    result = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        if keyword not in ds:
            result.append(default)
            continue
        value = _floats(ds, keyword, 1)
        if value is None:
            raise _Problem(f"{keyword} is missing its value or is not a finite number (non-finite HU values)",
                           "re-export the slice from the scanner or PACS")
        result.append(value[0])
    if result[0] <= 0:  # 0 flattens every pixel to one value; a negative slope turns air into bone
        raise _Problem(f"RescaleSlope is {'0' if result[0] == 0 else 'negative'}, so the pixels cannot map to CT "
                       "Hounsfield units", "re-export the slice from the scanner or PACS")
    return result[0], result[1]


def _slice_hu(path: Path) -> np.ndarray:
    ds = _read_dataset(path, pixels=True)
    _check_image_header(ds)
    pixels = _decode(ds, path)
    if pixels.ndim != 2:
        raise _Problem(f"pixel data of shape {pixels.shape}, expected one 2-D slice",
                       "export the series as single-frame greyscale CT slices")
    if min(pixels.shape) < MIN_SLICE_SIZE:
        raise _Problem(f"image of {pixels.shape[0]}x{pixels.shape[1]} pixels is too small to be a CT slice "
                       f"(at least {MIN_SLICE_SIZE}x{MIN_SLICE_SIZE})",
                       "send the full-resolution CT slices, not thumbnails or icons")
    slope, intercept = _rescale(ds)
    hu = (pixels.astype(np.float64) * slope + intercept).astype(np.float32)
    if not np.isfinite(hu).all():
        raise _Problem("pixel data contain NaN or infinite values", "re-export the slice from the scanner or PACS")
    return hu


@_quiet_pydicom()
def read_slice_hu(path: Path) -> np.ndarray:
    """float32 (rows, columns) in Hounsfield units: pixel_array * RescaleSlope + RescaleIntercept (defaults 1, 0).

    The stored values are scanner units (often unsigned with an intercept of -1024); HU are what windows and the
    models are defined in. Pixels outside the reconstructed circle keep their stored padding (e.g. -2048 or -3024
    HU): windowing or clipping maps them to air. Raises InputError naming the file, the problem and the fix for
    anything that is not one decodable greyscale CT image (see the module docstring for the decoders).
    """
    path = Path(path)
    try:
        return _slice_hu(path)
    except _Problem as p:
        raise InputError(path, p.problem, p.fix) from None


def window_to_uint8(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window like the DICOM VOI LUT 'LINEAR_EXACT' / a viewer export: (hu - (center - width/2)) * 255 / width,
    rounded, clipped to 0..255, uint8.

    The training PNGs are viewer exports with such a window, so a DICOM slice windowed the same way looks like
    them. ``width`` must be positive; ``hu`` is expected finite (read_slice_hu guarantees it).
    """
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise ValueError(f"window needs a finite center and a positive width, got center={center}, width={width}")
    scaled = (np.asarray(hu, dtype=np.float64) - (center - width / 2)) * 255.0 / width
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def slice_to_rgb(path: Path, center: float, width: float) -> np.ndarray:
    """uint8 (rows, cols, 3): read_slice_hu -> window_to_uint8 -> grey repeated to 3 channels.

    Displayed as stored (rows top to bottom): for standard axial slices that is the radiological view (anterior at
    top, patient right on image left), which is how the training PNGs look, so no flip is applied.
    """
    grey = window_to_uint8(read_slice_hu(path), center, width)
    return np.repeat(grey[:, :, None], 3, axis=2)


# ---------------------------------------------------------------------------------------------------
# Series
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomSeries:
    """The files of one series in one folder; ``uid_hash`` stands for the series in reports and messages."""

    folder: Path  # the folder holding the slices
    series_uid: str  # SeriesInstanceUID, or "frame-of-reference:<FrameOfReferenceUID>[/<SeriesNumber>]" if blanked
    uid_hash: str  # first 16 hex chars of sha256(series_uid) - used in reports instead of the UID
    files: tuple[Path, ...]  # sorted by file name


def _uid_hash(series_uid: str) -> str:
    return hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def _series_key(ds: Dataset) -> str:
    """SeriesInstanceUID, or for anonymised exports that blank it, the frame of reference (and series number).

    Some anonymisers empty the UIDs instead of replacing them (the real sample series is one). Slices of one
    frame of reference in one folder are then treated as one series: if two acquisitions share it, the
    duplicate-position and spacing checks of read_series_hu refuse the mix rather than build a wrong volume.
    """
    uid = _text(ds, "SeriesInstanceUID")
    if uid:
        return uid
    frame = _text(ds, "FrameOfReferenceUID")
    if not frame:
        raise _Problem("no SeriesInstanceUID (and no FrameOfReferenceUID) to tell which series the slice belongs to",
                       "re-export the series with its UIDs (an anonymiser must replace UIDs, not remove them)")
    number = _text(ds, "SeriesNumber")
    return f"{_BLANK_UID_KEY}{frame}" + (f"/{number}" if number else "")


class SliceUnreadable(InputError):
    """A slice whose header could not be read because of the file system (gone, permissions, I/O), not
    because of its content: its series must wait for a later run rather than be assembled without it."""


class SliceWithoutSeries(InputError):
    """A readable DICOM file that is no slice of any series (a DICOMDIR): it does not hold the series
    in its folder back."""


MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR


def _is_directory(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    media = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    return MEDIA_STORAGE_DIRECTORY in (media, _text(ds, "SOPClassUID")) or "DirectoryRecordSequence" in ds


@_quiet_pydicom()
def group_series(paths: Iterable[Path], known: Mapping[Path, str] | None = None
                 ) -> tuple[list[DicomSeries], dict[Path, InputError]]:
    """Group DICOM files by (parent folder, SeriesInstanceUID), reading headers only.

    Returns the series (sorted by folder, uid_hash) and the files whose header could not be read with their
    error (a DICOMDIR's is a SliceWithoutSeries). A file without SeriesInstanceUID is an error for that file,
    unless the UID was blanked by an anonymiser and a FrameOfReferenceUID can stand in for it (see
    ``_series_key``). Grouping per folder keeps two copies of the same series in two folders apart.
    ``known`` maps files whose series is already known (from an earlier night) to its ``uid_hash``: their
    headers are not read again. Series are grouped by ``uid_hash``, so their ``series_uid`` is that of a
    slice read now, or empty when every slice was known.
    """
    known = known or {}
    groups: dict[tuple[Path, str], list[Path]] = {}
    uids: dict[tuple[Path, str], str] = {}
    errors: dict[Path, InputError] = {}
    for path in sorted({Path(p) for p in paths}):
        if path in known:
            groups.setdefault((path.parent, known[path]), []).append(path)
            continue
        try:
            ds = _read_dataset(path, pixels=False)
        except _Problem as p:
            errors[path] = InputError(path, p.problem, p.fix)
            continue
        except OSError as exc:  # vanished or unreadable since it was listed: the system's fault, not the file's
            errors[path] = SliceUnreadable(path, f"cannot be read ({exc.strerror or type(exc).__name__})",
                                           "check the file system and the scoring user's permissions")
            continue
        try:
            key = _series_key(ds)
        except _Problem as p:
            # Only a directory (DICOMDIR) is known to be no slice; a file without UIDs may be a slice
            # cut short before them (pydicom reads a file cut at an element boundary without a word).
            cls = SliceWithoutSeries if _is_directory(ds) else InputError
            errors[path] = cls(path, p.problem, p.fix)
            continue
        group = (path.parent, _uid_hash(key))
        groups.setdefault(group, []).append(path)
        uids[group] = key
    series = [DicomSeries(folder=folder, series_uid=uids.get((folder, uid_hash), ""), uid_hash=uid_hash,
                          files=tuple(sorted(files, key=lambda p: (p.name, str(p)))))
              for (folder, uid_hash), files in groups.items()]
    series.sort(key=lambda s: (str(s.folder), s.uid_hash))
    return series, errors


def _names(paths: Sequence[Path], limit: int = 4) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


@dataclass(frozen=True)
class _Geometry:
    """A checked slice stack: slice order along the normal and the raw (column, row, slice) LPS affine."""

    order: tuple[int, ...]  # indices into the headers, sorted along the slice normal
    shape: tuple[int, int, int]  # (columns, rows, slices)
    spacing: tuple[float, float, float]  # mm along (column index, row index, slice index)
    affine_lps: np.ndarray


def _check_attributes(headers: Sequence[DicomHeader]) -> None:
    needed = {"ImagePositionPatient": "position", "ImageOrientationPatient": "orientation",
              "PixelSpacing": "pixel_spacing", "Rows": "rows", "Columns": "columns"}
    missing = {keyword: [h.path for h in headers if getattr(h, field) is None] for keyword, field in needed.items()}
    missing = {keyword: paths for keyword, paths in missing.items() if paths}
    if missing:
        files = sorted({p for paths in missing.values() for p in paths}, key=lambda p: p.name)
        raise _Problem(f"{_names(files)} lack(s) a valid {', '.join(missing)}, which are needed to stack slices "
                       "into a volume", "re-export the series with its full geometry from the scanner or PACS, "
                       "or score the slices one by one as 2-D images")


def _check_orientation(headers: Sequence[DicomHeader]) -> tuple[np.ndarray, np.ndarray]:
    """The common row and column direction cosines, checked equal between slices and orthonormal."""
    first = headers[0]
    ref = np.asarray(first.orientation, dtype=np.float64)
    differing = [h for h in headers if np.abs(np.asarray(h.orientation) - ref).max() > ORIENTATION_TOLERANCE]
    if differing:
        other = differing[0]
        raise _Problem(f"slice orientation differs between slices: {other.path.name} has ImageOrientationPatient "
                       f"{_fmt(other.orientation or ())} but {first.path.name} has {_fmt(ref)} "
                       f"({len(differing)} slice(s) differ)",
                       "keep only the slices of one series in the folder (a localiser or a reformatted series "
                       "is mixed in)")
    row, col = ref[:3], ref[3:]
    row_len, col_len, dot = float(np.linalg.norm(row)), float(np.linalg.norm(col)), float(row @ col)
    if max(abs(row_len - 1), abs(col_len - 1), abs(dot)) > ORIENTATION_TOLERANCE:
        raise _Problem(f"ImageOrientationPatient {_fmt(ref)} of {first.path.name} is not orthonormal (row length "
                       f"{row_len:.4f}, column length {col_len:.4f}, row.column {dot:.4f})",
                       "the geometry header is corrupt; re-export the series from the scanner or PACS")
    return row, col


def _check_sizes(headers: Sequence[DicomHeader]) -> tuple[int, int]:
    first = headers[0]
    size = (first.rows or 0, first.columns or 0)
    try:
        _check_side(*size)
    except _Problem as p:
        raise _Problem(f"{first.path.name}: {p.problem}", p.fix) from None
    other = [h for h in headers if (h.rows, h.columns) != size]
    if other:
        raise _Problem(f"mixed image sizes: {first.path.name} is {size[0]}x{size[1]} but {other[0].path.name} is "
                       f"{other[0].rows}x{other[0].columns} ({len(other)} slice(s) differ)",
                       "keep only the slices of one series in the folder (a localiser or another reconstruction "
                       "is mixed in)")
    voxels = size[0] * size[1] * len(headers)
    if voxels > readers.MAX_VOLUME_VOXELS:
        raise _Problem(f"{len(headers)} slices of {size[0]}x{size[1]} ({voxels} voxels) are too large to be a CT scan",
                       "check the headers, or split or downsample the series before scoring")
    return size


def _check_pixel_spacing(headers: Sequence[DicomHeader]) -> None:
    """Every slice must have the first one's PixelSpacing: the volume is built with one in-plane grid,
    so a slice of another spacing (another reconstruction, a mixed-in localiser) would be stretched."""
    first = headers[0]
    ref = np.asarray(first.pixel_spacing, dtype=np.float64)
    limit = PIXEL_SPACING_TOLERANCE * ref.max()
    other = [h for h in headers if np.abs(np.asarray(h.pixel_spacing) - ref).max() > limit]
    if other:
        odd = other[0]
        raise _Problem(f"mixed pixel spacing: {odd.path.name} has PixelSpacing {_fmt(odd.pixel_spacing or ())} "
                       f"mm but {first.path.name} has {_fmt(ref)} mm ({len(other)} slice(s) differ)",
                       "keep only the slices of one series in the folder (another reconstruction or a localiser "
                       "is mixed in), or re-export the series with one pixel spacing")


def _check_positions(headers: Sequence[DicomHeader], normal: np.ndarray) -> tuple[tuple[int, ...], float]:
    """Slice order along the normal and the mean gap, after refusing duplicates, holes and uneven spacing."""
    positions = np.asarray([h.position for h in headers], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    d = along[order]
    paths = [headers[i].path for i in order]
    if d[-1] - d[0] < SAME_POSITION_MM:
        raise _Problem(f"zero gap: all {len(d)} slices are at the same position along the slice normal "
                       f"({d[0]:.2f} mm)", "this is a dynamic, cine or multi-phase acquisition at one table "
                       "position, not a volume; score the slices one by one as 2-D images")
    gaps = np.diff(d)
    dup = np.flatnonzero(gaps < SAME_POSITION_MM)
    if dup.size:
        i = int(dup[0])
        more = f" ({dup.size} duplicate pairs in all)" if dup.size > 1 else ""
        raise _Problem(f"duplicate positions: {paths[i].name} and {paths[i + 1].name} are both at {d[i]:.2f} mm "
                       f"along the slice normal{more}",
                       "remove the duplicate file, or if the two are different acquisitions (e.g. two phases), "
                       "put each series in its own folder")
    median = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - median) > max(GAP_TOLERANCE * median, GAP_TOLERANCE_MM))
    if bad.size:
        i = int(bad[0])
        where = f"between {paths[i].name} and {paths[i + 1].name} ({d[i]:.2f} and {d[i + 1]:.2f} mm along the normal)"
        more = f"; {bad.size} irregular gaps in all" if bad.size > 1 else ""
        ratio = gaps[i] / median
        if ratio >= 1.5:
            missing = int(round(ratio)) - 1
            raise _Problem(f"missing slice(s): the gap {where} is {gaps[i]:.2f} mm where the series steps by "
                           f"{median:.2f} mm, so about {missing} slice(s) seem missing there{more}",
                           "re-send the complete series (every slice of the folder)")
        raise _Problem(f"inconsistent slice spacing: the gap {where} is {gaps[i]:.2f} mm but the median gap is "
                       f"{median:.2f} mm{more}", "re-export the series with uniform slice spacing, or resample "
                       "it to a regular grid before scoring")
    # Slices must stack straight along the normal; a tilted gantry shifts each one in-plane (a sheared grid).
    drift = positions[order] - positions[order[0]] - np.outer(d - d[0], normal)
    shift = np.linalg.norm(drift, axis=1)
    limit = max(0.5 * min(min(h.pixel_spacing or (1.0, 1.0)) for h in headers), 0.05)
    if shift.max() > limit:
        k = int(np.argmax(shift))
        raise _Problem(f"sheared slice stack: {paths[k].name} is shifted {shift[k]:.2f} mm in-plane from "
                       f"{paths[0].name} (gantry tilt or a mixed series)",
                       "resample (de-tilt) the series to an orthogonal grid before scoring")
    return tuple(int(i) for i in order), float((d[-1] - d[0]) / (len(d) - 1))


def _check_geometry(headers: Sequence[DicomHeader]) -> _Geometry:
    _check_attributes(headers)
    row, col = _check_orientation(headers)
    rows, columns = _check_sizes(headers)
    _check_pixel_spacing(headers)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    spacing_between_rows, spacing_between_columns = headers[0].pixel_spacing or (1.0, 1.0)
    order, gap = _check_positions(headers, normal)
    affine = np.eye(4)
    affine[:3, 0] = row * spacing_between_columns  # i: column index, steps along the row direction
    affine[:3, 1] = col * spacing_between_rows  # j: row index, steps along the column direction
    affine[:3, 2] = normal * gap  # k: slice index, sorted along the normal
    affine[:3, 3] = headers[order[0]].position or (0.0, 0.0, 0.0)
    return _Geometry(order=order, shape=(columns, rows, len(headers)),
                     spacing=(spacing_between_columns, spacing_between_rows, gap), affine_lps=affine)


def _series_problem(series: DicomSeries, problem: str, fix: str) -> InputError:
    return InputError(series.folder, f"series {series.uid_hash}: {problem}", fix)


@_quiet_pydicom()
def read_series_hu(series: DicomSeries) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Assemble the series into (volume float32 HU shaped (x, y, z), spacing mm (x, y, z), 4x4 RAS affine).

    The result is laid out exactly as ``nib.as_closest_canonical(nib.Nifti1Image(raw, raw_affine))`` would lay
    it out, where raw[i, j, k] is column i, row j of slice k (slices sorted along the normal = row x column
    direction) and raw_affine is the header geometry converted from DICOM LPS to RAS. Saved as
    ``nib.Nifti1Image(volume, affine)``, readers.read_nifti_hu gives back this very array, so the scan scores
    the same whether it came as DICOM or as that NIfTI (a NIfTI in another orientation is scored as stored).
    For standard axial slices (IOP [1,0,0,0,1,0]) that is x = columns reversed (increasing towards the
    patient's right), y = rows reversed (towards anterior), z = slices from inferior to superior; the affine is
    then diagonal and positive.

    Every check is an InputError naming the series folder, its uid_hash, the offending file(s) and the fix:
    too few slices, missing geometry, orientation differing between slices or not orthonormal, mixed sizes,
    absurd size (from the headers, before any pixel is read), duplicate or all-equal positions, missing slices
    or uneven spacing, a sheared (gantry-tilted) stack, and any slice error of read_slice_hu.
    """
    files = series.files
    if len(files) < MIN_SERIES_SLICES:
        raise _series_problem(series, f"only {len(files)} slice(s) ({_names(files)}), fewer than the "
                              f"{MIN_SERIES_SLICES} a CT volume needs",
                              "send the complete series, or score the slices one by one as 2-D images")
    headers = []
    for path in files:
        try:
            headers.append(_header(path, _read_dataset(path, pixels=False)))
        except _Problem as p:
            raise _series_problem(series, f"slice {path.name}: {p.problem}", p.fix) from None
    try:
        geometry = _check_geometry(headers)
    except _Problem as p:
        raise _series_problem(series, p.problem, p.fix) from None

    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.affine_lps  # LPS -> RAS: negate x and y
    ornt = orientations.io_orientation(affine_ras)
    affine = affine_ras @ orientations.inv_ornt_aff(ornt, geometry.shape)
    out_shape = [0, 0, 0]
    spacing = [0.0, 0.0, 0.0]
    inverse = np.zeros_like(ornt)
    for axis, (out_axis, flip) in enumerate(ornt):
        out_shape[int(out_axis)] = geometry.shape[axis]
        spacing[int(out_axis)] = geometry.spacing[axis]
        inverse[int(out_axis)] = (axis, flip)
    volume = np.empty(out_shape, dtype=np.float32)
    # A (column, row, slice) view of the canonical array: each slice is written once, straight into its place,
    # so the volume is allocated once and comes out C-contiguous.
    raw = orientations.apply_orientation(volume, inverse)
    assert raw.shape == geometry.shape and np.shares_memory(raw, volume)
    rows_columns = (geometry.shape[1], geometry.shape[0])
    for k, index in enumerate(geometry.order):
        path = headers[index].path
        try:
            hu = _slice_hu(path)
        except _Problem as p:
            raise _series_problem(series, f"slice {path.name}: {p.problem}", p.fix) from None
        if hu.shape != rows_columns:
            raise _series_problem(series, f"slice {path.name}: pixel data of {hu.shape[0]}x{hu.shape[1]} do not "
                                  f"match its header ({rows_columns[0]}x{rows_columns[1]})", _RETRANSFER)
        raw[:, :, k] = hu.T
    return volume, (spacing[0], spacing[1], spacing[2]), affine
