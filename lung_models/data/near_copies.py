"""Near-copies: the same picture saved twice in a slightly different way.

Byte-identical copies are found by sha256 (:func:`lung_models.data.datasets.drop_duplicates`).
What is left in real data sets are copies re-encoded (PNG and JPEG of one slice), re-cropped,
rescaled, mirrored or turned (LC25000 tiles are augmented copies of 250 images per class), and
neighbouring slices of one scan that look alike. A model that has trained on one of them has as
good as seen the other, so they must not sit on both sides of a split or a fold.

Two images are near-copies when their 64x64 grey thumbnails correlate at least
:data:`NEAR_COPY_CORRELATION` (0.97) in one of the eight flips and quarter turns. Measured on the
real samples in ``../shared/data``: in the chest CT one (578 distinct files) it links 44 pairs
(39 of them above 0.99) into groups of at most 4, and 3 pairs among the 894 LC25000 tiles;
among generated phantoms (one body template for every slice) none in 240 chest slices, and 2
test slices of the demo's 1,600 are near-copies of training ones. Coarser rules
catch look-alike slices that are different pictures: 16x16 thumbnails at 0.95 put 238 of 240
generated chest slices into one group. Volumes are compared by hash only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

NEAR_COPY_CORRELATION = 0.97
THUMBNAIL = 64
# Candidate pairs come from 16x16 thumbnails (a 16th of the work; a near-copy's coarse thumbnails
# correlate at least as well as its fine ones, in practice: on both real samples candidates at 0.95
# give the same pairs as at 0.90), then are checked at 64x64. Look-alike images make many
# candidates: the demo's 1,600 generated chest slices took 24.6 s and 4.75 GiB to prepare with
# 0.90 and 65,536-pair chunks, 4.7 s and 1.05 GiB now (2.3 s and 0.83 GiB without the check).
COARSE = 16
COARSE_CORRELATION = 0.95
BLOCK = 1024  # rows compared at a time: 15,000 tiles never need a 15,000 x 15,000 matrix
# Part of the preprocessed cache's key: a change of rule re-splits the data.
RULE = f"grey {THUMBNAIL}x{THUMBNAIL} thumbnails, correlation >= {NEAR_COPY_CORRELATION}, 8 flips/turns"


def thumbnail(image: np.ndarray) -> np.ndarray:
    """The 64x64 grey thumbnail of a uint8 (H, W, C) image, as float32."""
    from PIL import Image

    grey = Image.fromarray(np.asarray(image).mean(axis=-1).astype(np.uint8))
    return np.asarray(grey.resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR), dtype=np.float32)


def _unit(thumbs: np.ndarray) -> np.ndarray:
    flat = thumbs.reshape(len(thumbs), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    return flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6)


def _view(thumbs: np.ndarray, view: int) -> np.ndarray:
    """One of the eight flips and quarter turns (view 0 is the thumbnail itself)."""
    turned = np.rot90(thumbs, view // 2, axes=(1, 2))
    return np.ascontiguousarray(turned[:, :, ::-1] if view % 2 else turned)


def _coarse(thumbs: np.ndarray) -> np.ndarray:
    f = THUMBNAIL // COARSE
    return thumbs.reshape(len(thumbs), COARSE, f, COARSE, f).mean(axis=(2, 4))


def pairs(thumbs: np.ndarray, others: np.ndarray | None = None) -> Iterator[tuple[int, int, float]]:
    """(i, j, correlation) of every near-copy pair: i in ``thumbs``, j in ``others`` (default:
    ``thumbs`` itself, each pair once, i < j)."""
    same = others is None
    others = thumbs if same else others
    if not len(thumbs) or not len(others):
        return
    coarse_others = _coarse(others)
    coarse_views = [_unit(_view(coarse_others, v)) for v in range(8)]
    coarse, fine = _unit(_coarse(thumbs)), _unit(thumbs)
    for start in range(0, len(thumbs), BLOCK):
        best: dict[tuple[int, int], float] = {}
        for view, candidates in enumerate(coarse_views):
            ii, jj = np.nonzero(coarse[start:start + BLOCK] @ candidates.T >= COARSE_CORRELATION)
            ii = ii + start
            if same:
                ii, jj = ii[ii < jj], jj[ii < jj]
            # The fine check, vectorised in chunks of 4,096 pairs (64 MiB of thumbnails): look-alike
            # images (every generated slice) make millions of candidates.
            for c in range(0, len(ii), 4096):
                i, j = ii[c:c + 4096], jj[c:c + 4096]
                r = np.einsum("ij,ij->i", fine[i], _unit(_view(others[j], view)))
                for a, b, v in zip(i[r >= NEAR_COPY_CORRELATION], j[r >= NEAR_COPY_CORRELATION],
                                   r[r >= NEAR_COPY_CORRELATION]):
                    key = (int(a), int(b))
                    best[key] = max(best.get(key, -1.0), float(v))
        for (i, j), r in sorted(best.items()):
            yield i, j, r


def groups(thumbs: np.ndarray | None, exact: list[str]) -> list[str]:
    """A group name per item: items linked by a chain of near-copies share one, and so do exact
    copies (same ``exact`` hash). Without thumbnails (volumes), the hashes alone."""
    parent = list(range(len(exact)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, digest in enumerate(exact):
        parent[root(i)] = root(first.setdefault(digest, i))
    if thumbs is not None:
        for i, j, _ in pairs(thumbs):
            parent[root(i)] = root(j)
    return [exact[root(i)] for i in range(len(exact))]
