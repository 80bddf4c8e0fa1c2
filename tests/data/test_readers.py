"""Readers: files that decode but would be scored wrongly (16-bit grey, several frames), NIfTI names
in any letter case, and a volume read in its stored width as nibabel's canonical read gives it."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from lung_models.data import phantoms
from lung_models.data.readers import InputError, read_nifti_hu, read_rgb_image

SLICE = phantoms.ct_slice("normal", np.random.default_rng(1), size=128)


def _hu_slice() -> np.ndarray:
    hu = np.full((64, 64), -1000.0, np.float32)
    hu[16:48, 16:48] = 40.0
    return hu


@pytest.mark.parametrize("name, image, word", [
    ("sixteen.png", lambda: Image.fromarray((_hu_slice() + 1024).astype(np.uint16)), "I;16 greyscale"),
    ("hu.tif", lambda: Image.fromarray(_hu_slice()), "F greyscale"),
])
def test_high_bit_depth_grey_images_are_refused_not_stretched(tmp_path, name, image, word):
    path = tmp_path / name
    image().save(path)
    with pytest.raises(InputError, match=f"{name}: {word}.*not an 8-bit export; send the slice as DICOM"):
        read_rgb_image(path)


def test_a_multi_page_tiff_is_refused(tmp_path):
    path = tmp_path / "pages.tif"
    Image.fromarray(SLICE).save(path, save_all=True, append_images=[Image.fromarray(255 - SLICE)])
    with pytest.raises(InputError, match="pages.tif: image holds 2 frames.*one slice or tile per file"):
        read_rgb_image(path)


@pytest.mark.parametrize("name", ["Scan.Nii.gz", "Scan.Nii", "SCAN.NII.GZ"])
def test_a_mixed_case_nifti_name_reads_like_a_lower_case_one(tmp_path, name):
    vol, affine = phantoms.ct_volume("normal", np.random.default_rng(2), in_plane=32, slices=12)
    suffix = ".nii.gz" if name.lower().endswith(".gz") else ".nii"
    lower = tmp_path / f"scan{suffix}"
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), str(lower))
    data, spacing = read_nifti_hu(lower)
    mixed = lower.rename(tmp_path / name)
    data2, spacing2 = read_nifti_hu(mixed)
    assert spacing2 == spacing and np.array_equal(data2, data)


@pytest.mark.parametrize("affine", [np.diag([0.7, 0.8, 2.5, 1.0]), np.diag([-0.7, -0.8, 2.5, 1.0]),
                                    np.array([[0, 0, -2.5, 10], [-0.7, 0, 0, 5], [0, 0.8, 0, 1], [0, 0, 0, 1.0]])],
                         ids=["ras", "lps", "permuted"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_a_volume_read_in_its_stored_width_equals_nibabels_canonical_scaled_read(tmp_path, affine, dtype):
    """The reader scales and reorients the stored array itself (one float32 copy instead of nibabel's
    float64 one): values and spacing must be what ``as_closest_canonical`` gives, including a header
    whose pixdim disagrees with its affine and an int16 volume with slope/intercept."""
    data = np.random.default_rng(0).integers(-1024, 1500, (20, 22, 24)).astype(dtype)
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms((1.2, 1.3, 1.1))
    if dtype == np.int16:
        img.header.set_slope_inter(1.0, -0.5)
    path = tmp_path / "v.nii.gz"
    nib.save(img, str(path))
    canonical = nib.as_closest_canonical(nib.load(str(path)))
    volume, spacing = read_nifti_hu(path)
    assert volume.dtype == np.float32 and volume.flags.owndata  # one float32 copy, in the stored order
    np.testing.assert_array_equal(volume, np.asarray(canonical.dataobj, dtype=np.float32))
    assert spacing == tuple(float(z) for z in canonical.header.get_zooms()[:3])


def test_one_table_of_readers_by_file_kind_serves_training_and_scoring(tmp_path):
    from lung_models.data import datasets, readers

    assert set(readers.READERS) == {readers.IMAGE, readers.NIFTI, readers.DICOM}
    assert datasets.reader_for({"kind": "rgb_image"}) is readers.READERS[readers.IMAGE]
    assert datasets.reader_for({"kind": "ct_volume"}) is readers.READERS[readers.NIFTI]
    with pytest.raises(ValueError, match="no reader for preprocessing kind 'text'"):
        datasets.reader_for({"kind": "text"})
    assert readers.file_kind_by_name(Path("ct/Scan.NII.GZ")) == readers.NIFTI
    assert readers.file_kind_by_name(Path("slide.JPEG")) == readers.IMAGE
    assert readers.file_kind_by_name(Path("IM000001")) is None  # DICOM is told by content, not name
    vol, affine = phantoms.ct_volume("normal", np.random.default_rng(2), in_plane=32, slices=12)
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), str(tmp_path / "v.nii.gz"))
    np.testing.assert_array_equal(readers.READERS[readers.NIFTI](tmp_path / "v.nii.gz", 0),
                                  read_nifti_hu(tmp_path / "v.nii.gz")[0])
