"""H&E histopathology tiles like LC25000's lung tiles: acinar glands (adenocarcinoma), keratinising
nests (squamous cell carcinoma) and alveolar lace (normal lung), under a randomised stain.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from lung_models.data import catalog
from lung_models.data.phantoms.fields import F32, jittered_grid, resize, smooth_field

LC25000_CLASSES = catalog.LC25000.classes

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
        return out.reshape(shape).astype(F32)
    harmonics = rng.normal(0.0, wobble, (n, 4)).astype(F32) if wobble > 0 else None
    r_max = np.maximum(rx, ry) * (1.0 + 2.5 * wobble) + edge + 1
    order = np.argsort(r_max)
    # Window size per size bucket, so a few big blobs do not make every small one pay for it.
    for chunk in np.array_split(order, min(3, n)):
        if chunk.size == 0:
            continue
        k = int(np.ceil(r_max[chunk].max()))
        off = np.arange(-k, k + 1, dtype=F32)
        iy = np.round(cy[chunk]).astype(np.int64)
        ix = np.round(cx[chunk]).astype(np.int64)
        dy = off[None, :, None] - (cy[chunk] - iy).astype(F32)[:, None, None]
        dx = off[None, None, :] - (cx[chunk] - ix).astype(F32)[:, None, None]
        c = np.cos(theta[chunk]).astype(F32)[:, None, None]
        s = np.sin(theta[chunk]).astype(F32)[:, None, None]
        u = (dx * c + dy * s) / rx[chunk].astype(F32)[:, None, None]
        v = (dy * c - dx * s) / ry[chunk].astype(F32)[:, None, None]
        d = np.sqrt(u * u + v * v) + F32(1e-6)
        if harmonics is not None:
            # Low-order angular harmonics of the outline, via polynomial identities (no arctan2).
            cs, sn = u / d, v / d
            a = harmonics[chunk]
            radius = 1 + (a[:, 0, None, None] * (cs * cs - sn * sn) + a[:, 1, None, None] * (2 * cs * sn)
                          + a[:, 2, None, None] * cs * (4 * cs * cs - 3)
                          + a[:, 3, None, None] * sn * (3 - 4 * sn * sn))
            d = d / np.maximum(radius, F32(0.4))
        mean_r = (0.5 * (rx[chunk] + ry[chunk])).astype(F32)[:, None, None]
        val = np.clip((1 - d) * mean_r / F32(edge) + F32(0.5), 0, 1)
        if rim > 0:
            val *= (1 - rim) + rim * np.clip(d / F32(0.85), 0, 1) ** 2
        if nucleolus > 0:
            val += nucleolus * np.exp(-((d / F32(0.2)) ** 2))
        if pale_centre > 0:
            val *= 1 - pale_centre * np.exp(-((d / F32(0.5)) ** 2))
        yy = iy[:, None, None] + off.astype(np.int64)[None, :, None]
        xx = ix[:, None, None] + off.astype(np.int64)[None, None, :]
        ok = (val > 0.004) & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        out += np.bincount((yy * w + xx)[ok], weights=val[ok], minlength=h * w)
    return out.reshape(shape).astype(F32)


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
    return edge.reshape(grid, grid).astype(F32), idx[:, 0].reshape(grid, grid)


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
        self.haem = np.zeros(self.shape, F32)
        self.eosin = np.zeros(self.shape, F32)
        self.rbc = np.zeros(self.shape, F32)
        half = max(size // 2, 8)
        self.chromatin = 1 + 0.4 * resize(rng.standard_normal((half, half), dtype=F32), self.shape)
        # Coarser graininess of cytoplasm and stroma (a few pixels across).
        sixth = max(size // 6, 8)
        self.grain = 1 + 0.12 * resize(rng.standard_normal((sixth, sixth), dtype=F32), self.shape)

    def nuclei(self, darkness: float, blobs: np.ndarray) -> None:
        self.haem += darkness * blobs * self.chromatin


def _collagen(rng: np.random.Generator, st: _Stains) -> np.ndarray:
    """Wavy, roughly parallel fibre bundles in [0, 1]: the look of collagenous stroma."""
    ang = rng.uniform(0, np.pi)
    yy = np.arange(st.size, dtype=F32)[:, None] * F32(np.sin(ang))
    xx = np.arange(st.size, dtype=F32)[None, :] * F32(np.cos(ang))
    # Bundles bend on two scales, and a patchy mask breaks them into strands of varying length.
    warp = (smooth_field(rng, st.shape, 150 * st.s) * F32(30 * st.s)
            + smooth_field(rng, st.shape, 30 * st.s) * F32(5 * st.s))
    period = F32(rng.uniform(12, 20) * st.s)
    lines = (0.5 + 0.5 * np.cos((yy + xx + warp) * F32(2 * np.pi) / period)) ** 3
    strands = np.clip(0.35 + 0.6 * smooth_field(rng, st.shape, 24 * st.s), 0, 1)
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
    seeds = jittered_grid(rng, size, spacing, jitter=0.45)
    warp = tuple(smooth_field(rng, (grid, grid), 110 * s / cell) * (30 * s) for _ in range(2))
    edge_lo, _ = _voronoi_fields(seeds, grid, cell, warp)
    edge = resize(edge_lo, st.shape)
    # Septa vary in thickness along their length and between tiles (collapse, congestion).
    thick = np.clip(resize(smooth_field(rng, (grid, grid), 160 * s / cell), st.shape), 0, None)
    half_width = (rng.uniform(10.0, 28.0) + rng.uniform(0, 1) * 40.0 * thick) * s
    wall = np.clip((half_width - edge) / (2.0 * s) + 0.5, 0, 1)
    # A few walls leave the section plane: free-ending septa, as in the real lace.
    breaks = resize(smooth_field(rng, (grid, grid), 120 * s / cell), st.shape)
    wall *= np.clip((breaks + rng.uniform(1.3, 2.5)) * 3, 0, 1)
    # Each septum is two thin pink linings around a paler core (capillary bed, interstitium).
    depth = np.clip(edge / np.maximum(half_width, 1e-3), 0, 1)
    lining = np.exp(-(((1 - depth) * half_width / (4.0 * s)) ** 2))
    st.eosin += wall * (rng.uniform(0.3, 0.45) + rng.uniform(0.25, 0.45) * lining) * st.grain
    st.haem += wall * rng.uniform(0.15, 0.3)
    # Pale pink oedema fluid or fibrin filling some air spaces, common in resection specimens.
    fluid = np.clip((resize(smooth_field(rng, (grid, grid), 260 * s / cell), st.shape) - rng.uniform(0.2, 1.8)) * 2,
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
    centres = jittered_grid(rng, size, spacing, jitter=0.3)
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
    depth = (np.hypot(u, v) - lumen_radius(near, np.arctan2(v, u))).astype(F32)
    depth += smooth_field(rng, (grid, grid), 60 * s / cell) * (5 * s)
    depth_full = resize(depth, st.shape)

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
    secretion = np.clip(resize(smooth_field(rng, (grid, grid), 40 * s / cell), st.shape) * 0.3 + 0.7, 0, 1)
    fill = resize(filled[near].astype(F32), st.shape) * secretion
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
    seeds = jittered_grid(rng, size, spacing, jitter=0.35)
    warp = tuple(smooth_field(rng, (grid, grid), 60 * s / cell) * (8 * s) for _ in range(2))
    border = resize(_voronoi_fields(seeds, grid, cell, warp)[0], st.shape)
    # Nests separated by bands of fibrous stroma where a smooth field is high.
    band_field = resize(smooth_field(rng, (grid, grid), 300 * s / cell), st.shape)
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
    in_pearl = np.zeros(st.shape, F32)
    for _ in range(n_pearls):
        py, px = rng.uniform(0.1, 0.9, 2) * size
        pr = rng.uniform(80, 170) * s
        period = rng.uniform(14, 24) * s
        y0, y1 = max(int(py - pr) - 2, 0), min(int(py + pr) + 3, size)
        x0, x1 = max(int(px - pr) - 2, 0), min(int(px + pr) + 3, size)
        yy = np.arange(y0, y1, dtype=F32)[:, None] - F32(py)
        xx = np.arange(x0, x1, dtype=F32)[None, :] - F32(px)
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
        gaps = np.clip(resize(smooth_field(rng, (grid, grid), 80 * s / cell), st.shape) + 0.3, 0, 1)
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
        yy = np.arange(size, dtype=F32)[:, None] * F32(np.sin(ang))
        xx = np.arange(size, dtype=F32)[None, :] * F32(np.cos(ang))
        reach = rng.uniform(0.6, 0.95) * size * (abs(np.sin(ang)) + abs(np.cos(ang)))
        offset = min(0.0, np.sin(ang) * (size - 1)) + min(0.0, np.cos(ang) * (size - 1))
        wavy = smooth_field(rng, (size, size), 200 * st.s) * F32(25 * st.s)
        tissue = np.clip((F32(offset + reach) - (yy + xx) - wavy) / F32(3 * st.s), 0, 1)
        for m in (st.haem, st.eosin, st.rbc):
            m *= tissue

    # Staining and scanning vary between slides: stain hue and strength, focus, sensor noise.
    h_vec = _perturbed(_OD_HAEM, rng, 0.06)
    e_vec = _perturbed(_OD_EOSIN, rng, 0.08)
    r_vec = _perturbed(_OD_RBC, rng, 0.05)
    h_gain, e_gain = rng.lognormal(0, 0.18), rng.lognormal(0, 0.2)
    uneven = 1 + 0.1 * resize(smooth_field(rng, (16, 16), 6.0), (size, size))
    sigma = rng.uniform(0.6, 1.8) * max(st.s, 0.35)
    conc = [
        ndimage.gaussian_filter(np.clip(m, 0, 3.5) * uneven, sigma, truncate=2.5)
        for m in (st.haem, st.eosin, st.rbc)
    ]
    # Glass and air spaces are rarely pure white: slides and scanners tint them cream, pink or blue.
    background = np.abs(rng.normal(0, 0.035, 3)) + 0.015
    gains = np.stack([h_gain * h_vec, e_gain * e_vec, r_vec])  # (stain, channel)
    noise_sd = F32(rng.uniform(1.5, 4.0))
    rgb = np.empty((size, size, 3), np.uint8)
    for ch in range(3):
        od = conc[0] * F32(gains[0, ch]) + conc[1] * F32(gains[1, ch]) + conc[2] * F32(gains[2, ch])
        od += F32(background[ch])
        channel = np.exp(-od) * F32(255.0)
        channel += noise_sd * rng.standard_normal((size, size), dtype=F32) + F32(0.5)
        rgb[..., ch] = np.clip(channel, 0, 255)
    return rgb
