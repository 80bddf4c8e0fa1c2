"""Writing a HU volume as a DICOM CT series: the demo's incoming series, test inputs and benchmarks.

Kept apart from ``dicom`` (which only reads and assembles series, the nightly scorer's side), so the
reader never depends on how our own files are written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from lung_models.data.dicom import _syntax_name

HU_OFFSET = 1024  # write_series stores HU + 1024 as unsigned 16-bit (RescaleIntercept -1024)


def _slice_dataset(pixels: np.ndarray, position: tuple[float, float, float], index: int, spacing: Sequence[float],
                   uids: dict[str, str], patient_name: str, patient_id: str) -> Dataset:
    """One CT Image Storage slice (uncompressed, Explicit VR Little Endian) around ``pixels`` (uint16 rows x cols)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [format_number_as_ds(v) for v in position]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = format_number_as_ds(position[2])
    ds.PixelSpacing = [format_number_as_ds(spacing[1]), format_number_as_ds(spacing[0])]  # rows (y), columns (x)
    ds.SliceThickness = format_number_as_ds(spacing[2])
    ds.RescaleIntercept = -HU_OFFSET
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    ds.set_pixel_data(pixels, "MONOCHROME2", 16, generate_instance_uid=False)
    return ds


def _encode(ds: Dataset, transfer_syntax: str | None) -> None:
    """Re-encode in the requested syntax: little-endian uncompressed natively, compressed ones with pydicom's
    encoders (RLE Lossless always; JPEG-LS / JPEG 2000 only with an encoder plugin installed)."""
    if transfer_syntax is None:
        return
    uid = UID(transfer_syntax)
    if uid.is_compressed:
        ds.compress(uid, generate_instance_uid=False)
    elif uid.is_transfer_syntax and uid.is_little_endian:
        ds.file_meta.TransferSyntaxUID = uid
    else:
        raise ValueError(f"cannot write transfer syntax {_syntax_name(uid)}; use a little-endian or compressed one")


def write_series(volume_hu: np.ndarray, spacing: tuple[float, float, float], folder: Path, *,
                 series_uid: str | None = None, patient_name: str = "Anonymous", patient_id: str = "ANON",
                 first_position_z: float = 0.0, file_names: Sequence[str] | None = None,
                 transfer_syntax: str | None = None) -> list[Path]:
    """Write a (x, y, z) int16/float HU volume as a CT series of DICOM slices, one per z; returns the paths.

    The volume is taken to be in canonical RAS voxel order (like phantoms.ct_volume and any NIfTI after
    ``as_closest_canonical``): x increasing towards the patient's right, y anterior, z superior. Each
    slice k is stored as axial IOP [1,0,0,0,1,0] with pixels = volume[::-1, ::-1, k].T (rows = y reversed,
    columns = x reversed: the radiological view a scanner writes), the in-plane centre at x = y = 0 and
    ImagePositionPatient z = first_position_z + k * spacing[2]. read_series_hu's canonical reorientation flips
    exactly those two axes back, so ``read_series_hu(group_series(write_series(v)))`` returns ``v`` itself (as
    float32) with spacing ``spacing`` and affine diag(sx, sy, sz) translated to
    (-(nx-1)/2 * sx, -(ny-1)/2 * sy, first_position_z).

    HU are stored as unsigned 16-bit HU + 1024 (RescaleIntercept -1024, slope 1), so they must lie in
    [-1024, 64511] after rounding. Default encoding is Explicit VR Little Endian; ``transfer_syntax`` asks for
    another one (little-endian uncompressed, or compressed if pydicom has an encoder: RLE Lossless always).
    Each file is written under a temporary name and renamed, so a reader never sees half a slice.
    PatientName / PatientID are written as given (tests use them to check that identifiers never leak).
    """
    volume = np.asarray(volume_hu)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"expected a 3-D (x, y, z) volume, got shape {volume.shape}")
    sizes = tuple(float(s) for s in spacing)
    if len(sizes) != 3 or not all(math.isfinite(s) and s > 0 for s in sizes):
        raise ValueError(f"spacing must be three positive finite mm values, got {spacing}")
    stored = np.rint(volume.astype(np.float64)) + HU_OFFSET
    if not np.isfinite(stored).all() or stored.min() < 0 or stored.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"HU values must be finite and within [-{HU_OFFSET}, {np.iinfo(np.uint16).max - HU_OFFSET}]")
    nx, ny, nz = volume.shape
    names = list(file_names) if file_names is not None else [f"IM{k + 1:06d}.dcm" for k in range(nz)]
    if len(names) != nz or len(set(names)) != nz or any(Path(n).name != n or not n for n in names):
        raise ValueError(f"file_names must be {nz} distinct plain file names, got {len(names)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "series": series_uid or generate_uid(), "frame": generate_uid()}
    # LPS position of pixel (row 0, column 0) = canonical voxel (nx-1, ny-1, k), centred in-plane at x = y = 0.
    corner = (-(nx - 1) / 2 * sizes[0], -(ny - 1) / 2 * sizes[1])
    paths = []
    for k, name in enumerate(names):
        pixels = np.ascontiguousarray(stored[::-1, ::-1, k].T.astype(np.uint16))
        position = (corner[0], corner[1], float(first_position_z) + k * sizes[2])
        ds = _slice_dataset(pixels, position, k, sizes, uids, patient_name, patient_id)
        _encode(ds, transfer_syntax)
        path = folder / name
        tmp = folder / f".{name}.{os.getpid()}.partial"
        try:
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
    return paths
