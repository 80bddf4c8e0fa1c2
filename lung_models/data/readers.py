"""Readers for incoming files: RGB images (PNG/JPEG/TIFF/BMP) and NIfTI CT volumes.

Every failure is an :class:`InputError` whose message names the file, says what is wrong and
what to do about it, so that a scoring run can record it in the report and go on.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz")

# A volume larger than this (in voxels) is refused from its header, before any allocation.
MAX_VOLUME_VOXELS = 1024 * 1024 * 1024 // 4  # 256 Mi voxels = 1 GiB as float32
# Changes whenever the readers turn the same file into a different array (training caches key on it):
# 2 = NIfTI volumes reoriented to closest-canonical RAS; 3 = 16-bit/float and multi-frame images refused.
READER_VERSION = 3
# Smaller than this on either side cannot be a CT slice or a histology tile (icons, thumbnails).
MIN_IMAGE_SIDE = 32
# Every chest CT has air (about -1000 HU) in it; a volume whose darkest voxel is above this is not
# in Hounsfield units (MR, PET, an 8-bit export or a scaled copy).
CT_MAX_DARKEST_HU = -500.0
CT_MAX_BRIGHTEST_HU = 40000.0


class InputError(ValueError):
    """A file that cannot be scored; the message is written to the report as is."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path = str(path)
        super().__init__(f"{Path(path).name}: {problem}; {fix}")


def file_kind(path: Path) -> str | None:
    """``"image"``, ``"volume"`` or ``None`` from the file name."""
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    return None


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3); grayscale and RGBA are converted."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)", "re-export or re-transfer the image")
    try:
        with Image.open(path) as img:
            img.load()
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise InputError(path, f"image holds {frames} frames (a multi-page TIFF or animated PNG); only "
                                 "one would be scored", "send one slice or tile per file")
            if img.mode.startswith(("I", "F")):
                # 16-bit or float grey levels are raw values (stored pixels, HU, HU + 1024...), not the
                # 8-bit display-windowed export the models learnt from; stretching them to 0-255 gives
                # a contrast the model never saw, and a wrong score marked ok.
                raise InputError(path, f"{img.mode} greyscale image ({'float' if img.mode == 'F' else '16/32-bit'} "
                                 "values), not an 8-bit export", "send the slice as DICOM (it is then windowed "
                                 "as in training) or as an 8-bit PNG/JPEG exported with a display window")
            if min(img.size) < MIN_IMAGE_SIDE:
                raise InputError(path, f"image of {img.size[0]}x{img.size[1]} pixels is too small to be a scan or "
                                 f"a tile (under {MIN_IMAGE_SIDE} pixels a side)", "send the full-resolution image")
            return np.asarray(img.convert("RGB"))
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(path, "not a readable image (unknown or corrupt format)",
                         "check the file is a PNG/JPEG/TIFF and re-transfer it") from None
    except Image.DecompressionBombError as exc:
        raise InputError(path, f"image too large to be a scan or tile ({error_detail(exc, path)})",
                         "crop or downsample it before scoring") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the file system's fault (permissions, I/O), not the image's: the caller retries later
        raise InputError(path, f"image is truncated or corrupt ({error_detail(exc, path)})",
                         "re-transfer the file from its source") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other decoder failure is still this file's problem
        raise InputError(path, f"image cannot be decoded ({error_detail(exc, path)})",
                         "re-export the image as PNG or JPEG") from None


def read_nifti_hu(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a 3-D NIfTI CT volume: (float32 HU array (x, y, z), voxel spacing in mm).

    The array is reoriented to the closest canonical (RAS) axes, as DICOM series are, so that a
    scan scores the same whichever format and storage order it arrives in. (The MosMedData
    write-up feeds the stored array as is; for files already stored RAS, like the generated ones,
    this is the same.)"""
    import nibabel as nib

    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)", "re-export or re-transfer the volume")
    try:
        img = _load_nifti(path)
        shape = tuple(int(s) for s in img.shape)
    except OSError as exc:
        if exc.errno is not None:
            raise  # the file system's fault (permissions, I/O), not the volume's: the caller retries later
        raise InputError(path, f"not a readable NIfTI file ({error_detail(exc, path)})",
                         "re-export the volume as .nii/.nii.gz") from None
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad headers
        raise InputError(path, f"not a readable NIfTI file ({error_detail(exc, path)})",
                         "re-export the volume as .nii/.nii.gz") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"{len(shape)}-D image {shape}, expected a 3-D CT volume (x, y, z)",
                         "pass one 3-D volume per file")
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_VOLUME_VOXELS:
        raise InputError(path, f"volume of {shape} voxels is too large to be a CT scan",
                         "check the header, or crop/resample the volume before scoring")
    if min(shape) < 8:
        raise InputError(path, f"volume {shape} is too small to be a CT scan", "check the export")
    spacing = _stored_spacing(path, img)
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(path, f"invalid voxel spacing {spacing} mm (zero, negative or not a number)",
                         "fix pixdim in the NIfTI header (re-export the volume with its real voxel size)")
    try:
        if len(img.shape) == 4:
            img = img.slicer[..., 0]
        img = nib.as_closest_canonical(img)
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    except MemoryError:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise InputError(path, f"voxel data unreadable or truncated ({error_detail(exc, path)})",
                         "re-transfer the file from its source") from None
    except Exception as exc:  # noqa: BLE001 - a broken stream or affine is this file's problem
        raise InputError(path, f"voxel data unreadable or truncated ({error_detail(exc, path)})",
                         "re-transfer the file from its source") from None
    if not np.isfinite(data).all():
        raise InputError(path, "volume contains NaN or infinite voxels", "re-export the volume")
    return data, spacing


def _load_nifti(path: Path):
    """``nib.load``; for a name whose suffix nibabel rewrites (``Scan.Nii.gz``, ``x.Nii``: it then
    opens a lower-cased name that does not exist), the file itself through a file map instead."""
    import nibabel as nib
    from nibabel.fileholders import FileHolder

    try:
        return nib.load(str(path))
    except FileNotFoundError:
        if not path.is_file():
            raise
    first: Exception | None = None
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return klass.from_file_map({"header": FileHolder(str(path)), "image": FileHolder(str(path))})
        except Exception as exc:  # noqa: BLE001 - not this class's header: try the next, then report the first
            first = first or exc
    raise first


def check_ct_intensities(path: str | Path, volume: np.ndarray) -> np.ndarray:
    """Refuse a volume whose values are not CT Hounsfield units; returns it unchanged otherwise."""
    lo, hi = float(volume.min()), float(volume.max())
    if lo > CT_MAX_DARKEST_HU or hi > CT_MAX_BRIGHTEST_HU:
        raise InputError(path, f"values {lo:.0f}..{hi:.0f} are not CT Hounsfield units (a chest CT has air near "
                         f"-1000 HU; the darkest value here is {lo:.0f})",
                         "send the CT in HU (apply the rescale slope/intercept; not an MR or 8-bit export)")
    return volume


def _stored_spacing(path: Path, img) -> tuple[float, ...]:
    """Voxel spacing as written in the file. nibabel's loader silently replaces zero pixdims by 1
    and negative ones by their absolute value; a scanner export with such a header is broken, and
    guessing its geometry would score a distorted volume, so the raw header is read again."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as handle:
            raw = type(img.header).from_fileobj(handle, check=False)
        return tuple(float(z) for z in raw["pixdim"][1:4])
    except Exception:  # noqa: BLE001 - the header already parsed once: fall back to what nibabel made of it
        return tuple(float(z) for z in img.header.get_zooms()[:3])


def error_detail(exc: BaseException, path: str | Path, limit: int = 240) -> str:
    """An exception as one short line for a report: ``Type: text`` with the file's full path cut to
    its name (reports name files relative to the input folder; the folders above may name
    patients), object addresses dropped (reports must be reproducible), whitespace collapsed."""
    path = Path(path)
    text = str(exc)
    for full in sorted({str(path), str(path.absolute()), str(path.resolve())}, key=len, reverse=True):
        text = text.replace(full, path.name)
    text = " ".join(re.sub(r" at 0x[0-9a-fA-F]+", "", text).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
