"""The bad-input corpus: every kind of file a night must refuse with a clear row, beside good ones.

Shared by the scoring tests (``test_night.py``, ``test_hostile_inputs.py``) and by
``scripts/bench_corpus.py``, which measures the peak memory of a night over it.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from lung_models.data import dicom_writer, phantoms

PHI = ("Doe^Jane", "MRN12345", "19700101")
HOUR_AGO = time.time() - 3600


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_nifti(path: Path, data: np.ndarray, zooms: tuple[float, ...]) -> Path:
    """``data`` saved as NIfTI with voxel sizes ``zooms`` (one per axis)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4)
    affine[:3, :3] = np.diag((list(zooms) + [1.0, 1.0])[:3])
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(tuple(zooms)[: data.ndim])
    nib.save(img, str(path))
    return path


def phantom_volume(seed: int, in_plane: int = 64, slices: int = 24) -> tuple[np.ndarray, tuple[float, float, float]]:
    vol, affine = phantoms.ct_volume("normal", np.random.default_rng(seed), in_plane=in_plane, slices=slices)
    return vol, tuple(float(v) for v in np.abs(np.diag(affine)[:3]))


def write_series(folder: Path, seed: int, **kw) -> list[Path]:
    """A generated CT volume written as a DICOM series carrying fake patient identifiers."""
    import pydicom

    vol, spacing = phantom_volume(seed)
    files = dicom_writer.write_series(vol, spacing, folder, patient_name=PHI[0], patient_id=PHI[1], **kw)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientBirthDate = PHI[2]
        ds.save_as(f)
    return files


def copy_dicom(src: Path, dst: Path, **changes) -> Path:
    import pydicom

    ds = pydicom.dcmread(src)
    for key, value in changes.items():
        if key == "drop":
            del ds[value]
        elif key == "transfer_syntax":  # the raw pixels posing as a compressed frame
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([bytes(ds.PixelData)])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = value
        else:
            setattr(ds, key, value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def age_everything(folder: Path, when: float = HOUR_AGO) -> None:
    for p in folder.rglob("*"):
        if not p.is_symlink():
            os.utime(p, (when, when))


# (relative path or series folder, expected status of its rows, words its error must contain); for a series
# whose slices do not stack into a volume, the status of the 3-D model's row (the 2-D models score the slices).
def make_bad_corpus(root: Path, outside: Path) -> dict[str, tuple[str, str]]:
    """At least twenty kinds of bad input beside good ones; returns {item key: (status, a word of the reason)}."""
    rng = np.random.default_rng(3)
    good_slice = phantoms.ct_slice("normal", np.random.default_rng(1), size=128)
    png = write_png(root / "good" / "slice.png", good_slice)
    write_png(root / "good" / "tile.png", phantoms.histology_tile("lung_aca", np.random.default_rng(2), 128))
    jpg = root / "good" / "tile.jpg"
    Image.fromarray(phantoms.histology_tile("lung_n", np.random.default_rng(4), 128)).save(jpg, quality=90)
    vol, spacing = phantom_volume(5)
    write_nifti(root / "good" / "scan.nii.gz", vol.astype(np.int16), spacing)
    good_series = write_series(root / "good" / "series", 6)
    # Unusual but fine: a mixed-case NIfTI suffix (nibabel alone looks for "scan.nii.gz"), and a
    # CT slice with a burnt-in red ruler (a CT slice, not a histology tile).
    write_nifti(root / "good" / "upper.nii.gz", vol.astype(np.int16), spacing).rename(root / "good" / "Upper.Nii.gz")
    ruler = np.repeat(good_slice[..., None], 3, axis=2)
    ruler[4:8, 4:124] = (255, 0, 0)
    write_png(root / "good" / "slice_with_ruler.png", ruler)
    expected: dict[str, tuple[str, str]] = {
        "good/slice.png": ("ok", ""), "good/tile.png": ("ok", ""), "good/tile.jpg": ("ok", ""),
        "good/scan.nii.gz": ("ok", ""), "good/series": ("ok", ""), "good/Upper.Nii.gz": ("ok", ""),
        "good/slice_with_ruler.png": ("ok", ""),
    }
    assert good_series
    bad = root / "bad"
    bad.mkdir()

    def put(name: str, data: bytes, status: str = "rejected", word: str = "") -> None:
        (bad / name).write_bytes(data)
        expected[f"bad/{name}"] = (status, word)

    put("zero.png", b"", word="empty")
    put("truncated.png", png.read_bytes()[: png.stat().st_size // 2])
    put("truncated.jpg", jpg.read_bytes()[: jpg.stat().st_size // 3])
    put("text.png", b"Patient list, not an image\n" * 10, word="not a readable")
    put("garbage.dcm", rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    put("garbage.nii", b"\x00\x01garbage" * 40)
    scan = (root / "good" / "scan.nii.gz").read_bytes()
    put("truncated.nii.gz", scan[: len(scan) // 3])
    write_png(bad / "icon.png", good_slice[:16, :16])
    expected["bad/icon.png"] = ("rejected", "too small")
    # DICOM slices that are broken in their content.
    src = good_series[0]
    from pydicom.uid import generate_uid

    # (each its own series: copies sharing one SeriesInstanceUID in a folder would form a series)
    copy_dicom(src, bad / "no_pixels.dcm", drop="PixelData", SeriesInstanceUID=generate_uid())
    expected["bad/no_pixels.dcm"] = ("rejected", "pixel")
    # JPEG-LS: no decoder plugin is installed (pylibjpeg, gdcm and pyjpegls are not dependencies)
    copy_dicom(src, bad / "jpeg_ls.dcm", transfer_syntax="1.2.840.10008.1.2.4.80", SeriesInstanceUID=generate_uid())
    expected["bad/jpeg_ls.dcm"] = ("rejected", "decoder")
    copy_dicom(src, bad / "mr.dcm", Modality="MR", SeriesInstanceUID=generate_uid())
    expected["bad/mr.dcm"] = ("rejected", "MR")
    # Series that do not make a volume (each slice alone is still a fine CT slice).
    for name, fix in (("missing_slice", "missing"), ("duplicate_positions", "duplicate"), ("mixed_sizes", "size")):
        files = write_series(bad / name, 7)
        if name == "missing_slice":
            files[len(files) // 2].unlink()
            files.pop(len(files) // 2)
        elif name == "duplicate_positions":
            shutil.copy(files[3], bad / name / "copy_of_slice.dcm")
            files.append(bad / name / "copy_of_slice.dcm")
        else:  # one slice, in its place, cut to 48x48 pixels
            import pydicom

            ds = pydicom.dcmread(files[3])
            ds.PixelData = np.ascontiguousarray(ds.pixel_array[:48, :48]).tobytes()
            ds.Rows = ds.Columns = 48
            ds.save_as(files[3])
        expected[f"bad/{name}"] = ("rejected", fix)
        SLICES_STILL_SCORED.add(f"bad/{name}")
    # NIfTI volumes that are not 3-D CT.
    nan = vol.astype(np.float32)
    nan[10, 10, 5] = np.nan
    write_nifti(bad / "nan.nii.gz", nan, spacing)
    expected["bad/nan.nii.gz"] = ("rejected", "NaN")
    zero = write_nifti(bad / "zero_spacing.nii.gz", vol.astype(np.int16), spacing)
    set_pixdim(zero, (0.0, 1.0, 1.0))
    expected["bad/zero_spacing.nii.gz"] = ("rejected", "spacing")
    neg = write_nifti(bad / "negative_spacing.nii", vol.astype(np.int16), spacing)
    set_pixdim(neg, (-1.0, 1.0, 3.0))
    expected["bad/negative_spacing.nii"] = ("rejected", "spacing")
    write_nifti(bad / "four_d.nii.gz", np.full((32, 32, 16, 3), -1000, np.int16), (1.0, 1.0, 1.0, 1.0))
    expected["bad/four_d.nii.gz"] = ("rejected", "4-D")
    write_nifti(bad / "two_d.nii.gz", np.full((64, 64), -1000, np.int16), (1.0, 1.0))
    expected["bad/two_d.nii.gz"] = ("rejected", "2-D")
    absurd_nifti(bad / "absurd.nii")
    expected["bad/absurd.nii"] = ("rejected", "too large")
    write_nifti(bad / "mr_like.nii.gz", (vol.astype(np.float32) + 1024) / 16, spacing)
    expected["bad/mr_like.nii.gz"] = ("rejected", "Hounsfield")
    # Grey levels that are not an 8-bit display export: stretching them would score ok with a
    # contrast the model never saw.
    hu_slice = np.full((64, 64), -1000.0, np.float32)
    hu_slice[16:48, 16:48] = 40.0
    write_png(bad / "sixteen_bit.png", (hu_slice + 1024).astype(np.uint16))
    expected["bad/sixteen_bit.png"] = ("rejected", "not an 8-bit export")
    write_png(bad / "float_hu.tif", hu_slice)
    expected["bad/float_hu.tif"] = ("rejected", "not an 8-bit export")
    Image.fromarray(good_slice).save(bad / "two_pages.tif", save_all=True, append_images=[Image.fromarray(good_slice)])
    expected["bad/two_pages.tif"] = ("rejected", "2 frames")
    # A name that is not valid UTF-8 (Latin-1 from an old export tool): one row, not a crashed night.
    (bad / "slice_\udce9.png").write_bytes(png.read_bytes())
    expected["bad/slice_\\xe9.png"] = ("rejected", "not valid UTF-8")
    # A series whose last slice arrived empty: without it the series would look complete.
    broken = write_series(bad / "series_empty_end", 8)
    broken[-1].write_bytes(b"")
    expected["bad/series_empty_end"] = ("rejected", "cannot be read as DICOM")
    expected[broken[-1].relative_to(root).as_posix()] = ("rejected", "empty")
    # A link out of the input folder.
    secret = outside / "elsewhere.png"
    write_png(secret, good_slice)
    (bad / "link_out.png").symlink_to(secret)
    expected["bad/link_out.png"] = ("rejected", "outside the input folder")
    expected.update(add_hostile_inputs(root, good_slice, jpg, good_series[0]))
    return expected


def add_hostile_inputs(root: Path, good_slice: np.ndarray, jpg: Path, dicom_slice: Path) -> dict[str, tuple[str, str]]:
    """The kinds an adversarial run found scored (or mis-reported) although they should not be (issue 16)."""
    from pydicom.uid import generate_uid

    expected: dict[str, tuple[str, str]] = {}
    hostile = root / "hostile"
    hostile.mkdir(parents=True, exist_ok=True)
    # 1. Names a spreadsheet would run as formulas, at the top of the folder (so the cell starts with them).
    for name in FORMULA_NAMES:
        write_png(root / name, good_slice)
        expected[name] = ("ok", "")
    (root / "@SUM(1+1).png").write_bytes(b"not an image\n" * 8)
    expected["@SUM(1+1).png"] = ("rejected", "not a readable")
    # 2. A real name with a backslash that spells the escape of a non-UTF-8 byte ("bad/slice_\xe9.png").
    write_png(root / "bad" / "slice_\\xe9.png", good_slice)
    expected["bad/slice_\\\\xe9.png"] = ("ok", "")
    # 3. 16 bits per channel, which Pillow would silently cut to their high byte.
    hu16 = (np.asarray(good_slice, np.uint16) * 257)
    (hostile / "rgb48.png").write_bytes(png_bytes(np.repeat(hu16[..., None], 3, axis=2), colour_type=2))
    (hostile / "grey_alpha16.png").write_bytes(png_bytes(np.stack([hu16, np.full_like(hu16, 65535)], axis=2),
                                                         colour_type=4))
    (hostile / "rgb48.tif").write_bytes(tiff_rgb16(np.repeat(hu16[..., None], 3, axis=2)))
    for name in ("rgb48.png", "grey_alpha16.png", "rgb48.tif"):
        expected[f"hostile/{name}"] = ("rejected", "not an 8-bit export")
    # 4. Single DICOM slices whose rescale gives values no CT has.
    for name, change in (("slope_1e6.dcm", {"RescaleSlope": 1e6}), ("slope_minus_1.dcm", {"RescaleSlope": -1}),
                         ("intercept_1e9.dcm", {"RescaleIntercept": 1e9})):
        copy_dicom(dicom_slice, hostile / name, SeriesInstanceUID=generate_uid(), **change)
        expected[f"hostile/{name}"] = ("rejected", "Hounsfield")
    # 5. A complex-valued volume.
    vol, spacing = phantom_volume(21)
    write_nifti(hostile / "complex.nii.gz", (vol + 1j * vol).astype(np.complex64), spacing)
    expected["hostile/complex.nii.gz"] = ("rejected", "complex")
    # 6. Headers claiming more pixels than any scan has, on small files.
    (hostile / "huge_header.jpg").write_bytes(jpeg_claiming(jpg.read_bytes(), 12000, 12000))
    expected["hostile/huge_header.jpg"] = ("rejected", "larger than")
    (hostile / "grey_10000.png").write_bytes(png_bytes(np.zeros((1, 10000), np.uint8), colour_type=0, rows=10000))
    expected["hostile/grey_10000.png"] = ("rejected", "larger than")
    (hostile / "rgb_12000.png").write_bytes(png_bytes(np.zeros((1, 12000, 3), np.uint8), colour_type=2, rows=12000))
    expected["hostile/rgb_12000.png"] = ("rejected", "larger than")
    # 7. A float64 640^3 volume (2.1 GB decompressed) in a small file: its header alone says too large.
    header_only_nifti(hostile / "float64_640.nii.gz", (640, 640, 640), np.float64)
    expected["hostile/float64_640.nii.gz"] = ("rejected", "too large")
    # 8. A series with one slice of another PixelSpacing (each slice alone is still a fine CT slice).
    files = write_series(hostile / "mixed_spacing", 22)
    import pydicom

    spacing_between = [float(v) * 1.5 for v in pydicom.dcmread(files[5], stop_before_pixels=True).PixelSpacing]
    copy_dicom(files[5], files[5], PixelSpacing=spacing_between)
    expected["hostile/mixed_spacing"] = ("rejected", "pixel spacing")
    SLICES_STILL_SCORED.add("hostile/mixed_spacing")
    # Smaller ones: another format under an image's name; sequences nested 20,000 deep; a NaN
    # orientation; a transfer syntax UID that is not one (it must not be quoted into the report).
    (hostile / "eps.png").write_bytes(EPS)
    expected["hostile/eps.png"] = ("rejected", "another format")
    (hostile / "deep.dcm").write_bytes(deeply_nested(dicom_slice, 20000))
    expected["hostile/deep.dcm"] = ("rejected", "nested too deeply")
    nan_affine(write_nifti(hostile / "nan_affine.nii", vol.astype(np.int16), spacing))
    expected["hostile/nan_affine.nii"] = ("rejected", "orientation")
    copy_dicom(dicom_slice, hostile / "junk_syntax.dcm", SeriesInstanceUID=generate_uid(),
               transfer_syntax="1.2.840.10008.1.2.4.80")
    raw = (hostile / "junk_syntax.dcm").read_bytes()
    (hostile / "junk_syntax.dcm").write_bytes(raw.replace(b"1.2.840.10008.1.2.4.80", JUNK_UID, 1))
    expected["hostile/junk_syntax.dcm"] = ("rejected", "malformed UID")
    return expected


FORMULA_NAMES = ("=1+1.png", "+1+1.png", "-2+3.png", "\tlead_tab.png", "\rlead_cr.png")
JUNK_UID = b"1.2.840.<img src=x>.80"  # as long as the UID it replaces
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\nnewpath 0 0 moveto 64 64 lineto stroke\n" * 4


def csv_name(cell: str) -> str:
    """The true text of a report cell (drop the ' the reports put before a formula-like text)."""
    return cell[1:] if cell.startswith("'") else cell


def png_bytes(rows_array: np.ndarray, colour_type: int, rows: int | None = None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour): ``rows_array`` (H, W[, C]) of uint8 or
    uint16 samples, or one row repeated ``rows`` times (a huge image from a few bytes of memory)."""
    arr = np.asarray(rows_array)
    depth = 16 if arr.dtype == np.uint16 else 8
    height = rows or arr.shape[0]
    width = arr.shape[1]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packed = [b"\0" + np.ascontiguousarray(r.astype(">u2" if depth == 16 else np.uint8)).tobytes() for r in arr]
    z = zlib.compressobj(9)
    data = b"".join(z.compress(packed[i % len(packed)]) for i in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def tiff_rgb16(rgb: np.ndarray) -> bytes:
    """An uncompressed little-endian TIFF of 16-bit RGB samples."""
    h, w, _ = rgb.shape
    pixels = np.ascontiguousarray(rgb.astype("<u2")).tobytes()
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, None), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(pixels))]
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at = 8 + ifd_size
    data_at = bits_at + 6
    out = bytearray(b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, typ, count, value in entries:
        if tag == 258:
            out += struct.pack("<HHII", tag, typ, count, bits_at)
        elif tag == 273:
            out += struct.pack("<HHII", tag, typ, count, data_at)
        elif typ == 3:
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + pixels
    return bytes(out)


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0/SOF2) claims ``width`` x ``height``; its data stay small."""
    out = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = out.find(marker)
        if at > 0:
            out[at + 5:at + 9] = struct.pack(">HH", height, width)
            return bytes(out)
    raise ValueError("no SOF0/SOF2 frame header in the JPEG")


def header_only_nifti(path: Path, shape: tuple[int, ...], dtype: type) -> None:
    """A .nii.gz whose header claims ``shape`` of ``dtype`` followed by a little data (a file cut short)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms((1.0,) * len(shape))
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * (1 << 20)))


def nan_affine(path: Path) -> None:
    """Put a NaN into the sform (and mark it the one to use) straight into the header bytes."""
    data = bytearray(path.read_bytes())
    data[254:256] = struct.pack("<h", 1)  # sform_code: scanner
    data[280:284] = struct.pack("<f", float("nan"))  # srow_x[0]
    path.write_bytes(bytes(data))


def deeply_nested(src: Path, depth: int) -> bytes:
    """``src`` (an Explicit VR Little Endian slice) with a sequence nested ``depth`` levels deep before its pixels."""
    raw = src.read_bytes()
    undefined, zero = struct.pack("<I", 0xFFFFFFFF), struct.pack("<I", 0)
    opening = b"\x40\x00\x75\x02SQ\0\0" + undefined + b"\xfe\xff\x00\xe0" + undefined
    closing = b"\xfe\xff\x0d\xe0" + zero + b"\xfe\xff\xdd\xe0" + zero
    at = raw.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData, the last element
    return raw[:at] + opening * depth + closing * depth + raw[at:]


# Series whose slices do not stack into a volume: rejected by the 3-D model, scored as slices by the 2-D ones.
SLICES_STILL_SCORED: set[str] = set()


def series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def set_pixdim(path: Path, zooms: tuple[float, float, float]) -> None:
    """Write pixdim[1:4] straight into the header bytes (nibabel refuses to set bad zooms)."""
    raw = path.read_bytes()
    gz = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(raw) if gz else raw)
    data[80:92] = np.asarray(zooms, "<f4").tobytes()  # pixdim[1..3] at byte offset 76 + 4
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))


def absurd_nifti(path: Path) -> None:
    """A 352-byte header claiming 30000 x 30000 x 30000 int16 voxels (54 TB), and no data."""
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 1.0))
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\0" * 4)
