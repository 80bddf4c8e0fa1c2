"""Readers for scan files: RGB images (PNG/JPEG/TIFF/BMP), NIfTI CT volumes and DICOM CT slices,
behind one table, :data:`READERS`, keyed by file kind; training and scoring both read through it.

Every failure is an :class:`InputError` whose message names the file, says what is wrong and
what to do about it, so that a scoring run can record it in the report and go on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lung_models.fileutil import report_text

# File kinds: how a file is decoded. Images and NIfTI volumes are told by their names, DICOM files by
# their content (``dicom.is_dicom_file``), since many have no suffix.
IMAGE, NIFTI, DICOM = "image", "nifti", "dicom"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz")
# The image formats each suffix may hold. PNG and JPEG are accepted under every image suffix, because
# export tools mix them up (4 of the 685 real Kaggle chest CT slices in ../shared/data are JPEGs named
# .png); no other Pillow plugin is ever tried, so an EPS, PDF or ICO named .png is refused from its
# first bytes (Pillow's EPS plugin would otherwise run Ghostscript on it).
_COMMON_FORMATS = ("PNG", "JPEG")  # (Pillow's JPEG opener also opens a camera's multi-picture JPEG, MPO)
IMAGE_FORMATS = {".png": _COMMON_FORMATS, ".jpg": _COMMON_FORMATS, ".jpeg": _COMMON_FORMATS,
                 ".tif": ("TIFF", *_COMMON_FORMATS), ".tiff": ("TIFF", *_COMMON_FORMATS),
                 ".bmp": ("BMP", *_COMMON_FORMATS)}
# Pixel limits, checked from the header before anything is decoded (a 15 KB JPEG may claim
# 12000x12000 pixels, 432 MB decoded and several GB in the decoder): a CT slice is at most
# 4096x4096 (DICOM's largest CT matrices are 2048; exports may upsample once), a histology tile at
# most 8192x8192 (LC25000 tiles are 768x768; whole-slide images must be tiled first). An image whose
# kind is not yet known gets the larger limit. Decoding one is then bounded by about 4 bytes a pixel.
MAX_SLICE_PIXELS = 4096 * 4096
MAX_TILE_PIXELS = 8192 * 8192

# A volume larger than this (in voxels, or in stored bytes once decompressed) is refused from its
# header, before any allocation: 512x512x1024 is the largest chest CT expected (0.3 mm slices over
# 30 cm), stored as int16 or float32; reading one costs its stored bytes plus one float32 copy.
MAX_VOLUME_VOXELS = 1024 * 1024 * 1024 // 4  # 256 Mi voxels = 1 GiB as float32
MAX_VOLUME_BYTES = 1024 * 1024 * 1024
# Changes whenever the readers turn the same file into a different array (training caches key on it):
# 2 = NIfTI volumes reoriented to closest-canonical RAS; 3 = 16-bit/float and multi-frame images refused;
# 4 = 16-bit-per-channel colour images refused too.
READER_VERSION = 4
# Smaller than this on either side cannot be a CT slice or a histology tile (icons, thumbnails).
MIN_IMAGE_SIDE = 32
# Every chest CT has air (about -1000 HU) and soft tissue or blood (above 0 HU) in it; a scan whose
# darkest value is above CT_MAX_DARKEST_HU, or whose brightest is below CT_MIN_BRIGHTEST_HU or above
# CT_MAX_BRIGHTEST_HU, is not in Hounsfield units (MR, PET, an 8-bit export, a wrong rescale slope
# or intercept). On ../shared/data every real slice and volume spans at most -1019 .. at least +894.
CT_MAX_DARKEST_HU = -500.0
CT_MIN_BRIGHTEST_HU = 0.0
CT_MAX_BRIGHTEST_HU = 40000.0


class InputError(ValueError):
    """A file that cannot be scored; the message is written to the report as is."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path = str(path)
        super().__init__(f"{report_text(Path(path).name)}: {problem}; {fix}")


def file_kind_by_name(path: Path) -> str | None:
    """:data:`IMAGE`, :data:`NIFTI` or ``None`` (maybe DICOM, maybe not a scan) from the file name."""
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return NIFTI
    if name.endswith(IMAGE_SUFFIXES):
        return IMAGE
    return None


def open_image(path: Path):
    """``Image.open`` restricted to the formats ``path``'s suffix may hold (see IMAGE_FORMATS); the
    header is parsed, no pixel is decoded."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():  # the callers enforce their own, lower pixel limits from the header
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path, formats=IMAGE_FORMATS.get(Path(path).suffix.lower(), _COMMON_FORMATS))


def bits_per_sample(img) -> int:
    """Bits per colour sample as stored. Pillow reads a 48-bit RGB or 16-bit grey+alpha PNG, or a
    16-bit RGB TIFF, as 8-bit RGB(A), keeping only the high byte of each sample: the mode alone hides it."""
    if img.format == "PNG" and img.tile:
        rawmode = img.tile[0][3]
        rawmode = rawmode if isinstance(rawmode, str) else rawmode[0]
        return 16 if ";16" in str(rawmode) else 8
    if img.format == "TIFF":
        bits = getattr(img, "tag_v2", {}).get(258, 8)  # BitsPerSample, one per channel
        return int(max(bits)) if isinstance(bits, tuple) else int(bits)
    return 32 if img.mode.startswith(("I", "F")) else 8


def read_rgb_image(path: str | Path, max_pixels: int = MAX_TILE_PIXELS) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3); 8-bit grayscale and RGBA are converted. Refused
    before decoding: formats the suffix does not name, more than ``max_pixels`` pixels, more than 8
    bits a sample, several frames."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)", "re-export or re-transfer the image")
    try:
        with open_image(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                side = int(max_pixels ** 0.5)
                raise InputError(path, f"image of {width}x{height} pixels is larger than the {side}x{side} this kind "
                                 "of scan can be (refused before decoding: it could exhaust the memory)",
                                 f"crop or downsample it to at most {side}x{side} (tile a whole-slide image) "
                                 "before scoring")
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise InputError(path, f"image holds {frames} frames (a multi-page TIFF or animated PNG); only "
                                 "one would be scored", "send one slice or tile per file")
            bits = bits_per_sample(img)
            if img.mode.startswith(("I", "F")) or bits > 8:
                # 16-bit or float grey levels are raw values (stored pixels, HU, HU + 1024...), not the
                # 8-bit display-windowed export the models learnt from; stretching them to 0-255, or
                # keeping their high byte as Pillow does for 16-bit colour, gives a contrast the model
                # never saw, and a wrong score marked ok.
                what = (f"{img.mode} greyscale image ({'float' if img.mode == 'F' else '16/32-bit'} values)"
                        if img.mode.startswith(("I", "F")) else f"image of {bits} bits per sample ({img.mode} "
                        "as stored: 48-bit colour or 16-bit grey with alpha)")
                raise InputError(path, f"{what}, not an 8-bit export",
                                 "send the slice as DICOM (it is then windowed as in training) or as an 8-bit "
                                 "PNG/JPEG exported with a display window")
            if min(img.size) < MIN_IMAGE_SIDE:
                raise InputError(path, f"image of {img.size[0]}x{img.size[1]} pixels is too small to be a scan or "
                                 f"a tile (under {MIN_IMAGE_SIDE} pixels a side)", "send the full-resolution image")
            img.load()
            return np.asarray(img.convert("RGB"))
    except InputError:
        raise
    except UnidentifiedImageError:
        allowed = "/".join(IMAGE_FORMATS.get(path.suffix.lower(), _COMMON_FORMATS))
        raise InputError(path, f"not a readable {allowed} image (corrupt, or another format under an image's name)",
                         "check the file is a PNG/JPEG/TIFF named for its format and re-transfer it") from None
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
    try:
        dtype = np.dtype(img.get_data_dtype())
    except Exception as exc:  # noqa: BLE001 - an unknown datatype code
        raise InputError(path, f"unknown voxel data type in the header ({error_detail(exc, path)})",
                         "re-export the volume as int16 or float32 HU") from None
    if dtype.kind not in "iuf":
        what = "complex numbers" if dtype.kind == "c" else "not plain numbers (e.g. RGB or boolean voxels)"
        raise InputError(path, f"voxels of type {dtype.name}: {what}, not CT values",
                         "send the CT volume in real Hounsfield units (int16 or float32), not a complex, "
                         "colour or mask image")
    voxels = int(np.prod(shape, dtype=np.int64))
    nbytes = voxels * dtype.itemsize
    if voxels > MAX_VOLUME_VOXELS or nbytes > MAX_VOLUME_BYTES:
        raise InputError(path, f"volume of {shape} voxels of {dtype.name} ({nbytes / 2**20:.0f} MiB decompressed) is "
                         f"too large to be a chest CT (at most {MAX_VOLUME_VOXELS} voxels and "
                         f"{MAX_VOLUME_BYTES // 2**20} MiB; refused from its header, before reading)",
                         "check the header, or crop/resample the volume (or store it as int16 or float32) "
                         "before scoring")
    if min(shape) < 8:
        raise InputError(path, f"volume {shape} is too small to be a CT scan", "check the export")
    spacing = _stored_spacing(path, img)
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(path, f"invalid voxel spacing {spacing} mm (zero, negative or not a number)",
                         "fix pixdim in the NIfTI header (re-export the volume with its real voxel size)")
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
        ornt = nib.orientations.io_orientation(affine) if np.isfinite(affine).all() else None
    except Exception:  # noqa: BLE001 - a singular affine has no orientation
        ornt = None
    if ornt is None or np.isnan(ornt).any():
        raise InputError(path, "the header's orientation (qform/sform affine) holds NaN, infinite or degenerate "
                         "values, so the patient's axes cannot be told", "re-export the volume with its real "
                         "orientation (qform/sform) from the scanner or converter")
    try:
        # Read in the stored type's own width (nibabel's scaled read would go through float64), reorient
        # the raw array to the closest canonical (RAS) axes (flips and transposes: a view), and make the
        # one float32 copy from that view, so a volume costs its stored bytes plus one float32 copy.
        proxy = img.dataobj
        raw = np.asanyarray(proxy.get_unscaled()).reshape(shape)
        # order "K": NIfTI voxels are stored Fortran-ordered; forcing C order would add a transpose
        # (a quarter of a second on a 512x512x120 volume), and nothing downstream needs it.
        data = np.array(nib.orientations.apply_orientation(raw, ornt), dtype=np.float32, order="K")
        del raw
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
        if slope != 1.0:
            data *= np.float32(slope)
        if inter != 0.0:
            data += np.float32(inter)
        if (ornt == [[0, 1], [1, 1], [2, 1]]).all():
            spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        else:  # as nibabel's as_closest_canonical gives it: the voxel sizes of the reoriented affine
            sizes = nib.affines.voxel_sizes(affine)[:3]
            canonical = [0.0, 0.0, 0.0]
            for axis, (out_axis, _) in enumerate(ornt):
                canonical[int(out_axis)] = float(sizes[axis])
            spacing = tuple(canonical)
    except MemoryError:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise InputError(path, f"voxel data unreadable or truncated ({error_detail(exc, path)})",
                         "re-transfer the file from its source") from None
    except Exception as exc:  # noqa: BLE001 - a broken stream is this file's problem
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


def check_ct_intensities(path: str | Path, scan: np.ndarray) -> np.ndarray:
    """Refuse a scan (a volume or a slice) whose values are not CT Hounsfield units; returns it unchanged otherwise."""
    lo, hi = float(scan.min()), float(scan.max())
    if lo > CT_MAX_DARKEST_HU or hi < CT_MIN_BRIGHTEST_HU or hi > CT_MAX_BRIGHTEST_HU:
        raise InputError(path, f"values {lo:.4g}..{hi:.4g} are not CT Hounsfield units (a chest CT has air near "
                         f"-1000 HU and soft tissue above {CT_MIN_BRIGHTEST_HU:.0f} HU, nothing above "
                         f"{CT_MAX_BRIGHTEST_HU:.0f})", "send the CT in HU: check the rescale slope and intercept "
                         "(not an MR, PET or 8-bit export)")
    return scan


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


def read_nifti_volume(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """:func:`read_nifti_hu` without the spacing (the models take voxels; volumes have their own limits)."""
    return read_nifti_hu(path)[0]


def read_dicom_slice(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """One DICOM CT slice in HU (``dicom.read_slice_hu``; slices have their own size limit)."""
    from lung_models.data import dicom  # dicom builds on this module's errors: imported when first used

    return dicom.read_slice_hu(Path(path))


# The decoder of each file kind, called as ``READERS[kind](path, max_pixels)``: an image to uint8 RGB
# (rows, columns, 3), refused above ``max_pixels``; a NIfTI file to a float32 HU volume (x, y, z) in
# closest-canonical RAS; a DICOM file to one float32 HU slice (rows, columns).
READERS: dict[str, Callable[[Path, int], np.ndarray]] = {
    IMAGE: read_rgb_image,
    NIFTI: read_nifti_volume,
    DICOM: read_dicom_slice,
}
