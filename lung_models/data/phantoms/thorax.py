"""The patient both chest CT phantoms are cut from: a randomised thorax in Hounsfield units.

A chest is sampled once (``sample_chest``: habitus, lungs, heart, diaphragm), then painted on any
voxel grid (``thorax_hu``): a slab for a volume, one slice at a chosen level for a 2-D image.
Coordinates are millimetres, x to the patient's left, y anterior, z superior.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lung_models.data.phantoms.fields import F32, smooth_field

HU_AIR = -1000.0
_HU_PAD = -1024.0  # outside the reconstruction circle, the value most scanners write there
_HU_FAT = -95.0
_HU_MUSCLE = 45.0


@dataclass(frozen=True)
class Chest:
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


def sample_chest(rng: np.random.Generator) -> Chest:
    bx = rng.uniform(140, 175)
    by = bx * rng.uniform(0.66, 0.78)
    fat = rng.uniform(5, 22)
    wall = rng.uniform(10, 16)
    back = rng.uniform(28, 40)
    cx = bx - fat - wall
    cy = by - 0.7 * fat - wall - 0.5 * back
    lung_x = cx * rng.uniform(0.47, 0.55)
    heart_angle = rng.uniform(-0.7, -0.3)  # long axis points anterior-left
    return Chest(
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


def soft(signed_mm: np.ndarray, edge: float) -> np.ndarray:
    """0..1 occupancy from a signed distance (mm, positive inside): a partial-volume edge."""
    return np.clip(signed_mm * F32(1.0 / edge) + F32(0.5), 0, 1)


def _lungs(c: Chest, x: np.ndarray, y: np.ndarray, z: np.ndarray, edge: float, edge_z: float
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Soft masks of the right and left lung, and each lung's normalised radius (0 centre, 1 pleura).

    Works on broadcastable grids (x: (n, 1, 1), y: (1, n, 1), z: (1, 1, s)) and on 1-D point arrays
    alike, so the vessel tree can ask whether a branch is still inside a lung. Powers are taken on
    the small axis-wise arrays only; near the outline rho**p - 1 is linearised, which is all a soft
    edge needs.
    """
    t = z / F32(c.height)
    taper = np.where(t < c.apex_from, 1.0,
                     np.sqrt(np.clip(1 - ((t - c.apex_from) / (1.0 - c.apex_from)) ** 2, 0, 1))).astype(F32)
    apex_cap = soft((F32(c.height) - z), edge_z)
    cav_q = (x / F32(c.cx)) ** 2 + ((y - F32(c.cav_y)) / F32(c.cy)) ** 2
    inside_cavity = soft((1 - cav_q) * F32(0.5 * c.cy), edge)
    blend = np.clip((t - 0.45) / 0.25, 0, 1).astype(F32)
    med_w = F32(c.med_w_low) + F32(c.med_w_high - c.med_w_low) * blend
    med_q = ((x - F32(c.med_x)) / med_w) ** 2 + ((y - F32(c.med_y)) / F32(1.3 * c.cy)) ** 2
    outside_med = soft((med_q - 1) * (0.5 * med_w), edge)
    hx, hy, hz, ha, hb, hc, hang = c.heart
    cos_h, sin_h = F32(np.cos(hang)), F32(np.sin(hang))
    hu_ = (x - F32(hx)) * cos_h + (y - F32(hy)) * sin_h
    hv_ = (y - F32(hy)) * cos_h - (x - F32(hx)) * sin_h
    heart_q = (hu_ / F32(ha)) ** 2 + (hv_ / F32(hb)) ** 2 + ((z - F32(hz * c.height)) / F32(hc * c.height)) ** 2
    # Pericardial fat keeps the lungs a few millimetres off the heart.
    outside_heart = soft((heart_q - 1) * F32(0.5 * hb) - 4, edge)
    shared = inside_cavity * outside_med * outside_heart * apex_cap
    masks, radii = [], []
    for side, sign in ((0, -1.0), (1, 1.0)):
        ax = F32(c.lung_ax[side]) * taper + F32(1e-3)
        ay = F32(c.lung_ay) * (0.3 + 0.7 * taper)
        lx = F32(sign * c.lung_x[side]) * (1 - 0.25 * (1 - taper))
        ly = F32(c.lung_y) - F32(0.3 * c.cy) * (1 - taper)
        q = (np.abs(x - lx) / ax) ** c.lung_p + (np.abs(y - ly) / ay) ** c.lung_p
        own = soft((1 - q) * (np.minimum(ax, ay) / F32(c.lung_p)), edge)
        r_dome2 = (x - F32(sign * c.dome_x)) ** 2 + (y - F32(c.dome_y)) ** 2
        above_dome = soft(z - (F32(c.dome_top[side]) - F32(c.dome_k) * r_dome2), edge_z)
        masks.append(own * shared * above_dome)
        radii.append(np.maximum(q, cav_q))
    return masks, radii


def _vessel_points(c: Chest, rng: np.random.Generator, step: float, edge: float
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
    field = acc.reshape(shape).astype(F32)
    field = ndimage.gaussian_filter(field, (sigma / spacing[0], sigma / spacing[1], 0), truncate=3.0)
    return np.clip((field - F32(0.5)) * F32(1 / 1.5), 0, 1)


def _paint(hu: np.ndarray, weight: np.ndarray, value: float, zmask: np.ndarray | None = None) -> None:
    """Blend ``value`` into ``hu`` in place with 0..1 ``weight``; ``zmask`` limits it to a slab of slices.

    Structures that exist only over part of the z range (great vessels, trachea) are painted on that
    contiguous slab alone, which saves most of the full-volume arithmetic.
    """
    if zmask is None:
        hu += weight * (F32(value) - hu)
        return
    ks = np.flatnonzero(np.asarray(zmask).ravel())
    if ks.size == 0:
        return
    sl = slice(int(ks[0]), int(ks[-1]) + 1)
    sub = hu[:, :, sl]
    w = weight if weight.shape[2] == 1 else weight[:, :, sl]
    sub += w * (F32(value) - sub)


def _chest_slice(c: Chest, rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
                 spacing: tuple[float, float], edge: float) -> np.ndarray:
    """The parts of an axial slice that barely change along the thorax, as an (n, n, 1) HU array.

    Table, skin and fat, chest-wall muscle, mediastinal fat filling the cavity, spine, oesophagus.
    """
    n = x.shape[0]
    hu = np.full((n, n, 1), HU_AIR, F32)
    # Curved scanner table under the patient: a foam core between two thin carbon shells.
    top = F32(-c.by * 0.93 - rng.uniform(3, 12)) + F32(0.0012) * x * x
    width = soft(F32(0.75 * c.bx * 1.2) - np.abs(x), edge)
    core = soft(np.minimum(top - y, y - (top - 14)), edge) * width
    _paint(hu, core, -880.0)
    for shell in (top, top - 14):
        _paint(hu, soft(1.2 - np.abs(y - shell), edge) * width, 150.0)
    # Body outline, flatter at the back where the patient lies on the table.
    half_depth = np.where(y < 0, F32(0.93 * c.by), F32(c.by))
    q = (np.abs(x) / F32(c.bx)) ** 2.3 + (np.abs(y) / half_depth) ** 2.3
    texture = smooth_field(rng, (n, n), 12 / spacing[0])[:, :, None]
    _paint(hu, soft((1 - q) * F32(0.45 * c.by), edge), _HU_FAT)
    hu += soft((1 - q) * F32(0.45 * c.by), edge) * texture * F32(8)
    ix, iy = c.bx - c.fat, np.where(y < 0, 0.93 * c.by - 0.5 * c.fat, c.by - c.fat)
    q = (np.abs(x) / F32(ix)) ** 2.3 + (np.abs(y) / iy.astype(F32)) ** 2.3
    muscle = soft((1 - q) * F32(0.45 * (c.by - c.fat)), edge)
    _paint(hu, muscle, _HU_MUSCLE)
    # The cavity starts out as mediastinal fat; lungs, heart and vessels are painted over it.
    q = (x / F32(c.cx)) ** 2 + ((y - F32(c.cav_y)) / F32(c.cy)) ** 2
    _paint(hu, soft((1 - q) * F32(0.5 * c.cy), edge), _HU_FAT + 10)
    hu += soft((1 - q) * F32(0.5 * c.cy), edge) * texture * F32(10)
    # Vertebra: cortical shell around cancellous bone, canal with cord, arch and spinous process.
    vy = c.spine_y
    vr = rng.uniform(15, 19)
    d = np.sqrt(x * x + (y - F32(vy)) ** 2)
    _paint(hu, soft(vr - d, edge), 650.0)
    _paint(hu, soft(vr - 2.0 - d, edge), rng.uniform(180, 280))
    cy_canal = vy - vr - 9
    d = np.sqrt(x * x + (y - F32(cy_canal)) ** 2)
    arch = soft(np.minimum(d - 8.0, 14.0 - d), edge) * (y < F32(cy_canal + 4))
    spinous = soft(3.5 - np.abs(x), edge) * soft(np.minimum(F32(cy_canal - 8) - y, y - F32(cy_canal - 36)), edge)
    # Transverse processes angle backwards from the arch.
    transverse = (soft(4.5 - np.abs(y - F32(cy_canal + 2) + 0.35 * np.abs(x)), edge)
                  * soft(np.minimum(np.abs(x) - 10, 30 - np.abs(x)), edge))
    # Keep the posterior elements under the skin however thin the patient's back is.
    _paint(hu, np.maximum(np.maximum(arch, spinous), transverse) * muscle, 520.0)
    _paint(hu, soft(8.0 - d, edge), 35.0)
    # Oesophagus in front of the spine, sometimes holding a little air.
    d = np.sqrt((x + 4) ** 2 + (y - F32(vy + vr + 9)) ** 2)
    _paint(hu, soft(7.5 - d, edge), _HU_MUSCLE - 5)
    if rng.random() < 0.4:
        _paint(hu, soft(2.5 - d, edge), HU_AIR)
    return hu


def _paint_bones(hu: np.ndarray, c: Chest, rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
                 z: np.ndarray, edge: float, edge_z: float) -> None:
    """Ribs, costal cartilage, sternum, scapulae and intervertebral discs, in place.

    A rib descends from the spine towards the front, so in one axial slice it shows as a short arc
    of the chest wall; all ribs at once follow from one periodic function of z + slope * angle.
    The computation is done only on the ring of pixels where ribs can be.
    """
    n, _, s = hu.shape
    t = z[0, 0] / F32(c.height)
    phi = np.arctan2(y - F32(c.cav_y), x)[:, :, 0]
    from_back = np.abs(np.mod(phi + np.pi / 2 + np.pi, 2 * np.pi) - np.pi)  # 0 at the spine, pi in front
    rho = np.sqrt((x / F32(c.cx)) ** 2 + ((y - F32(c.cav_y)) / F32(c.cy)) ** 2)[:, :, 0]
    local_r = c.cx * c.cy / np.sqrt((c.cy * np.cos(phi)) ** 2 + (c.cx * np.sin(phi)) ** 2)
    out = (rho - 1) * local_r  # mm outside the cavity outline
    thick = rng.uniform(8, 11)
    band = soft(np.minimum(out - 1.0, 1.0 + thick - out), edge) * (from_back > 0.3) * (from_back < np.pi - 0.22)
    ring = np.flatnonzero(band.ravel() > 0)
    core = np.clip(1 - np.abs(out - 1 - thick / 2) / (thick / 2), 0, 1)
    rib_hu = np.where(from_back > np.pi - 0.75, 110.0, 700.0 - 420.0 * core).astype(F32)
    slope, pitch = rng.uniform(28, 36), rng.uniform(24, 30)
    height, phase = rng.uniform(8, 10), rng.uniform(0, pitch)
    u = np.mod(z[0, 0][None, :] + F32(slope) * from_back.ravel()[ring, None].astype(F32) - F32(phase), F32(pitch))
    occ = soft(np.minimum(u, height - u), edge_z) * band.ravel()[ring, None] * ((t > -0.35) & (t < 1.08))[None, :]
    flat = hu.reshape(n * n, s)
    sub = flat[ring]
    sub += occ * (rib_hu.ravel()[ring, None] - sub)
    flat[ring] = sub
    # Sternum in front, over the middle of the chest.
    d = ((x / F32(14)) ** 2 + ((y - F32(c.cav_y + c.cy + 7)) / F32(6)) ** 2)
    _paint(hu, soft((1 - d) * 4, edge), 380.0, (t > 0.25) & (t < 0.85))
    # Scapulae: thin curved plates behind the upper ribs, away from the midline.
    plate = (soft(np.minimum(out - thick - 5, thick + 10 - out), edge) * (from_back > 0.45) * (from_back < 1.2))
    _paint(hu, plate[:, :, None], 480.0, t > 0.55)
    # Intervertebral discs interrupt the vertebral bodies every few centimetres.
    vpitch, vphase = rng.uniform(24, 28), rng.uniform(0, 28)
    disc = soft(3.0 - np.abs(np.mod(z[0, 0] - vphase, vpitch) - 3.0), edge_z)
    body = soft(rng.uniform(15, 18) - np.sqrt(x * x + (y - F32(c.spine_y)) ** 2), edge)
    _paint(hu, body * disc[None, None, :], 85.0, disc > 0)


def _ground_glass(rng: np.random.Generator, parenchyma: np.ndarray, masks: Sequence[np.ndarray],
                  radii: Sequence[np.ndarray], shape: tuple[int, int, int], spacing: tuple[float, float, float],
                  y: np.ndarray, c: Chest) -> np.ndarray:
    """Parenchyma with viral-pneumonia ground-glass opacities added.

    Patches are a smooth random field thresholded per lung, tilted towards the pleura and the
    dependent lung, at the quantile that makes them cover a chosen 25-50% of the lung volume (MosMedData's
    CT-23 folder holds grades CT-2 and CT-3: 25-75% involvement);
    most cases are bilateral. Some cases also get denser consolidation in the patch centres.
    """
    sx, sy, sz = spacing
    corr = rng.uniform(25, 45)
    field = smooth_field(rng, shape, (corr / sx, corr / sy, max(corr / sz, 1.5)))
    dependent = np.clip((F32(c.lung_y) - y) / F32(c.cy), -1, 1) * F32(rng.uniform(0.2, 0.6))
    total = rng.uniform(0.25, 0.50)
    share = rng.uniform(0.35, 0.65) if rng.random() < 0.85 else rng.choice([0.1, 0.9])
    consolidation = rng.random() < 0.35
    ggo_hu = np.clip(F32(rng.uniform(-640, -480)) + smooth_field(rng, shape, (8 / sx, 8 / sy, max(8 / sz, 1.0)))
                     * F32(90), -720, -280)
    opacity = np.zeros(shape, F32)
    core = np.zeros(shape, F32)
    for side, frac in ((0, 2 * total * share), (1, 2 * total * (1 - share))):
        inside = masks[side] > 0.5
        if not inside.any():
            continue
        score = field + F32(1.3) * np.clip((radii[side] - 0.3) / 0.7, 0, 1) + dependent
        values = score[inside][::5]
        thr = np.quantile(values, 1 - min(max(frac, 0.02), 0.9))
        side_w = masks[side] > 0
        opacity = np.where(side_w, soft(score - F32(thr), 0.5), opacity)
        if consolidation:
            thr_core = np.quantile(values, 1 - 0.12 * min(max(frac, 0.02), 0.9))
            core = np.where(side_w, soft(score - F32(thr_core), 0.3), core)
    out = parenchyma + opacity * (ggo_hu - parenchyma)
    if consolidation:
        out += core * (F32(rng.uniform(-120, 10)) - out)
    return out


def _noise_std_after_blur(sigma: tuple[float, float]) -> float:
    """Standard deviation of unit white noise after ``gaussian_filter`` with this in-plane sigma."""
    impulse = np.zeros((31, 31))
    impulse[15, 15] = 1.0
    return float(np.sqrt((ndimage.gaussian_filter(impulse, sigma, truncate=3.0) ** 2).sum()))


def thorax_hu(c: Chest, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray,
               origin: np.ndarray, spacing: tuple[float, float, float], *, ground_glass: bool
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Noise-free HU of patient ``c`` on the voxel grid ``x`` (n,1,1), ``y`` (1,n,1), ``z`` (1,1,s).

    Returns the (n, n, s) HU array and the soft (right, left) lung masks. ``origin`` is the
    patient position of voxel (0, 0, 0) in mm. With ``ground_glass`` the lungs get viral-pneumonia
    opacities. Shared by ``ct_volume`` (a slab) and ``ct_slice`` (one slice at a chosen level).
    """
    sx, sy, sz = spacing
    shape = (x.shape[0], y.shape[1], z.shape[2])
    t = z / F32(c.height)
    edge, edge_z = 0.6 * sx, 0.5 * sz

    blood = rng.uniform(30, 55) if rng.random() < 0.7 else rng.uniform(120, 220)  # plain or contrast
    hu2d = _chest_slice(c, rng, x, y, (sx, sy), edge)
    hu = np.repeat(hu2d, shape[2], axis=2)

    # Heart on the diaphragm, with pericardial fat; great vessels above it.
    hx, hy, hz, ha, hb, hc, hang = c.heart
    cos_h, sin_h = F32(np.cos(hang)), F32(np.sin(hang))
    hu_ = (x - F32(hx)) * cos_h + (y - F32(hy)) * sin_h
    hv_ = (y - F32(hy)) * cos_h - (x - F32(hx)) * sin_h
    heart_q = (hu_ / F32(ha)) ** 2 + (hv_ / F32(hb)) ** 2 + ((z - F32(hz * c.height)) / F32(hc * c.height)) ** 2
    _paint(hu, soft((1 - heart_q) * F32(0.5 * hb) + 4, edge), _HU_FAT)
    _paint(hu, soft((1 - heart_q) * F32(0.5 * hb), edge), blood)
    # Ascending aorta, pulmonary trunk, superior vena cava, descending aorta: (x, y, radius, t range).
    for (vx, vy, vr, t0, t1) in ((10.0, c.cav_y + 0.2 * c.cy, rng.uniform(13, 17), 0.38, 0.78),
                                 (22.0, c.cav_y + 0.4 * c.cy, rng.uniform(12, 15), 0.42, 0.6),
                                 (-22.0, c.cav_y + 0.15 * c.cy, rng.uniform(8, 11), 0.45, 0.95),
                                 (c.med_x + 22.0, c.spine_y + 10, rng.uniform(10, 14), -0.5, 0.78)):
        dist = np.sqrt((x - F32(vx)) ** 2 + (y - F32(vy)) ** 2)
        _paint(hu, soft(vr + 3 - dist, edge), _HU_FAT, (t > t0) & (t < t1))
        _paint(hu, soft(vr - dist, edge), blood, (t > t0) & (t < t1))
    # Trachea above the carina, then the two main bronchi heading for the hila.
    ty = c.spine_y + 40
    carina = rng.uniform(0.6, 0.68)
    for bxo, t0, t1 in ((0.0, carina, 1.2), (-1.0, carina - 0.12, carina), (1.0, carina - 0.12, carina)):
        k = (t > t0) & (t < t1)
        if not k.any():
            continue
        # Each main bronchus runs down and out from the carina.
        along = np.clip((carina - t) / 0.12, 0, 1) * F32(bxo * 35)
        rad = 9.0 if bxo == 0 else 6.5
        dist = np.sqrt((x - along) ** 2 + (y - F32(ty)) ** 2)
        _paint(hu, soft(rad + 2 - dist, edge), _HU_MUSCLE - 5, k)
        _paint(hu, soft(rad - dist, edge), HU_AIR, k)

    # Abdomen under the diaphragm: liver on the right, spleen and stomach on the left.
    for side, sign, organ in ((0, -1.0, 58.0), (1, 1.0, 45.0)):
        r2 = (x - F32(sign * c.dome_x)) ** 2 + (y - F32(c.dome_y)) ** 2
        below = soft(F32(c.dome_top[side]) - F32(c.dome_k) * r2 - z, edge_z)
        cavity = soft((1 - (x / F32(c.cx)) ** 2 - ((y - F32(c.cav_y)) / F32(c.cy)) ** 2) * F32(0.5 * c.cy), edge)
        _paint(hu, below * cavity * (x * F32(sign) > -10), organ, (z < F32(c.dome_top[side] + edge_z)))

    # Lungs: parenchyma denser in the dependent (posterior) part, with fine texture.
    (w_r, w_l), (q_r, q_l) = _lungs(c, x, y, z, edge, edge_z)
    lung_w = np.minimum(w_r + w_l, 1)
    base = rng.uniform(-880, -835)
    dependent = np.clip((F32(c.lung_y + 0.2 * c.cy) - y) / F32(1.4 * c.cy), 0, 1) * F32(rng.uniform(25, 70))
    texture = smooth_field(rng, shape, (6 / sx, 6 / sy, max(6 / sz, 1.0))) * F32(rng.uniform(8, 18))
    parenchyma = F32(base) + dependent + texture
    if ground_glass:
        parenchyma = _ground_glass(rng, parenchyma, (w_r, w_l), (q_r, q_l), shape, (sx, sy, sz), y, c)
    hu += lung_w * (parenchyma - hu)

    # Pulmonary vessels inside the lungs (and their roots in the hila).
    step = 0.6 * min(sx, sz)
    pts, rad = _vessel_points(c, rng, step, edge)
    vessels = _vessel_opacity(pts, rad, origin, np.array([sx, sy, sz]), shape, step)
    # Near the hila the tree's roots cross the mediastinal border; paint them there too.
    hila = soft(12 - np.abs(np.abs(x - F32(c.med_x)) - F32(c.med_w_low)), 4 * edge) * (np.abs(y) < 0.5 * c.cy)
    _paint(hu, vessels * np.maximum(lung_w, hila * (t > 0.3) * (t < 0.75)), blood + rng.uniform(-5, 15))

    _paint_bones(hu, c, rng, x, y, z, edge, edge_z)
    return hu, [w_r, w_l]


def scanner_noise(hu: np.ndarray, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, off: np.ndarray,
                   r_fov: float) -> np.ndarray:
    """``hu`` with CT noise added and the pad value outside the reconstruction circle of radius ``r_fov`` mm.

    ``off`` is the patient's offset from the centre of the field of view.
    """
    shape = hu.shape
    # CT noise: slightly correlated in-plane, like filtered back-projection, and none outside the
    # reconstruction circle where scanners write a constant.
    noise_sd = rng.uniform(10, 20)
    sig = (0.6, 0.6)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=F32), (*sig, 0), truncate=3.0)
    hu += noise * F32(noise_sd / _noise_std_after_blur(sig))
    outside = ((x + F32(off[0])) ** 2 + (y + F32(off[1])) ** 2) > F32(r_fov**2)
    hu = np.where(outside, F32(_HU_PAD), hu)
    return hu
