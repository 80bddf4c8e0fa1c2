"""The tuned profiles' data-pipeline augmentation (lung_models.augment)."""

import numpy as np
import pytest

from lung_models import augment

OFF = {"ct_slice": {"rotation_degrees": 0.0, "shift": 0.0, "scale": (1.0, 1.0), "contrast": (1.0, 1.0),
                    "brightness": 0.0},
       "he_tile": {"flips": False, "quarter_turns": False, "stain": 0.0, "brightness": 0.0}}


def _slices(n=4, size=48, grey=True):
    rng = np.random.default_rng(0)
    base = np.zeros((n, size, size, 3), np.uint8)
    base[:, 12:30, 8:20] = rng.integers(120, 250, size=(n, 18, 12, 1 if grey else 3), dtype=np.uint8)
    return base


@pytest.mark.parametrize("kind", augment.IMAGE_KINDS)
def test_with_every_change_switched_off_the_images_come_back_unchanged(kind):
    batch = _slices(grey=kind == "ct_slice")
    out = augment.images(batch, {"kind": kind, **OFF[kind]}, np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.shape == batch.shape
    # Stain jitter off still round-trips through optical density: at most a rounding step off.
    assert np.abs(out.astype(int) - batch).max() <= (0 if kind == "ct_slice" else 1)


def test_ct_slices_move_and_change_contrast_but_stay_grey_and_are_never_mirrored():
    batch = _slices(n=32)
    out = augment.images(batch, {"kind": "ct_slice"}, np.random.default_rng(2))
    assert (out == out[..., :1]).all()  # a grey slice stays grey
    assert sum(not np.array_equal(o, b) for o, b in zip(out, batch)) == 32
    # The bright block sits left of centre; a left-right mirror would put its mass right of centre.
    columns = np.arange(48)
    centre_of_mass = [(o[..., 0].sum(0) * columns).sum() / o[..., 0].sum() for o in out]
    assert max(centre_of_mass) < 24, max(centre_of_mass)


def test_he_tiles_flip_turn_and_change_stain_within_bounds():
    batch = _slices(n=64, grey=False)
    only_geometry = augment.images(batch, {"kind": "he_tile", "stain": 0.0, "brightness": 0.0},
                                   np.random.default_rng(3))
    # Flips and quarter turns move pixels, never change them.
    for o, b in zip(only_geometry, batch):
        assert np.abs(np.sort(o, axis=None).astype(int) - np.sort(b, axis=None)).max() <= 1
    moved = sum(not np.array_equal(o, b) for o, b in zip(only_geometry, batch))
    assert 40 <= moved < 64  # 1 in 8 keeps its place (no flip and no turn, or both flips and a half turn)
    stained = augment.images(batch, {"kind": "he_tile", "flips": False, "quarter_turns": False},
                             np.random.default_rng(4))
    change = np.abs(stained.astype(int) - batch)
    assert 0 < change.mean() < 30


def test_unknown_kinds_and_options_are_refused_before_training():
    with pytest.raises(ValueError, match="unknown augmentation kind 'ct'"):
        augment.check({"kind": "ct"})
    with pytest.raises(ValueError, match=r"unknown options \['rotation'\]"):
        augment.check({"kind": "ct_slice", "rotation": 10})
    with pytest.raises(ValueError, match=r"unknown options \['probability'\]"):  # every image is augmented
        augment.check({"kind": "he_tile", "probability": 0.5})
