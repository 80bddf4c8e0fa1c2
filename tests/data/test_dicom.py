"""Tests for lung_models.data.dicom: real DICOM samples (skipped without ../shared/data) and generated series.

Bad inputs are built in tmp_path from write_series output or from copies of the real files; every failure must be
an InputError naming the file (or series folder), with a fix after the '; ', and never a patient identifier.
"""

from __future__ import annotations

import logging
import shutil
import tracemalloc
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from lung_models.data import dicom, readers
from lung_models.data.dicom import (
    DICOM_SUFFIXES,
    MIN_SERIES_SLICES,
    DicomHeader,
    DicomSeries,
    group_series,
    is_dicom_file,
    read_header,
    read_series_hu,
    read_slice_hu,
    slice_to_rgb,
    window_to_uint8,
)
from lung_models.data.dicom_writer import write_series
from lung_models.data.phantoms import ct_volume
from lung_models.data.readers import InputError, read_nifti_hu

SPACING = (0.8, 0.7, 2.5)
PHI = ("Doe^Jane", "MRN12345")


# ---------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dicom_data(shared_data: Path) -> Path:
    folder = shared_data / "dicom"
    if not folder.is_dir():
        pytest.skip(f"real DICOM samples not found at {folder}")
    return folder


@pytest.fixture(scope="session")
def abdomen_files(dicom_data: Path) -> list[Path]:
    return sorted((dicom_data / "abdomen-series").glob("*.dcm"))


@pytest.fixture(scope="session")
def real_slices(dicom_data: Path) -> list[Path]:
    return sorted((dicom_data / "tcga-luad-slices").glob("*.dcm")) + sorted((dicom_data / "lungmask").glob("*.dcm"))


def _volume(shape: tuple[int, int, int] = (40, 36, 10), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 3072, size=shape).astype(np.int16)


def _write(folder: Path, shape: tuple[int, int, int] = (40, 36, 10), **kwargs: object) -> list[Path]:
    return write_series(_volume(shape), SPACING, folder, **kwargs)  # type: ignore[arg-type]


def _only_series(folder: Path) -> DicomSeries:
    series, errors = group_series(sorted(folder.iterdir()))
    assert not errors and len(series) == 1, (series, errors)
    return series[0]


def _series_error(folder: Path) -> InputError:
    with pytest.raises(InputError) as info:
        read_series_hu(_only_series(folder))
    return info.value


def _slice_error(path: Path) -> InputError:
    with pytest.raises(InputError) as info:
        read_slice_hu(path)
    return info.value


def _assert_names_and_fix(err: InputError, path: Path, *words: str) -> str:
    """The message starts with the file (or folder) name, has a fix after '; ', and contains ``words``."""
    msg = str(err)
    assert msg.startswith(f"{path.name}: "), msg
    assert "; " in msg and len(msg.split("; ")[-1]) > 10, msg
    for word in words:
        assert word.lower() in msg.lower(), (word, msg)
    return msg


def _edit(paths: Sequence[Path], change: Callable[[pydicom.Dataset, int], None]) -> None:
    """Rewrite files after ``change(dataset, index)``, keeping their encoding."""
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        change(ds, k)
        ds.save_as(path, enforce_file_format=True)


def _reference_canonical(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Independent build of the documented convention: stack columns x rows x slices sorted along the normal,
    affine from the headers in LPS converted to RAS, then nibabel's as_closest_canonical."""
    dss = [pydicom.dcmread(f) for f in files]
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot([float(v) for v in d.ImagePositionPatient], normal)))
    raw = np.stack([(d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)).T for d in dss], axis=2)
    ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
    row_sp, col_sp = (float(v) for v in dss[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * col_sp, iop[3:] * row_sp
    lps[:3, 2] = (ipp[-1] - ipp[0]) / (len(dss) - 1)
    lps[:3, 3] = ipp[0]
    img = nib.as_closest_canonical(nib.Nifti1Image(raw.astype(np.float32), np.diag([-1.0, -1, 1, 1]) @ lps))
    return np.asarray(img.dataobj), img.affine


# ---------------------------------------------------------------------------------------------------
# Real series
# ---------------------------------------------------------------------------------------------------


def test_real_series_reads_as_canonical_volume(abdomen_files: list[Path], tmp_path: Path) -> None:
    assert len(abdomen_files) == 20
    series, errors = group_series(abdomen_files)
    assert not errors and len(series) == 1
    s = series[0]
    assert len(s.files) == 20 and s.folder == abdomen_files[0].parent and len(s.uid_hash) == 16
    assert list(s.files) == sorted(s.files, key=lambda p: p.name)

    vol, spacing, affine = read_series_hu(s)
    assert vol.shape == (512, 512, 20) and vol.dtype == np.float32 and vol.flags.c_contiguous
    # Pixel spacing 0.977 mm; the slices are 3 mm thick but reconstructed every 2 mm (overlapping).
    assert spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert nib.affines.voxel_sizes(affine) == pytest.approx(spacing)
    assert np.allclose(affine[:3, :3], np.diag(spacing))  # axial scan: canonical RAS is a positive diagonal
    assert -1100 <= vol.min() <= -1000 and 500 < vol.max() < 4000
    assert np.percentile(vol, 1) < -950  # air around the patient

    ref_vol, ref_affine = _reference_canonical(abdomen_files)
    assert np.array_equal(vol, ref_vol) and np.allclose(affine, ref_affine)

    nii = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), nii)
    back, back_spacing = read_nifti_hu(nii)
    assert np.array_equal(back, vol)
    assert back_spacing == pytest.approx(spacing)


def test_real_series_missing_slice(abdomen_files: list[Path], tmp_path: Path) -> None:
    for path in abdomen_files[:9] + abdomen_files[10:]:
        shutil.copy(path, tmp_path / path.name)
    err = _series_error(tmp_path)
    msg = _assert_names_and_fix(err, tmp_path, "missing", "about 1 slice")
    assert abdomen_files[8].name in msg and abdomen_files[10].name in msg  # where the hole is
    assert "4.00 mm" in msg and "2.00 mm" in msg


def test_real_series_duplicate_slice(abdomen_files: list[Path], tmp_path: Path) -> None:
    for path in abdomen_files:
        shutil.copy(path, tmp_path / path.name)
    shutil.copy(abdomen_files[5], tmp_path / "copy_of_slice.dcm")
    msg = _assert_names_and_fix(_series_error(tmp_path), tmp_path, "duplicate positions")
    assert abdomen_files[5].name in msg and "copy_of_slice.dcm" in msg


# ---------------------------------------------------------------------------------------------------
# Real single slices
# ---------------------------------------------------------------------------------------------------


def test_real_slices_hu_and_rgb(real_slices: list[Path]) -> None:
    assert len(real_slices) == 14
    for path in real_slices:
        assert is_dicom_file(path)
        hu = read_slice_hu(path)
        assert hu.shape == (512, 512) and hu.dtype == np.float32
        assert hu.max() < 4000 and np.percentile(hu, 5) < -900 and -1100 < np.median(hu) < 200
        # Below -1100 HU only the single padding value outside the reconstruction circle (-2048 or -3024).
        assert len(np.unique(hu[hu < -1100])) <= 1
    rgb = slice_to_rgb(real_slices[0], -600, 800)  # lung window: -1000 HU and below black, -200 and above white
    assert rgb.dtype == np.uint8 and rgb.shape == (512, 512, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 2]) and rgb.min() == 0 and rgb.max() > 200


def test_real_slice_header(real_slices: list[Path]) -> None:
    header = read_header(real_slices[0])
    assert isinstance(header, DicomHeader)
    assert (header.rows, header.columns, header.modality) == (512, 512, "CT")
    assert header.orientation == (1, 0, 0, 0, 1, 0) and header.pixel_spacing is not None
    assert header.transfer_syntax.startswith("1.2.840.10008.1.2") and header.series_uid
    patient_id = str(pydicom.dcmread(real_slices[0], stop_before_pixels=True).PatientID)
    assert patient_id and patient_id not in repr(header)  # no patient attribute is carried


def test_preamble_detects_dicom_without_extension(real_slices: list[Path], tmp_path: Path) -> None:
    bare = tmp_path / "IM0001"
    shutil.copy(real_slices[0], bare)
    assert is_dicom_file(bare)
    assert np.array_equal(read_slice_hu(bare), read_slice_hu(real_slices[0]))
    (tmp_path / "notes.txt").write_text("x" * 300)
    (tmp_path / "X.DICOM").write_bytes(b"not even dicom")
    (tmp_path / "folder.dcm").mkdir()
    assert not is_dicom_file(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):  # cannot tell: the caller must know, not hear "not DICOM"
        is_dicom_file(tmp_path / "does-not-exist")
    assert not is_dicom_file(tmp_path / "folder.dcm")
    assert is_dicom_file(tmp_path / "X.DICOM")  # by name; reading it says what is wrong
    assert DICOM_SUFFIXES == (".dcm", ".dicom")


# ---------------------------------------------------------------------------------------------------
# Bad single files
# ---------------------------------------------------------------------------------------------------


def test_garbage_empty_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "x.dcm"
    garbage.write_bytes(np.random.default_rng(1).bytes(4000))
    _assert_names_and_fix(_slice_error(garbage), garbage, "not a DICOM file", "re-export")
    with pytest.raises(InputError, match="x.dcm: not a DICOM file"):
        read_header(garbage)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    _assert_names_and_fix(_slice_error(empty), empty, "empty file", "re-")
    # A missing or unreadable file is the system's problem, not the content's: an OSError for the
    # caller to report as an error (retried), not an InputError (a rejected file).
    with pytest.raises(FileNotFoundError):
        read_slice_hu(tmp_path / "gone.dcm")


def test_truncated_files(real_slices: list[Path], abdomen_files: list[Path], tmp_path: Path) -> None:
    for source, name in ((real_slices[0], "half_native.dcm"), (abdomen_files[0], "half_j2k.dcm")):
        data = source.read_bytes()
        cut = tmp_path / name
        cut.write_bytes(data[: len(data) // 2])
        _assert_names_and_fix(_slice_error(cut), cut, "truncated", "re-transfer")
    header_only = tmp_path / "cut_in_header.dcm"
    header_only.write_bytes(real_slices[0].read_bytes()[:1000])
    _assert_names_and_fix(_slice_error(header_only), header_only, "truncated")


def test_slice_without_pixel_data(tmp_path: Path) -> None:
    path = _write(tmp_path, (40, 36, 1))[0]
    _edit([path], lambda ds, _: ds.__delattr__("PixelData"))
    _assert_names_and_fix(_slice_error(path), path, "no pixel data", "send the image slices")


def test_unsupported_and_undecodable_transfer_syntax(tmp_path: Path) -> None:
    no_decoder, corrupt, private = _write(tmp_path, (40, 36, 3))

    def recompress(uid: str) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, _: int) -> None:
            ds.PixelData = encapsulate([bytes(ds.PixelData)])  # raw bytes posing as a compressed frame
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = uid
        return change

    _edit([no_decoder], recompress(JPEGLSLossless))  # no JPEG-LS plugin installed (pylibjpeg/gdcm/pyjpegls)
    msg = _assert_names_and_fix(_slice_error(no_decoder), no_decoder, "JPEG-LS", JPEGLSLossless,
                                "no installed decoder", "uncompressed", "install")
    assert "Explicit VR Little Endian" in msg
    _edit([corrupt], recompress(JPEG2000Lossless))  # Pillow decodes JPEG 2000, but these bytes are not J2K
    _assert_names_and_fix(_slice_error(corrupt), corrupt, "JPEG 2000", "cannot be decoded", "uncompressed")
    _edit([private], recompress("1.2.3.4.5"))
    _assert_names_and_fix(_slice_error(private), private, "unsupported transfer syntax", "1.2.3.4.5")


def test_non_ct_and_non_slice_images(tmp_path: Path) -> None:
    mr, multi, colour, zero_slope, bad_slope = _write(tmp_path / "a", (40, 36, 5))
    _edit([mr], lambda ds, _: setattr(ds, "Modality", "MR"))
    _assert_names_and_fix(_slice_error(mr), mr, "modality 'MR' is not CT", "CT series")
    _edit([multi], lambda ds, _: setattr(ds, "NumberOfFrames", 2))
    _assert_names_and_fix(_slice_error(multi), multi, "multi-frame", "single-frame")

    def to_rgb(ds: pydicom.Dataset, _: int) -> None:
        grey = ds.pixel_array.astype(np.uint8)
        ds.set_pixel_data(np.repeat(grey[..., None], 3, axis=2), "RGB", 8)

    _edit([colour], to_rgb)
    _assert_names_and_fix(_slice_error(colour), colour, "colour image", "greyscale")
    _edit([zero_slope], lambda ds, _: setattr(ds, "RescaleSlope", 0))
    _assert_names_and_fix(_slice_error(zero_slope), zero_slope, "RescaleSlope is 0")
    _edit([bad_slope], lambda ds, _: setattr(ds, "RescaleSlope", ""))
    _assert_names_and_fix(_slice_error(bad_slope), bad_slope, "RescaleSlope", "not a finite number")
    tiny = write_series(_volume((16, 40, 1)), SPACING, tmp_path / "b")[0]
    _assert_names_and_fix(_slice_error(tiny), tiny, "too small", "full-resolution")


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make pydicom's decoding record the call and fail: the slice must be refused from its header alone."""
    calls: list[str] = []

    def pixel_array(ds: pydicom.Dataset) -> np.ndarray:
        calls.append(str(ds.get("Rows")))
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(pixel_array))
    return calls


def test_oversized_slice_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny RLE file whose header claims 8000x8000 would make the decoder allocate rows*columns*bytes."""
    path = write_series(_volume((40, 36, 1)), SPACING, tmp_path, transfer_syntax=RLELossless)[0]
    _edit([path], lambda ds, _: (setattr(ds, "Rows", 8000), setattr(ds, "Columns", 8000)))
    assert path.stat().st_size < 8192  # kilobytes on disk, 128 MB once decoded
    calls = _no_decoding(monkeypatch)
    tracemalloc.start()
    try:
        err = _slice_error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not calls, "the oversized slice was handed to the decoder"
    assert peak < 16 * 2**20, f"refusing the header peaked at {peak / 2**20:.1f} MiB"
    msg = _assert_names_and_fix(err, path, "8000x8000", f"{dicom.MAX_SLICE_SIDE}x{dicom.MAX_SLICE_SIDE}",
                                "16 bits", "downsample")
    assert dicom.MAX_SLICE_SIDE == 4096
    one_side = tmp_path / "wide"
    wide = write_series(_volume((40, 36, 1)), SPACING, one_side)[0]
    _edit([wide], lambda ds, _: setattr(ds, "Columns", dicom.MAX_SLICE_SIDE + 1))
    _assert_names_and_fix(_slice_error(wide), wide, f"36x{dicom.MAX_SLICE_SIDE + 1}")
    assert not calls and "8000x8000" in msg


def test_oversized_series_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4097x4097 x 8 slices is under the volume limit, but no slice may exceed the side limit."""
    side = dicom.MAX_SLICE_SIDE + 1
    assert side * side * 8 < readers.MAX_VOLUME_VOXELS
    paths = _write(tmp_path, (40, 36, 8), transfer_syntax=RLELossless)
    _edit(paths, lambda ds, _: (setattr(ds, "Rows", side), setattr(ds, "Columns", side)))
    series = _only_series(tmp_path)
    calls = _no_decoding(monkeypatch)
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as info:
            read_series_hu(series)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not calls, "a slice of the oversized series was handed to the decoder"
    assert peak < 16 * 2**20, f"the {side * side * 8 * 4 / 2**20:.0f} MiB volume was allocated ({peak / 2**20:.1f} MiB)"
    msg = _assert_names_and_fix(info.value, tmp_path, f"{side}x{side}", "IM000001.dcm")
    assert series.uid_hash in msg


@pytest.mark.parametrize("bits", [1, 12, 64, None])
def test_unsupported_bits_allocated_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            bits: int | None) -> None:
    path = _write(tmp_path, (40, 36, 1))[0]

    def change(ds: pydicom.Dataset, _: int) -> None:
        if bits is None:
            del ds.BitsAllocated
        else:
            ds.BitsAllocated = bits

    _edit([path], change)
    calls = _no_decoding(monkeypatch)
    _assert_names_and_fix(_slice_error(path), path, f"BitsAllocated {bits if bits else 'missing'}",
                          "8, 16 or 32", "re-export")
    assert not calls


def test_float_pixel_data_with_nan(tmp_path: Path) -> None:
    path = _write(tmp_path, (40, 36, 1))[0]

    def to_float(ds: pydicom.Dataset, _: int) -> None:
        values = ds.pixel_array.astype(np.float32)
        values[3, 4] = np.nan
        del ds.PixelData
        for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
            delattr(ds, keyword)
        ds.BitsAllocated = 32
        ds.FloatPixelData = values.tobytes()

    _edit([path], to_float)
    _assert_names_and_fix(_slice_error(path), path, "NaN or infinite")


def test_raw_dataset_without_preamble(tmp_path: Path) -> None:
    """Old exports without the 128-byte preamble and 'DICM' are still read (by name), with their encoding."""
    path = _write(tmp_path, (40, 36, 1))[0]
    expected = read_slice_hu(path)
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    raw = tmp_path / "raw.dcm"
    pydicom.dcmwrite(raw, ds, implicit_vr=True, little_endian=True)
    assert raw.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(read_slice_hu(raw), expected)


def test_window_to_uint8() -> None:
    hu = np.array([[-2000.0, -160.0, 40.0], [240.0, 239.0, 5000.0]])
    out = window_to_uint8(hu, 40, 400)
    assert out.dtype == np.uint8
    # (hu - (40 - 200)) * 255 / 400: -160 -> 0, 40 -> 127.5 -> 128 (round half to even), 240 -> 255
    assert out.tolist() == [[0, 0, 128], [255, 254, 255]]
    with pytest.raises(ValueError):
        window_to_uint8(hu, 40, 0)


# ---------------------------------------------------------------------------------------------------
# Writer round trips
# ---------------------------------------------------------------------------------------------------


def test_write_series_round_trip(tmp_path: Path) -> None:
    vol = _volume((64, 60, 12), seed=3)
    paths = write_series(vol, SPACING, tmp_path, first_position_z=-100.0)
    assert [p.name for p in paths] == [f"IM{k:06d}.dcm" for k in range(1, 13)]
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
    assert (ds.Rows, ds.Columns, ds.PixelRepresentation, ds.BitsAllocated) == (60, 64, 0, 16)
    # Radiological storage: the first stored row/column are the last y/x of the canonical volume.
    assert np.array_equal(ds.pixel_array.astype(np.int32) - 1024, vol[::-1, ::-1, 0].T)

    back, spacing, affine = read_series_hu(_only_series(tmp_path))
    assert back.dtype == np.float32 and np.array_equal(back, vol)  # canonical reorientation undoes the flips
    assert spacing == pytest.approx(SPACING)
    expected = np.diag([*SPACING, 1.0])
    expected[:3, 3] = (-(64 - 1) / 2 * SPACING[0], -(60 - 1) / 2 * SPACING[1], -100.0)
    assert np.allclose(affine, expected)


def test_write_series_round_trip_phantom(tmp_path: Path) -> None:
    vol, phantom_affine = ct_volume("normal", np.random.default_rng(0), in_plane=64, slices=12)
    spacing = tuple(float(v) for v in np.diag(phantom_affine)[:3])
    write_series(vol, spacing, tmp_path, first_position_z=float(phantom_affine[2, 3]))  # type: ignore[arg-type]
    back, back_spacing, affine = read_series_hu(_only_series(tmp_path))
    assert np.array_equal(back, vol)
    assert back_spacing == pytest.approx(spacing, rel=1e-6)
    assert np.allclose(np.diag(affine)[:3], spacing) and affine[2, 3] == pytest.approx(phantom_affine[2, 3])


def test_write_series_names_syntax_and_validation(tmp_path: Path) -> None:
    vol = _volume((40, 36, 8))
    names = [f"slice_{k}" for k in range(8)]
    paths = write_series(vol, SPACING, tmp_path / "rle", file_names=names, transfer_syntax=RLELossless)
    assert [p.name for p in paths] == names and all(is_dicom_file(p) for p in paths)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(read_series_hu(_only_series(tmp_path / "rle"))[0], vol)
    with pytest.raises(ValueError, match="HU values"):
        write_series(np.full((40, 36, 8), -2000), SPACING, tmp_path / "bad")
    with pytest.raises(ValueError, match="file_names"):
        write_series(vol, SPACING, tmp_path / "bad", file_names=["a.dcm"] * 8)


def test_orientation_matches_as_closest_canonical(tmp_path: Path) -> None:
    """Non-axial and oblique stacks come out exactly as nibabel's as_closest_canonical lays them out."""
    cases = {
        "coronal": (1, 0, 0, 0, 0, -1),
        "sagittal": (0, 1, 0, 0, 0, -1),
        "flipped_axial": (-1, 0, 0, 0, 1, 0),
        "oblique": (np.cos(0.3), np.sin(0.3), 0, -np.sin(0.3), np.cos(0.3), 0),
    }
    for name, iop in cases.items():
        paths = _write(tmp_path / name, (40, 36, 9))
        normal = np.cross(iop[:3], iop[3:])

        def regeom(ds: pydicom.Dataset, k: int, iop: tuple = iop, normal: np.ndarray = normal) -> None:
            ds.ImageOrientationPatient = [f"{v:.10f}" for v in iop]
            ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array([10.0, -20.0, 30.0]) + 2.5 * k * normal]

        _edit(paths[::-1], regeom)  # file order opposite to the position order
        vol, spacing, affine = read_series_hu(_only_series(tmp_path / name))
        ref_vol, ref_affine = _reference_canonical(paths)
        assert np.array_equal(vol, ref_vol), name
        assert np.allclose(affine, ref_affine, atol=1e-6), name
        assert nib.affines.voxel_sizes(affine) == pytest.approx(spacing), name
        assert nib.aff2axcodes(affine) == ("R", "A", "S"), name


# ---------------------------------------------------------------------------------------------------
# Bad series
# ---------------------------------------------------------------------------------------------------


def test_group_series_mixed_folder(tmp_path: Path) -> None:
    a = _write(tmp_path / "one", (40, 36, 8))
    b = _write(tmp_path / "one", (40, 36, 8), file_names=[f"B{k}.dcm" for k in range(8)])
    c = _write(tmp_path / "two", (40, 36, 8))
    (tmp_path / "one" / "junk.dcm").write_bytes(b"junk" * 100)
    no_uid = _write(tmp_path / "three", (40, 36, 1))[0]

    def blank(ds: pydicom.Dataset, _: int) -> None:
        ds.SeriesInstanceUID = ""
        del ds.FrameOfReferenceUID

    _edit([no_uid], blank)
    paths = [*a, *b, *c, tmp_path / "one" / "junk.dcm", no_uid, a[0]]  # a duplicate path counts once
    series, errors = group_series(paths)
    assert sorted(len(s.files) for s in series) == [8, 8, 8]
    assert [s.folder.name for s in series] == ["one", "one", "two"]
    assert series == sorted(series, key=lambda s: (str(s.folder), s.uid_hash))
    assert set(errors) == {tmp_path / "one" / "junk.dcm", no_uid}
    assert "no SeriesInstanceUID" in str(errors[no_uid]) and str(errors[no_uid]).startswith("IM000001.dcm: ")


def test_blank_series_uid_groups_by_frame_of_reference(tmp_path: Path) -> None:
    paths = _write(tmp_path, (40, 36, 8))
    _edit(paths, lambda ds, _: setattr(ds, "SeriesInstanceUID", ""))
    series = _only_series(tmp_path)
    assert series.series_uid.startswith("frame-of-reference:") and len(series.files) == 8
    assert read_series_hu(series)[0].shape == (40, 36, 8)


def test_series_too_few_slices(tmp_path: Path) -> None:
    _write(tmp_path, (40, 36, MIN_SERIES_SLICES - 1))
    series = _only_series(tmp_path)
    msg = _assert_names_and_fix(_series_error(tmp_path), tmp_path, f"only {MIN_SERIES_SLICES - 1} slice",
                                series.uid_hash, "IM000001.dcm", "2-D images")
    assert "and 3 more" in msg


def test_series_mixed_sizes(tmp_path: Path) -> None:
    uid = pydicom.uid.generate_uid()
    write_series(_volume((40, 36, 9)), SPACING, tmp_path, series_uid=uid)
    write_series(_volume((48, 48, 1)), SPACING, tmp_path, series_uid=uid, first_position_z=9 * SPACING[2],
                 file_names=["odd.dcm"])
    _assert_names_and_fix(_series_error(tmp_path), tmp_path, "mixed image sizes", "odd.dcm", "48x48", "36x40")


@pytest.mark.parametrize(("iop", "words"), [
    ((1, 0, 0, 0, 0.9, 0), ["not orthonormal", "column length 0.9000"]),
    ((1, 0, 0, 0.1, 0.995, 0), ["not orthonormal", "row.column 0.1000"]),
])
def test_series_non_orthonormal_orientation(tmp_path: Path, iop: tuple[float, ...], words: list[str]) -> None:
    paths = _write(tmp_path, (40, 36, 8))
    _edit(paths, lambda ds, _: setattr(ds, "ImageOrientationPatient", list(iop)))
    _assert_names_and_fix(_series_error(tmp_path), tmp_path, *words, "IM000001.dcm")


def test_series_geometry_errors(tmp_path: Path) -> None:
    def case(name: str, change: Callable[[pydicom.Dataset, int], None], only: slice = slice(None)) -> str:
        paths = _write(tmp_path / name, (40, 36, 10))
        _edit(paths[only], change)
        return _assert_names_and_fix(_series_error(tmp_path / name), tmp_path / name)

    msg = case("orient", lambda ds, _: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]), slice(4, 5))
    assert "orientation differs" in msg and "IM000005.dcm" in msg
    msg = case("nopos", lambda ds, _: ds.__delattr__("ImagePositionPatient"), slice(2, 4))
    assert "IM000003.dcm, IM000004.dcm lack(s) a valid ImagePositionPatient" in msg
    msg = case("same", lambda ds, _: setattr(ds, "ImagePositionPatient", [0, 0, 5]))
    assert "zero gap: all 10 slices" in msg
    msg = case("uneven", lambda ds, k: setattr(ds, "ImagePositionPatient", [0, 0, 2.5 * k + (0.8 if k > 5 else 0)]))
    assert "inconsistent slice spacing" in msg and "IM000006.dcm and IM000007.dcm" in msg
    msg = case("holes", lambda ds, k: setattr(ds, "ImagePositionPatient", [0, 0, 2.5 * k + (7.5 if k > 2 else 0)]))
    assert "about 3 slice(s) seem missing" in msg and "IM000003.dcm and IM000004.dcm" in msg
    msg = case("tilt", lambda ds, k: setattr(ds, "ImagePositionPatient", [0, 0.6 * k, 2.5 * k]))
    assert "sheared" in msg and "IM000010.dcm" in msg
    msg = case("mr", lambda ds, _: setattr(ds, "Modality", "MR"), slice(7, 8))
    assert "slice IM000008.dcm: modality 'MR' is not CT" in msg


def test_series_size_refused_from_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write(tmp_path, (40, 36, 8))
    _edit(paths[:1], lambda ds, _: ds.__setattr__("PixelData", b"\x00" * 10))  # never decoded
    monkeypatch.setattr(readers, "MAX_VOLUME_VOXELS", 40 * 36 * 8 - 1)
    _assert_names_and_fix(_series_error(tmp_path), tmp_path, "too large to be a CT scan")


def test_series_slice_errors_name_the_file(tmp_path: Path) -> None:
    paths = _write(tmp_path, (40, 36, 8))
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) - 500])
    msg = _assert_names_and_fix(_series_error(tmp_path), tmp_path, "slice IM000004.dcm", "truncated or corrupt")
    assert _only_series(tmp_path).uid_hash in msg


def test_no_patient_identifiers_in_errors(tmp_path: Path) -> None:
    """Fake PHI written into the headers never reaches a message, nor the raw SeriesInstanceUID."""
    uid = pydicom.uid.generate_uid()
    errors: list[str] = []
    reprs: list[str] = []  # returned objects: no PHI (DicomSeries.series_uid is the UID by design)

    def series_case(name: str, count: int = 10, drop: int | None = None, mr: int | None = None,
                    duplicate: bool = False) -> None:
        paths = write_series(_volume((40, 36, count)), SPACING, tmp_path / name, series_uid=uid,
                             patient_name=PHI[0], patient_id=PHI[1])
        if drop is not None:
            paths[drop].unlink()
        if duplicate:
            shutil.copy(paths[1], tmp_path / name / "again.dcm")
        if mr is not None:
            _edit(paths[mr:mr + 1], lambda ds, _: setattr(ds, "Modality", "MR"))
            errors.append(str(_slice_error(paths[mr])))
            reprs.append(repr(read_header(paths[mr])))
        errors.append(str(_series_error(tmp_path / name)))
        reprs.append(repr(group_series((tmp_path / name).iterdir())))

    series_case("missing", drop=4)
    series_case("few", count=3)
    series_case("duplicate", duplicate=True)
    series_case("mr", mr=2)
    assert len(errors) == 5
    for text in errors + reprs:
        assert not any(secret in text for secret in (*PHI, "Doe", "Jane", "MRN")), text
    for text in errors:
        assert uid not in text, text
    assert pydicom.dcmread(tmp_path / "mr" / "IM000003.dcm").PatientName == PHI[0]  # the PHI is in the files


def test_pydicom_warnings_and_logs_never_carry_identifiers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pydicom warns (and logs through its logger) about invalid values, quoting them: a SeriesInstanceUID
    with an MRN in it, or the full path of a truncated file in a folder named after the patient. Reading
    headers, grouping and reading series and slices emit no warning and no log record with them."""
    secret = PHI[1]
    uid = f"1.2.826.{secret}.DOE"  # not a valid UI: letters
    folder = tmp_path / f"{secret}_{PHI[0]}"
    with warnings.catch_warnings():  # the writer warns too, about the UID it was given
        warnings.simplefilter("ignore")
        paths = write_series(_volume((40, 36, 8)), SPACING, folder, series_uid=uid, patient_name=PHI[0],
                             patient_id=secret)
        _edit(paths, lambda ds, _: setattr(ds, "OtherPatientIDs", f"{secret}\\{secret}-OLD"))
    cut = folder.parent / f"{secret}_cut" / "cut.dcm"
    cut.parent.mkdir()
    data = paths[0].read_bytes()
    cut.write_bytes(data[: len(data) - 500])
    validation_mode = pydicom.config.settings.reading_validation_mode
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        header = read_header(paths[0])
        series, errors = group_series([*paths, cut])
        volume = read_series_hu(series[0])[0]
        hu = read_slice_hu(paths[1])
        slice_to_rgb(paths[2], -600, 1500)
        truncated = _slice_error(cut)
    assert header.series_uid == uid and len(series) == 2 and not errors  # the values are still read ...
    assert volume.shape == (40, 36, 8) and hu.shape == (36, 40)
    assert "truncated" in str(truncated) and secret not in str(truncated)  # ... and truncation still detected
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [t for t in texts if secret in t or PHI[0] in t], texts
    # pydicom's settings are restored afterwards: its validation and its logger work as before
    assert pydicom.config.settings.reading_validation_mode == validation_mode
    assert logging.getLogger("pydicom").level == logging.DEBUG
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert str(pydicom.dcmread(paths[0]).SeriesInstanceUID) == uid
    assert any(secret in str(w.message) for w in caught)  # pydicom itself still warns: the test is real
    assert any(secret in r.getMessage() for r in caplog.records)


def test_dicom_module_exports() -> None:
    assert dicom.MIN_SERIES_SLICES == 8
    assert callable(dicom.read_series_hu) and not hasattr(dicom, "write_series")  # the writer is dicom_writer's
