"""Data set layouts (prefix-mapped class folders, shipped splits), splits, duplicates and cached arrays."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lung_models import registry
from lung_models.data import datasets


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)


CHEST_TRAIN = ["adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib", "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa",
               "normal", "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa"]
CHEST_TEST = ["adenocarcinoma", "large.cell.carcinoma", "normal", "squamous.cell.carcinoma"]


def test_chest_folders_with_long_and_short_names_map_to_the_four_classes(tmp_path):
    spec = registry.get("chest-cnn").spec
    for split, folders in (("train", CHEST_TRAIN), ("valid", CHEST_TRAIN), ("test", CHEST_TEST)):
        for folder in folders:
            for i in range(3):
                _png(tmp_path / "Data" / split / folder / f"{i}.png")
    found = datasets.find_split_folders(tmp_path, spec.dataset, spec.class_names)
    assert {k: len(v) for k, v in found.items()} == {"train": 12, "val": 12, "test": 12}
    for items in found.values():
        assert sorted({spec.class_names[i.label] for i in items}) == sorted(spec.class_names)
        for item in items:  # every file landed in the class its folder names
            assert item.path.parent.name.startswith(spec.class_names[item.label])
    splits, note = datasets.assign_splits(found, spec.dataset.split)
    assert note == "the data set's own split folders" and len(splits["test"]) == 12


def test_a_class_folder_that_maps_to_no_class_is_an_error_naming_it(tmp_path):
    spec = registry.get("chest-cnn").spec
    for folder in CHEST_TRAIN:
        _png(tmp_path / "Data" / "train" / folder / "a.png")
    _png(tmp_path / "Data" / "train" / "small.cell.carcinoma" / "a.png")
    with pytest.raises(datasets.DatasetLayoutError, match="small.cell.carcinoma"):
        datasets.find_split_folders(tmp_path, spec.dataset, spec.class_names)


def test_the_real_chest_sample_without_a_test_folder_gets_one_carved_from_train(shared_data):
    spec = registry.get("chest-cnn").spec
    found = datasets.find_split_folders(shared_data / "chest-ct-4class", spec.dataset, spec.class_names)
    assert len(found["train"]) == 613 and len(found["val"]) == 72 and "test" not in found
    splits, note = datasets.assign_splits(found, spec.dataset.split)
    assert "carved from the train folder" in note
    assert len(splits["val"]) == 72 and len(splits["train"]) + len(splits["test"]) == 613
    assert {i.path for i in splits["train"]}.isdisjoint(i.path for i in splits["test"])
    assert len({i.label for i in splits["test"]}) == 4


def test_duplicate_images_never_span_splits_in_the_real_chest_sample(shared_data, tmp_path):
    spec = registry.get("chest-cnn").spec
    prepared = datasets.prepare(spec, shared_data / "chest-ct-4class", tmp_path, input_shape=(32, 32, 3))
    manifest = prepared.manifest
    hashes = [e["sha256"] for split in ("train", "val", "test") for e in manifest["splits"][split]]
    assert len(hashes) == len(set(hashes))  # the sample ships 100+ byte-identical copies
    assert len(manifest["duplicates_dropped"]) > 100
    assert any("same image under classes" in d["reason"] for d in manifest["duplicates_dropped"])


def test_a_profile_can_cap_files_per_class_and_an_explicit_cap_wins(tmp_path):
    """The chest demo caps its random-backbone models at 20 files a class per split (same data
    set as the CNN, so the splits agree); the CNN uses every file; --max-per-class overrides."""
    from tasks.data import preprocess_data

    rng = np.random.default_rng(0)
    for split, folders, n in (("train", CHEST_TRAIN, 45), ("valid", CHEST_TRAIN, 3), ("test", CHEST_TEST, 3)):
        for folder in folders:
            for i in range(n):
                path = tmp_path / "data" / "Data" / split / folder / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(path)
    assert registry.get("chest-resnet50").spec.recipe_for("demo").max_per_class == 20
    assert registry.get("chest-cnn").spec.recipe_for("demo").max_per_class is None

    def split_sizes(name, **kw):
        folder = preprocess_data.fn(name, str(tmp_path / "data"), str(tmp_path / "work"), input_shape=[32, 32, 3],
                                    **kw)
        return {k: len(v) for k, v in datasets.PreparedData(Path(folder)).manifest["splits"].items()}

    assert split_sizes("chest-resnet50", profile="demo") == {"train": 80, "val": 12, "test": 12}
    assert split_sizes("chest-cnn", profile="demo") == {"train": 180, "val": 12, "test": 12}
    assert split_sizes("chest-resnet50", profile="full") == {"train": 180, "val": 12, "test": 12}
    assert split_sizes("chest-resnet50", max_per_class=5, profile="demo") == {"train": 20, "val": 12, "test": 12}


def test_a_split_where_no_file_can_be_read_is_an_error_saying_why(tmp_path):
    """16-bit PNGs are refused one by one (each recorded); a split left with none says so, rather
    than failing inside numpy."""
    rng = np.random.default_rng(0)
    for split, folders in (("train", CHEST_TRAIN), ("valid", CHEST_TRAIN), ("test", CHEST_TEST)):
        for folder in folders:
            for i in range(2):
                path = tmp_path / "data" / "Data" / split / folder / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 4096, (40, 40), dtype=np.uint16)).save(path)
    spec = registry.get("chest-cnn").spec
    with pytest.raises(ValueError, match=r"none of the 8 train files .* could be read \(the first: 0.png: I;16"):
        datasets.prepare(spec, tmp_path / "data", tmp_path / "cache")


def test_generated_source_loads_into_the_documented_layout(tmp_path):
    from lung_models.data.sources import source_from_config

    spec = registry.get("lc25000-cnn").spec
    src = source_from_config("generated", {"kind": "lc25000", "n_per_class": 6, "seed": 1,
                                           "params": {"size": 64, "classes": list(spec.class_names)}})
    root = src.fetch(tmp_path)
    items = datasets.find_items(root, spec.dataset, spec.class_names)
    assert len(items) == 12 and {i.label for i in items} == {0, 1}
    prepared = datasets.prepare(spec, root, tmp_path / "cache", input_shape=(32, 32, 3))
    x, y = prepared.arrays("train")
    assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3) and len(x) == len(y)
    again = datasets.prepare(spec, root, tmp_path / "cache", input_shape=(32, 32, 3))
    assert again.folder == prepared.folder


def test_missing_class_folder_is_a_clear_error(tmp_path):
    spec = registry.get("lc25000-cnn").spec
    (tmp_path / "lung_aca").mkdir()
    with pytest.raises(datasets.DatasetLayoutError, match="lung_scc"):
        datasets.find_items(tmp_path, spec.dataset, spec.class_names)


def test_near_copies_of_a_training_image_are_dropped_from_later_splits(tmp_path):
    """A mirrored JPEG re-encode of a training slice in the test folder is the same picture: it is
    dropped from test (and named in the manifest); distinct slices stay."""
    spec = registry.get("chest-cnn").spec
    rng = np.random.default_rng(0)
    for split, folders in (("train", CHEST_TRAIN), ("valid", CHEST_TRAIN), ("test", CHEST_TEST)):
        for folder in folders:
            for i in range(3):
                path = tmp_path / split / folder / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).resize((80, 80)).save(path)
    original = tmp_path / "train" / CHEST_TRAIN[2] / "0.png"
    Image.open(original).transpose(Image.FLIP_LEFT_RIGHT).convert("RGB").save(
        tmp_path / "test" / "normal" / "copy.jpg", quality=85)
    prepared = datasets.prepare(spec, tmp_path, tmp_path / "cache", input_shape=(32, 32, 3))
    manifest = prepared.manifest
    (dropped,) = manifest["near_copies_dropped"]
    assert dropped["path"] == "test/normal/copy.jpg" and dropped["near_copy_of"] == "train/normal/0.png"
    assert dropped["split"] == "test" and dropped["correlation"] > 0.95
    assert {k: len(v) for k, v in manifest["splits"].items()} == {"train": 12, "val": 12, "test": 12}
