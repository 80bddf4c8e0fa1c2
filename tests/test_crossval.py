"""k-fold cross-validation of a recipe (lung_models.crossval)."""

import numpy as np
import pytest

from lung_models import registry
from lung_models.crossval import cross_validate, stratified_group_folds
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
