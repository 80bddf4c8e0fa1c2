"""Decode each item once, then prepare it once per preprocessing signature for every model that takes it.

Decoding (PNG/JPEG, DICOM, NIfTI, a whole series) is the expensive, shared part; what differs
between models is only the preprocessing recorded in their bundles. Models whose preprocessing
signatures are equal (same size, same CT window; the rescale factor is applied per batch) share
one prepared array, so a DICOM slice scored by five 2-D CT models is read, converted to HU,
windowed and resized once.

A volume (NIfTI or an assembled series) is one scan for every model: the 3-D model takes the volume,
the 2-D CT models its axial slices, each windowed like a DICOM slice and shown as a radiologist
views it (anterior at the top, the patient's right on the image's left), from inferior to superior.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lung_models import preprocess
from lung_models.data import dicom
from lung_models.data.readers import MAX_SLICE_PIXELS, MAX_TILE_PIXELS, READERS, InputError, check_ct_intensities
from lung_models.registry import CT_SLICE
from lung_models.scoring.discovery import stat_key
from lung_models.scoring.items import DICOM, DICOM_SERIES, IMAGE, NIFTI, BundleInputError, FileChanged, Item


@dataclass
class Decoded:
    """One item read once. Exactly one of ``image``, ``slices_hu`` or ``volume_hu`` is the scan;
    a series whose slices do not stack into a volume keeps them as ``slices_hu`` (in file order)
    with ``volume_error`` saying why, so the 2-D models still score them and the 3-D model says why not."""

    item: Item
    image: np.ndarray | None = None  # uint8 RGB (rows, columns, 3)
    slices_hu: list[np.ndarray] | None = None  # float32 HU (rows, columns), display orientation
    volume_hu: np.ndarray | None = None  # float32 HU (x, y, z), RAS
    volume_error: Exception | None = None
    prepared: dict[tuple, np.ndarray] = field(default_factory=dict)  # by preprocessing signature


def check_unchanged(item: Item, root: Path) -> None:
    """Raise FileChanged unless every file of ``item`` still has the stat key it was hashed with."""
    for rel, then in zip(item.files, item.stats):
        try:
            now = stat_key((root / rel).stat())
        except OSError:
            now = None
        if now != tuple(then):
            raise FileChanged(f"{rel}: changed or removed since it was hashed; a later run scores it")


def decode(item: Item, root: Path) -> Decoded:
    """Read and decode ``item`` (not a refused one) once; raises InputError for a bad file, OSError for
    the file system's faults, FileChanged when the bytes decoded may not be the bytes hashed."""
    path = root / item.files[0]
    if item.file_kind == DICOM_SERIES:
        decoded = _decode_series(item, root)
    elif item.file_kind in (IMAGE, DICOM, NIFTI):
        scan = READERS[item.file_kind](path, MAX_SLICE_PIXELS if item.input_kind == CT_SLICE else MAX_TILE_PIXELS)
        if item.file_kind == IMAGE:
            decoded = Decoded(item, image=scan)
        elif item.file_kind == DICOM:  # the same HU plausibility check as a volume's (a wrong rescale, an MR)
            decoded = Decoded(item, slices_hu=[check_ct_intensities(path, scan)])
        else:  # NIFTI
            decoded = Decoded(item, volume_hu=check_ct_intensities(path, scan))
    else:
        raise ValueError(f"unknown item file kind {item.file_kind!r}")
    check_unchanged(item, root)  # the bytes decoded are the bytes hashed
    return decoded


def _decode_series(item: Item, root: Path) -> Decoded:
    folder = root / item.key
    series = dicom.DicomSeries(folder=folder, series_uid="", uid_hash=item.series_uid_hash,
                               files=tuple(root / f for f in item.files))
    try:
        volume, _, _ = dicom.read_series_hu(series)
        return Decoded(item, volume_hu=check_ct_intensities(folder, volume))
    except InputError as exc:  # not a volume (too few slices, a gap, mixed sizes): still slices
        # each slice checked on its own: one with a wrong rescale must not hide among good ones
        slices = [check_ct_intensities(f, dicom.read_slice_hu(f)) for f in series.files]
        return Decoded(item, slices_hu=slices, volume_error=exc)


def axial_slices(volume_hu: np.ndarray) -> list[np.ndarray]:
    """The axial slices of a RAS volume as stored DICOM slices show them: rows from anterior to
    posterior, columns from the patient's right to left (the inverse of read_series_hu's layout)."""
    return [volume_hu[::-1, ::-1, k].T for k in range(volume_hu.shape[2])]


def signature(params: dict[str, Any], item: Item) -> tuple:
    """What a prepared input depends on. The per-batch rescale is left out: models differing only in
    it share the prepared uint8 array."""
    if params["kind"] == "rgb_image":
        size = tuple(int(s) for s in params["size"])
        if item.file_kind == IMAGE:
            return ("rgb", size, params.get("colour", "rgb"))
        window = params.get("ct_window")
        if not window:
            raise BundleInputError(f"{Path(item.key).name}: this model's bundle records no ct_window, so CT slices "
                                   "in HU cannot be windowed like its training images; re-export the model with this "
                                   "version")
        return ("rgb", size, float(window["center"]), float(window["width"]))
    if params["kind"] == "ct_volume":
        return ("volume", json.dumps({k: v for k, v in params.items() if k != "layout"}, sort_keys=True))
    raise BundleInputError(f"unknown preprocessing kind {params['kind']!r} in the model's bundle; re-export it")


def prepare(decoded: Decoded, params: dict[str, Any]) -> np.ndarray:
    """The model inputs of ``decoded`` for a model with ``params``, before the per-batch stage: a stack
    of one or more uint8 images (N, H, W, 3), or one float32 volume (1, x, y, z, 1). Computed once per
    signature and kept in ``decoded``."""
    sig = signature(params, decoded.item)
    if sig in decoded.prepared:
        return decoded.prepared[sig]
    if params["kind"] == "ct_volume":
        if decoded.volume_hu is None:
            raise decoded.volume_error or InputError(decoded.item.key, "not a volume", "send a CT volume")
        out = preprocess.preprocess_ct_volume(decoded.volume_hu, params)[np.newaxis]
    else:
        size = tuple(params["size"])
        if decoded.image is not None:
            out = preprocess.cache_stage(decoded.image, params)[np.newaxis]
        else:
            slices = decoded.slices_hu if decoded.slices_hu is not None else axial_slices(decoded.volume_hu)
            center, width = sig[2], sig[3]
            out = np.stack([preprocess.resize_rgb(np.repeat(dicom.window_to_uint8(s, center, width)[:, :, None], 3,
                                                            axis=2), size) for s in slices])
    decoded.prepared[sig] = out
    return out


def release_sources(decoded: Decoded) -> None:
    """Drop the decoded pixels once every signature is prepared (only the prepared arrays are needed)."""
    decoded.image = decoded.volume_hu = decoded.slices_hu = None
