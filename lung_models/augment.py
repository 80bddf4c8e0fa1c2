"""Training-time augmentation in the data pipeline, for the ``tuned`` profiles.

It runs on the cached uint8 images of a batch before they are rescaled, so a model's layers and
its exported graph are the same whether or not it was trained with it. What each kind does is
what is plausible for its images:

- ``ct_slice``: a small rotation, shift and scale about the centre (a patient lies a little
  differently, a scanner's field of view differs), and a contrast and brightness change (the
  exports' windows and gammas differ). No flips: a mirrored chest puts the heart on the wrong side.
- ``he_tile``: flips and quarter turns (a tile has no up or left), and a stain jitter: each RGB
  channel's optical density (Beer-Lambert: what the stains absorb) scaled by up to ``stain``
  (relative) and shifted by up to ``stain`` (absolute, in OD units), as staining and scanners vary
  between labs, plus a small brightness change. (Per RGB channel, not per stain: no H&E unmixing.)

Every item of a batch is augmented (each with its own random draw).

Volumes keep their own augmentation (``volume_rotation``, in :mod:`lung_models.preprocess`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

IMAGE_KINDS = ("ct_slice", "he_tile")
KINDS = ("volume_rotation", *IMAGE_KINDS)

# Defaults of each image kind's options (a profile may override any of them).
DEFAULTS: dict[str, dict[str, Any]] = {
    "ct_slice": {"rotation_degrees": 10.0, "shift": 0.06, "scale": (0.9, 1.1), "contrast": (0.8, 1.25),
                 "brightness": 0.08},
    "he_tile": {"flips": True, "quarter_turns": True, "stain": 0.05, "brightness": 0.05},
}


def check(augmentation: dict[str, Any] | None) -> None:
    """Refuse an unknown kind or option before any training starts."""
    if not augmentation:
        return
    kind = augmentation.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown augmentation kind {kind!r}; known: {', '.join(KINDS)}")
    if kind in DEFAULTS:
        unknown = sorted(set(augmentation) - {"kind", *DEFAULTS[kind]})
        if unknown:
            raise ValueError(f"{kind} augmentation: unknown options {unknown}; known: {sorted(DEFAULTS[kind])}")


def images(batch: np.ndarray, augmentation: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """A randomly augmented copy of a uint8 (N, H, W, C) batch, still uint8."""
    kind = augmentation["kind"]
    options = {**DEFAULTS[kind], **{k: v for k, v in augmentation.items() if k in DEFAULTS[kind]}}
    one = _ct_slice if kind == "ct_slice" else _he_tile
    return np.stack([one(np.asarray(image), rng, options) for image in batch])


def _ct_slice(image: np.ndarray, rng: np.random.Generator, o: dict[str, Any]) -> np.ndarray:
    from scipy import ndimage

    h, w = image.shape[:2]
    angle = np.deg2rad(rng.uniform(-o["rotation_degrees"], o["rotation_degrees"]))
    zoom = rng.uniform(*o["scale"])
    shift = rng.uniform(-o["shift"], o["shift"], size=2) * (h, w)
    # affine_transform maps output coordinates to input ones: the inverse of "rotate, zoom, shift".
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    matrix = np.array([[cos, -sin], [sin, cos]])
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre - matrix @ (centre + shift)
    # What comes in from outside the image is the image's own border (air, or a viewer's frame).
    border = float(np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])))
    grey = image.shape[-1] == 1 or bool((image == image[..., :1]).all())
    channels = [image[..., 0]] if grey else [image[..., c] for c in range(image.shape[-1])]
    moved = [ndimage.affine_transform(c.astype(np.float32), matrix, offset, order=1, cval=border)
             for c in channels]
    out = np.stack(moved * image.shape[-1] if grey else moved, axis=-1)
    mean = out.mean()
    out = (out - mean) * rng.uniform(*o["contrast"]) + mean + rng.uniform(-o["brightness"], o["brightness"]) * 255
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _he_tile(image: np.ndarray, rng: np.random.Generator, o: dict[str, Any]) -> np.ndarray:
    out = image
    if o["flips"] and rng.random() < 0.5:
        out = out[:, ::-1]
    if o["flips"] and rng.random() < 0.5:
        out = out[::-1]
    if o["quarter_turns"] and out.shape[0] == out.shape[1]:
        out = np.rot90(out, int(rng.integers(4)))
    density = -np.log((out.astype(np.float32) + 1) / 256)
    channels = out.shape[-1]
    density = (density * rng.uniform(1 - o["stain"], 1 + o["stain"], channels)
               + rng.uniform(-o["stain"], o["stain"], channels))
    out = 256 * np.exp(-density) - 1 + rng.uniform(-o["brightness"], o["brightness"]) * 255
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
