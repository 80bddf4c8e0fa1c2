"""The 3D path must reproduce the documented formulas of the Keras MosMedData example."""

import numpy as np
import pytest
from scipy import ndimage

from lung_models import preprocess
from lung_models.registry import get


def documented_normalize(volume):
    # Transcribed from the documented example (variable names kept apart from builtins).
    lo, hi = -1000, 400
    volume = volume.copy()
    volume[volume < lo] = lo
    volume[volume > hi] = hi
    volume = (volume - lo) / (hi - lo)
    return volume.astype("float32")


def documented_resize_volume(img, desired=(128, 128, 64)):
    width_factor = 1 / (img.shape[0] / desired[0])
    height_factor = 1 / (img.shape[1] / desired[1])
    depth_factor = 1 / (img.shape[-1] / desired[2])
    img = ndimage.rotate(img, 90, reshape=False)
    return ndimage.zoom(img, (width_factor, height_factor, depth_factor), order=1)


def test_ct_preprocessing_equals_the_documented_formulas():
    from lung_models.data.phantoms import ct_volume

    hu, _ = ct_volume("abnormal", np.random.default_rng(3), in_plane=160, slices=40)
    params = get("mosmed-3dcnn").spec.preprocessing
    ours = preprocess.preprocess_ct_volume(hu, params)
    reference = documented_resize_volume(documented_normalize(hu.astype(np.float64)))
    assert ours.shape == (128, 128, 64, 1) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[..., 0], reference, atol=1e-5)
    assert 0.0 <= ours.min() and ours.max() <= 1.0


def test_rot90_equals_ndimage_rotate_on_a_square_plane():
    vol = np.random.default_rng(0).random((32, 32, 5)).astype(np.float32)
    np.testing.assert_allclose(preprocess.rotate_in_plane_90(vol), ndimage.rotate(vol, 90, reshape=False),
                               atol=1e-6)


def test_hu_window_clips_and_scales():
    out = preprocess.clip_and_scale_hu(np.array([-3000, -1000, -300, 400, 3000]), -1000, 400)
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])


def test_random_rotation_stays_in_unit_range_and_is_seeded():
    vol = np.random.default_rng(1).random((24, 24, 8, 1)).astype(np.float32)
    a = preprocess.random_rotate_volume(vol, np.random.default_rng(7), [-20, 20])
    b = preprocess.random_rotate_volume(vol, np.random.default_rng(7), [-20, 20])
    np.testing.assert_array_equal(a, b)
    assert a.shape == vol.shape and a.min() >= 0 and a.max() <= 1
    assert not np.allclose(a, vol)


def test_rgb_preprocessing_resizes_and_rescales():
    img = np.full((300, 200, 3), 255, dtype=np.uint8)
    out = preprocess.model_input(img, {"kind": "rgb_image", "size": [64, 48], "scale": 1 / 255})
    assert out.shape == (64, 48, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0)


def test_fast_linear_resampling_equals_clip_then_zoom_on_any_shape():
    """preprocess_ct_volume gathers the voxels linear interpolation reads before clipping: equal to
    clipping everything and calling scipy.ndimage.zoom (order 1), up or down, odd sizes included."""
    params = {"hu_window": [-1000.0, 400.0], "rotate90": 1, "target_shape": [32, 28, 16], "zoom_order": 1}
    rng = np.random.default_rng(3)
    for shape in [(97, 64, 41), (20, 33, 9), (32, 28, 16), (5, 200, 16)]:
        volume = rng.normal(-300, 900, shape).astype(np.float32)
        reference = preprocess.resize_volume(
            preprocess.rotate_in_plane_90(preprocess.clip_and_scale_hu(volume, -1000, 400), 1), (32, 28, 16), 1)
        fast = preprocess.preprocess_ct_volume(volume, params)
        assert fast.shape == (32, 28, 16, 1) and fast.dtype == np.float32 and fast.flags.c_contiguous
        assert np.abs(fast[..., 0] - reference).max() < 1e-5, shape


def test_grey_colour_handling_is_luma_in_three_equal_channels():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 200  # pure red
    grey = preprocess.to_colour(img, {"colour": "grey"})
    assert grey.shape == img.shape and (grey == round(0.299 * 200)).all()
    assert preprocess.to_colour(img, {}) is img  # the default keeps the colours
    with pytest.raises(ValueError, match="unknown colour handling 'gray'"):
        preprocess.to_colour(img, {"colour": "gray"})


def test_the_scorer_prepares_each_file_exactly_as_training_cached_it(tmp_path):
    """A bundle trained in grey is scored in grey: for RGBA, greyscale and JPEG files as the chest
    CT exports mix them, the scorer's prepared input equals the training cache's row, and an RGB
    bundle does not share it. A DICOM slice is grey already: both bundles see the same pixels."""
    from PIL import Image

    from lung_models.data import dicom_writer
    from lung_models.data.readers import IMAGE, READERS
    from lung_models.scoring import decode, discover

    rng = np.random.default_rng(0)
    slice_ = np.repeat(rng.integers(0, 256, (120, 90, 1), dtype=np.uint8), 3, axis=2)
    marked = slice_.copy()
    marked[10:20, 10:20] = (255, 0, 0)  # a red mark burnt into the slice
    Image.fromarray(np.dstack([marked, np.full((120, 90), 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(slice_[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(marked).save(tmp_path / "rgb.jpg", quality=90)
    volume = np.full((32, 32, 1), -500, np.float32)
    volume[8:20, 8:20] = 40.0
    dicom_writer.write_series(volume, (0.7, 0.7, 2.0), tmp_path / "dcm")
    grey = {"kind": "rgb_image", "size": [64, 64], "scale": 1.0, "colour": "grey",
            "ct_window": {"center": 100.0, "width": 2200.0}}
    rgb = {k: v for k, v in grey.items() if k != "colour"}
    items = {item.key: item for item in discover(tmp_path).items}
    for name in ("rgba.png", "grey.png", "rgb.jpg"):
        decoded = decode.decode(items[name], tmp_path)
        trained = preprocess.cache_stage(READERS[IMAGE](tmp_path / name), grey)
        np.testing.assert_array_equal(decode.prepare(decoded, grey)[0], trained)
        assert (trained == trained[..., :1]).all()
        assert decode.signature(grey, items[name]) != decode.signature(rgb, items[name])
    (series,) = [key for key in items if key.startswith("dcm")]
    decoded = decode.decode(items[series], tmp_path)
    np.testing.assert_array_equal(decode.prepare(decoded, grey), decode.prepare(decoded, rgb))
