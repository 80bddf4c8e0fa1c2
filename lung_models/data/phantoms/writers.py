"""Phantom data sets in the real data sets' folder layouts, and folders of unlabelled arrivals.

Every file is written atomically and each item depends only on ``(seed, class index, item index)``,
so an interrupted run leaves only complete files and a rerun rewrites identical content.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lung_models.data import catalog
from lung_models.data.phantoms.chest_slices import CANCER_CLASSES, CHEST_CLASSES, check_window, ct_slice
from lung_models.data.phantoms.chest_volumes import MOSMED_CLASSES, ct_volume
from lung_models.data.phantoms.tiles import LC25000_CLASSES, histology_tile
from lung_models.fileutil import atomic_write_bytes

MOSMED_FOLDERS = catalog.MOSMED.layout
CHEST_FOLDERS = catalog.CHEST_CT_STAGED_FOLDERS
CT_CANCER_FOLDERS = catalog.CT_CANCER_PARENTS
# Bump a kind's number whenever the same seed and parameters start giving different pictures:
# generated-data caches are keyed on it, so a work folder from an older generator is rebuilt
# instead of silently reused. chest_ct and ct_cancer 2: every adenocarcinoma has its ground-glass
# rim and slices stop at the lower hila.
GENERATOR_VERSIONS = {"lc25000": 1, "mosmed": 1, "chest_ct": 2, "ct_cancer": 2}

def _jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _nifti_gz_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """A .nii.gz file's bytes: header zooms and qform/sform from the affine, units mm.

    Compressed with mtime 0 so the same volume always gives the same bytes (stable checksums), at
    level 1 because noisy CT barely compresses better at higher levels but takes three times longer.
    """
    import nibabel as nib  # only the CT writers need it

    img = nib.Nifti1Image(volume, affine)
    img.header.set_data_dtype(volume.dtype)
    img.header.set_zooms(tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    img.header.set_xyzt_units(xyz="mm", t="sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _item_rng(seed: int, class_index: int, index: int) -> np.random.Generator:
    """One generator per item, so any item can be regenerated alone and write order does not matter."""
    return np.random.default_rng([int(seed), int(class_index), int(index)])


def _slice_count(slices: int | Sequence[int], rng: np.random.Generator) -> int:
    if isinstance(slices, (int, np.integer)):
        return int(slices)
    lo, hi = (int(v) for v in slices)
    return int(rng.integers(lo, hi + 1))


def _write_lc25000(root: Path, n_per_class: int, seed: int, *,
                   classes: Sequence[str] = LC25000_CLASSES, size: int = 768) -> None:
    """``root/lung_image_sets/<class>/<name><i>.jpeg`` with i from 1, as LC25000 ships.

    LC25000 names its files after the class without the underscore (``lung_aca/lungaca1.jpeg``),
    and so do we, so that anything matching on real file names works on phantoms too.
    """
    for cls in classes:
        if cls not in LC25000_CLASSES:
            raise ValueError(f"unknown LC25000 class {cls!r}; expected some of {LC25000_CLASSES}")
        class_index = LC25000_CLASSES.index(cls)
        folder = root / catalog.LC25000_PARENT / cls
        for i in range(1, n_per_class + 1):
            tile = histology_tile(cls, _item_rng(seed, class_index, i), size)
            atomic_write_bytes(folder / f"{cls.replace('_', '')}{i}.jpeg", _jpeg_bytes(tile))


def _write_mosmed(root: Path, n_per_class: int, seed: int, *, in_plane: int = 256,
                  slices: int | Sequence[int] = (40, 60), classes: Sequence[str] = MOSMED_CLASSES) -> None:
    """``root/CT-0/study_0001.nii.gz`` (normal) and ``root/CT-23/study_0001.nii.gz`` (abnormal)."""
    for cls in classes:
        if cls not in MOSMED_CLASSES:
            raise ValueError(f"unknown MosMedData class {cls!r}; expected some of {MOSMED_CLASSES}")
        class_index = MOSMED_CLASSES.index(cls)
        folder = root / MOSMED_FOLDERS[cls]
        for i in range(1, n_per_class + 1):
            rng = _item_rng(seed, class_index, i)
            volume, affine = ct_volume(cls, rng, in_plane=in_plane, slices=_slice_count(slices, rng))
            atomic_write_bytes(folder / f"study_{i:04d}.nii.gz", _nifti_gz_bytes(volume, affine))


def _split_sizes(n: int, n_valid: float, n_test: float) -> tuple[int, int, int]:
    """(train, valid, test) items per class; floats are fractions of ``n``, ints are counts, each at least 2."""
    def count(v: float) -> int:
        return max(2, int(round(v * n)) if isinstance(v, float) else int(v))

    valid, test = count(n_valid), count(n_test)
    if n - valid - test < 2:
        raise ValueError(f"chest_ct: n_per_class={n} leaves {n - valid - test} training images per class after "
                         f"{valid} valid and {test} test; use n_per_class >= {valid + test + 2}")
    return n - valid - test, valid, test


def _crop_to_body(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The slice cut down to the body (and table) plus a small margin, as the Kaggle screenshots are."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    dark, bright = float(np.median(border)), float(np.percentile(grey, 90))
    body = grey > dark + 0.3 * (bright - dark)
    rows, cols = np.flatnonzero(body.mean(axis=1) > 0.02), np.flatnonzero(body.mean(axis=0) > 0.02)
    if rows.size < 2 or cols.size < 2:
        return grey
    h, w = grey.shape
    my, mx = (int(rng.uniform(0.01, 0.06) * n) for n in (h, w))
    return grey[max(rows[0] - my, 0):rows[-1] + my + 1, max(cols[0] - mx, 0):cols[-1] + mx + 1]


def _screenshot_bytes(grey: np.ndarray, rng: np.random.Generator, size: int) -> tuple[bytes, str]:
    """A slice saved the way the Kaggle chest CT files are: cropped, resized and in a mix of formats.

    The real files are mostly RGBA PNGs (opaque), some RGB PNGs, a few JPEGs and greyscale PNGs, of
    many sizes; so are ours, with widths within 15% of ``size``. Returns the bytes and the suffix.
    """
    crop = _crop_to_body(grey, rng)
    width = int(round(size * rng.uniform(0.85, 1.15)))
    height = max(int(round(width * crop.shape[0] / crop.shape[1] * rng.uniform(0.95, 1.05))), 8)
    img = Image.fromarray(crop).resize((width, height), Image.Resampling.BILINEAR)
    u = rng.random()
    buf = io.BytesIO()
    if u < 0.1:
        img.convert("RGB").save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
        return buf.getvalue(), ".jpg"
    mode = "RGBA" if u < 0.65 else "RGB" if u < 0.85 else "L"
    img.convert(mode).save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _write_chest_ct(root: Path, n_per_class: int, seed: int, *, size: int = 512,
                    classes: Sequence[str] = CHEST_CLASSES, n_valid: float = 0.07, n_test: float = 0.32,
                    window: str = "mixed") -> None:
    """``root/Data/{train,valid,test}/<folder>/NNNNNN.png|jpg``, as Kaggle's chest-ctscan-images ships.

    Train and valid folders carry the real data set's long names (class, site and TNM stage); test
    folders are the bare class names. Each class's items are numbered from 0 across the three
    splits, train first, so an item's picture depends only on (seed, class, index).
    """
    check_window(window)
    train, valid, _ = _split_sizes(n_per_class, n_valid, n_test)
    for cls in classes:
        if cls not in CHEST_CLASSES:
            raise ValueError(f"unknown chest CT class {cls!r}; expected some of {CHEST_CLASSES}")
        class_index = CHEST_CLASSES.index(cls)
        for i in range(n_per_class):
            split = "train" if i < train else "valid" if i < train + valid else "test"
            folder = root / catalog.CHEST_CT_PARENT / split / (cls if split == "test" else CHEST_FOLDERS[cls])
            rng = _item_rng(seed, class_index, i)
            data, suffix = _screenshot_bytes(ct_slice(cls, rng, size, window), rng, size)
            atomic_write_bytes(folder / f"{i:06d}{suffix}", data)


def _write_ct_cancer(root: Path, n_per_class: int, seed: int, *, size: int = 512,
                     classes: Sequence[str] = CANCER_CLASSES) -> None:
    """``root/CT-Scan images/CT-Scan images/CT-Scan Images/{Cancerous,Non-Cancerous}/NNNNNN.png|jpg``.

    The layout of Kaggle's "Lung CT-Scan images" (orvile/ct-scan-images), nesting and capitals as
    shipped. Each Cancerous image shows one of the three cancers of ``ct_slice``, drawn per item.
    """
    for cls in classes:
        if cls not in CANCER_CLASSES:
            raise ValueError(f"unknown CT cancer class {cls!r}; expected some of {CANCER_CLASSES}")
        class_index = CANCER_CLASSES.index(cls)
        folder = root.joinpath(*CT_CANCER_FOLDERS, cls)
        for i in range(n_per_class):
            rng = _item_rng(seed, class_index, i)
            data, suffix = _screenshot_bytes(ct_slice(cls, rng, size), rng, size)
            atomic_write_bytes(folder / f"{i:06d}{suffix}", data)


_DATASET_WRITERS = {"lc25000": _write_lc25000, "mosmed": _write_mosmed, "chest_ct": _write_chest_ct,
                    "ct_cancer": _write_ct_cancer}
_DEFAULT_CLASSES = {"lc25000": LC25000_CLASSES, "mosmed": MOSMED_CLASSES, "chest_ct": CHEST_CLASSES,
                    "ct_cancer": CANCER_CLASSES}
DATASET_KINDS = tuple(_DATASET_WRITERS)


def write_dataset(kind: str, root: Path, n_per_class: int, seed: int, **params: object) -> None:
    """Write ``n_per_class`` phantoms per class in the real data set's folder layout under ``root``.

    ``kind="lc25000"`` takes ``classes`` and ``size`` (JPEG tiles, quality 90); ``kind="mosmed"``
    takes ``in_plane`` and ``slices`` (an int, or an inclusive (low, high) range drawn per volume).
    ``kind="chest_ct"`` (Kaggle chest-ctscan-images: train, valid and test folders) takes ``size``,
    ``classes``, ``n_valid``/``n_test`` (fractions of ``n_per_class`` if floats, counts if ints;
    at least 2 each) and ``window`` (``mixed`` display windows as in the Kaggle PNGs, or ``wide``
    only); ``kind="ct_cancer"`` (Kaggle Lung CT-Scan images) takes ``size`` and ``classes``.
    Both write cropped slices of varying size as a mix of RGBA, RGB and greyscale PNGs and JPEGs.
    Every file is written atomically, so an interrupted run leaves only complete files, and each
    item depends only on (seed, class, index), so re-running rewrites identical content.
    """
    writer = _DATASET_WRITERS.get(kind)
    if writer is None:
        raise ValueError(f"unknown phantom data set kind {kind!r}; known kinds: {', '.join(DATASET_KINDS)}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, not {n_per_class}")
    classes = tuple(params.pop("classes", _DEFAULT_CLASSES[kind]))
    workers = min(len(classes), os.cpu_count() or 1)
    if workers < 2 or n_per_class * len(classes) < 16:
        writer(Path(root), int(n_per_class), int(seed), classes=classes, **params)
        return
    # Classes are independent (each item depends on seed, class and index only), so they are
    # written in parallel; "spawn" keeps TensorFlow's threads in the parent out of the children.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        jobs = [pool.submit(writer, Path(root), int(n_per_class), int(seed), classes=(cls,), **params)
                for cls in classes]
        for job in jobs:
            job.result()


def write_incoming(root: Path, seed: int, n_tiles: int = 4, n_volumes: int = 2, corrupt: bool = True, *,
                   tile_size: int = 768, in_plane: int = 256, slices: int = 48, n_slices: int = 0,
                   slice_size: int = 512, n_dicom_series: int = 0) -> list[Path]:
    """A folder of newly arrived files for the scoring demo; returns the paths written.

    Tiles of random classes alternate between PNG and JPEG (``slide_001.png``, ``slide_002.jpg``,
    ...); volumes go to ``ct/scan_001.nii.gz``, ...; chest CT slices (``n_slices``) to
    ``ct-slices/slice_001.png``, ...; DICOM series (``n_dicom_series``, volumes like the NIfTI ones,
    as uncompressed CT slices) to ``dicom/series_001/IM000001.dcm``, ... Names carry no label, since scoring must not
    see one. With ``corrupt`` a truncated ``ct/broken_scan.nii.gz`` is added: its header still
    parses but its data ends early, the way an interrupted transfer looks.
    """
    root = Path(root)
    pick = np.random.default_rng([int(seed), 0xC0FFEE])
    written: list[Path] = []
    for i in range(n_tiles):
        cls = LC25000_CLASSES[int(pick.integers(len(LC25000_CLASSES)))]
        tile = histology_tile(cls, np.random.default_rng([int(seed), 1, i]), tile_size)
        png = i % 2 == 0
        path = root / f"slide_{i + 1:03d}.{'png' if png else 'jpg'}"
        written.append(atomic_write_bytes(path, _png_bytes(tile) if png else _jpeg_bytes(tile)))
    for i in range(n_volumes):
        cls = MOSMED_CLASSES[int(pick.integers(len(MOSMED_CLASSES)))]
        volume, affine = ct_volume(cls, np.random.default_rng([int(seed), 2, i]), in_plane, slices)
        written.append(atomic_write_bytes(root / "ct" / f"scan_{i + 1:03d}.nii.gz", _nifti_gz_bytes(volume, affine)))
    for i in range(n_slices):
        cls = CHEST_CLASSES[int(pick.integers(len(CHEST_CLASSES)))]
        image = ct_slice(cls, np.random.default_rng([int(seed), 4, i]), slice_size)
        written.append(atomic_write_bytes(root / "ct-slices" / f"slice_{i + 1:03d}.png", _png_bytes(image)))
    if n_dicom_series:
        from lung_models.data.dicom_writer import write_series

    for i in range(n_dicom_series):
        cls = MOSMED_CLASSES[int(pick.integers(len(MOSMED_CLASSES)))]
        volume, affine = ct_volume(cls, np.random.default_rng([int(seed), 5, i]), in_plane, slices)
        spacing = tuple(float(v) for v in np.abs(np.diag(affine)[:3]))
        written.extend(write_series(volume, spacing, root / "dicom" / f"series_{i + 1:03d}"))
    if corrupt:
        volume, affine = ct_volume("normal", np.random.default_rng([int(seed), 3]), 64, 16)
        data = _nifti_gz_bytes(volume, affine)
        written.append(atomic_write_bytes(root / "ct" / "broken_scan.nii.gz", data[: len(data) // 2]))
    return written
