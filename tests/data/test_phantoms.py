"""Generated phantoms: determinism, formats, plausible values, class differences and file layouts."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lung_models.data.phantoms import (
    CANCER_CLASSES,
    CHEST_CLASSES,
    CHEST_FOLDERS,
    LC25000_CLASSES,
    MOSMED_CLASSES,
    chest_slices,
    ct_slice,
    ct_volume,
    histology_tile,
    write_dataset,
    write_incoming,
    writers,
)

GGO_RANGE = (-700, -300)


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def white_fraction(tile: np.ndarray) -> float:
    """Lumen, air space and glass: every channel bright."""
    return float((tile.min(axis=-1) > 200).mean())


def nuclear_fraction(tile: np.ndarray) -> float:
    """Haematoxylin-dark pixels: dark, and bluer than red."""
    r, g, b = (tile[..., i].astype(int) for i in range(3))
    return float(((r < 150) & (g < 130) & (b > r + 15)).mean())


def lung_region(volume: np.ndarray) -> np.ndarray:
    """Air-density voxels enclosed by the body (lungs and airways), as a radiologist would segment.

    The body is the largest connected soft-tissue-or-denser component (the table is separate);
    its holes, filled slice by slice, are the lungs.
    """
    labels, n = ndimage.label(volume > -500)
    body = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    filled = np.stack([ndimage.binary_fill_holes(body[:, :, k]) for k in range(volume.shape[2])], axis=2)
    return filled & (volume < -500)


# --- histology tiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LC25000_CLASSES)
def test_tile_is_uint8_rgb_and_deterministic_by_seed(cls):
    a, b, other = histology_tile(cls, rng(1), 128), histology_tile(cls, rng(1), 128), histology_tile(cls, rng(2), 128)
    assert a.dtype == np.uint8 and a.shape == (128, 128, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)
    assert a.min() < 120 and a.max() > 200  # dark nuclei and bright spaces or highlights, not a flat wash


def test_default_tile_is_lc25000_sized():
    assert histology_tile("lung_aca", rng(0)).shape == (768, 768, 3)


def test_tiles_have_h_and_e_colours():
    # Eosin (pink) and haematoxylin (blue-purple) both absorb green most, so every tissue pixel
    # on average has green below red and blue.
    for cls in LC25000_CLASSES:
        mean = histology_tile(cls, rng(3), 128).reshape(-1, 3).mean(axis=0)
        assert mean[1] < mean[0] and mean[1] < mean[2], (cls, mean)


def test_tile_classes_differ_as_lc25000_classes_do():
    # Medians over a few tiles: single tiles vary on purpose (filled lumina, specimen edges).
    tiles = {cls: [histology_tile(cls, rng(i, 7), 96) for i in range(8)] for cls in LC25000_CLASSES}
    white = {cls: np.median([white_fraction(t) for t in ts]) for cls, ts in tiles.items()}
    nuclear = {cls: np.median([nuclear_fraction(t) for t in ts]) for cls, ts in tiles.items()}
    # Normal lung is mostly air space, adenocarcinoma has gland lumina, squamous nests are solid.
    assert white["lung_n"] > white["lung_aca"] > white["lung_scc"], white
    assert white["lung_aca"] > 0.03 and white["lung_scc"] < 0.03, white
    # Squamous sheets are crowded with large nuclei; alveolar walls carry few.
    assert nuclear["lung_scc"] > 3 * nuclear["lung_n"], nuclear


def test_stain_varies_between_tiles_of_a_class():
    means = np.array([histology_tile("lung_scc", rng(i, 9), 96).reshape(-1, 3).mean(axis=0) for i in range(6)])
    assert means.std(axis=0).max() > 3  # grey levels: the colour is not a class giveaway


def test_unknown_tile_class_is_rejected():
    with pytest.raises(ValueError, match="lung_aca"):
        histology_tile("lung_xyz", rng(0), 64)


# --- CT volumes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MOSMED_CLASSES)
def test_volume_is_int16_hu_and_deterministic_by_seed(cls):
    (a, aff_a), (b, aff_b) = ct_volume(cls, rng(1), 64, 16), ct_volume(cls, rng(1), 64, 16)
    other, _ = ct_volume(cls, rng(2), 64, 16)
    assert a.dtype == np.int16 and a.shape == (64, 64, 16)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(aff_a, aff_b)
    assert not np.array_equal(a, other)


def test_default_volume_geometry_and_hu_ranges():
    volume, affine = ct_volume("normal", rng(3))
    assert volume.shape == (256, 256, 48) and volume.dtype == np.int16
    assert affine.shape == (4, 4)
    np.testing.assert_array_equal(affine[3], [0, 0, 0, 1])
    np.testing.assert_array_equal(affine[:3, :3], np.diag(np.diag(affine[:3, :3])))  # axis-aligned RAS
    sx, sy, sz = np.diag(affine)[:3]
    assert sx == sy and 0.5 < sx < 2.0 and 1.5 <= sz <= 5.0
    assert -1025 <= volume.min() <= -1000  # air, and the constant outside the reconstruction circle
    assert 400 < volume.max() < 3072  # cortical bone
    assert abs(np.median(volume[:8, :8, :]) + 1000) <= 30  # corner air
    lungs = lung_region(volume)
    assert 0.05 < lungs.mean() < 0.4
    lung_hu = volume[lungs]
    assert -900 < lung_hu.mean() < -800, lung_hu.mean()
    assert ((lung_hu >= -950) & (lung_hu <= -750)).mean() > 0.7
    body_soft = volume[(volume > -200) & (volume < 200)]
    assert body_soft.size > 0.1 * volume.size  # fat, muscle, heart, mediastinum


def test_explicit_spacing_is_used_as_given():
    _, affine = ct_volume("abnormal", rng(4), 96, 12, spacing=(0.75, 0.75, 2.5))
    np.testing.assert_allclose(np.diag(affine)[:3], [0.75, 0.75, 2.5])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_abnormal_volumes_have_ground_glass(seed):
    normal, _ = ct_volume("normal", rng(seed), 128, 24)
    abnormal, _ = ct_volume("abnormal", rng(seed), 128, 24)

    def ggo(v: np.ndarray) -> np.ndarray:
        return (v >= GGO_RANGE[0]) & (v <= GGO_RANGE[1])

    assert ggo(abnormal).mean() > 1.4 * ggo(normal).mean()
    # Within the lungs (air-density or ground-glass voxels inside the body) the opacities cover a
    # clearly visible share, while normal lungs show only partial-volume edges.
    def share(v: np.ndarray) -> float:
        labels, _ = ndimage.label(v > -200)
        body = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
        lungs = np.stack([ndimage.binary_fill_holes(body[:, :, k]) for k in range(v.shape[2])], axis=2) & (v < -200)
        return float(ggo(v)[lungs].mean())

    assert share(abnormal) > 0.1 and share(abnormal) > 1.8 * share(normal), (share(abnormal), share(normal))


def test_unknown_ct_class_is_rejected():
    with pytest.raises(ValueError, match="abnormal"):
        ct_volume("covid", rng(0), 32, 4)


# --- CT slices (chest-ctscan-images) ---------------------------------------------------------------

TUMOUR_CLASSES = [c for c in CHEST_CLASSES if c != "normal"]


def body_midline(grey: np.ndarray) -> tuple[float, float]:
    """Centre column and half-width (pixels) of the patient: the bright region, holes filled."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    body = ndimage.binary_fill_holes(grey > (np.median(border) + np.percentile(grey, 90)) / 2)
    cols = np.flatnonzero(body.any(axis=0))
    return (cols[0] + cols[-1]) / 2, (cols[-1] - cols[0]) / 2


def tumour_change(cls: str, seed: int, size: int = 128) -> tuple[float, int, float, int]:
    """Where ``cls`` changes the slice of the same seed's ``normal`` patient.

    Returns the changed pixels' centroid distance from the body midline as a fraction of the body
    half-width (0 centre, about 0.6 at the lateral pleura), the number of changed pixels, the
    fraction of changed pixels outside the body and the number of solid pixels: changed by more
    than half the largest change, which leaves out ground glass.
    """
    normal = ct_slice("normal", rng(seed), size).astype(int)
    diff = np.abs(ct_slice(cls, rng(seed), size).astype(int) - normal)
    changed = diff > 8
    if not changed.any():
        return float("nan"), 0, 0.0, 0
    centre, half = body_midline(normal.astype(np.uint8))
    rows, cols = np.nonzero(changed)
    lateral = abs(float(np.average(cols, weights=diff[rows, cols])) - centre) / half
    border = np.concatenate([normal[0], normal[-1], normal[:, 0], normal[:, -1]])
    body = ndimage.binary_fill_holes(normal > (np.median(border) + np.percentile(normal, 90)) / 2)
    solid = int((diff > 0.5 * diff.max()).sum())
    return lateral, int(changed.sum()), float((changed & ~body).mean() / changed.mean()), solid


@pytest.mark.parametrize("cls", CHEST_CLASSES + CANCER_CLASSES)
def test_ct_slice_is_uint8_2d_and_deterministic_by_seed(cls):
    a, b, other = ct_slice(cls, rng(1), 128), ct_slice(cls, rng(1), 128), ct_slice(cls, rng(2), 128)
    assert a.dtype == np.uint8 and a.shape == (128, 128)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)
    assert int(a.max()) - int(a.min()) > 60  # air, lungs, soft tissue and bone, whatever the window


def test_default_ct_slice_is_512_pixels():
    assert ct_slice("normal", rng(0)).shape == (512, 512)


def test_ct_slice_shows_a_chest_like_the_kaggle_pngs():
    # Anterior up: the sternum side of the body is nearer the top than the table side is to the
    # bottom; the lungs are the dark holes inside the body, about a fifth to a half of it.
    for seed in range(4):
        grey = ct_slice("normal", rng(seed, 3), 128)
        border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
        body = grey > (np.median(border) + np.percentile(grey, 90)) / 2
        filled = ndimage.binary_fill_holes(body)
        lungs = filled & ~body
        assert 0.15 < lungs.sum() / filled.sum() < 0.6, seed
        assert np.median(grey[lungs]) < np.median(grey[body]) - 40, seed


def test_two_class_variant_matches_the_four_class_slices():
    # Tumours come from their own generator: one seed is one patient, scan and window in every class.
    np.testing.assert_array_equal(ct_slice("Non-Cancerous", rng(4), 96), ct_slice("normal", rng(4), 96))
    for seed in range(4):
        cancer = ct_slice("Cancerous", rng(seed), 96)
        assert any(np.array_equal(cancer, ct_slice(kind, rng(seed), 96)) for kind in TUMOUR_CLASSES), seed


def test_each_cancer_changes_the_slice_where_it_grows():
    # Same seed, same patient: the difference from the normal slice is the tumour alone. Squamous
    # cell carcinoma sits at the hilum, by the mediastinum; the other two grow in the periphery.
    seeds = range(10)
    changes = {cls: [tumour_change(cls, s) for s in seeds] for cls in TUMOUR_CLASSES}
    for cls, rows in changes.items():
        for seed, (_, n_changed, outside_body, _) in zip(seeds, rows):
            assert 8 < n_changed < 0.15 * 128 * 128, (cls, seed, n_changed)  # a lesion, not a new image
            assert outside_body < 0.05, (cls, seed, outside_body)
    lateral = {cls: np.median([r[0] for r in rows]) for cls, rows in changes.items()}
    assert lateral["squamous.cell.carcinoma"] < 0.35, lateral
    assert lateral["adenocarcinoma"] > 0.45 and lateral["large.cell.carcinoma"] > 0.45, lateral
    # Large solid masses vs nodules whose ground-glass rim makes them look bigger than they are.
    solid = {cls: np.median([r[3] for r in rows]) for cls, rows in changes.items()}
    assert solid["large.cell.carcinoma"] > 1.3 * solid["adenocarcinoma"], solid


def test_every_adenocarcinoma_has_a_ground_glass_rim():
    # The rim is what tells a peripheral adenocarcinoma from a small large-cell mass. In the wide
    # window ground glass (-650 to -450 HU) is grey 30-80, between lung (below 25) and solid
    # tumour (above 90); a bare solid nodule changes only a thin partial-volume ring to that grey.
    # When a quarter of nodules had no rim, seeds 0, 1, 9, 21, 23 and 25 gave ratios of 0.12-0.24 here.
    for seed in range(30):
        normal = ct_slice("normal", rng(seed, 11), 256, "wide").astype(int)
        cancer = ct_slice("adenocarcinoma", rng(seed, 11), 256, "wide").astype(int)
        grey = cancer[np.abs(cancer - normal) > 10]
        ground_glass, solid = int(((grey >= 30) & (grey <= 80)).sum()), int((grey > 90).sum())
        assert ground_glass > 0.4 * max(solid, 1), (seed, ground_glass, solid)


def test_slices_are_cut_at_or_above_the_hila(monkeypatch):
    # Below the hila a "hilar" squamous mass merges with the heart; no class is cut there.
    levels = []
    thorax = chest_slices.thorax_hu

    def recording(c, rng_, x, y, z, *args, **kwargs):
        levels.append(float(z.ravel()[0]) / c.height)
        return thorax(c, rng_, x, y, z, *args, **kwargs)

    monkeypatch.setattr(chest_slices, "thorax_hu", recording)
    for seed in range(40):
        ct_slice(CHEST_CLASSES[seed % 4], rng(seed, 12), 64)
    assert 0.4 <= min(levels) < 0.45 and 0.7 < max(levels) <= 0.75, (min(levels), max(levels))


def test_cancer_classes_are_not_told_apart_by_brightness():
    # Window, habitus and level vary far more between slices than a tumour shifts the mean grey level.
    means = {cls: [float(ct_slice(cls, rng(s, 5), 96).mean()) for s in range(8)] for cls in CHEST_CLASSES}
    spread = np.std(means["normal"])
    for cls in TUMOUR_CLASSES:
        assert abs(np.median(means[cls]) - np.median(means["normal"])) < 0.25 * spread, (cls, means)


def test_unknown_chest_class_is_rejected():
    with pytest.raises(ValueError, match="squamous.cell.carcinoma"):
        ct_slice("lung_scc", rng(0), 64)


def test_wide_window_shows_the_same_patient_in_the_common_preset_only():
    # One generator state is one patient in either mode: where the mixed draw was already the
    # common 1900-2600 HU preset the slices are identical; elsewhere (very wide, mediastinal and
    # lung windows among these seeds) only the window differs, and the wide slice shows air black
    # and soft tissue mid-grey.
    same = differ = 0
    for seed in range(20):
        mixed, wide = (ct_slice("adenocarcinoma", rng(seed, 6), 96, window=w) for w in ("mixed", "wide"))
        border = np.concatenate([wide[0], wide[-1], wide[:, 0], wide[:, -1]])
        assert np.median(border) < 12, seed
        assert 90 < np.percentile(wide, 90) < 200, seed
        if np.array_equal(mixed, wide):
            same += 1
        else:
            differ += 1
            assert np.corrcoef(mixed.ravel(), wide.ravel())[0, 1] > 0.8, seed  # same anatomy, other contrast
    assert same and differ, (same, differ)
    with pytest.raises(ValueError, match="mixed"):
        ct_slice("normal", rng(0), 64, window="lung")


# --- data-set layouts ----------------------------------------------------------------------------


def files_under(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_lc25000_layout_matches_the_real_data_set(tmp_path):
    write_dataset("lc25000", tmp_path, 2, seed=3, size=64)
    expected = [f"lung_image_sets/{c}/{c.replace('_', '')}{i}.jpeg" for c in LC25000_CLASSES for i in (1, 2)]
    assert files_under(tmp_path) == sorted(expected)
    with Image.open(tmp_path / "lung_image_sets/lung_scc/lungscc2.jpeg") as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)


def test_items_depend_only_on_seed_class_and_index(tmp_path):
    write_dataset("lc25000", tmp_path / "a", 2, seed=3, size=48)
    write_dataset("lc25000", tmp_path / "b", 1, seed=3, size=48, classes=["lung_scc"])
    write_dataset("lc25000", tmp_path / "c", 1, seed=4, size=48, classes=["lung_scc"])
    name = "lung_image_sets/lung_scc/lungscc1.jpeg"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_mosmed_layout_and_nifti_header(tmp_path):
    write_dataset("mosmed", tmp_path / "a", 2, seed=4, in_plane=48, slices=(8, 10))
    assert files_under(tmp_path / "a") == ["CT-0/study_0001.nii.gz", "CT-0/study_0002.nii.gz",
                                           "CT-23/study_0001.nii.gz", "CT-23/study_0002.nii.gz"]
    img = nib.load(tmp_path / "a/CT-23/study_0002.nii.gz")
    data = np.asarray(img.dataobj)
    assert data.dtype == np.int16 and data.shape[:2] == (48, 48) and 8 <= data.shape[2] <= 10
    spacing = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(img.header.get_zooms(), spacing, rtol=1e-6)
    assert img.header.get_xyzt_units()[0] == "mm"
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
    # Class order and count do not change an item: the abnormal study 1 is the same file.
    write_dataset("mosmed", tmp_path / "b", 1, seed=4, in_plane=48, slices=(8, 10), classes=["abnormal"])
    name = "CT-23/study_0001.nii.gz"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_lc25000_accepts_its_classes_in_any_order(tmp_path):
    write_dataset("lc25000", tmp_path, 1, seed=3, size=48, classes=("lung_n", "lung_aca", "lung_scc"))
    assert files_under(tmp_path) == [f"lung_image_sets/{c}/{c.replace('_', '')}1.jpeg" for c in sorted(LC25000_CLASSES)]


def test_chest_ct_layout_matches_the_real_data_set(tmp_path):
    write_dataset("chest_ct", tmp_path, 10, seed=3, size=96)
    files = files_under(tmp_path)
    folders = {f.rsplit("/", 1)[0] for f in files}
    long_names = {"adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib", "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa",
                  "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa", "normal"}
    assert set(CHEST_FOLDERS.values()) == long_names
    assert folders == ({f"Data/train/{n}" for n in long_names} | {f"Data/valid/{n}" for n in long_names}
                       | {f"Data/test/{c}" for c in CHEST_CLASSES})
    per_folder = {folder: sum(f.startswith(folder + "/") for f in files) for folder in folders}
    # 10 per class split roughly like the real 613/72/315, and never fewer than two.
    assert all(n == 5 for f, n in per_folder.items() if f.startswith("Data/train")), per_folder
    assert all(n == 2 for f, n in per_folder.items() if f.startswith("Data/valid")), per_folder
    assert all(n == 3 for f, n in per_folder.items() if f.startswith("Data/test")), per_folder
    assert all(re.fullmatch(r"\d{6}\.(png|jpg)", f.rsplit("/", 1)[1]) for f in files)
    kinds, widths = set(), set()
    for f in files:
        with Image.open(tmp_path / f) as im:
            im.load()
            kinds.add((im.format, im.mode))
            widths.add(im.size[0])
            assert 0.85 * 96 - 1 <= im.size[0] <= 1.15 * 96 + 1 and 0.4 < im.size[1] / im.size[0] < 1.0, (f, im.size)
            assert im.format == ("JPEG" if f.endswith(".jpg") else "PNG")
    # Like the real files: RGBA, RGB and greyscale PNGs and a few JPEGs, of varying sizes.
    assert {("PNG", "RGBA"), ("PNG", "RGB"), ("PNG", "L"), ("JPEG", "RGB")} <= kinds, kinds
    assert len(widths) > 10


def test_chest_ct_split_counts_and_item_independence(tmp_path):
    write_dataset("chest_ct", tmp_path / "a", 8, seed=2, size=64, n_valid=2, n_test=2)
    write_dataset("chest_ct", tmp_path / "b", 8, seed=2, size=64, n_valid=2, n_test=2, classes=["normal"])
    a, b = files_under(tmp_path / "a"), files_under(tmp_path / "b")
    assert len(a) == 32 and len([f for f in a if f.startswith("Data/train/")]) == 16
    assert b == [f for f in a if "/normal/" in f]
    for f in b:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    with pytest.raises(ValueError, match="n_per_class >= 6"):
        write_dataset("chest_ct", tmp_path / "c", 5, seed=2, size=64)
    with pytest.raises(ValueError, match="adenocarcinoma"):
        write_dataset("chest_ct", tmp_path / "d", 6, seed=2, size=64, classes=["lung_aca"])
    with pytest.raises(ValueError, match="display window 'lung'.*generated_window"):
        write_dataset("chest_ct", tmp_path / "e", 6, seed=2, size=64, classes=["normal"], window="lung")
    assert not (tmp_path / "e").exists()


def test_ct_cancer_layout_matches_the_real_data_set(tmp_path):
    write_dataset("ct_cancer", tmp_path, 4, seed=1, size=64)
    files = files_under(tmp_path)
    base = "CT-Scan images/CT-Scan images/CT-Scan Images"
    assert {f.rsplit("/", 1)[0] for f in files} == {f"{base}/Cancerous", f"{base}/Non-Cancerous"}
    assert sum("/Cancerous/" in f for f in files) == sum("/Non-Cancerous/" in f for f in files) == 4
    for f in files:
        with Image.open(tmp_path / f) as im:
            im.load()
            assert im.mode in ("L", "RGB", "RGBA")


def test_unknown_kind_and_parameters_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="lc25000, mosmed"):
        write_dataset("chestxray", tmp_path, 1, seed=0)
    with pytest.raises(TypeError):
        write_dataset("lc25000", tmp_path, 1, seed=0, in_plane=64)


def test_interrupted_write_leaves_only_complete_files(tmp_path, monkeypatch):
    real_tile = writers.histology_tile
    calls = []

    def failing_tile(cls, generator, size=768):
        calls.append(cls)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_tile(cls, generator, size)

    monkeypatch.setattr(writers, "histology_tile", failing_tile)
    with pytest.raises(KeyboardInterrupt):
        write_dataset("lc25000", tmp_path, 3, seed=1, size=48)
    assert files_under(tmp_path) == ["lung_image_sets/lung_aca/lungaca1.jpeg"]
    with Image.open(tmp_path / "lung_image_sets/lung_aca/lungaca1.jpeg") as im:
        im.load()


# --- incoming folder -------------------------------------------------------------------------------


def test_write_incoming_makes_unlabelled_files_and_one_corrupt_scan(tmp_path):
    root = tmp_path / "incoming"
    paths = write_incoming(root, seed=5, n_tiles=3, n_volumes=1, tile_size=64, in_plane=48, slices=8)
    assert sorted(p.relative_to(root).as_posix() for p in paths) == files_under(root) == [
        "ct/broken_scan.nii.gz", "ct/scan_001.nii.gz", "slide_001.png", "slide_002.jpg", "slide_003.png"]
    for p in paths:
        assert not any(label in p.name for label in (*LC25000_CLASSES, *MOSMED_CLASSES, "aca", "scc"))
    for p in paths:
        if p.suffix in (".png", ".jpg"):
            with Image.open(p) as im:
                im.load()
                assert im.size == (64, 64)
    assert np.asarray(nib.load(root / "ct/scan_001.nii.gz").dataobj).shape == (48, 48, 8)
    with pytest.raises((EOFError, OSError, ValueError)):
        np.asarray(nib.load(root / "ct/broken_scan.nii.gz").dataobj)


def test_write_incoming_without_corrupt_file(tmp_path):
    paths = write_incoming(tmp_path, seed=6, n_tiles=1, n_volumes=0, corrupt=False, tile_size=48)
    assert [p.name for p in paths] == ["slide_001.png"]
