import numpy as np
import pytest

from lung_models.evaluation import classification_metrics, wilson_interval


def two_class(p1):
    return np.stack([1 - np.asarray(p1, dtype=float), np.asarray(p1, dtype=float)], axis=1)


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)


def test_binary_metrics_from_a_known_confusion_matrix():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p1 = np.array([.1, .2, .6, .3, .9, .8, .4, .7, .95, .85])  # one FP, one FN
    m = classification_metrics(y, two_class(p1), ["a", "b"])
    assert m["confusion_matrix"] == [[3, 1], [1, 5]]
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["per_class"]["b"]["recall"] == pytest.approx(5 / 6)
    assert m["per_class"]["b"]["specificity"] == pytest.approx(3 / 4)
    assert m["per_class"]["b"]["precision"] == pytest.approx(5 / 6)
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.75)
    assert m["roc_auc"] == pytest.approx(23 / 24)


def test_auc_is_none_when_a_class_is_missing():
    m = classification_metrics(np.array([1, 1]), two_class([.9, .2]), ["a", "b"])
    assert m["roc_auc"] is None and m["accuracy"] == 0.5
