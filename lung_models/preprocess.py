"""Pure array preprocessing: arrays in, arrays out, no file I/O.

The parameters of every function come from a model's ``preprocessing`` dict (in the registry
and, after export, in the bundle's model card), so training and scoring run the same code on
the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage


# ---------------------------------------------------------------- CT volumes (HU)
def clip_and_scale_hu(volume: np.ndarray, hu_min: float = -1000.0, hu_max: float = 400.0) -> np.ndarray:
    """Clip Hounsfield units to ``[hu_min, hu_max]`` and map them linearly onto ``[0, 1]`` (float32)."""
    volume = np.clip(np.asarray(volume, dtype=np.float32), hu_min, hu_max)
    return ((volume - hu_min) / (hu_max - hu_min)).astype(np.float32)


def rotate_in_plane_90(volume: np.ndarray, turns: int = 1) -> np.ndarray:
    """Rotate by ``turns`` × 90° in the (x, y) plane.

    Equal, voxel for voxel, to ``scipy.ndimage.rotate(volume, 90 * turns, reshape=False)`` on a
    square plane (the documented step), but exact and about a hundred times faster. On a
    non-square plane the documented call crops and pads; this keeps every voxel and swaps the
    in-plane sizes, which the resize that follows absorbs.
    """
    return np.rot90(volume, k=turns, axes=(0, 1))


def resize_volume(volume: np.ndarray, target_shape: tuple[int, int, int], order: int = 1) -> np.ndarray:
    """Resample a (x, y, z) volume to ``target_shape`` with spline interpolation of ``order``."""
    factors = [t / s for t, s in zip(target_shape, volume.shape)]
    out = ndimage.zoom(volume, factors, order=order)
    if out.shape != tuple(target_shape):  # zoom rounds; guard against an off-by-one
        raise ValueError(f"resize produced {out.shape}, expected {tuple(target_shape)}")
    return out.astype(np.float32, copy=False)


def preprocess_ct_volume(volume_hu: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """HU volume (x, y, z) → model input (x, y, z, 1) float32 in [0, 1], as documented:
    clip and scale HU, rotate 90° in plane, resize with linear interpolation.

    With linear interpolation (the documented ``zoom_order`` 1) only the input voxels next to a
    sample point are ever read: a 512×512×120 scan resized to 128×128×64 reads about a quarter of
    its voxels. Those are gathered first, then clipped and scaled (a voxel-wise step, so the order
    does not change the result) and interpolated, which is an order of magnitude faster than
    clipping the whole volume and calling ``scipy.ndimage.zoom``, and equal to it within float32
    rounding (``resize_volume`` stays the reference, and the tests compare the two)."""
    hu_min, hu_max = params["hu_window"]
    target = tuple(params["target_shape"])
    volume = rotate_in_plane_90(np.asarray(volume_hu), params.get("rotate90", 1))
    if params.get("zoom_order", 1) != 1:
        volume = clip_and_scale_hu(volume, hu_min, hu_max)
        return resize_volume(volume, target, params.get("zoom_order", 1))[..., np.newaxis]
    axes = [_linear_taps(n_in, n_out) for n_in, n_out in zip(volume.shape, target)]
    needed = volume[np.ix_(*(taps for taps, _, _, _ in axes))]
    out = clip_and_scale_hu(needed, hu_min, hu_max)
    for axis, (_, lo, hi, weight) in enumerate(axes):
        shape = [1, 1, 1]
        shape[axis] = -1
        w = weight.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return np.ascontiguousarray(out, dtype=np.float32)[..., np.newaxis]


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For linear resampling of an axis from ``n_in`` to ``n_out`` samples on scipy.ndimage.zoom's grid
    (output sample o at input coordinate o·(n_in − 1)/(n_out − 1)): the input indices read, and for
    each output sample the positions of its two taps among them and the weight of the upper one."""
    coords = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lower = np.clip(np.floor(coords).astype(np.int64), 0, n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    weight = (coords - lower).astype(np.float32)
    taps = np.union1d(lower, upper)
    return taps, np.searchsorted(taps, lower), np.searchsorted(taps, upper), weight


def random_rotate_volume(volume: np.ndarray, rng: np.random.Generator, angles: list[float]) -> np.ndarray:
    """Training augmentation: rotate in plane by an angle drawn from ``angles`` (degrees), then clip
    back to [0, 1] (spline overshoot). Works on (x, y, z) or (x, y, z, 1)."""
    angle = float(rng.choice(angles))
    channel = volume.ndim == 4 and volume.shape[-1] == 1
    # Rotating the 3-D array is a quarter faster than rotating it with its channel axis.
    rotated = ndimage.rotate(volume[..., 0] if channel else volume, angle, axes=(0, 1), reshape=False)
    rotated = np.clip(rotated, 0.0, 1.0).astype(np.float32, copy=False)
    return rotated[..., np.newaxis] if channel else rotated


# ---------------------------------------------------------------- 2D RGB images
def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) → uint8 (size[0], size[1], 3), bilinear (as Keras' image loaders do)."""
    from PIL import Image

    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


# Colour handling recorded in a bundle's preprocessing ("colour"): "rgb" (the default) keeps the
# decoded colours; "grey" turns every image into its luminance, repeated in three channels. Chest CT
# exports mix greyscale, RGB and RGBA PNGs and JPEGs, a few with coloured annotations, and a DICOM
# slice is grey: a model that sees colour can learn which exporter made a slice instead of what is
# in it.
COLOURS = ("rgb", "grey")


def to_colour(image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """uint8 (H, W, 3) in the colour handling ``params`` asks for (ITU-R 601 luma, as Pillow's "L")."""
    colour = params.get("colour", "rgb")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour handling {colour!r}; known: {', '.join(COLOURS)}")
    if colour == "rgb":
        return image
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., np.newaxis], 3, axis=-1)


def scale_rgb(batch_uint8: np.ndarray, scale: float) -> np.ndarray:
    return batch_uint8.astype(np.float32) * np.float32(scale)


# The scorer and the trainer look preprocessing up by the ``kind`` recorded in the spec/bundle.
def cache_stage(image_or_volume: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """The deterministic, expensive part of preprocessing, whose result is cached on disk.

    RGB images are cached resized as uint8 (a quarter of the float size) and rescaled per batch;
    volumes are cached fully preprocessed (float32).
    """
    kind = params["kind"]
    if kind == "rgb_image":
        return resize_rgb(to_colour(image_or_volume, params), tuple(params["size"]))
    if kind == "ct_volume":
        return preprocess_ct_volume(image_or_volume, params)
    raise ValueError(f"unknown preprocessing kind {kind!r}")


def batch_stage(cached_batch: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """The cheap per-batch part that turns cached arrays into model inputs."""
    if params["kind"] == "rgb_image":
        return scale_rgb(cached_batch, params["scale"])
    return np.asarray(cached_batch, dtype=np.float32)


def cached_dtype(params: dict[str, Any]) -> str:
    return "uint8" if params["kind"] == "rgb_image" else "float32"


def model_input(image_or_volume: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Full preprocessing of one decoded item (what the scorer runs)."""
    return batch_stage(cache_stage(image_or_volume, params)[np.newaxis], params)[0]
