"""Drift watch: are tonight's scans like the ones the model was trained on?

At export a bundle stores ``drift_reference.json``: for every training item (at most
``REFERENCE_ITEMS``, drawn at random) four numbers of its model input (after the scorer's own
preprocessing): the mean, standard deviation, 5th and 95th percentile of its values (brightness,
contrast and window), and, on the validation and test items, the model's confidence (the
calibrated probability of its predicted class), with the predicted-class shares and a histogram of
the training inputs' values for the card.

Each night the scorer collects the same numbers for every input of a scan a model scored ``ok``
(each slice on its own when a 2-D model scores a volume, as the reference counts slices) and compares
them, feature by feature, with the reference by the two-sample Kolmogorov–Smirnov test. A feature
drifts when the difference is both significant (p below ``ALPHA`` divided by the number of
features: one family of tests per model) and large (the KS statistic, the largest gap between the
two cumulative distributions, at least ``MIN_STATISTIC``): a large night would otherwise be flagged
for differences too small to matter, and a small one for noise. A model drifts when any feature
does; with fewer than ``MIN_ITEMS`` inputs the night is "too few to judge".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_NAME = "drift_reference.json"
INPUT_FEATURES = ("input_mean", "input_std", "input_p05", "input_p95")
FEATURES = (*INPUT_FEATURES, "confidence")
TEST = "two-sample Kolmogorov-Smirnov"
ALPHA = 0.01
MIN_STATISTIC = 0.25
MIN_ITEMS = 20
REFERENCE_ITEMS = 2000
NIGHT_ITEMS = 5000  # per model and shard: a random subset beyond this (the test needs no more)
HISTOGRAM_BINS = 32


def input_features(inputs: np.ndarray) -> dict[str, float]:
    """The input features of one model input (a batch of one, batch-staged)."""
    values = np.asarray(inputs, dtype=np.float32).reshape(-1)
    p05, p95 = np.percentile(values, [5, 95])
    return {"input_mean": float(values.mean()), "input_std": float(values.std()), "input_p05": float(p05),
            "input_p95": float(p95)}


def reference_indices(n: int, seed: int = 0) -> np.ndarray:
    """Which of ``n`` training items the reference holds: all, or ``REFERENCE_ITEMS`` at random."""
    if n <= REFERENCE_ITEMS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, REFERENCE_ITEMS, replace=False))


def reference(inputs, confidences: np.ndarray, predicted: np.ndarray, class_names: list[str],
              seed: int = 0) -> dict[str, Any]:
    """The reference of a bundle: ``inputs`` yields the training items' model inputs one by one
    (each a batch of one; at most ``REFERENCE_ITEMS``, see ``reference_indices``), ``confidences``
    and ``predicted`` (class indices) are the model's calibrated outputs on held-out items."""
    rows, values = [], []
    rng = np.random.default_rng(seed)
    for x in inputs:
        rows.append(input_features(x))
        flat = np.asarray(x, dtype=np.float32).reshape(-1)
        values.append(rng.choice(flat, size=min(len(flat), 4096), replace=False))
    pooled = np.concatenate(values) if values else np.zeros(1, np.float32)
    counts, edges = np.histogram(pooled, bins=HISTOGRAM_BINS)
    confidences = np.asarray(confidences, dtype=np.float64)
    shares = np.bincount(np.asarray(predicted, dtype=int), minlength=len(class_names)) / max(1, len(predicted))
    return {
        "test": TEST, "alpha": ALPHA, "min_statistic": MIN_STATISTIC, "min_items": MIN_ITEMS,
        "n_inputs": len(rows), "n_outputs": int(len(confidences)),
        "samples": {**{f: [round(r[f], 6) for r in rows] for f in INPUT_FEATURES},
                    "confidence": [round(float(c), 6) for c in confidences]},
        "predicted_shares": {c: float(s) for c, s in zip(class_names, shares)},
        "input_histogram": {"edges": [float(e) for e in edges], "share": [float(c) for c in counts / counts.sum()]},
    }


def load_reference(bundle_path: str | Path) -> dict[str, Any] | None:
    path = Path(bundle_path) / REFERENCE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


class NightSample:
    """One shard's drift figures: per model, the features of each scan it scored ``ok``."""

    def __init__(self):
        self.values: dict[str, dict[str, list[float]]] = {}
        self.predicted: dict[str, dict[str, int]] = {}

    def observe(self, model: str, inputs: np.ndarray, probs: np.ndarray, class_names: list[str]) -> None:
        """One scan's model inputs (batch-staged) and their probabilities (one row per input). Each
        input counts on its own, as each training item did in the reference: a 2-D model's
        volume is its slices, each with its own confidence."""
        features = self.values.setdefault(model, {f: [] for f in FEATURES})
        shares = self.predicted.setdefault(model, {})
        probs = np.asarray(probs, dtype=np.float64).reshape(len(inputs), -1)
        for x, p in zip(inputs, probs):
            for name, value in {**input_features(x[np.newaxis]), "confidence": float(p.max())}.items():
                features[name].append(value)
            predicted = class_names[int(p.argmax())]
            shares[predicted] = shares.get(predicted, 0) + 1

    def as_dict(self, seed: int = 0) -> dict[str, Any]:
        """Small enough to return from a shard: at most ``NIGHT_ITEMS`` inputs per model, at random."""
        out = {}
        for model, features in self.values.items():
            n = len(features["confidence"])
            keep = np.arange(n) if n <= NIGHT_ITEMS else np.sort(np.random.default_rng(seed).choice(n, NIGHT_ITEMS,
                                                                                                  replace=False))
            out[model] = {"features": {f: [round(features[f][i], 6) for i in keep] for f in FEATURES},
                          "n": n, "predicted": self.predicted.get(model, {})}
        return out


def merge(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The night's figures from every shard's ``NightSample.as_dict``."""
    out: dict[str, Any] = {}
    for sample in samples:
        for model, part in (sample or {}).items():
            into = out.setdefault(model, {"features": {f: [] for f in FEATURES}, "n": 0, "predicted": {}})
            for f in FEATURES:
                into["features"][f].extend(part["features"][f])
            into["n"] += part["n"]
            for c, k in part["predicted"].items():
                into["predicted"][c] = into["predicted"].get(c, 0) + k
    return out


def compare(ref: dict[str, Any] | None, night: dict[str, Any] | None) -> dict[str, Any]:
    """A model's verdict for the night: per feature the KS statistic and p-value and whether it
    drifted; ``status`` drift, no drift, too few inputs, or no reference (an older bundle)."""
    from scipy.stats import ks_2samp

    n = int((night or {}).get("n", 0))  # model inputs: an image, a volume, or each slice of a 2-D model's volume
    if ref is None:
        return {"status": "no reference", "n": n, "flagged": False,
                "note": "bundle exported before drift references: re-export it to watch drift"}
    if n < ref.get("min_items", MIN_ITEMS):
        return {"status": "too few inputs", "n": n, "flagged": False,
                "note": f"{n} inputs scored ok; at least {ref.get('min_items', MIN_ITEMS)} are needed to judge"}
    alpha = ref.get("alpha", ALPHA) / len(FEATURES)
    rule = (f"a feature drifts when p < {ref.get('alpha', ALPHA)} / {len(FEATURES)} and the KS statistic >= "
            f"{ref.get('min_statistic', MIN_STATISTIC)}")
    features = {}
    for f in FEATURES:
        reference_values, tonight = ref["samples"].get(f) or [], night["features"][f]
        if not reference_values or not tonight:
            continue
        result = ks_2samp(reference_values, tonight)
        statistic, p = float(result.statistic), float(result.pvalue)
        features[f] = {"statistic": round(statistic, 4), "p_value": p,
                       "drift": bool(p < alpha and statistic >= ref.get("min_statistic", MIN_STATISTIC)),
                       "reference_median": float(np.median(reference_values)),
                       "night_median": float(np.median(tonight))}
    drifted = [f for f, r in features.items() if r["drift"]]
    return {"status": "drift" if drifted else "no drift", "flagged": bool(drifted), "n": n, "drifted": drifted,
            "features": features, "test": ref.get("test", TEST), "rule": rule, "alpha_per_feature": alpha,
            "min_statistic": ref.get("min_statistic", MIN_STATISTIC),
            "predicted_counts": night.get("predicted", {}), "reference_predicted_shares": ref.get("predicted_shares")}


def night_report(pins: list[dict[str, Any]], night: dict[str, Any], stamp: str) -> dict[str, Any]:
    """drift.json's content: every pinned model's verdict for the night."""
    models = {}
    for pin in pins:
        try:
            verdict = compare(load_reference(pin["bundle"]), night.get(pin["model"]))
        except Exception as exc:  # noqa: BLE001 - an unreadable reference costs its model's verdict, not the others'
            verdict = {"status": "error", "flagged": False, "n": int((night.get(pin["model"]) or {}).get("n", 0)),
                       "note": f"drift not judged: {type(exc).__name__}: {exc}"}
        models[pin["model"]] = {"version": pin["version"], **verdict}
    return {"night": stamp, "test": TEST, "rule": (f"by default a feature drifts when p < {ALPHA} / {len(FEATURES)} "
                                                   f"and the KS statistic >= {MIN_STATISTIC}, given at least "
                                                   f"{MIN_ITEMS} inputs (each model's own rule is in its verdict)"),
            "models": models}


def judged(report: dict[str, Any]) -> bool:
    """Whether a night's report holds a verdict (drift or no drift) for any model."""
    return any(v.get("status") in ("drift", "no drift") for v in report.get("models", {}).values())


def write(output_dir: str | Path, report: dict[str, Any], stamp: str) -> Path:
    """``drift-<stamp>.json`` (kept, one per run) and ``drift.json``: the latest run that judged a
    model (or the first run), so a run with too few inputs (a trickle, an empty folder) does not hide
    the last verdict."""
    from lung_models.fileutil import atomic_write_json

    out = Path(output_dir)
    path = out / f"drift-{stamp}.json"
    atomic_write_json(path, report)
    if judged(report) or not (out / "drift.json").exists():
        atomic_write_json(out / "drift.json", report)
    return path
