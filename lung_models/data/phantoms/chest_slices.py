"""Axial chest CT slices with lung cancers, like Kaggle's chest-ctscan-images and Lung CT-Scan images:
peripheral spiculated nodules, large lobulated pleural masses, cavitated hilar masses, or none,
windowed to 8-bit grey levels as the Kaggle PNGs are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lung_models.data import catalog
from lung_models.data.phantoms.fields import F32, smooth_field
from lung_models.data.phantoms.thorax import HU_AIR, Chest, sample_chest, scanner_noise, soft, thorax_hu

CHEST_CLASSES = catalog.CHEST_CT.classes
CANCER_CLASSES = catalog.CT_CANCER.classes

_TUMOUR_KINDS = tuple(c for c in CHEST_CLASSES if c != "normal")
CT_WINDOWS = ("mixed", "wide")


def check_window(window: str) -> None:
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
        r += F32(rng.normal(0, amp / np.sqrt(k))) * np.cos(F32(k) * theta + F32(rng.uniform(0, 2 * np.pi)))
    return np.maximum(r, F32(0.45))


def _spicules(rng: np.random.Generator, theta: np.ndarray, radius: float, n: int, length: float) -> np.ndarray:
    """Extra radius in mm along ``n`` thin spikes, tapering outwards: a spiculated (corona radiata) margin."""
    extra = np.zeros_like(theta)
    for ang, reach, width in zip(rng.uniform(0, 2 * np.pi, n), rng.uniform(0.3, 1.0, n) * length,
                                 rng.uniform(0.35, 0.8, n)):
        gap = np.abs(np.mod(theta - F32(ang) + F32(np.pi), F32(2 * np.pi)) - F32(np.pi))
        extra = np.maximum(extra, F32(reach) * np.exp(-((gap * F32(radius / width)) ** 2)))
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
                c: Chest, radius: float) -> tuple[float, float]:
    """Centre (x, y) in mm of a mass at the hilum: the lung pixel nearest the root of the lung.

    At the lowest levels ``ct_slice`` cuts, where the top of the heart can still show, that is the
    medial lung next to the lower-lobe bronchi, behind the heart.
    """
    ii, jj = np.nonzero(lung)
    hx = c.med_x + sign * (c.med_w_low + rng.uniform(0, 10))
    hy = c.med_y + rng.normal(0.0, 0.12) * c.cy
    k = int(np.argmin((xs[ii] - hx) ** 2 + (ys[jj] - hy) ** 2))
    return float(xs[ii[k]]) + sign * rng.uniform(0.1, 0.6) * radius, float(ys[jj[k]])


def _paint_tumour(hu: np.ndarray, kind: str, rng: np.random.Generator, c: Chest, xs: np.ndarray, ys: np.ndarray,
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
    dx = (xs[i0:i1] - F32(cx))[:, None]
    dy = (ys[j0:j1] - F32(cy))[None, :]
    dist = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    shape = win.shape
    tex = smooth_field(rng, shape, 4.0 / step)
    solid_hu = F32(rng.uniform(20, 45)) + tex * F32(rng.uniform(6, 14))

    if kind == "adenocarcinoma":
        outline = radius * _outline(rng, theta, rng.uniform(0.08, 0.18), (2, 3, 4, 5))
        if rng.random() < 0.7:
            n_spikes, spike_len = int(rng.integers(6, 16)), rng.uniform(4, 0.8 * radius + 8)
            outline = outline + _spicules(rng, theta, radius, n_spikes, spike_len)
        ggo = soft(outline * F32(halo) + smooth_field(rng, shape, 5.0 / step) * F32(0.15 * radius) - dist, 2.5)
        ggo_hu = F32(rng.uniform(-650, -450)) + tex * F32(50)
        # Ground glass raises the parenchyma but leaves vessels running through it visible.
        win += ggo * lung_w * (np.maximum(win, ggo_hu) - win)
        solid = soft(outline - dist, 1.2 * edge) * lung_w
        if rng.random() < 0.4:  # pleural tag: a thin band pulled from the nodule out to the pleura
            li, lj = np.nonzero(lung)
            ox, oy = cx - float(xs[li].mean()), cy - float(ys[lj].mean())
            norm = np.hypot(ox, oy) + 1e-6
            along = dx * F32(ox / norm) + dy * F32(oy / norm)
            across = np.abs(dy * F32(ox / norm) - dx * F32(oy / norm))
            tag = soft(F32(rng.uniform(0.8, 1.5)) - across, edge) * (along > 0) * lung_w
            win += tag * (F32(rng.uniform(-300, -100)) - win)
        win += solid * (solid_hu - win)
        if rng.random() < 0.3:  # bubble-like lucencies, typical of lepidic adenocarcinoma
            n = int(rng.integers(2, 6))
            for bx, by, br in zip(rng.normal(0, 0.35 * radius, n), rng.normal(0, 0.35 * radius, n),
                                  rng.uniform(0.8, 2.0, n)):
                bubble = soft(F32(br) - np.sqrt((dx - F32(bx)) ** 2 + (dy - F32(by)) ** 2), edge) * solid
                win += bubble * (F32(-900) - win)
        return

    if kind == "large.cell.carcinoma":
        outline = radius * _outline(rng, theta, rng.uniform(0.07, 0.16), (2, 3, 4))
        solid = soft(outline - dist, edge) * lung_w
        win += solid * (solid_hu - win)
        if rng.random() < 0.35:  # central necrosis: lower density, shows only in narrow windows
            necrosis = soft(outline * F32(rng.uniform(0.3, 0.55)) - dist, 3.0)
            win += necrosis * solid * (F32(rng.uniform(5, 18)) - win)
        return

    # Squamous: the mass spills from the lung into the hilar fat (nodes), sparing vessels and airways.
    outline = radius * _outline(rng, theta, rng.uniform(0.08, 0.18), (2, 3, 4))
    if rng.random() < 0.3:
        outline = outline + _spicules(rng, theta, radius, int(rng.integers(3, 8)), rng.uniform(3, 8))
    mass = soft(outline - dist, 1.5 * edge)
    xw, yw = xs[i0:i1][:, None], ys[j0:j1][None, :]
    cavity_q = (xw / F32(c.cx)) ** 2 + ((yw - F32(c.cav_y)) / F32(c.cy)) ** 2
    mediastinum = soft((1 - cavity_q) * F32(0.5 * c.cy), edge) * (1 - lung_w) * (win > -500)
    if rng.random() < 0.2:  # pneumonitis beyond the blocked bronchus: patchy opacity fanning out laterally
        out_ang = np.arctan2(0.0, sign) + rng.normal(0, 0.4)
        gap = np.abs(np.mod(theta - F32(out_ang) + F32(np.pi), F32(2 * np.pi)) - F32(np.pi))
        patches = smooth_field(rng, shape, 12.0 / step)
        fan = soft(F32(rng.uniform(0.3, 0.5)) + patches * F32(0.25) - gap, 0.25)
        fade = np.clip(F32(1.3) - dist / F32(radius + rng.uniform(25, 45)), 0, 1)
        opacity = fan * fade * np.clip(F32(0.6) + F32(0.5) * patches, 0, 1) * lung_w
        win += opacity * (np.maximum(win, F32(rng.uniform(-450, -150)) + tex * F32(40)) - win)
    win += mass * lung_w * (solid_hu - win)
    win += mass * mediastinum * (np.maximum(win, solid_hu) - win)
    if rng.random() < 0.5:  # cavitation: necrotic centre drained through the bronchus
        inner = outline * F32(rng.uniform(0.45, 0.7)) * _outline(rng, theta, 0.12, (2, 3, 5))
        cavity = soft(inner - dist, edge) * mass
        win += cavity * (F32(HU_AIR) - win)
        if rng.random() < 0.5:  # air-fluid level: fluid settles posteriorly in a supine patient
            level = F32(rng.uniform(-0.5, 0.1) * radius)
            win += cavity * soft(level - dy, edge) * (F32(rng.uniform(5, 25)) - win)


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
    check_window(window)
    c = sample_chest(rng)
    sxy = 2 * c.bx * rng.uniform(1.05, 1.25) / size
    sz = rng.uniform(1.5, 7.0)
    off = np.array([rng.normal(0, 6), rng.normal(4, 6)])
    # Not lower: below the hila a "hilar" mass merges with the heart, and a squamous cell carcinoma
    # there no longer looks like one.
    level = rng.uniform(0.4, 0.75) * c.height
    tumour_seed = int(rng.integers(2**63))
    shown = _display_window(rng, window)
    origin = np.array([-(size - 1) / 2 * sxy - off[0], -(size - 1) / 2 * sxy - off[1], level])
    x = (origin[0] + np.arange(size) * sxy).astype(F32)[:, None, None]
    y = (origin[1] + np.arange(size) * sxy).astype(F32)[None, :, None]
    z = np.full((1, 1, 1), level, F32)
    hu, lungs = thorax_hu(c, rng, x, y, z, origin, (sxy, sxy, sz), ground_glass=False)
    kind = cls
    if cls == "Cancerous":  # picked on the side, so a Cancerous slice is exactly that kind's slice
        kind = _TUMOUR_KINDS[int(np.random.default_rng([tumour_seed, 1]).integers(len(_TUMOUR_KINDS)))]
    if kind in _TUMOUR_KINDS:
        _paint_tumour(hu[:, :, 0], kind, np.random.default_rng(tumour_seed), c, x[:, 0, 0], y[0, :, 0],
                      [m[:, :, 0] for m in lungs], 0.6 * sxy)
    hu = scanner_noise(hu, rng, x, y, off, (size / 2) * sxy)
    centre, width = shown
    grey = (hu[:, ::-1, 0].T - F32(centre - width / 2)) * F32(255.0 / width)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
