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


def test_the_confusion_matrix_keeps_every_label_and_title_inside_the_picture(tmp_path):
    from PIL import Image

    from lung_models import evaluation

    names = ["adenocarcinoma", "large.cell.carcinoma", "normal", "squamous.cell.carcinoma",
             "a-very-long-class-name-without-any-break-at-all"]
    cm = [[5, 1, 0, 0, 0]] * 5
    fig = evaluation.confusion_figure(cm, names, "a model (test split)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.get_tightbbox(renderer)  # what save_figure keeps (inches)
    ax = fig.axes[0]
    texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]
    for text in texts:
        extent = text.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, text
    assert all(len(line) <= 14 for t in ax.get_xticklabels() for line in t.get_text().split("\n"))
    path = evaluation.save_figure(fig, tmp_path / "cm.png")
    assert Image.open(path).size[0] > 300


def test_roc_plot_has_a_curve_per_class_and_says_which_class_has_none(tmp_path):
    import numpy as np
    from PIL import Image

    from lung_models import evaluation

    rng = np.random.default_rng(0)
    y = np.array([0] * 20 + [1] * 20 + [2] * 20)
    probs = rng.dirichlet([1, 1, 1], size=60)
    probs[np.arange(60), y] += 1.0
    probs /= probs.sum(1, keepdims=True)
    path = evaluation.plot_roc(y, probs, ["lung_aca", "lung_scc", "lung_n"], tmp_path / "roc.png", "m")
    assert Image.open(path).size[0] > 300
    binary = evaluation.plot_roc(np.zeros(10, int), np.full((10, 2), 0.5), ["normal", "abnormal"],
                                 tmp_path / "roc2.png", "one class only")
    assert binary.is_file()
