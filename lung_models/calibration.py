"""Calibration: temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML
2017) fitted on the validation split, and the expected calibration error with its reliability
diagram, measured on the test split before and after.

A model's probabilities ``p`` become ``softmax(log(p) / T)``: one number ``T`` for the whole model,
fitted by minimising the validation split's negative log-likelihood. ``T`` > 1 softens an
over-confident model, ``T`` < 1 sharpens an under-confident one; the arg-max, hence accuracy, never
changes. The exported graph applies ``T`` itself (``export.probability_function``), so the scorer's
probabilities are the calibrated ones and parity is checked on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

METHOD = "temperature scaling (Guo et al. 2017), fitted on the validation split by negative log-likelihood"
BINS = 15  # equal-width confidence bins of the expected calibration error
EPS = 1e-12  # probabilities are clipped here before their log (a saturated softmax gives exact zeros)
T_RANGE = (0.05, 20.0)


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` row by row: what the exported graph computes."""
    z = log_probabilities(probs) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(probs: np.ndarray, y: np.ndarray) -> float:
    y = np.asarray(y, dtype=int)
    return float(-log_probabilities(probs)[np.arange(len(y)), y].mean())


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """The ``T`` in ``T_RANGE`` that minimises the negative log-likelihood of ``y`` under the scaled
    probabilities (a bounded search over log T: the likelihood is smooth and has one minimum there),
    with how it was found. Left at 1: no validation items; every one right (the likelihood then only
    grows as T falls, and the search would run to its floor and make the model certain of
    everything); a fit no better than leaving the model alone. An optimum at the range's edge is
    kept and said (a model confidently wrong beyond what one temperature can soften)."""
    from scipy.optimize import minimize_scalar

    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=int)
    if len(y) == 0:
        return 1.0, "not fitted: no validation items"
    if (probs.argmax(axis=1) == y).all():
        return 1.0, "not fitted: every validation item is right, which says nothing of over-confidence"
    bounds = np.log(T_RANGE)
    found = minimize_scalar(lambda log_t: negative_log_likelihood(apply_temperature(probs, np.exp(log_t)), y),
                            bounds=tuple(bounds), method="bounded", options={"xatol": 1e-4})
    t = float(np.exp(found.x))
    if negative_log_likelihood(apply_temperature(probs, t), y) >= negative_log_likelihood(apply_temperature(probs, 1.0),
                                                                                          y):
        return 1.0, "not fitted: no temperature beats leaving the model alone"
    if min(abs(found.x - bounds[0]), abs(found.x - bounds[1])) < 0.01:
        return t, f"fitted, at the edge of the searched range {T_RANGE}: the model's confidence is far off"
    return t, "fitted"


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> dict[str, Any]:
    """The expected calibration error over ``bins`` equal-width bins of confidence (the top class's
    probability): the mean over items of |accuracy - confidence| of their bin, weighted by the bin's
    share of items. With every bin's count, mean confidence and accuracy (None for an empty bin)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    # Bin k holds confidences in (k/bins, (k+1)/bins]; a confidence of exactly 0 goes to the first.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    table, ece = [], 0.0
    for k in range(bins):
        mask = index == k
        n = int(mask.sum())
        conf = float(confidence[mask].mean()) if n else None
        acc = float(correct[mask].mean()) if n else None
        if n:
            ece += n / len(y) * abs(acc - conf)
        table.append({"lower": k / bins, "upper": (k + 1) / bins, "count": n, "confidence": conf, "accuracy": acc})
    return {"ece": float(ece) if len(y) else None, "n": int(len(y)), "bins": table}


def calibrate(val_probs: np.ndarray, val_y: np.ndarray, test_probs: np.ndarray, test_y: np.ndarray,
              bins: int = BINS) -> dict[str, Any]:
    """Fit ``T`` on validation; the card's calibration record with the test split's reliability
    before and after, and the accuracy both ways (equal: scaling keeps every arg-max)."""
    t, how = fit_temperature(val_probs, val_y)
    val_unscaled = apply_temperature(val_probs, 1.0)  # renormalised like every scaled one, so T = 1 compares equal
    before, after = reliability(test_probs, test_y, bins), reliability(apply_temperature(test_probs, t), test_y, bins)
    test_y = np.asarray(test_y, dtype=int)
    return {
        "method": METHOD, "temperature": t, "fitted": how.startswith("fitted"), "fit": how, "bins": bins,
        "fitted_on": {"split": "val", "n": int(len(val_y)),
                      "nll_before": negative_log_likelihood(val_unscaled, val_y) if len(val_y) else None,
                      "nll_after": negative_log_likelihood(apply_temperature(val_probs, t), val_y)
                      if len(val_y) else None},
        "test": {"n": int(len(test_y)), "ece_before": before["ece"], "ece_after": after["ece"],
                 "accuracy_before": float((np.asarray(test_probs).argmax(1) == test_y).mean()) if len(test_y) else None,
                 "accuracy_after": float((apply_temperature(test_probs, t).argmax(1) == test_y).mean())
                 if len(test_y) else None,
                 "bins_before": before["bins"], "bins_after": after["bins"]},
        "applied": "in the exported graph: the scorer's probabilities are the calibrated ones",
    }


def summary(record: dict[str, Any]) -> str:
    """One line for logs, the demo and the UI: T and the test ECE before and after."""
    test = record["test"]

    def ece(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    fit = f"T = {record['temperature']:.3f}" if record.get("fitted", True) else f"T = 1 ({record.get('fit')})"
    return (f"temperature scaling {fit}, fitted on {record['fitted_on']['n']} validation items; test expected "
            f"calibration error {ece(test['ece_before'])} -> {ece(test['ece_after'])} "
            f"({record['bins']} bins, n={test['n']})")


def plot_reliability(record: dict[str, Any], path: str | Path, title: str) -> None:
    """The reliability diagram of the test split: accuracy per confidence bin before and after
    scaling, against the diagonal of perfect calibration, with the bins' item counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lung_models.evaluation import save_figure

    test = record["test"]
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    width = 1.0 / record["bins"]
    for key, label, colour, shift in (("bins_before", "before", "tab:red", -0.2), ("bins_after", "after", "tab:blue",
                                                                                     0.2)):
        ece = test["ece_before" if key == "bins_before" else "ece_after"]
        filled = [b for b in test[key] if b["count"]]
        ax.bar([(b["lower"] + b["upper"]) / 2 + shift * width for b in filled], [b["accuracy"] for b in filled],
               width=width * 0.4, color=colour, alpha=0.8,
               label=f"{label} (ECE {ece:.3f})" if ece is not None else label)
        counts.bar([(b["lower"] + b["upper"]) / 2 + shift * width for b in filled], [b["count"] for b in filled],
                   width=width * 0.4, color=colour, alpha=0.8)
    ax.set_ylabel("accuracy in bin")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}\nT = {record['temperature']:.3f}{'' if record.get('fitted', True) else ' (not fitted)'}, "
                 f"test n = {test['n']}")
    ax.legend(loc="upper left", fontsize=8)
    counts.set_xlabel("confidence (probability of the predicted class)")
    counts.set_ylabel("items")
    counts.set_xlim(0, 1)
    save_figure(fig, path)
