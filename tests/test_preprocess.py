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


def test_the_scorer_prepares_an_image_exactly_as_training_cached_it():
    """A bundle trained in grey is scored in grey: the scorer's prepared input equals the training
    cache's for the same decoded image, and a grey and an RGB model do not share it."""
    from lung_models.scoring import decode
    from lung_models.scoring.items import Item

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(120, 90, 3), dtype=np.uint8)
    item = Item(key="a.png", input_kind="ct_slice", file_kind="image", files=("a.png",), sha256="0")
    grey = {"kind": "rgb_image", "size": [64, 64], "scale": 1.0, "colour": "grey"}
    rgb = {k: v for k, v in grey.items() if k != "colour"}
    decoded = decode.Decoded(item, image=image)
    np.testing.assert_array_equal(decode.prepare(decoded, grey)[0], preprocess.cache_stage(image, grey))
    np.testing.assert_array_equal(decode.prepare(decoded, rgb)[0], preprocess.cache_stage(image, rgb))
    assert decode.signature(grey, item) != decode.signature(rgb, item)
