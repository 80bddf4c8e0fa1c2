"""Data set layouts (prefix-mapped class folders, shipped splits) and pretrained-weight errors."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lung_models import registry
from lung_models.data import datasets
from lung_models.models import pretrained


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


def test_offline_tfhub_error_names_the_module_and_the_fix(monkeypatch):
    import tensorflow_hub as hub

    def offline(handle):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "resolve", offline)
    handle = registry.get("ct-inception-hub").spec.pretrained["handle"]
    with pytest.raises(pretrained.PretrainedWeightsError) as err:
        pretrained.resolve_tfhub(handle, "pretrained")
    assert handle in str(err.value) and "--weights" in str(err.value) and "TFHUB_CACHE_DIR" in str(err.value)
    assert pretrained.resolve_tfhub(handle, "random") is None


def test_offline_imagenet_error_names_the_file_and_where_it_goes():
    def ResNet50(weights=None, **kwargs):  # noqa: N802 - stands in for keras.applications.ResNet50
        raise Exception("URL fetch failure: network is unreachable")

    with pytest.raises(pretrained.PretrainedWeightsError) as err:
        pretrained.keras_application(ResNet50, "pretrained", include_top=False)
    message = str(err.value)
    assert "keras-applications/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert ".keras/models" in message
    with pytest.raises(pretrained.PretrainedWeightsError, match="not found"):
        pretrained.keras_application(ResNet50, "/no/such/weights.h5")


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
