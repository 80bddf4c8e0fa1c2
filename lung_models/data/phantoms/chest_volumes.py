"""Chest CT volumes like MosMedData's: normal lungs, or viral pneumonia's ground-glass opacities."""

from __future__ import annotations

import numpy as np

from lung_models.data import catalog
from lung_models.data.phantoms.fields import F32
from lung_models.data.phantoms.thorax import sample_chest, scanner_noise, thorax_hu

MOSMED_CLASSES = catalog.MOSMED.classes

def ct_volume(
    cls: str,
    rng: np.random.Generator,
    in_plane: int = 256,
    slices: int = 48,
    spacing: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A chest CT in Hounsfield units, int16 shaped (x, y, z), and its 4x4 RAS affine.

    ``normal`` lungs are clear; ``abnormal`` adds patchy, mostly peripheral and bilateral
    ground-glass opacities (-700 to -300 HU) over 25-50% of the lung volume, the MosMedData CT-2/3
    picture of viral pneumonia. By default the field of view fits the patient (so in-plane spacing
    is about 0.7 mm at 512 pixels and 1.4 mm at 256) and the slices cover the lungs, at most 5 mm
    apart; an explicit ``spacing`` (mm, x y z) is used as given, cropping the body if it is small.
    """
    if cls not in MOSMED_CLASSES:
        raise ValueError(f"unknown CT class {cls!r}; expected one of {MOSMED_CLASSES}")
    if in_plane < 16 or slices < 2:
        raise ValueError(f"volume {in_plane}x{in_plane}x{slices} too small; use at least 16x16x2")
    c = sample_chest(rng)
    if spacing is None:
        sxy = 2 * c.bx * rng.uniform(1.1, 1.28) / in_plane
        sz = float(np.clip(c.height * rng.uniform(1.0, 1.15) / slices, 1.5, 5.0))
        spacing = (sxy, sxy, sz)
    sx, sy, sz = (float(v) for v in spacing)
    # Patient offset within the field of view, and which part of the chest the slab covers.
    off = np.array([rng.normal(0, 6), rng.normal(4, 6)])
    z_mid = c.height * 0.42 + rng.normal(0, 0.03) * c.height
    origin = np.array([-(in_plane - 1) / 2 * sx - off[0], -(in_plane - 1) / 2 * sy - off[1],
                       z_mid - (slices - 1) / 2 * sz])
    # Patient coordinates of voxel centres as broadcastable axes, (n,1,1), (1,n,1), (1,1,s): the
    # in-plane anatomy then costs 2-D work and only z-dependent structures pay for 3-D arrays.
    x = (origin[0] + np.arange(in_plane) * sx).astype(F32)[:, None, None]
    y = (origin[1] + np.arange(in_plane) * sy).astype(F32)[None, :, None]
    z = (origin[2] + np.arange(slices) * sz).astype(F32)[None, None, :]
    hu, _ = thorax_hu(c, rng, x, y, z, origin, (sx, sy, sz), ground_glass=cls == "abnormal")
    hu = scanner_noise(hu, rng, x, y, off, (in_plane / 2) * sx)
    vol = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = origin + np.array([off[0], off[1], rng.uniform(-350, -150) - z_mid])
    return vol, affine
