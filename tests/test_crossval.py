"""k-fold cross-validation of a recipe (lung_models.crossval)."""

import numpy as np
import pytest

from lung_models import registry
from lung_models.crossval import cross_validate, fold_plan, near_copy_groups, stratified_group_folds
from lung_models.data import phantoms
from lung_models.data.datasets import prepare


def test_folds_are_stratified_and_keep_every_copy_of_an_image_together():
    y = np.repeat([0, 1, 2], [30, 20, 10])
    groups = [f"img{i // 2}" for i in range(60)]  # every image twice, as copies
    folds = stratified_group_folds(y, groups, 5, seed=1)
    held = np.concatenate(folds)
    assert sorted(held) == list(range(60))  # every item held out exactly once
    for fold in folds:
        assert {groups[i] for i in fold}.isdisjoint({groups[i] for i in set(range(60)) - set(fold)})
        assert np.bincount(y[fold], minlength=3).tolist() == [6, 4, 2]


def test_too_few_items_of_a_class_for_k_folds_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="smallest class has 2: use fewer folds"):
        stratified_group_folds(np.array([0] * 10 + [1] * 2), [str(i) for i in range(12)], 3, seed=1)


def test_models_built_from_others_are_not_cross_validated(tmp_path):
    entry = registry.get("chest-ensemble")
    with pytest.raises(ValueError, match="cross-validate them instead"):
        cross_validate(entry.spec, entry.build, None, entry.spec.recipe, tmp_path)


def test_cross_validation_holds_out_each_fold_once_and_reports_mean_and_spread(tmp_path):
    entry = registry.get("lc25000-cnn")
    phantoms.write_dataset("lc25000", tmp_path / "data", 12, seed=3, size=96, classes=["lung_aca", "lung_scc"])
    shape = entry.spec.test_input_shape
    data = prepare(entry.spec, tmp_path / "data", tmp_path / "cache", input_shape=shape)
    recipe = entry.spec.recipe_for("tuned", epochs=1, batch_size=8)
    summary = cross_validate(entry.spec, entry.build, data, recipe, tmp_path / "cv", folds=3, input_shape=shape)
    pooled = sum(len(data.arrays(s)[1]) for s in ("train", "val"))
    assert summary["n"] == pooled and sum(f["n_held_out"] for f in summary["per_fold"]) == pooled
    accuracies = [f["accuracy"] for f in summary["per_fold"]]
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert summary["accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert all(0 <= f["macro_f1"] <= 1 for f in summary["per_fold"])
    assert not list((tmp_path / "cv").glob("fold-*"))  # fold arrays and checkpoints are not kept
    assert (tmp_path / "cv" / "crossval.json").is_file()


def test_every_fold_keeps_train_inner_validation_and_held_out_apart_and_groups_whole():
    y = np.repeat([0, 1, 2], [40, 30, 20])
    groups = [f"scan{i // 3}" for i in range(90)]  # three near-copies of each slice
    plan = fold_plan(y, groups, 4, seed=5)
    assert sorted(np.concatenate([held for _, _, held in plan])) == list(range(90))
    for train, val, held in plan:
        parts = [set(train), set(val), set(held)]
        assert sum(map(len, parts)) == 90 and len(set.union(*parts)) == 90  # disjoint, complete
        names = [{groups[i] for i in p} for p in parts]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
        assert len(val) and set(y[val]) == {0, 1, 2}


def test_near_copies_share_a_group_and_different_images_do_not():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)
    images[1] = images[0][:, ::-1]  # a mirrored copy
    images[2] = np.clip(images[0].astype(int) + rng.integers(-6, 7, images[0].shape), 0, 255)  # re-encoded
    images[3] = np.rot90(images[4])  # a turned copy
    groups = near_copy_groups(images, {"kind": "rgb_image"}, ["a", "b", "c", "d", "e", "f"])
    assert groups[0] == groups[1] == groups[2] and groups[3] == groups[4]
    assert len({groups[0], groups[3], groups[5]}) == 3
    # Exact copies (same sha256) share a group whatever their pixels; volumes group by hash only.
    assert near_copy_groups(images[[0, 5]], {"kind": "rgb_image"}, ["x", "x"]) == ["x", "x"]
    assert near_copy_groups(images, {"kind": "ct_volume"}, list("abcdef")) == list("abcdef")
