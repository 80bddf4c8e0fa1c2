"""Held-out evaluation: metrics with honest intervals, and the plots that go beside an export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    from scipy.stats import binomtest

    if total == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(correct, total).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy (Wilson 95% CI), macro-F1, per-class precision/recall/specificity/F1, confusion matrix, ROC AUC."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y_true = np.asarray(y_true, dtype=int)
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    total = int(cm.sum())
    per_class = {}
    for i, name in enumerate(class_names):
        tn = total - cm[i, :].sum() - cm[:, i].sum() + cm[i, i]
        fp = cm[:, i].sum() - cm[i, i]
        per_class[name] = {
            "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
            "specificity": float(tn / (tn + fp)) if (tn + fp) else float("nan"),
            "support": int(support[i]),
        }
    correct = int(np.trace(cm))
    present = np.unique(y_true)
    auc: float | None
    try:
        if len(class_names) == 2:
            auc = float(roc_auc_score(y_true, probs[:, 1])) if len(present) == 2 else None
        else:
            auc = float(roc_auc_score(y_true, probs, multi_class="ovr", labels=labels))
    except ValueError:  # a class absent from the test split: AUC is undefined, say so
        auc = None
    low, high = wilson_interval(correct, total)
    return _finite_or_none({
        "n": total,
        "accuracy": correct / total if total else float("nan"),
        "accuracy_ci95_wilson": [low, high],
        # The unweighted mean of the per-class F1: a model that ignores a small class shows it here.
        "macro_f1": float(np.mean(f1)),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_axes": "rows = true class, columns = predicted class",
        "roc_auc": auc,
        "class_names": list(class_names),
    })


def _finite_or_none(obj: Any) -> Any:
    """NaN (an undefined metric) becomes None, which JSON can hold."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj


def plot_history(history: dict[str, list[float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def wrap_label(name: str, width: int = 14) -> str:
    """A class name broken into lines of at most ``width`` characters, at its dots, underscores,
    hyphens or spaces where it has them (``large.cell.carcinoma`` -> ``large.cell.`` / ``carcinoma``)."""
    import re
    import textwrap

    parts = re.findall(r"[^._\- ]+[._\- ]?", name) or [name]
    lines, line = [], ""
    for part in parts:
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    lines.append(line)
    return "\n".join(piece for line in lines for piece in textwrap.wrap(line.strip(), width) or [line])


def confusion_figure(cm: list[list[int]], class_names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.6 * len(class_names) + 2.5, 1.6 * len(class_names) + 2))
    labels = [wrap_label(c) for c in class_names]
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=labels).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    return fig


def save_figure(fig, path: Path) -> Path:
    """Saved with a tight bounding box: axis titles and long class labels are never cut off."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.2)
    plt.close(fig)
    return path


def plot_confusion(cm: list[list[int]], class_names: list[str], path: Path, title: str) -> Path:
    return save_figure(confusion_figure(cm, class_names, title), path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], path: Path, title: str) -> Path:
    """ROC curves on the test split: one class against the rest for each class (for two classes, the
    second one's), with each curve's AUC; a class absent from the split has no curve and says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true, dtype=int)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    for k in classes:
        positive = y_true == k
        if positive.all() or not positive.any():
            ax.plot([], [], " ", label=f"{class_names[k]}: no curve (one class only in the split)")
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        ax.plot(fpr, tpr, label=f"{class_names[k]} (AUC {roc_auc_score(positive, probs[:, k]):.3f})")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)
