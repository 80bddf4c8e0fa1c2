"""Generated stand-ins for the lung data sets: H&E tiles like LC25000, chest CT volumes like MosMedData
and axial chest CT slices with lung cancers like Kaggle's chest-ctscan-images and Lung CT-Scan images.

No real data set can be downloaded on the build machines, yet training, export and scoring need
inputs in the real formats with a class difference a small network can learn. The generators draw
the anatomy each class is defined by (acinar glands, keratinising nests, alveolar lace; ground-glass
opacities in the lungs; peripheral spiculated nodules, pleural masses, cavitated hilar masses) and
randomise everything else (stain, blur, noise, body habitus, spacing, display window), so that a
model has to learn shape rather than one pixel statistic.

Everything is deterministic given a ``numpy.random.Generator``; the dataset writers seed one per item
from ``(seed, class index, item index)`` so items are reproducible and independent of write order.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from lung_models.data import catalog
from lung_models.fileutil import atomic_write_bytes

# The classes and folders of the data sets the phantoms stand in for (see data/catalog.py). A
# class's index in these tuples seeds its phantoms.
LC25000_CLASSES = catalog.LC25000.classes
MOSMED_CLASSES = catalog.MOSMED.classes
MOSMED_FOLDERS = catalog.MOSMED.layout
CHEST_CLASSES = catalog.CHEST_CT.classes
CHEST_FOLDERS = catalog.CHEST_CT_STAGED_FOLDERS
CANCER_CLASSES = catalog.CT_CANCER.classes
CT_CANCER_FOLDERS = catalog.CT_CANCER_PARENTS
DATASET_KINDS = ("lc25000", "mosmed", "chest_ct", "ct_cancer")
# Bump a kind's number whenever the same seed and parameters start giving different pictures:
# generated-data caches are keyed on it, so a work folder from an older generator is rebuilt
# instead of silently reused. chest_ct and ct_cancer 2: every adenocarcinoma has its ground-glass
# rim and slices stop at the lower hila.
GENERATOR_VERSIONS = {"lc25000": 1, "mosmed": 1, "chest_ct": 2, "ct_cancer": 2}

_F32 = np.float32

# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], corr: float | Sequence[float]) -> np.ndarray:
    """Zero-mean, roughly unit-variance smooth random field with features about ``corr`` elements wide.

    Blurred white noise on a coarse lattice (two nodes per feature), interpolated up. This avoids
    both full-size blurs and BLAS, whose worker threads stall badly when the CPU is shared.
    """
    corrs = np.broadcast_to(np.asarray(corr, dtype=float), (len(shape),))
    coarse = tuple(max(int(np.ceil(2.0 * n / max(c, 1e-3))) + 3, 4) for n, c in zip(shape, corrs))
    lattice = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=_F32), 0.8, mode="wrap")
    lattice /= max(float(lattice.std()), 1e-6)
    if len(shape) == 2:
        return _resize(lattice, (int(shape[0]), int(shape[1])), smooth=True)
    return _upsample_linear(lattice, shape)


def _upsample_linear(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Separable linear interpolation of ``arr`` onto ``shape`` (corners aligned), one axis at a time."""
    out = arr
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        pos = np.linspace(0, m - 1, int(n), dtype=_F32)
        lo = np.minimum(pos.astype(np.int64), m - 2)
        frac = (pos - lo).reshape([-1 if i == axis else 1 for i in range(out.ndim)])
        a, b = np.take(out, lo, axis=axis), np.take(out, lo + 1, axis=axis)
        out = a + (b - a) * frac
    return np.ascontiguousarray(out, dtype=_F32)


def _resize(field: np.ndarray, size: tuple[int, int], smooth: bool = False) -> np.ndarray:
    """Bilinear (or, with ``smooth``, bicubic) resize of a 2-D float field to (height, width).

    PIL's float-image path is several times faster than scipy.ndimage.zoom at these sizes.
    """
    img = Image.fromarray(np.ascontiguousarray(field, dtype=_F32), mode="F")
    method = Image.Resampling.BICUBIC if smooth else Image.Resampling.BILINEAR
    return np.asarray(img.resize((size[1], size[0]), method), dtype=_F32)


def _jittered_grid(rng: np.random.Generator, extent: float, spacing: float, jitter: float = 0.4) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------------
# Histopathology tiles (LC25000-like)
# ---------------------------------------------------------------------------------------------------

# Optical density per unit stain (R, G, B), natural-log units. Haematoxylin is close to the
# Ruifrok-Johnston colour-deconvolution vector; eosin is bluer than theirs because LC25000's eosin
# looks lavender-pink rather than magenta (both fitted by eye and by mean tile colour to the real
# tiles); red cells and keratin get their own, redder vector.
_OD_HAEM = np.array([0.64, 0.74, 0.20])
_OD_EOSIN = np.array([0.30, 0.92, 0.24])
_OD_RBC = np.array([0.08, 0.95, 0.62])


def _paint_blobs(
    shape: tuple[int, int],
    cy: np.ndarray,
    cx: np.ndarray,
    ry: np.ndarray,
    rx: np.ndarray,
    theta: np.ndarray,
    rng: np.random.Generator,
    *,
    wobble: float = 0.0,
    rim: float = 0.0,
    nucleolus: float = 0.0,
    edge: float = 1.0,
    pale_centre: float = 0.0,
) -> np.ndarray:
    """Sum of soft ellipses (nuclei, red cells) rendered in small windows and scattered with bincount.

    ``ry``/``rx`` are semi-axes in pixels, ``theta`` the orientation of the ``rx`` axis and ``edge``
    the width of the soft outline in pixels. ``wobble`` makes outlines irregular (pleomorphism),
    ``rim`` darkens the edge relative to the centre (vesicular chromatin), ``nucleolus`` adds a
    central dot and ``pale_centre`` gives red cells their biconcave look.
    """
    h, w = shape
    out = np.zeros(h * w, dtype=np.float64)
    n = len(cy)
    if n == 0:
        return out.reshape(shape).astype(_F32)
    harmonics = rng.normal(0.0, wobble, (n, 4)).astype(_F32) if wobble > 0 else None
    r_max = np.maximum(rx, ry) * (1.0 + 2.5 * wobble) + edge + 1
    order = np.argsort(r_max)
    # Window size per size bucket, so a few big blobs do not make every small one pay for it.
    for chunk in np.array_split(order, min(3, n)):
        if chunk.size == 0:
            continue
        k = int(np.ceil(r_max[chunk].max()))
        off = np.arange(-k, k + 1, dtype=_F32)
        iy = np.round(cy[chunk]).astype(np.int64)
        ix = np.round(cx[chunk]).astype(np.int64)
        dy = off[None, :, None] - (cy[chunk] - iy).astype(_F32)[:, None, None]
        dx = off[None, None, :] - (cx[chunk] - ix).astype(_F32)[:, None, None]
        c = np.cos(theta[chunk]).astype(_F32)[:, None, None]
        s = np.sin(theta[chunk]).astype(_F32)[:, None, None]
        u = (dx * c + dy * s) / rx[chunk].astype(_F32)[:, None, None]
        v = (dy * c - dx * s) / ry[chunk].astype(_F32)[:, None, None]
        d = np.sqrt(u * u + v * v) + _F32(1e-6)
        if harmonics is not None:
            # Low-order angular harmonics of the outline, via polynomial identities (no arctan2).
            cs, sn = u / d, v / d
            a = harmonics[chunk]
            radius = 1 + (a[:, 0, None, None] * (cs * cs - sn * sn) + a[:, 1, None, None] * (2 * cs * sn)
                          + a[:, 2, None, None] * cs * (4 * cs * cs - 3)
                          + a[:, 3, None, None] * sn * (3 - 4 * sn * sn))
            d = d / np.maximum(radius, _F32(0.4))
        mean_r = (0.5 * (rx[chunk] + ry[chunk])).astype(_F32)[:, None, None]
        val = np.clip((1 - d) * mean_r / _F32(edge) + _F32(0.5), 0, 1)
        if rim > 0:
            val *= (1 - rim) + rim * np.clip(d / _F32(0.85), 0, 1) ** 2
        if nucleolus > 0:
            val += nucleolus * np.exp(-((d / _F32(0.2)) ** 2))
        if pale_centre > 0:
            val *= 1 - pale_centre * np.exp(-((d / _F32(0.5)) ** 2))
        yy = iy[:, None, None] + off.astype(np.int64)[None, :, None]
        xx = ix[:, None, None] + off.astype(np.int64)[None, None, :]
        ok = (val > 0.004) & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        out += np.bincount((yy * w + xx)[ok], weights=val[ok], minlength=h * w)
    return out.reshape(shape).astype(_F32)


def _voronoi_fields(
    points: np.ndarray, grid: int, scale: float, warp: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the nearest Voronoi edge and index of the nearest seed, on a grid x grid lattice.

    ``scale`` converts lattice units to tile pixels. The edge distance is the exact distance to the
    bisector of the two nearest seeds, so walls drawn from it keep an even thickness; ``warp``
    (pixel offsets per lattice point) bends the walls without thickening them.
    """
    coords = (np.arange(grid) + 0.5) * scale
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    if warp is not None:
        gy, gx = gy + warp[0], gx + warp[1]
    q = np.stack([gy.ravel(), gx.ravel()], axis=1)
    dist, idx = cKDTree(points).query(q, k=2)
    sep = np.linalg.norm(points[idx[:, 1]] - points[idx[:, 0]], axis=1)
    edge = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * np.maximum(sep, 1e-6))
    return edge.reshape(grid, grid).astype(_F32), idx[:, 0].reshape(grid, grid)


def _sample_in_mask(rng: np.random.Generator, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random sub-pixel positions inside ``mask`` (with replacement), as (y, x) arrays."""
    flat = np.flatnonzero(mask)
    if flat.size == 0 or n <= 0:
        return np.zeros(0), np.zeros(0)
    pick = flat[rng.integers(0, flat.size, n)]
    y, x = np.divmod(pick, mask.shape[1])
    return y + rng.uniform(-0.5, 0.5, n), x + rng.uniform(-0.5, 0.5, n)


class _Stains:
    """Per-tile stain concentration maps, composed to RGB with Beer-Lambert absorption at the end.

    ``chromatin`` is a fine granular texture that nuclei are multiplied by, since flat nuclei are
    the most obvious tell of a drawn tile.
    """

    def __init__(self, rng: np.random.Generator, size: int, s: float) -> None:
        self.size = size
        self.s = s
        self.shape = (size, size)
        self.haem = np.zeros(self.shape, _F32)
        self.eosin = np.zeros(self.shape, _F32)
        self.rbc = np.zeros(self.shape, _F32)
        half = max(size // 2, 8)
        self.chromatin = 1 + 0.4 * _resize(rng.standard_normal((half, half), dtype=_F32), self.shape)
        # Coarser graininess of cytoplasm and stroma (a few pixels across).
        sixth = max(size // 6, 8)
        self.grain = 1 + 0.12 * _resize(rng.standard_normal((sixth, sixth), dtype=_F32), self.shape)

    def nuclei(self, darkness: float, blobs: np.ndarray) -> None:
        self.haem += darkness * blobs * self.chromatin


def _collagen(rng: np.random.Generator, st: _Stains) -> np.ndarray:
    """Wavy, roughly parallel fibre bundles in [0, 1]: the look of collagenous stroma."""
    ang = rng.uniform(0, np.pi)
    yy = np.arange(st.size, dtype=_F32)[:, None] * _F32(np.sin(ang))
    xx = np.arange(st.size, dtype=_F32)[None, :] * _F32(np.cos(ang))
    # Bundles bend on two scales, and a patchy mask breaks them into strands of varying length.
    warp = (_smooth_field(rng, st.shape, 150 * st.s) * _F32(30 * st.s)
            + _smooth_field(rng, st.shape, 30 * st.s) * _F32(5 * st.s))
    period = _F32(rng.uniform(12, 20) * st.s)
    lines = (0.5 + 0.5 * np.cos((yy + xx + warp) * _F32(2 * np.pi) / period)) ** 3
    strands = np.clip(0.35 + 0.6 * _smooth_field(rng, st.shape, 24 * st.s), 0, 1)
    return lines * strands


def _lowres(size: int) -> tuple[int, float]:
    """Side of the coarse lattice used for tissue layout, and its cell size in pixels."""
    grid = max(size // 4, 24)
    return grid, size / grid


def _normal_lung(rng: np.random.Generator, st: _Stains) -> None:
    """Alveolar lace: wavy pink septa around large air spaces, scattered nuclei and red cells."""
    size, s = st.size, st.s
    grid, cell = _lowres(size)
    spacing = rng.uniform(240, 520) * s
    seeds = _jittered_grid(rng, size, spacing, jitter=0.45)
    warp = tuple(_smooth_field(rng, (grid, grid), 110 * s / cell) * (30 * s) for _ in range(2))
    edge_lo, _ = _voronoi_fields(seeds, grid, cell, warp)
    edge = _resize(edge_lo, st.shape)
    # Septa vary in thickness along their length and between tiles (collapse, congestion).
    thick = np.clip(_resize(_smooth_field(rng, (grid, grid), 160 * s / cell), st.shape), 0, None)
    half_width = (rng.uniform(10.0, 28.0) + rng.uniform(0, 1) * 40.0 * thick) * s
    wall = np.clip((half_width - edge) / (2.0 * s) + 0.5, 0, 1)
    # A few walls leave the section plane: free-ending septa, as in the real lace.
    breaks = _resize(_smooth_field(rng, (grid, grid), 120 * s / cell), st.shape)
    wall *= np.clip((breaks + rng.uniform(1.3, 2.5)) * 3, 0, 1)
    # Each septum is two thin pink linings around a paler core (capillary bed, interstitium).
    depth = np.clip(edge / np.maximum(half_width, 1e-3), 0, 1)
    lining = np.exp(-(((1 - depth) * half_width / (4.0 * s)) ** 2))
    st.eosin += wall * (rng.uniform(0.3, 0.45) + rng.uniform(0.25, 0.45) * lining) * st.grain
    st.haem += wall * rng.uniform(0.15, 0.3)
    # Pale pink oedema fluid or fibrin filling some air spaces, common in resection specimens.
    fluid = np.clip((_resize(_smooth_field(rng, (grid, grid), 260 * s / cell), st.shape) - rng.uniform(0.2, 1.8)) * 2,
                    0, 1)
    st.eosin += (1 - wall) * fluid * rng.uniform(0.06, 0.25) * st.grain

    mask = wall > 0.5
    n_nuc = int(mask.sum() / (rng.uniform(1500, 3000) * s * s))
    y, x = _sample_in_mask(rng, mask, n_nuc)
    gy, gx = np.gradient(edge_lo)
    gi = np.clip((y / cell).astype(int), 0, grid - 1), np.clip((x / cell).astype(int), 0, grid - 1)
    along = np.arctan2(gy[gi], gx[gi]) + np.pi / 2  # flattened along the wall
    rx = rng.uniform(13, 22, y.size) * s
    ry = rx * rng.uniform(0.45, 0.8, y.size)
    st.nuclei(1.35, _paint_blobs(st.shape, y, x, ry, rx, along, rng, wobble=0.06, edge=2.5 * s + 0.3))

    # Alveolar macrophages: loose pale cells with a nucleus, floating in a few air spaces.
    n_mac = int(rng.integers(0, 5))
    if n_mac:
        y, x = rng.uniform(0, size, n_mac), rng.uniform(0, size, n_mac)
        r = rng.uniform(22, 34, n_mac) * s
        body = _paint_blobs(st.shape, y, x, r * 0.85, r, rng.uniform(0, np.pi, n_mac), rng, wobble=0.1,
                            edge=3 * s + 0.3)
        st.eosin += 0.3 * body
        st.haem += 0.2 * body
        st.nuclei(1.7, _paint_blobs(st.shape, y + 0.3 * r, x, 0.35 * r, 0.45 * r, np.zeros(n_mac), rng,
                                    edge=2 * s + 0.3))

    # Red cells: in capillaries along the walls and in haemorrhagic clumps inside some alveoli.
    y1, x1 = _sample_in_mask(rng, mask, int(mask.sum() / (rng.uniform(1500, 8000) * s * s)))
    n_clump = int(rng.choice([0, 1, 2, 3]))
    which = rng.integers(0, max(n_clump, 1), int(rng.uniform(0, 250) * (size / 768) ** 2) if n_clump else 0)
    centres = rng.uniform(0, size, (max(n_clump, 1), 2))
    y2 = centres[which, 0] + rng.normal(0, 70 * s, which.size)
    x2 = centres[which, 1] + rng.normal(0, 70 * s, which.size)
    y, x = np.concatenate([y1, y2]), np.concatenate([x1, x2])
    r = rng.uniform(12.0, 15.0, y.size) * s
    st.rbc += 1.5 * _paint_blobs(st.shape, y, x, r * rng.uniform(0.75, 1.0, y.size), r,
                                 rng.uniform(0, np.pi, y.size), rng, edge=2.0 * s + 0.3, pale_centre=0.3)


def _adenocarcinoma(rng: np.random.Generator, st: _Stains) -> None:
    """Acinar pattern: glands with a white lumen lined by crowded columnar nuclei, in pink stroma."""
    size, s = st.size, st.s
    grid, cell = _lowres(size)
    spacing = rng.uniform(270, 400) * s
    centres = _jittered_grid(rng, size, spacing, jitter=0.3)
    n = len(centres)
    # Per gland: lumen radius, elongation, orientation and outline harmonics.
    r0 = rng.uniform(0.12, 0.28, n) * spacing  # acinar lumina stay visible after 3x downsampling
    elong = rng.uniform(1.0, 2.0, n)
    phi = rng.uniform(0, np.pi, n)
    harm = rng.normal(0, 0.15, (n, 4))
    epi = rng.uniform(50, 80) * s  # epithelium thickness in pixels

    def lumen_radius(i: np.ndarray, ang: np.ndarray) -> np.ndarray:
        return r0[i] * (1 + harm[i, 0] * np.cos(2 * ang) + harm[i, 1] * np.sin(2 * ang)
                        + harm[i, 2] * np.cos(3 * ang) + harm[i, 3] * np.sin(3 * ang))

    coords = (np.arange(grid) + 0.5) * cell
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    _, near = cKDTree(centres).query(np.stack([gy.ravel(), gx.ravel()], 1))
    near = near.reshape(grid, grid)
    py, px = gy - centres[near, 0], gx - centres[near, 1]
    cphi, sphi = np.cos(phi[near]), np.sin(phi[near])
    u = (px * cphi + py * sphi) / np.sqrt(elong[near])
    v = (py * cphi - px * sphi) * np.sqrt(elong[near])
    # Signed distance (pixels, roughly) outside the lumen outline of the nearest gland.
    depth = (np.hypot(u, v) - lumen_radius(near, np.arctan2(v, u))).astype(_F32)
    depth += _smooth_field(rng, (grid, grid), 60 * s / cell) * (5 * s)
    depth_full = _resize(depth, st.shape)

    soft = 2.5 * s
    # The basal side of the epithelium fades into stroma; the luminal side is a crisp edge.
    base = 8 * s
    epithelium = np.clip(depth_full / soft + 0.5, 0, 1) * np.clip((epi - depth_full) / base + 0.5, 0, 1)
    stroma = np.clip((depth_full - epi) / base + 0.5, 0, 1)
    fibres = _collagen(rng, st)
    st.eosin += stroma * (rng.uniform(0.35, 0.55) + 0.3 * fibres) * st.grain
    st.haem += stroma * rng.uniform(0.12, 0.25)
    st.eosin += epithelium * rng.uniform(0.35, 0.55) * st.grain
    st.haem += epithelium * rng.uniform(0.3, 0.45)  # amphophilic, purple-tinged cytoplasm
    # Mucin, secretions or shed cells fill some lumina, more in some tiles than others, so a tile's
    # share of white is a hint of its class but never the whole answer.
    lumen = 1 - np.clip(depth_full / soft + 0.5, 0, 1)
    filled = (rng.random(n) < rng.uniform(0, 0.4)) * rng.uniform(0.3, 1.0, n)
    secretion = np.clip(_resize(_smooth_field(rng, (grid, grid), 40 * s / cell), st.shape) * 0.3 + 0.7, 0, 1)
    fill = _resize(filled[near].astype(_F32), st.shape) * secretion
    st.eosin += lumen * (0.05 + 0.35 * fill)
    st.haem += lumen * 0.15 * fill

    # Columnar nuclei: crowded along each lumen outline, long axis radial, pseudo-stratified.
    nuc_y, nuc_x, nuc_t = [], [], []
    pitch = rng.uniform(18, 24) * s / rng.uniform(1.2, 1.8)
    for i in range(n):
        perim = 2 * np.pi * r0[i] * np.sqrt(0.5 * (elong[i] + 1 / elong[i]))
        k = max(int(perim / pitch), 6)
        a = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 2 * np.pi)
        a += rng.normal(0, 0.3 * 2 * np.pi / k, k)
        rr = lumen_radius(np.full(k, i), a) + rng.uniform(0.25, 0.75, k) * epi
        u_, v_ = rr * np.cos(a) * np.sqrt(elong[i]), rr * np.sin(a) / np.sqrt(elong[i])
        nuc_x.append(centres[i, 1] + u_ * np.cos(phi[i]) - v_ * np.sin(phi[i]))
        nuc_y.append(centres[i, 0] + u_ * np.sin(phi[i]) + v_ * np.cos(phi[i]))
        # Radial direction after the gland's stretch and rotation: the long axis of columnar nuclei.
        nuc_t.append(phi[i] + np.arctan2(np.sin(a) / np.sqrt(elong[i]), np.cos(a) * np.sqrt(elong[i])))
    y, x, t = np.concatenate(nuc_y), np.concatenate(nuc_x), np.concatenate(nuc_t)
    margin = 40 * s
    inside = (y > -margin) & (y < size + margin) & (x > -margin) & (x < size + margin)
    y, x, t = y[inside], x[inside], t[inside]
    # Drop nuclei that landed in a neighbouring gland's lumen.
    gi = np.clip((y / cell).astype(int), 0, grid - 1), np.clip((x / cell).astype(int), 0, grid - 1)
    keep = depth[gi] > 0
    y, x, t = y[keep], x[keep], t[keep]
    rx = rng.uniform(18, 28, y.size) * s
    ry = rx * rng.uniform(0.45, 0.7, y.size)
    st.nuclei(1.2, _paint_blobs(st.shape, y, x, ry, rx, t, rng, wobble=0.08, rim=0.45,
                                nucleolus=0.25 * (rng.random() < 0.5), edge=2.5 * s + 0.3))

    # Stromal cells: spindle fibroblasts and small round lymphocytes.
    smask = stroma > 0.5
    y, x = _sample_in_mask(rng, smask, int(smask.sum() / (rng.uniform(6000, 14000) * s * s)))
    rx = rng.uniform(12, 20, y.size) * s
    ry = np.where(rng.random(y.size) < 0.6, rx * 0.35, rx * 0.85)
    st.nuclei(2.0, _paint_blobs(st.shape, y, x, ry, rx, rng.uniform(0, np.pi, y.size), rng,
                                wobble=0.05, edge=2.0 * s + 0.3))
    y, x = _sample_in_mask(rng, smask, int(rng.uniform(0, 12) * (size / 768) ** 2))
    r = rng.uniform(12.0, 15.0, y.size) * s
    st.rbc += 1.5 * _paint_blobs(st.shape, y, x, r, r, np.zeros(y.size), rng, edge=2.0 * s + 0.3, pale_centre=0.3)


def _squamous(rng: np.random.Generator, st: _Stains) -> None:
    """Solid nests of large polygonal pink cells with big dark pleomorphic nuclei and keratin pearls."""
    size, s = st.size, st.s
    grid, cell = _lowres(size)
    spacing = rng.uniform(68, 95) * s
    seeds = _jittered_grid(rng, size, spacing, jitter=0.35)
    warp = tuple(_smooth_field(rng, (grid, grid), 60 * s / cell) * (8 * s) for _ in range(2))
    border = _resize(_voronoi_fields(seeds, grid, cell, warp)[0], st.shape)
    # Nests separated by bands of fibrous stroma where a smooth field is high.
    band_field = _resize(_smooth_field(rng, (grid, grid), 300 * s / cell), st.shape)
    band_level = rng.uniform(0.9, 2.2)
    band = np.clip((band_field - band_level) * 4, 0, 1)
    nest = 1 - band

    membrane = np.clip((3.0 * s - border) / (2.0 * s) + 0.5, 0, 1)
    st.eosin += nest * (rng.uniform(0.3, 0.6) * st.grain + 0.2 * membrane)
    st.haem += nest * (rng.uniform(0.2, 0.35) + 0.2 * membrane)
    st.eosin += band * (0.5 + 0.35 * _collagen(rng, st))
    st.haem += band * 0.08

    # Keratin pearls: a glassy orange-pink keratin core wrapped in concentric flattened cells.
    n_pearls = int(rng.choice([0, 0, 0, 1, 1, 2]))
    in_pearl = np.zeros(st.shape, _F32)
    for _ in range(n_pearls):
        py, px = rng.uniform(0.1, 0.9, 2) * size
        pr = rng.uniform(80, 170) * s
        period = rng.uniform(14, 24) * s
        y0, y1 = max(int(py - pr) - 2, 0), min(int(py + pr) + 3, size)
        x0, x1 = max(int(px - pr) - 2, 0), min(int(px + pr) + 3, size)
        yy = np.arange(y0, y1, dtype=_F32)[:, None] - _F32(py)
        xx = np.arange(x0, x1, dtype=_F32)[None, :] - _F32(px)
        ang = np.arctan2(yy, xx)
        # An irregular outline and wavy lamellae, so pearls read as whorls rather than targets.
        rad = np.sqrt(yy * yy + xx * xx) / (1 + 0.12 * np.cos(2 * ang + rng.uniform(0, 6.3))
                                             + 0.08 * np.sin(3 * ang + rng.uniform(0, 6.3)))
        rings = 0.5 + 0.5 * np.cos(2 * np.pi * (rad + 0.1 * pr * np.sin(2 * ang + rad / pr * 5)) / period)
        wgt = np.clip((pr - rad) / (4 * s), 0, 1)
        core = np.clip((0.5 * pr - rad) / (8 * s), 0, 1)
        win = (slice(y0, y1), slice(x0, x1))
        st.eosin[win] += wgt * (0.3 + 0.2 * rings * (1 - core) + 0.2 * core)
        st.rbc[win] += wgt * (0.15 + 0.1 * rings) + 0.25 * core  # keratin takes a brighter, orange eosin
        st.haem[win] *= 1 - 0.7 * wgt
        in_pearl[win] = np.maximum(in_pearl[win], wgt)
        k = int(rng.integers(6, 16))
        a = rng.uniform(0, 2 * np.pi, k)
        rr = rng.uniform(0.55, 0.92, k) * pr
        st.nuclei(1.6, _paint_blobs(st.shape, py + rr * np.sin(a), px + rr * np.cos(a),
                                    rng.uniform(5, 8, k) * s, rng.uniform(16, 26, k) * s, a + np.pi / 2, rng,
                                    edge=2.0 * s + 0.3))

    # One large, dark, pleomorphic nucleus per tumour cell; none in stroma or inside pearls.
    y = seeds[:, 0] + rng.normal(0, 0.08 * spacing, len(seeds))
    x = seeds[:, 1] + rng.normal(0, 0.08 * spacing, len(seeds))
    ok = (y > -spacing) & (y < size + spacing) & (x > -spacing) & (x < size + spacing)
    y, x = y[ok], x[ok]
    iy, ix = np.clip(y.astype(int), 0, size - 1), np.clip(x.astype(int), 0, size - 1)
    keep = (band[iy, ix] < 0.5) & (in_pearl[iy, ix] < 0.2) & (rng.random(y.size) < 0.9)
    y, x = y[keep], x[keep]
    rx = rng.uniform(0.3, 0.37) * spacing * rng.lognormal(0, 0.2, y.size)
    ry = rx * rng.uniform(0.6, 0.95, y.size)
    st.nuclei(rng.uniform(1.1, 1.5), _paint_blobs(st.shape, y, x, ry, rx, rng.uniform(0, np.pi, y.size), rng,
                                                  wobble=0.12, rim=0.5, nucleolus=0.5, edge=2.5 * s + 0.3))
    # Spindle fibroblast nuclei in the stromal bands.
    bmask = band > 0.5
    y, x = _sample_in_mask(rng, bmask, int(bmask.sum() / (rng.uniform(3000, 6000) * s * s)))
    rx = rng.uniform(14, 22, y.size) * s
    st.nuclei(2.0, _paint_blobs(st.shape, y, x, rx * 0.35, rx, rng.uniform(0, np.pi, y.size), rng,
                                edge=2.0 * s + 0.3))
    # Small clear vacuoles and retraction spaces: the only white in a squamous tile.
    n_vac = int(rng.integers(0, 10))
    if n_vac:
        y, x = rng.uniform(0, size, n_vac), rng.uniform(0, size, n_vac)
        r = rng.uniform(8, 24, n_vac) * s
        hole = np.clip(_paint_blobs(st.shape, y, x, r * 0.8, r, rng.uniform(0, np.pi, n_vac), rng,
                                    wobble=0.1, edge=3.0 * s + 0.3), 0, 1)
        for m in (st.haem, st.eosin, st.rbc):
            m *= 1 - 0.9 * hole
    # Retraction clefts where nests shrank away from the stroma during fixation.
    if rng.random() < 0.4:
        gaps = np.clip(_resize(_smooth_field(rng, (grid, grid), 80 * s / cell), st.shape) + 0.3, 0, 1)
        cleft = np.clip(1.5 - np.abs(band_field - band_level) / rng.uniform(0.04, 0.1), 0, 1) * gaps
        for m in (st.haem, st.eosin, st.rbc):
            m *= 1 - 0.95 * cleft


_TILE_BUILDERS = {"lung_aca": _adenocarcinoma, "lung_scc": _squamous, "lung_n": _normal_lung}


def _perturbed(vec: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    v = np.clip(vec + rng.normal(0, amount, 3), 0.01, None)
    return v / np.linalg.norm(v)


def histology_tile(cls: str, rng: np.random.Generator, size: int = 768) -> np.ndarray:
    """An H&E-like RGB tile (uint8, (size, size, 3)) of one LC25000 class.

    Structure sizes are defined for a 768-pixel tile (LC25000's size) and scale with ``size``, so a
    small tile looks like a downsampled large one.
    """
    if cls not in _TILE_BUILDERS:
        raise ValueError(f"unknown histology class {cls!r}; expected one of {LC25000_CLASSES}")
    if size < 16:
        raise ValueError(f"tile size {size} too small; use at least 16 pixels")
    st = _Stains(rng, size, size / 768.0)
    _TILE_BUILDERS[cls](rng, st)
    if rng.random() < 0.2:
        # The specimen's edge crosses the tile: bare glass on one side, whatever the class.
        ang = rng.uniform(0, 2 * np.pi)
        yy = np.arange(size, dtype=_F32)[:, None] * _F32(np.sin(ang))
        xx = np.arange(size, dtype=_F32)[None, :] * _F32(np.cos(ang))
        reach = rng.uniform(0.6, 0.95) * size * (abs(np.sin(ang)) + abs(np.cos(ang)))
        offset = min(0.0, np.sin(ang) * (size - 1)) + min(0.0, np.cos(ang) * (size - 1))
        wavy = _smooth_field(rng, (size, size), 200 * st.s) * _F32(25 * st.s)
        tissue = np.clip((_F32(offset + reach) - (yy + xx) - wavy) / _F32(3 * st.s), 0, 1)
        for m in (st.haem, st.eosin, st.rbc):
            m *= tissue

    # Staining and scanning vary between slides: stain hue and strength, focus, sensor noise.
    h_vec = _perturbed(_OD_HAEM, rng, 0.06)
    e_vec = _perturbed(_OD_EOSIN, rng, 0.08)
    r_vec = _perturbed(_OD_RBC, rng, 0.05)
    h_gain, e_gain = rng.lognormal(0, 0.18), rng.lognormal(0, 0.2)
    uneven = 1 + 0.1 * _resize(_smooth_field(rng, (16, 16), 6.0), (size, size))
    sigma = rng.uniform(0.6, 1.8) * max(st.s, 0.35)
    conc = [
        ndimage.gaussian_filter(np.clip(m, 0, 3.5) * uneven, sigma, truncate=2.5)
        for m in (st.haem, st.eosin, st.rbc)
    ]
    # Glass and air spaces are rarely pure white: slides and scanners tint them cream, pink or blue.
    background = np.abs(rng.normal(0, 0.035, 3)) + 0.015
    gains = np.stack([h_gain * h_vec, e_gain * e_vec, r_vec])  # (stain, channel)
    noise_sd = _F32(rng.uniform(1.5, 4.0))
    rgb = np.empty((size, size, 3), np.uint8)
    for ch in range(3):
        od = conc[0] * _F32(gains[0, ch]) + conc[1] * _F32(gains[1, ch]) + conc[2] * _F32(gains[2, ch])
        od += _F32(background[ch])
        channel = np.exp(-od) * _F32(255.0)
        channel += noise_sd * rng.standard_normal((size, size), dtype=_F32) + _F32(0.5)
        rgb[..., ch] = np.clip(channel, 0, 255)
    return rgb


# ---------------------------------------------------------------------------------------------------
# Chest CT volumes (MosMedData-like)
# ---------------------------------------------------------------------------------------------------

_HU_AIR = -1000.0
_HU_PAD = -1024.0  # outside the reconstruction circle, the value most scanners write there
_HU_FAT = -95.0
_HU_MUSCLE = 45.0


@dataclass(frozen=True)
class _Chest:
    """One patient's chest in millimetres: x to the patient's left, y anterior, z superior.

    x = y = 0 is the middle of the body; z = 0 is the top of the right hemidiaphragm and the lung
    apices reach z = ``height``. Pairs are (right, left).
    """

    bx: float  # body half-width
    by: float  # body half-depth
    fat: float  # subcutaneous fat thickness
    wall: float  # chest wall thickness (muscle and ribs)
    back: float  # extra posterior thickness: spine and paraspinal muscles
    cav_y: float  # centre of the thoracic cavity
    height: float
    lung_x: tuple[float, float]
    lung_y: float
    lung_ax: tuple[float, float]
    lung_ay: float
    lung_p: float  # superellipse exponent: > 2 gives the boxier outline of real lungs
    apex_from: float  # fraction of the height where the lungs start narrowing to the apex
    med_x: float
    med_y: float
    med_w_low: float  # mediastinal half-width at heart level and above the heart
    med_w_high: float
    heart: tuple[float, float, float, float, float, float, float]  # x, y, z, a, b, c, angle
    dome_top: tuple[float, float]
    dome_x: float
    dome_y: float
    dome_k: float  # curvature: dome surface z = top - k * r^2

    @property
    def cx(self) -> float:
        return self.bx - self.fat - self.wall

    @property
    def cy(self) -> float:
        return self.by - 0.7 * self.fat - self.wall - 0.5 * self.back

    @property
    def spine_y(self) -> float:
        """Centre of the vertebral bodies, which bulge into the back of the cavity."""
        return self.cav_y - self.cy + 8


def _sample_chest(rng: np.random.Generator) -> _Chest:
    bx = rng.uniform(140, 175)
    by = bx * rng.uniform(0.66, 0.78)
    fat = rng.uniform(5, 22)
    wall = rng.uniform(10, 16)
    back = rng.uniform(28, 40)
    cx = bx - fat - wall
    cy = by - 0.7 * fat - wall - 0.5 * back
    lung_x = cx * rng.uniform(0.47, 0.55)
    heart_angle = rng.uniform(-0.7, -0.3)  # long axis points anterior-left
    return _Chest(
        bx=bx, by=by, fat=fat, wall=wall, back=back, cav_y=0.5 * back - 0.15 * fat,
        height=rng.uniform(210, 280),
        lung_x=(lung_x * rng.uniform(0.97, 1.03), lung_x * rng.uniform(0.97, 1.03)),
        lung_y=-0.02 * cy,
        lung_ax=(lung_x * rng.uniform(0.86, 0.95), lung_x * rng.uniform(0.82, 0.92)),
        lung_ay=cy * rng.uniform(0.9, 0.98),
        lung_p=rng.uniform(2.3, 3.0),
        apex_from=rng.uniform(0.3, 0.45),
        med_x=rng.uniform(-4, 4),
        med_y=0.0,
        med_w_low=rng.uniform(24, 32),
        med_w_high=rng.uniform(17, 24),
        heart=(rng.uniform(12, 30), cy * rng.uniform(0.2, 0.35), rng.uniform(0.15, 0.22),
               rng.uniform(50, 62), rng.uniform(38, 46), rng.uniform(0.18, 0.23), heart_angle),
        dome_top=(0.0, -rng.uniform(8, 25)),
        dome_x=cx * rng.uniform(0.4, 0.5),
        dome_y=cy * rng.uniform(0.05, 0.25),
        dome_k=rng.uniform(0.004, 0.007),
    )


def _soft(signed_mm: np.ndarray, edge: float) -> np.ndarray:
    """0..1 occupancy from a signed distance (mm, positive inside): a partial-volume edge."""
    return np.clip(signed_mm * _F32(1.0 / edge) + _F32(0.5), 0, 1)


def _lungs(c: _Chest, x: np.ndarray, y: np.ndarray, z: np.ndarray, edge: float, edge_z: float
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Soft masks of the right and left lung, and each lung's normalised radius (0 centre, 1 pleura).

    Works on broadcastable grids (x: (n, 1, 1), y: (1, n, 1), z: (1, 1, s)) and on 1-D point arrays
    alike, so the vessel tree can ask whether a branch is still inside a lung. Powers are taken on
    the small axis-wise arrays only; near the outline rho**p - 1 is linearised, which is all a soft
    edge needs.
    """
    t = z / _F32(c.height)
    taper = np.where(t < c.apex_from, 1.0,
                     np.sqrt(np.clip(1 - ((t - c.apex_from) / (1.0 - c.apex_from)) ** 2, 0, 1))).astype(_F32)
    apex_cap = _soft((_F32(c.height) - z), edge_z)
    cav_q = (x / _F32(c.cx)) ** 2 + ((y - _F32(c.cav_y)) / _F32(c.cy)) ** 2
    inside_cavity = _soft((1 - cav_q) * _F32(0.5 * c.cy), edge)
    blend = np.clip((t - 0.45) / 0.25, 0, 1).astype(_F32)
    med_w = _F32(c.med_w_low) + _F32(c.med_w_high - c.med_w_low) * blend
    med_q = ((x - _F32(c.med_x)) / med_w) ** 2 + ((y - _F32(c.med_y)) / _F32(1.3 * c.cy)) ** 2
    outside_med = _soft((med_q - 1) * (0.5 * med_w), edge)
    hx, hy, hz, ha, hb, hc, hang = c.heart
    cos_h, sin_h = _F32(np.cos(hang)), _F32(np.sin(hang))
    hu_ = (x - _F32(hx)) * cos_h + (y - _F32(hy)) * sin_h
    hv_ = (y - _F32(hy)) * cos_h - (x - _F32(hx)) * sin_h
    heart_q = (hu_ / _F32(ha)) ** 2 + (hv_ / _F32(hb)) ** 2 + ((z - _F32(hz * c.height)) / _F32(hc * c.height)) ** 2
    # Pericardial fat keeps the lungs a few millimetres off the heart.
    outside_heart = _soft((heart_q - 1) * _F32(0.5 * hb) - 4, edge)
    shared = inside_cavity * outside_med * outside_heart * apex_cap
    masks, radii = [], []
    for side, sign in ((0, -1.0), (1, 1.0)):
        ax = _F32(c.lung_ax[side]) * taper + _F32(1e-3)
        ay = _F32(c.lung_ay) * (0.3 + 0.7 * taper)
        lx = _F32(sign * c.lung_x[side]) * (1 - 0.25 * (1 - taper))
        ly = _F32(c.lung_y) - _F32(0.3 * c.cy) * (1 - taper)
        q = (np.abs(x - lx) / ax) ** c.lung_p + (np.abs(y - ly) / ay) ** c.lung_p
        own = _soft((1 - q) * (np.minimum(ax, ay) / _F32(c.lung_p)), edge)
        r_dome2 = (x - _F32(sign * c.dome_x)) ** 2 + (y - _F32(c.dome_y)) ** 2
        above_dome = _soft(z - (_F32(c.dome_top[side]) - _F32(c.dome_k) * r_dome2), edge_z)
        masks.append(own * shared * above_dome)
        radii.append(np.maximum(q, cav_q))
    return masks, radii


def _vessel_points(c: _Chest, rng: np.random.Generator, step: float, edge: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Centre-line samples (m, 3) in mm and radii (m,) of a branching pulmonary vessel tree.

    Each lung gets a few trunks leaving the hilum; every branch forks in two with a narrower,
    shorter child, and a branch whose end leaves the lung stops forking, so vessels are thick and
    dense near the hilum and thin out towards the pleura, as on real CT.
    """
    pts, rads = [], []
    for side, sign in ((0, -1.0), (1, 1.0)):
        n = int(rng.integers(8, 13))
        p = np.column_stack([
            c.med_x + sign * (c.med_w_low + rng.uniform(0, 8, n)),
            c.med_y + rng.normal(0, 12, n),
            c.height * rng.normal(0.5, 0.06, n),
        ])
        d = np.column_stack([sign * rng.uniform(0.3, 1.0, n), rng.normal(0, 0.6, n), rng.normal(0, 0.9, n)])
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        r = rng.uniform(3.5, 5.5, n)
        length = rng.uniform(22, 38, n)
        for _ in range(int(rng.integers(7, 9))):
            if len(p) == 0:
                break
            k = np.maximum(np.ceil(length / step).astype(int), 1)
            seg = np.repeat(np.arange(len(p)), k)
            frac = (np.arange(seg.size) - np.repeat(np.cumsum(k) - k, k)) / np.repeat(k, k)
            pts.append(p[seg] + d[seg] * (length[seg] * frac)[:, None])
            rads.append(r[seg] * (1 - 0.15 * frac))
            end = p + d * length[:, None]
            masks, _ = _lungs(c, end[:, 0], end[:, 1], end[:, 2], edge, edge)
            alive = (masks[side] > 0.5) & (r > 0.6)
            p, d, r, length = end[alive], d[alive], r[alive], length[alive]
            # Two children per surviving branch, splayed about a random axis perpendicular to it.
            m = len(p)
            perp = np.cross(d, rng.standard_normal((m, 3)))
            perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-9
            ang = rng.uniform(0.3, 0.75, (m, 2))
            outward = np.array([sign, 0.0, 0.0])
            kids = [np.cos(ang[:, i, None]) * d + (1 - 2 * i) * np.sin(ang[:, i, None]) * perp + 0.15 * outward
                    for i in range(2)]
            d = np.concatenate(kids)
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            p = np.concatenate([p, p])
            r = np.concatenate([r, r]) * rng.uniform(0.68, 0.8, 2 * m)
            length = np.concatenate([length, length]) * rng.uniform(0.7, 0.9, 2 * m)
    if not pts:
        return np.zeros((0, 3)), np.zeros(0)
    return np.concatenate(pts), np.concatenate(rads)


def _vessel_opacity(points: np.ndarray, radii: np.ndarray, origin: np.ndarray, spacing: np.ndarray,
                    shape: tuple[int, int, int], step: float) -> np.ndarray:
    """0..1 occupancy of the tubes around the centre-line samples, with partial-volume edges.

    Each sample deposits a Gaussian whose weight grows like exp(r^2 / 2 sigma^2), so after one
    in-plane blur the iso-level 1 of the summed field lies at distance r from the centre line:
    tubes of any radius from a single filter pass. Samples are split linearly between the two
    nearest slices, which mimics partial volume in thick slices.
    """
    nx, ny, nz = shape
    sigma = max(0.7 * float(spacing[0]), 0.5)
    ijk = (points - origin) / spacing
    i = np.rint(ijk[:, 0]).astype(np.int64)
    j = np.rint(ijk[:, 1]).astype(np.int64)
    k0 = np.floor(ijk[:, 2]).astype(np.int64)
    fz = ijk[:, 2] - k0
    w = step * 2 * np.pi * sigma**2 * np.exp(np.minimum(radii, 6.0) ** 2 / (2 * sigma**2))
    w /= float(np.prod(spacing))
    acc = np.zeros(nx * ny * nz, dtype=np.float64)
    for k, wk in ((k0, 1 - fz), (k0 + 1, fz)):
        ok = (i >= 0) & (i < nx) & (j >= 0) & (j < ny) & (k >= 0) & (k < nz)
        acc += np.bincount(((i * ny + j) * nz + k)[ok], weights=(w * wk)[ok], minlength=acc.size)
    field = acc.reshape(shape).astype(_F32)
    field = ndimage.gaussian_filter(field, (sigma / spacing[0], sigma / spacing[1], 0), truncate=3.0)
    return np.clip((field - _F32(0.5)) * _F32(1 / 1.5), 0, 1)


def _paint(hu: np.ndarray, weight: np.ndarray, value: float, zmask: np.ndarray | None = None) -> None:
    """Blend ``value`` into ``hu`` in place with 0..1 ``weight``; ``zmask`` limits it to a slab of slices.

    Structures that exist only over part of the z range (great vessels, trachea) are painted on that
    contiguous slab alone, which saves most of the full-volume arithmetic.
    """
    if zmask is None:
        hu += weight * (_F32(value) - hu)
        return
    ks = np.flatnonzero(np.asarray(zmask).ravel())
    if ks.size == 0:
        return
    sl = slice(int(ks[0]), int(ks[-1]) + 1)
    sub = hu[:, :, sl]
    w = weight if weight.shape[2] == 1 else weight[:, :, sl]
    sub += w * (_F32(value) - sub)


def _chest_slice(c: _Chest, rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
                 spacing: tuple[float, float], edge: float) -> np.ndarray:
    """The parts of an axial slice that barely change along the thorax, as an (n, n, 1) HU array.

    Table, skin and fat, chest-wall muscle, mediastinal fat filling the cavity, spine, oesophagus.
    """
    n = x.shape[0]
    hu = np.full((n, n, 1), _HU_AIR, _F32)
    # Curved scanner table under the patient: a foam core between two thin carbon shells.
    top = _F32(-c.by * 0.93 - rng.uniform(3, 12)) + _F32(0.0012) * x * x
    width = _soft(_F32(0.75 * c.bx * 1.2) - np.abs(x), edge)
    core = _soft(np.minimum(top - y, y - (top - 14)), edge) * width
    _paint(hu, core, -880.0)
    for shell in (top, top - 14):
        _paint(hu, _soft(1.2 - np.abs(y - shell), edge) * width, 150.0)
    # Body outline, flatter at the back where the patient lies on the table.
    half_depth = np.where(y < 0, _F32(0.93 * c.by), _F32(c.by))
    q = (np.abs(x) / _F32(c.bx)) ** 2.3 + (np.abs(y) / half_depth) ** 2.3
    texture = _smooth_field(rng, (n, n), 12 / spacing[0])[:, :, None]
    _paint(hu, _soft((1 - q) * _F32(0.45 * c.by), edge), _HU_FAT)
    hu += _soft((1 - q) * _F32(0.45 * c.by), edge) * texture * _F32(8)
    ix, iy = c.bx - c.fat, np.where(y < 0, 0.93 * c.by - 0.5 * c.fat, c.by - c.fat)
    q = (np.abs(x) / _F32(ix)) ** 2.3 + (np.abs(y) / iy.astype(_F32)) ** 2.3
    muscle = _soft((1 - q) * _F32(0.45 * (c.by - c.fat)), edge)
    _paint(hu, muscle, _HU_MUSCLE)
    # The cavity starts out as mediastinal fat; lungs, heart and vessels are painted over it.
    q = (x / _F32(c.cx)) ** 2 + ((y - _F32(c.cav_y)) / _F32(c.cy)) ** 2
    _paint(hu, _soft((1 - q) * _F32(0.5 * c.cy), edge), _HU_FAT + 10)
    hu += _soft((1 - q) * _F32(0.5 * c.cy), edge) * texture * _F32(10)
    # Vertebra: cortical shell around cancellous bone, canal with cord, arch and spinous process.
    vy = c.spine_y
    vr = rng.uniform(15, 19)
    d = np.sqrt(x * x + (y - _F32(vy)) ** 2)
    _paint(hu, _soft(vr - d, edge), 650.0)
    _paint(hu, _soft(vr - 2.0 - d, edge), rng.uniform(180, 280))
    cy_canal = vy - vr - 9
    d = np.sqrt(x * x + (y - _F32(cy_canal)) ** 2)
    arch = _soft(np.minimum(d - 8.0, 14.0 - d), edge) * (y < _F32(cy_canal + 4))
    spinous = _soft(3.5 - np.abs(x), edge) * _soft(np.minimum(_F32(cy_canal - 8) - y, y - _F32(cy_canal - 36)), edge)
    # Transverse processes angle backwards from the arch.
    transverse = (_soft(4.5 - np.abs(y - _F32(cy_canal + 2) + 0.35 * np.abs(x)), edge)
                  * _soft(np.minimum(np.abs(x) - 10, 30 - np.abs(x)), edge))
    # Keep the posterior elements under the skin however thin the patient's back is.
    _paint(hu, np.maximum(np.maximum(arch, spinous), transverse) * muscle, 520.0)
    _paint(hu, _soft(8.0 - d, edge), 35.0)
    # Oesophagus in front of the spine, sometimes holding a little air.
    d = np.sqrt((x + 4) ** 2 + (y - _F32(vy + vr + 9)) ** 2)
    _paint(hu, _soft(7.5 - d, edge), _HU_MUSCLE - 5)
    if rng.random() < 0.4:
        _paint(hu, _soft(2.5 - d, edge), _HU_AIR)
    return hu


def _paint_bones(hu: np.ndarray, c: _Chest, rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
                 z: np.ndarray, edge: float, edge_z: float) -> None:
    """Ribs, costal cartilage, sternum, scapulae and intervertebral discs, in place.

    A rib descends from the spine towards the front, so in one axial slice it shows as a short arc
    of the chest wall; all ribs at once follow from one periodic function of z + slope * angle.
    The computation is done only on the ring of pixels where ribs can be.
    """
    n, _, s = hu.shape
    t = z[0, 0] / _F32(c.height)
    phi = np.arctan2(y - _F32(c.cav_y), x)[:, :, 0]
    from_back = np.abs(np.mod(phi + np.pi / 2 + np.pi, 2 * np.pi) - np.pi)  # 0 at the spine, pi in front
    rho = np.sqrt((x / _F32(c.cx)) ** 2 + ((y - _F32(c.cav_y)) / _F32(c.cy)) ** 2)[:, :, 0]
    local_r = c.cx * c.cy / np.sqrt((c.cy * np.cos(phi)) ** 2 + (c.cx * np.sin(phi)) ** 2)
    out = (rho - 1) * local_r  # mm outside the cavity outline
    thick = rng.uniform(8, 11)
    band = _soft(np.minimum(out - 1.0, 1.0 + thick - out), edge) * (from_back > 0.3) * (from_back < np.pi - 0.22)
    ring = np.flatnonzero(band.ravel() > 0)
    core = np.clip(1 - np.abs(out - 1 - thick / 2) / (thick / 2), 0, 1)
    rib_hu = np.where(from_back > np.pi - 0.75, 110.0, 700.0 - 420.0 * core).astype(_F32)
    slope, pitch = rng.uniform(28, 36), rng.uniform(24, 30)
    height, phase = rng.uniform(8, 10), rng.uniform(0, pitch)
    u = np.mod(z[0, 0][None, :] + _F32(slope) * from_back.ravel()[ring, None].astype(_F32) - _F32(phase), _F32(pitch))
    occ = _soft(np.minimum(u, height - u), edge_z) * band.ravel()[ring, None] * ((t > -0.35) & (t < 1.08))[None, :]
    flat = hu.reshape(n * n, s)
    sub = flat[ring]
    sub += occ * (rib_hu.ravel()[ring, None] - sub)
    flat[ring] = sub
    # Sternum in front, over the middle of the chest.
    d = ((x / _F32(14)) ** 2 + ((y - _F32(c.cav_y + c.cy + 7)) / _F32(6)) ** 2)
    _paint(hu, _soft((1 - d) * 4, edge), 380.0, (t > 0.25) & (t < 0.85))
    # Scapulae: thin curved plates behind the upper ribs, away from the midline.
    plate = (_soft(np.minimum(out - thick - 5, thick + 10 - out), edge) * (from_back > 0.45) * (from_back < 1.2))
    _paint(hu, plate[:, :, None], 480.0, t > 0.55)
    # Intervertebral discs interrupt the vertebral bodies every few centimetres.
    vpitch, vphase = rng.uniform(24, 28), rng.uniform(0, 28)
    disc = _soft(3.0 - np.abs(np.mod(z[0, 0] - vphase, vpitch) - 3.0), edge_z)
    body = _soft(rng.uniform(15, 18) - np.sqrt(x * x + (y - _F32(c.spine_y)) ** 2), edge)
    _paint(hu, body * disc[None, None, :], 85.0, disc > 0)


def _ground_glass(rng: np.random.Generator, parenchyma: np.ndarray, masks: Sequence[np.ndarray],
                  radii: Sequence[np.ndarray], shape: tuple[int, int, int], spacing: tuple[float, float, float],
                  y: np.ndarray, c: _Chest) -> np.ndarray:
    """Parenchyma with viral-pneumonia ground-glass opacities added.

    Patches are a smooth random field thresholded per lung, tilted towards the pleura and the
    dependent lung, at the quantile that makes them cover a chosen 25-50% of the lung volume (MosMedData's
    CT-23 folder holds grades CT-2 and CT-3: 25-75% involvement);
    most cases are bilateral. Some cases also get denser consolidation in the patch centres.
    """
    sx, sy, sz = spacing
    corr = rng.uniform(25, 45)
    field = _smooth_field(rng, shape, (corr / sx, corr / sy, max(corr / sz, 1.5)))
    dependent = np.clip((_F32(c.lung_y) - y) / _F32(c.cy), -1, 1) * _F32(rng.uniform(0.2, 0.6))
    total = rng.uniform(0.25, 0.50)
    share = rng.uniform(0.35, 0.65) if rng.random() < 0.85 else rng.choice([0.1, 0.9])
    consolidation = rng.random() < 0.35
    ggo_hu = np.clip(_F32(rng.uniform(-640, -480)) + _smooth_field(rng, shape, (8 / sx, 8 / sy, max(8 / sz, 1.0)))
                     * _F32(90), -720, -280)
    opacity = np.zeros(shape, _F32)
    core = np.zeros(shape, _F32)
    for side, frac in ((0, 2 * total * share), (1, 2 * total * (1 - share))):
        inside = masks[side] > 0.5
        if not inside.any():
            continue
        score = field + _F32(1.3) * np.clip((radii[side] - 0.3) / 0.7, 0, 1) + dependent
        values = score[inside][::5]
        thr = np.quantile(values, 1 - min(max(frac, 0.02), 0.9))
        side_w = masks[side] > 0
        opacity = np.where(side_w, _soft(score - _F32(thr), 0.5), opacity)
        if consolidation:
            thr_core = np.quantile(values, 1 - 0.12 * min(max(frac, 0.02), 0.9))
            core = np.where(side_w, _soft(score - _F32(thr_core), 0.3), core)
    out = parenchyma + opacity * (ggo_hu - parenchyma)
    if consolidation:
        out += core * (_F32(rng.uniform(-120, 10)) - out)
    return out


def _noise_std_after_blur(sigma: tuple[float, float]) -> float:
    """Standard deviation of unit white noise after ``gaussian_filter`` with this in-plane sigma."""
    impulse = np.zeros((31, 31))
    impulse[15, 15] = 1.0
    return float(np.sqrt((ndimage.gaussian_filter(impulse, sigma, truncate=3.0) ** 2).sum()))


def _thorax_hu(c: _Chest, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray,
               origin: np.ndarray, spacing: tuple[float, float, float], *, ground_glass: bool
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Noise-free HU of patient ``c`` on the voxel grid ``x`` (n,1,1), ``y`` (1,n,1), ``z`` (1,1,s).

    Returns the (n, n, s) HU array and the soft (right, left) lung masks. ``origin`` is the
    patient position of voxel (0, 0, 0) in mm. With ``ground_glass`` the lungs get viral-pneumonia
    opacities. Shared by ``ct_volume`` (a slab) and ``ct_slice`` (one slice at a chosen level).
    """
    sx, sy, sz = spacing
    shape = (x.shape[0], y.shape[1], z.shape[2])
    t = z / _F32(c.height)
    edge, edge_z = 0.6 * sx, 0.5 * sz

    blood = rng.uniform(30, 55) if rng.random() < 0.7 else rng.uniform(120, 220)  # plain or contrast
    hu2d = _chest_slice(c, rng, x, y, (sx, sy), edge)
    hu = np.repeat(hu2d, shape[2], axis=2)

    # Heart on the diaphragm, with pericardial fat; great vessels above it.
    hx, hy, hz, ha, hb, hc, hang = c.heart
    cos_h, sin_h = _F32(np.cos(hang)), _F32(np.sin(hang))
    hu_ = (x - _F32(hx)) * cos_h + (y - _F32(hy)) * sin_h
    hv_ = (y - _F32(hy)) * cos_h - (x - _F32(hx)) * sin_h
    heart_q = (hu_ / _F32(ha)) ** 2 + (hv_ / _F32(hb)) ** 2 + ((z - _F32(hz * c.height)) / _F32(hc * c.height)) ** 2
    _paint(hu, _soft((1 - heart_q) * _F32(0.5 * hb) + 4, edge), _HU_FAT)
    _paint(hu, _soft((1 - heart_q) * _F32(0.5 * hb), edge), blood)
    # Ascending aorta, pulmonary trunk, superior vena cava, descending aorta: (x, y, radius, t range).
    for (vx, vy, vr, t0, t1) in ((10.0, c.cav_y + 0.2 * c.cy, rng.uniform(13, 17), 0.38, 0.78),
                                 (22.0, c.cav_y + 0.4 * c.cy, rng.uniform(12, 15), 0.42, 0.6),
                                 (-22.0, c.cav_y + 0.15 * c.cy, rng.uniform(8, 11), 0.45, 0.95),
                                 (c.med_x + 22.0, c.spine_y + 10, rng.uniform(10, 14), -0.5, 0.78)):
        dist = np.sqrt((x - _F32(vx)) ** 2 + (y - _F32(vy)) ** 2)
        _paint(hu, _soft(vr + 3 - dist, edge), _HU_FAT, (t > t0) & (t < t1))
        _paint(hu, _soft(vr - dist, edge), blood, (t > t0) & (t < t1))
    # Trachea above the carina, then the two main bronchi heading for the hila.
    ty = c.spine_y + 40
    carina = rng.uniform(0.6, 0.68)
    for bxo, t0, t1 in ((0.0, carina, 1.2), (-1.0, carina - 0.12, carina), (1.0, carina - 0.12, carina)):
        k = (t > t0) & (t < t1)
        if not k.any():
            continue
        # Each main bronchus runs down and out from the carina.
        along = np.clip((carina - t) / 0.12, 0, 1) * _F32(bxo * 35)
        rad = 9.0 if bxo == 0 else 6.5
        dist = np.sqrt((x - along) ** 2 + (y - _F32(ty)) ** 2)
        _paint(hu, _soft(rad + 2 - dist, edge), _HU_MUSCLE - 5, k)
        _paint(hu, _soft(rad - dist, edge), _HU_AIR, k)

    # Abdomen under the diaphragm: liver on the right, spleen and stomach on the left.
    for side, sign, organ in ((0, -1.0, 58.0), (1, 1.0, 45.0)):
        r2 = (x - _F32(sign * c.dome_x)) ** 2 + (y - _F32(c.dome_y)) ** 2
        below = _soft(_F32(c.dome_top[side]) - _F32(c.dome_k) * r2 - z, edge_z)
        cavity = _soft((1 - (x / _F32(c.cx)) ** 2 - ((y - _F32(c.cav_y)) / _F32(c.cy)) ** 2) * _F32(0.5 * c.cy), edge)
        _paint(hu, below * cavity * (x * _F32(sign) > -10), organ, (z < _F32(c.dome_top[side] + edge_z)))

    # Lungs: parenchyma denser in the dependent (posterior) part, with fine texture.
    (w_r, w_l), (q_r, q_l) = _lungs(c, x, y, z, edge, edge_z)
    lung_w = np.minimum(w_r + w_l, 1)
    base = rng.uniform(-880, -835)
    dependent = np.clip((_F32(c.lung_y + 0.2 * c.cy) - y) / _F32(1.4 * c.cy), 0, 1) * _F32(rng.uniform(25, 70))
    texture = _smooth_field(rng, shape, (6 / sx, 6 / sy, max(6 / sz, 1.0))) * _F32(rng.uniform(8, 18))
    parenchyma = _F32(base) + dependent + texture
    if ground_glass:
        parenchyma = _ground_glass(rng, parenchyma, (w_r, w_l), (q_r, q_l), shape, (sx, sy, sz), y, c)
    hu += lung_w * (parenchyma - hu)

    # Pulmonary vessels inside the lungs (and their roots in the hila).
    step = 0.6 * min(sx, sz)
    pts, rad = _vessel_points(c, rng, step, edge)
    vessels = _vessel_opacity(pts, rad, origin, np.array([sx, sy, sz]), shape, step)
    # Near the hila the tree's roots cross the mediastinal border; paint them there too.
    hila = _soft(12 - np.abs(np.abs(x - _F32(c.med_x)) - _F32(c.med_w_low)), 4 * edge) * (np.abs(y) < 0.5 * c.cy)
    _paint(hu, vessels * np.maximum(lung_w, hila * (t > 0.3) * (t < 0.75)), blood + rng.uniform(-5, 15))

    _paint_bones(hu, c, rng, x, y, z, edge, edge_z)
    return hu, [w_r, w_l]


def _scanner_noise(hu: np.ndarray, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, off: np.ndarray,
                   r_fov: float) -> np.ndarray:
    """``hu`` with CT noise added and the pad value outside the reconstruction circle of radius ``r_fov`` mm.

    ``off`` is the patient's offset from the centre of the field of view.
    """
    shape = hu.shape
    # CT noise: slightly correlated in-plane, like filtered back-projection, and none outside the
    # reconstruction circle where scanners write a constant.
    noise_sd = rng.uniform(10, 20)
    sig = (0.6, 0.6)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=_F32), (*sig, 0), truncate=3.0)
    hu += noise * _F32(noise_sd / _noise_std_after_blur(sig))
    outside = ((x + _F32(off[0])) ** 2 + (y + _F32(off[1])) ** 2) > _F32(r_fov**2)
    hu = np.where(outside, _F32(_HU_PAD), hu)
    return hu


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
    c = _sample_chest(rng)
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
    x = (origin[0] + np.arange(in_plane) * sx).astype(_F32)[:, None, None]
    y = (origin[1] + np.arange(in_plane) * sy).astype(_F32)[None, :, None]
    z = (origin[2] + np.arange(slices) * sz).astype(_F32)[None, None, :]
    hu, _ = _thorax_hu(c, rng, x, y, z, origin, (sx, sy, sz), ground_glass=cls == "abnormal")
    hu = _scanner_noise(hu, rng, x, y, off, (in_plane / 2) * sx)
    vol = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = origin + np.array([off[0], off[1], rng.uniform(-350, -150) - z_mid])
    return vol, affine


# ---------------------------------------------------------------------------------------------------
# Axial chest CT slices with lung cancer (Kaggle chest-ctscan-images-like)
# ---------------------------------------------------------------------------------------------------

_TUMOUR_KINDS = tuple(c for c in CHEST_CLASSES if c != "normal")


CT_WINDOWS = ("mixed", "wide")


def _check_window(window: str) -> None:
    if window not in CT_WINDOWS:
        raise ValueError(f"unknown display window {window!r} for chest CT phantoms (profile key generated_window); "
                         f"expected one of {CT_WINDOWS}")


def _display_window(rng: np.random.Generator, window: str = "mixed") -> tuple[float, float]:
    """(level, width) in HU of the window a slice was exported with.

    The Kaggle PNGs are screenshots from several viewers (``window="mixed"``). Most show air
    black, lungs near black and soft tissue mid-grey with bone short of white: a window from about
    -1000 HU that is 1900-2600 HU wide (a few are wider still). The rest use a lung window, where
    air is dark grey and soft tissue near white, or a mediastinal window. ``window="wide"`` keeps
    only the common 1900-2600 HU preset, as one viewer exporting every slice would. Both draw the
    same random numbers, so the same generator state gives the same patient with either.
    """
    u = rng.random()
    if window == "wide" or u < 0.55:
        width = rng.uniform(1900, 2600)
        return rng.uniform(-1040, -980) + width / 2, width
    if u < 0.65:
        width = rng.uniform(3000, 4200)
        return rng.uniform(-1040, -980) + width / 2, width
    if u < 0.9:
        return rng.uniform(-650, -500), rng.uniform(1200, 1600)
    return rng.uniform(30, 60), rng.uniform(350, 450)


def _outline(rng: np.random.Generator, theta: np.ndarray, amp: float, orders: Sequence[int]) -> np.ndarray:
    """Relative radius 1 + sum of random angular harmonics: a lobulated outline."""
    r = np.ones_like(theta)
    for k in orders:
        r += _F32(rng.normal(0, amp / np.sqrt(k))) * np.cos(_F32(k) * theta + _F32(rng.uniform(0, 2 * np.pi)))
    return np.maximum(r, _F32(0.45))


def _spicules(rng: np.random.Generator, theta: np.ndarray, radius: float, n: int, length: float) -> np.ndarray:
    """Extra radius in mm along ``n`` thin spikes, tapering outwards: a spiculated (corona radiata) margin."""
    extra = np.zeros_like(theta)
    for ang, reach, width in zip(rng.uniform(0, 2 * np.pi, n), rng.uniform(0.3, 1.0, n) * length,
                                 rng.uniform(0.35, 0.8, n)):
        gap = np.abs(np.mod(theta - _F32(ang) + _F32(np.pi), _F32(2 * np.pi)) - _F32(np.pi))
        extra = np.maximum(extra, _F32(reach) * np.exp(-((gap * _F32(radius / width)) ** 2)))
    return extra


def _peripheral_site(rng: np.random.Generator, lung: np.ndarray, xs: np.ndarray, ys: np.ndarray, sign: float,
                     angles: tuple[float, float], radius: float, depth: tuple[float, float]
                     ) -> tuple[float, float, float]:
    """Centre (x, y) and radius (mm) of a mass near the pleura of one lung.

    From the lung's centroid a ray goes out at an angle drawn from ``angles`` (0 lateral, negative
    posterior, positive anterior); the mass sits ``depth`` radii inside the point where the ray
    leaves the lung, shrunk if the lung is too small at this level to hold it.
    """
    ii, jj = np.nonzero(lung)
    mx, my = float(xs[ii].mean()), float(ys[jj].mean())
    phi = rng.uniform(*angles)
    dx, dy = sign * np.cos(phi), np.sin(phi)
    step = float(xs[1] - xs[0])
    steps = np.arange(0, 4 * len(xs)) * step * 0.5
    pi = np.rint((mx + dx * steps - xs[0]) / step).astype(int)
    pj = np.rint((my + dy * steps - ys[0]) / step).astype(int)
    ok = (pi >= 0) & (pi < lung.shape[0]) & (pj >= 0) & (pj < lung.shape[1])
    inside = np.zeros(steps.size, bool)
    inside[ok] = lung[pi[ok], pj[ok]]
    if not inside.any():  # the ray missed a crescent-shaped lung: aim at one of its pixels instead
        k = int(rng.integers(ii.size))
        return float(xs[ii[k]]), float(ys[jj[k]]), min(radius, 4 * step)
    # The farthest lung pixel on the ray is on the pleura even where the ray crosses a fissure or notch.
    reach = float(steps[np.flatnonzero(inside)[-1]])
    radius = min(radius, 0.55 * max(reach, 4 * step))
    back = min(rng.uniform(*depth) * radius, 0.9 * reach)
    return mx + dx * (reach - back), my + dy * (reach - back), radius


def _hilar_site(rng: np.random.Generator, lung: np.ndarray, xs: np.ndarray, ys: np.ndarray, sign: float,
                c: _Chest, radius: float) -> tuple[float, float]:
    """Centre (x, y) in mm of a mass at the hilum: the lung pixel nearest the root of the lung.

    At the lowest levels ``ct_slice`` cuts, where the top of the heart can still show, that is the
    medial lung next to the lower-lobe bronchi, behind the heart.
    """
    ii, jj = np.nonzero(lung)
    hx = c.med_x + sign * (c.med_w_low + rng.uniform(0, 10))
    hy = c.med_y + rng.normal(0.0, 0.12) * c.cy
    k = int(np.argmin((xs[ii] - hx) ** 2 + (ys[jj] - hy) ** 2))
    return float(xs[ii[k]]) + sign * rng.uniform(0.1, 0.6) * radius, float(ys[jj[k]])


def _paint_tumour(hu: np.ndarray, kind: str, rng: np.random.Generator, c: _Chest, xs: np.ndarray, ys: np.ndarray,
                  lungs: Sequence[np.ndarray], edge: float) -> None:
    """Paint one lung cancer of ``kind`` into the 2-D HU slice ``hu`` (x, y), in place.

    ``xs``/``ys`` are the patient coordinates (mm) of the rows and columns and ``lungs`` the soft
    right and left lung masks. Adenocarcinoma: a peripheral, mostly posterior nodule with a
    ground-glass rim, spicules and sometimes a pleural tag or bubbly lucencies. Large cell
    carcinoma: a large, solid, lobulated, well-defined mass against the pleura. Squamous cell
    carcinoma: a hilar mass on the main bronchi, often cavitated with a thick irregular wall and
    sometimes an air-fluid level or collapse beyond it.
    """
    side = int(rng.integers(2))
    if (lungs[side] > 0.5).sum() < 50:
        side = 1 - side
    lung = lungs[side] > 0.5
    if lung.sum() < 50:
        return  # no lung in this slice worth the name
    sign = -1.0 if side == 0 else 1.0
    grow = 0.0  # how far (mm) spicules, halo and tags may reach beyond the outline
    if kind == "adenocarcinoma":
        radius = rng.uniform(6, 16)
        # Always a ground-glass rim: a bare solid nodule is a small large-cell mass in these
        # phantoms. When a quarter had none, they made 15 of a chest-cnn run's 19 adenocarcinoma
        # errors (train and test; 15% of them misread against 1.3% of those with a rim).
        halo = rng.uniform(1.3, 2.0)
        grow = radius * (halo - 1) + 0.8 * radius + 12  # halo and spicules
        cx, cy, radius = _peripheral_site(rng, lung, xs, ys, sign, (-1.6, 0.6), radius * halo, (0.8, 1.4))
        radius /= halo
    elif kind == "large.cell.carcinoma":
        cx, cy, radius = _peripheral_site(rng, lung, xs, ys, sign, (-1.3, 1.4), rng.uniform(15, 30), (0.6, 1.0))
    else:
        radius = rng.uniform(12, 24)
        cx, cy = _hilar_site(rng, lung, xs, ys, sign, c, radius)
        grow = 60.0  # room for post-obstructive collapse
    step = float(xs[1] - xs[0])
    reach = 2.0 * radius + grow + 3 * edge
    i0, i1 = (int(np.clip((v - xs[0]) / step, 0, len(xs))) for v in (cx - reach, cx + reach + step))
    j0, j1 = (int(np.clip((v - ys[0]) / step, 0, len(ys))) for v in (cy - reach, cy + reach + step))
    if i1 <= i0 or j1 <= j0:
        return
    win = hu[i0:i1, j0:j1]
    lung_w = (lungs[0] + lungs[1])[i0:i1, j0:j1].clip(0, 1)
    dx = (xs[i0:i1] - _F32(cx))[:, None]
    dy = (ys[j0:j1] - _F32(cy))[None, :]
    dist = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    shape = win.shape
    tex = _smooth_field(rng, shape, 4.0 / step)
    solid_hu = _F32(rng.uniform(20, 45)) + tex * _F32(rng.uniform(6, 14))

    if kind == "adenocarcinoma":
        outline = radius * _outline(rng, theta, rng.uniform(0.08, 0.18), (2, 3, 4, 5))
        if rng.random() < 0.7:
            n_spikes, spike_len = int(rng.integers(6, 16)), rng.uniform(4, 0.8 * radius + 8)
            outline = outline + _spicules(rng, theta, radius, n_spikes, spike_len)
        ggo = _soft(outline * _F32(halo) + _smooth_field(rng, shape, 5.0 / step) * _F32(0.15 * radius) - dist, 2.5)
        ggo_hu = _F32(rng.uniform(-650, -450)) + tex * _F32(50)
        # Ground glass raises the parenchyma but leaves vessels running through it visible.
        win += ggo * lung_w * (np.maximum(win, ggo_hu) - win)
        solid = _soft(outline - dist, 1.2 * edge) * lung_w
        if rng.random() < 0.4:  # pleural tag: a thin band pulled from the nodule out to the pleura
            li, lj = np.nonzero(lung)
            ox, oy = cx - float(xs[li].mean()), cy - float(ys[lj].mean())
            norm = np.hypot(ox, oy) + 1e-6
            along = dx * _F32(ox / norm) + dy * _F32(oy / norm)
            across = np.abs(dy * _F32(ox / norm) - dx * _F32(oy / norm))
            tag = _soft(_F32(rng.uniform(0.8, 1.5)) - across, edge) * (along > 0) * lung_w
            win += tag * (_F32(rng.uniform(-300, -100)) - win)
        win += solid * (solid_hu - win)
        if rng.random() < 0.3:  # bubble-like lucencies, typical of lepidic adenocarcinoma
            n = int(rng.integers(2, 6))
            for bx, by, br in zip(rng.normal(0, 0.35 * radius, n), rng.normal(0, 0.35 * radius, n),
                                  rng.uniform(0.8, 2.0, n)):
                bubble = _soft(_F32(br) - np.sqrt((dx - _F32(bx)) ** 2 + (dy - _F32(by)) ** 2), edge) * solid
                win += bubble * (_F32(-900) - win)
        return

    if kind == "large.cell.carcinoma":
        outline = radius * _outline(rng, theta, rng.uniform(0.07, 0.16), (2, 3, 4))
        solid = _soft(outline - dist, edge) * lung_w
        win += solid * (solid_hu - win)
        if rng.random() < 0.35:  # central necrosis: lower density, shows only in narrow windows
            necrosis = _soft(outline * _F32(rng.uniform(0.3, 0.55)) - dist, 3.0)
            win += necrosis * solid * (_F32(rng.uniform(5, 18)) - win)
        return

    # Squamous: the mass spills from the lung into the hilar fat (nodes), sparing vessels and airways.
    outline = radius * _outline(rng, theta, rng.uniform(0.08, 0.18), (2, 3, 4))
    if rng.random() < 0.3:
        outline = outline + _spicules(rng, theta, radius, int(rng.integers(3, 8)), rng.uniform(3, 8))
    mass = _soft(outline - dist, 1.5 * edge)
    xw, yw = xs[i0:i1][:, None], ys[j0:j1][None, :]
    cavity_q = (xw / _F32(c.cx)) ** 2 + ((yw - _F32(c.cav_y)) / _F32(c.cy)) ** 2
    mediastinum = _soft((1 - cavity_q) * _F32(0.5 * c.cy), edge) * (1 - lung_w) * (win > -500)
    if rng.random() < 0.2:  # pneumonitis beyond the blocked bronchus: patchy opacity fanning out laterally
        out_ang = np.arctan2(0.0, sign) + rng.normal(0, 0.4)
        gap = np.abs(np.mod(theta - _F32(out_ang) + _F32(np.pi), _F32(2 * np.pi)) - _F32(np.pi))
        patches = _smooth_field(rng, shape, 12.0 / step)
        fan = _soft(_F32(rng.uniform(0.3, 0.5)) + patches * _F32(0.25) - gap, 0.25)
        fade = np.clip(_F32(1.3) - dist / _F32(radius + rng.uniform(25, 45)), 0, 1)
        opacity = fan * fade * np.clip(_F32(0.6) + _F32(0.5) * patches, 0, 1) * lung_w
        win += opacity * (np.maximum(win, _F32(rng.uniform(-450, -150)) + tex * _F32(40)) - win)
    win += mass * lung_w * (solid_hu - win)
    win += mass * mediastinum * (np.maximum(win, solid_hu) - win)
    if rng.random() < 0.5:  # cavitation: necrotic centre drained through the bronchus
        inner = outline * _F32(rng.uniform(0.45, 0.7)) * _outline(rng, theta, 0.12, (2, 3, 5))
        cavity = _soft(inner - dist, edge) * mass
        win += cavity * (_F32(_HU_AIR) - win)
        if rng.random() < 0.5:  # air-fluid level: fluid settles posteriorly in a supine patient
            level = _F32(rng.uniform(-0.5, 0.1) * radius)
            win += cavity * _soft(level - dy, edge) * (_F32(rng.uniform(5, 25)) - win)


def ct_slice(cls: str, rng: np.random.Generator, size: int = 512, window: str = "mixed") -> np.ndarray:
    """An axial chest CT slice as 8-bit grey levels (size, size), windowed like the Kaggle PNGs.

    Displayed the radiological way: anterior at the top, the patient's right on the image's left.
    The anatomy is ``ct_volume``'s, cut at a random level between the aortic arch and the lower
    hila (so a hilar squamous cell carcinoma always has a hilum to grow from),
    with a random slice thickness, display window (lung, wide or mediastinal; only wide with
    ``window="wide"``, see ``_display_window``) and noise. ``cls`` is one of ``CHEST_CLASSES``
    (see ``_paint_tumour`` for what each cancer looks like) or one of ``CANCER_CLASSES``, where
    ``Cancerous`` draws one of the three cancers.

    Tumours are drawn from their own generator, seeded from ``rng`` at the same point for every
    class, so the same ``rng`` seed gives the same patient, level, noise and window in every class,
    and a ``Cancerous`` slice equals the slice of the cancer it drew.
    """
    if cls not in CHEST_CLASSES and cls not in CANCER_CLASSES:
        raise ValueError(f"unknown chest CT class {cls!r}; expected one of {CHEST_CLASSES + CANCER_CLASSES}")
    if size < 32:
        raise ValueError(f"slice size {size} too small; use at least 32 pixels")
    _check_window(window)
    c = _sample_chest(rng)
    sxy = 2 * c.bx * rng.uniform(1.05, 1.25) / size
    sz = rng.uniform(1.5, 7.0)
    off = np.array([rng.normal(0, 6), rng.normal(4, 6)])
    # Not lower: below the hila a "hilar" mass merges with the heart. When slices went down to
    # 0.25, all eight squamous errors of a chest-cnn run (train and test) were cut at 0.26-0.36.
    level = rng.uniform(0.4, 0.75) * c.height
    tumour_seed = int(rng.integers(2**63))
    shown = _display_window(rng, window)
    origin = np.array([-(size - 1) / 2 * sxy - off[0], -(size - 1) / 2 * sxy - off[1], level])
    x = (origin[0] + np.arange(size) * sxy).astype(_F32)[:, None, None]
    y = (origin[1] + np.arange(size) * sxy).astype(_F32)[None, :, None]
    z = np.full((1, 1, 1), level, _F32)
    hu, lungs = _thorax_hu(c, rng, x, y, z, origin, (sxy, sxy, sz), ground_glass=False)
    kind = cls
    if cls == "Cancerous":  # picked on the side, so a Cancerous slice is exactly that kind's slice
        kind = _TUMOUR_KINDS[int(np.random.default_rng([tumour_seed, 1]).integers(len(_TUMOUR_KINDS)))]
    if kind in _TUMOUR_KINDS:
        _paint_tumour(hu[:, :, 0], kind, np.random.default_rng(tumour_seed), c, x[:, 0, 0], y[0, :, 0],
                      [m[:, :, 0] for m in lungs], 0.6 * sxy)
    hu = _scanner_noise(hu, rng, x, y, off, (size / 2) * sxy)
    centre, width = shown
    grey = (hu[:, ::-1, 0].T - _F32(centre - width / 2)) * _F32(255.0 / width)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Writing data sets and incoming folders
# ---------------------------------------------------------------------------------------------------


def _jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _nifti_gz_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """A .nii.gz file's bytes: header zooms and qform/sform from the affine, units mm.

    Compressed with mtime 0 so the same volume always gives the same bytes (stable checksums), at
    level 1 because noisy CT barely compresses better at higher levels but takes three times longer.
    """
    import nibabel as nib  # only the CT writers need it

    img = nib.Nifti1Image(volume, affine)
    img.header.set_data_dtype(volume.dtype)
    img.header.set_zooms(tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    img.header.set_xyzt_units(xyz="mm", t="sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _item_rng(seed: int, class_index: int, index: int) -> np.random.Generator:
    """One generator per item, so any item can be regenerated alone and write order does not matter."""
    return np.random.default_rng([int(seed), int(class_index), int(index)])


def _slice_count(slices: int | Sequence[int], rng: np.random.Generator) -> int:
    if isinstance(slices, (int, np.integer)):
        return int(slices)
    lo, hi = (int(v) for v in slices)
    return int(rng.integers(lo, hi + 1))


def _write_lc25000(root: Path, n_per_class: int, seed: int, *,
                   classes: Sequence[str] = LC25000_CLASSES, size: int = 768) -> None:
    """``root/lung_image_sets/<class>/<name><i>.jpeg`` with i from 1, as LC25000 ships.

    LC25000 names its files after the class without the underscore (``lung_aca/lungaca1.jpeg``),
    and so do we, so that anything matching on real file names works on phantoms too.
    """
    for cls in classes:
        if cls not in LC25000_CLASSES:
            raise ValueError(f"unknown LC25000 class {cls!r}; expected some of {LC25000_CLASSES}")
        class_index = LC25000_CLASSES.index(cls)
        folder = root / catalog.LC25000_PARENT / cls
        for i in range(1, n_per_class + 1):
            tile = histology_tile(cls, _item_rng(seed, class_index, i), size)
            atomic_write_bytes(folder / f"{cls.replace('_', '')}{i}.jpeg", _jpeg_bytes(tile))


def _write_mosmed(root: Path, n_per_class: int, seed: int, *, in_plane: int = 256,
                  slices: int | Sequence[int] = (40, 60), classes: Sequence[str] = MOSMED_CLASSES) -> None:
    """``root/CT-0/study_0001.nii.gz`` (normal) and ``root/CT-23/study_0001.nii.gz`` (abnormal)."""
    for cls in classes:
        if cls not in MOSMED_CLASSES:
            raise ValueError(f"unknown MosMedData class {cls!r}; expected some of {MOSMED_CLASSES}")
        class_index = MOSMED_CLASSES.index(cls)
        folder = root / MOSMED_FOLDERS[cls]
        for i in range(1, n_per_class + 1):
            rng = _item_rng(seed, class_index, i)
            volume, affine = ct_volume(cls, rng, in_plane=in_plane, slices=_slice_count(slices, rng))
            atomic_write_bytes(folder / f"study_{i:04d}.nii.gz", _nifti_gz_bytes(volume, affine))


def _split_sizes(n: int, n_valid: float, n_test: float) -> tuple[int, int, int]:
    """(train, valid, test) items per class; floats are fractions of ``n``, ints are counts, each at least 2."""
    def count(v: float) -> int:
        return max(2, int(round(v * n)) if isinstance(v, float) else int(v))

    valid, test = count(n_valid), count(n_test)
    if n - valid - test < 2:
        raise ValueError(f"chest_ct: n_per_class={n} leaves {n - valid - test} training images per class after "
                         f"{valid} valid and {test} test; use n_per_class >= {valid + test + 2}")
    return n - valid - test, valid, test


def _crop_to_body(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The slice cut down to the body (and table) plus a small margin, as the Kaggle screenshots are."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    dark, bright = float(np.median(border)), float(np.percentile(grey, 90))
    body = grey > dark + 0.3 * (bright - dark)
    rows, cols = np.flatnonzero(body.mean(axis=1) > 0.02), np.flatnonzero(body.mean(axis=0) > 0.02)
    if rows.size < 2 or cols.size < 2:
        return grey
    h, w = grey.shape
    my, mx = (int(rng.uniform(0.01, 0.06) * n) for n in (h, w))
    return grey[max(rows[0] - my, 0):rows[-1] + my + 1, max(cols[0] - mx, 0):cols[-1] + mx + 1]


def _screenshot_bytes(grey: np.ndarray, rng: np.random.Generator, size: int) -> tuple[bytes, str]:
    """A slice saved the way the Kaggle chest CT files are: cropped, resized and in a mix of formats.

    The real files are mostly RGBA PNGs (opaque), some RGB PNGs, a few JPEGs and greyscale PNGs, of
    many sizes; so are ours, with widths within 15% of ``size``. Returns the bytes and the suffix.
    """
    crop = _crop_to_body(grey, rng)
    width = int(round(size * rng.uniform(0.85, 1.15)))
    height = max(int(round(width * crop.shape[0] / crop.shape[1] * rng.uniform(0.95, 1.05))), 8)
    img = Image.fromarray(crop).resize((width, height), Image.Resampling.BILINEAR)
    u = rng.random()
    buf = io.BytesIO()
    if u < 0.1:
        img.convert("RGB").save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
        return buf.getvalue(), ".jpg"
    mode = "RGBA" if u < 0.65 else "RGB" if u < 0.85 else "L"
    img.convert(mode).save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _write_chest_ct(root: Path, n_per_class: int, seed: int, *, size: int = 512,
                    classes: Sequence[str] = CHEST_CLASSES, n_valid: float = 0.07, n_test: float = 0.32,
                    window: str = "mixed") -> None:
    """``root/Data/{train,valid,test}/<folder>/NNNNNN.png|jpg``, as Kaggle's chest-ctscan-images ships.

    Train and valid folders carry the real data set's long names (class, site and TNM stage); test
    folders are the bare class names. Each class's items are numbered from 0 across the three
    splits, train first, so an item's picture depends only on (seed, class, index).
    """
    _check_window(window)
    train, valid, _ = _split_sizes(n_per_class, n_valid, n_test)
    for cls in classes:
        if cls not in CHEST_CLASSES:
            raise ValueError(f"unknown chest CT class {cls!r}; expected some of {CHEST_CLASSES}")
        class_index = CHEST_CLASSES.index(cls)
        for i in range(n_per_class):
            split = "train" if i < train else "valid" if i < train + valid else "test"
            folder = root / catalog.CHEST_CT_PARENT / split / (cls if split == "test" else CHEST_FOLDERS[cls])
            rng = _item_rng(seed, class_index, i)
            data, suffix = _screenshot_bytes(ct_slice(cls, rng, size, window), rng, size)
            atomic_write_bytes(folder / f"{i:06d}{suffix}", data)


def _write_ct_cancer(root: Path, n_per_class: int, seed: int, *, size: int = 512,
                     classes: Sequence[str] = CANCER_CLASSES) -> None:
    """``root/CT-Scan images/CT-Scan images/CT-Scan Images/{Cancerous,Non-Cancerous}/NNNNNN.png|jpg``.

    The layout of Kaggle's "Lung CT-Scan images" (orvile/ct-scan-images), nesting and capitals as
    shipped. Each Cancerous image shows one of the three cancers of ``ct_slice``, drawn per item.
    """
    for cls in classes:
        if cls not in CANCER_CLASSES:
            raise ValueError(f"unknown CT cancer class {cls!r}; expected some of {CANCER_CLASSES}")
        class_index = CANCER_CLASSES.index(cls)
        folder = root.joinpath(*CT_CANCER_FOLDERS, cls)
        for i in range(n_per_class):
            rng = _item_rng(seed, class_index, i)
            data, suffix = _screenshot_bytes(ct_slice(cls, rng, size), rng, size)
            atomic_write_bytes(folder / f"{i:06d}{suffix}", data)


_DATASET_WRITERS = {"lc25000": _write_lc25000, "mosmed": _write_mosmed, "chest_ct": _write_chest_ct,
                    "ct_cancer": _write_ct_cancer}
_DEFAULT_CLASSES = {"lc25000": LC25000_CLASSES, "mosmed": MOSMED_CLASSES, "chest_ct": CHEST_CLASSES,
                    "ct_cancer": CANCER_CLASSES}


def write_dataset(kind: str, root: Path, n_per_class: int, seed: int, **params: object) -> None:
    """Write ``n_per_class`` phantoms per class in the real data set's folder layout under ``root``.

    ``kind="lc25000"`` takes ``classes`` and ``size`` (JPEG tiles, quality 90); ``kind="mosmed"``
    takes ``in_plane`` and ``slices`` (an int, or an inclusive (low, high) range drawn per volume).
    ``kind="chest_ct"`` (Kaggle chest-ctscan-images: train, valid and test folders) takes ``size``,
    ``classes``, ``n_valid``/``n_test`` (fractions of ``n_per_class`` if floats, counts if ints;
    at least 2 each) and ``window`` (``mixed`` display windows as in the Kaggle PNGs, or ``wide``
    only); ``kind="ct_cancer"`` (Kaggle Lung CT-Scan images) takes ``size`` and ``classes``.
    Both write cropped slices of varying size as a mix of RGBA, RGB and greyscale PNGs and JPEGs.
    Every file is written atomically, so an interrupted run leaves only complete files, and each
    item depends only on (seed, class, index), so re-running rewrites identical content.
    """
    writer = _DATASET_WRITERS.get(kind)
    if writer is None:
        raise ValueError(f"unknown phantom data set kind {kind!r}; known kinds: {', '.join(DATASET_KINDS)}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, not {n_per_class}")
    classes = tuple(params.pop("classes", _DEFAULT_CLASSES[kind]))
    workers = min(len(classes), os.cpu_count() or 1)
    if workers < 2 or n_per_class * len(classes) < 16:
        writer(Path(root), int(n_per_class), int(seed), classes=classes, **params)
        return
    # Classes are independent (each item depends on seed, class and index only), so they are
    # written in parallel; "spawn" keeps TensorFlow's threads in the parent out of the children.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        jobs = [pool.submit(writer, Path(root), int(n_per_class), int(seed), classes=(cls,), **params)
                for cls in classes]
        for job in jobs:
            job.result()


def write_incoming(root: Path, seed: int, n_tiles: int = 4, n_volumes: int = 2, corrupt: bool = True, *,
                   tile_size: int = 768, in_plane: int = 256, slices: int = 48, n_slices: int = 0,
                   slice_size: int = 512, n_dicom_series: int = 0) -> list[Path]:
    """A folder of newly arrived files for the scoring demo; returns the paths written.

    Tiles of random classes alternate between PNG and JPEG (``slide_001.png``, ``slide_002.jpg``,
    ...); volumes go to ``ct/scan_001.nii.gz``, ...; chest CT slices (``n_slices``) to
    ``ct-slices/slice_001.png``, ...; DICOM series (``n_dicom_series``, volumes like the NIfTI ones,
    as uncompressed CT slices) to ``dicom/series_001/IM000001.dcm``, ... Names carry no label, since scoring must not
    see one. With ``corrupt`` a truncated ``ct/broken_scan.nii.gz`` is added: its header still
    parses but its data ends early, the way an interrupted transfer looks.
    """
    root = Path(root)
    pick = np.random.default_rng([int(seed), 0xC0FFEE])
    written: list[Path] = []
    for i in range(n_tiles):
        cls = LC25000_CLASSES[int(pick.integers(len(LC25000_CLASSES)))]
        tile = histology_tile(cls, np.random.default_rng([int(seed), 1, i]), tile_size)
        png = i % 2 == 0
        path = root / f"slide_{i + 1:03d}.{'png' if png else 'jpg'}"
        written.append(atomic_write_bytes(path, _png_bytes(tile) if png else _jpeg_bytes(tile)))
    for i in range(n_volumes):
        cls = MOSMED_CLASSES[int(pick.integers(len(MOSMED_CLASSES)))]
        volume, affine = ct_volume(cls, np.random.default_rng([int(seed), 2, i]), in_plane, slices)
        written.append(atomic_write_bytes(root / "ct" / f"scan_{i + 1:03d}.nii.gz", _nifti_gz_bytes(volume, affine)))
    for i in range(n_slices):
        cls = CHEST_CLASSES[int(pick.integers(len(CHEST_CLASSES)))]
        image = ct_slice(cls, np.random.default_rng([int(seed), 4, i]), slice_size)
        written.append(atomic_write_bytes(root / "ct-slices" / f"slice_{i + 1:03d}.png", _png_bytes(image)))
    if n_dicom_series:
        from lung_models.data.dicom import write_series

    for i in range(n_dicom_series):
        cls = MOSMED_CLASSES[int(pick.integers(len(MOSMED_CLASSES)))]
        volume, affine = ct_volume(cls, np.random.default_rng([int(seed), 5, i]), in_plane, slices)
        spacing = tuple(float(v) for v in np.abs(np.diag(affine)[:3]))
        written.extend(write_series(volume, spacing, root / "dicom" / f"series_{i + 1:03d}"))
    if corrupt:
        volume, affine = ct_volume("normal", np.random.default_rng([int(seed), 3]), 64, 16)
        data = _nifti_gz_bytes(volume, affine)
        written.append(atomic_write_bytes(root / "ct" / "broken_scan.nii.gz", data[: len(data) // 2]))
    return written
