"""Smooth random fields and jittered grids, the raw material of every phantom.

Everything works in float32 (``F32``) and avoids full-size blurs and BLAS calls, whose worker threads
stall badly when the CPU is shared with training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

F32 = np.float32

def smooth_field(rng: np.random.Generator, shape: Sequence[int], corr: float | Sequence[float]) -> np.ndarray:
    """Zero-mean, roughly unit-variance smooth random field with features about ``corr`` elements wide.

    Blurred white noise on a coarse lattice (two nodes per feature), interpolated up. This avoids
    both full-size blurs and BLAS, whose worker threads stall badly when the CPU is shared.
    """
    corrs = np.broadcast_to(np.asarray(corr, dtype=float), (len(shape),))
    coarse = tuple(max(int(np.ceil(2.0 * n / max(c, 1e-3))) + 3, 4) for n, c in zip(shape, corrs))
    lattice = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=F32), 0.8, mode="wrap")
    lattice /= max(float(lattice.std()), 1e-6)
    if len(shape) == 2:
        return resize(lattice, (int(shape[0]), int(shape[1])), smooth=True)
    return _upsample_linear(lattice, shape)


def _upsample_linear(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Separable linear interpolation of ``arr`` onto ``shape`` (corners aligned), one axis at a time."""
    out = arr
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        pos = np.linspace(0, m - 1, int(n), dtype=F32)
        lo = np.minimum(pos.astype(np.int64), m - 2)
        frac = (pos - lo).reshape([-1 if i == axis else 1 for i in range(out.ndim)])
        a, b = np.take(out, lo, axis=axis), np.take(out, lo + 1, axis=axis)
        out = a + (b - a) * frac
    return np.ascontiguousarray(out, dtype=F32)


def resize(field: np.ndarray, size: tuple[int, int], smooth: bool = False) -> np.ndarray:
    """Bilinear (or, with ``smooth``, bicubic) resize of a 2-D float field to (height, width).

    PIL's float-image path is several times faster than scipy.ndimage.zoom at these sizes.
    """
    img = Image.fromarray(np.ascontiguousarray(field, dtype=F32), mode="F")
    method = Image.Resampling.BICUBIC if smooth else Image.Resampling.BILINEAR
    return np.asarray(img.resize((size[1], size[0]), method), dtype=F32)


def jittered_grid(rng: np.random.Generator, extent: float, spacing: float, jitter: float = 0.4) -> np.ndarray:
    """Points roughly ``spacing`` apart covering a square (plus a margin), as an (n, 2) array of (y, x).

    A jittered lattice rather than uniform points: cells, alveoli and glands have a typical size,
    and clumped uniform points would give implausible tiny and huge Voronoi cells.
    """
    n = int(np.ceil(extent / spacing)) + 2
    iy, ix = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    pts = np.stack([iy.ravel(), ix.ravel()], axis=1).astype(float) - 0.5
    pts += rng.uniform(-jitter, jitter, pts.shape)
    # Shift alternate rows so the lattice is closer to hexagonal packing.
    pts[:, 1] += 0.5 * (iy.ravel() % 2)
    return pts * spacing
