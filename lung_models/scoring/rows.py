"""The report row: one schema for every CSV, one row per (scan, model).

The columns are a fixed set that does not grow with the number of models or classes, so a
downstream reader parses every night's CSV the same way. Per-class figures go into JSON cells
(``{"class": value}``), which pandas, a spreadsheet and ``json.loads`` all read.

A scan with several 2-D inputs (the axial slices of a volume or series, scored by a 2-D CT model)
gets one row: ``probabilities`` is the mean over its slices (the scan-level estimate, and
``predicted_class`` its largest), ``max_probabilities`` the largest per class over the slices and
``max_slice`` the slice where each class peaked (0 = the most inferior slice of a volume; for a
series that does not stack into a volume, the slice's place in file-name order), so a reader can
flag a scan where one slice is confidently abnormal although the mean is not. A single image or a
volume scored by the 3-D model has ``n_inputs`` 1 and the same values in both.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from lung_models.bundle import ModelBundle
from lung_models.fileutil import utc_now
from lung_models.scoring.items import Item

COLUMNS = ("relative_path", "file_sha256", "model", "model_version", "promoted", "predicted_class", "probability",
           "probabilities", "max_probabilities", "max_slice", "n_inputs", "status", "error", "precision",
           "provider", "scored_utc", "bundle_sha256", "item_kind", "series_uid_hash", "run_id", "heatmap")
REQUIRED_COLUMNS = ("relative_path", "file_sha256", "model", "model_version", "bundle_sha256", "status")
KEY_COLUMNS = ("relative_path", "file_sha256", "bundle_sha256", "model")
_LEGACY_PROB = "prob_"  # ledgers before the fixed schema held one prob_<class> column per class


def _json(values: dict[str, Any]) -> str:
    return json.dumps(values, separators=(",", ":"))


def result_row(bundle: ModelBundle, item: Item, *, provider: str = "", precision: str = "",
               onnx_sha256: str = "", **values: Any) -> dict[str, Any]:
    """One report row; ``values`` fill status, error and the prediction columns. ``onnx_sha256`` is the
    graph that ran (an int8 variant's), by default the bundle's fp32 graph. The ``item_kind`` column
    holds the item's file kind (image, nifti, dicom, dicom_series, refused)."""
    return {"relative_path": item.key, "file_sha256": item.sha256, "model": bundle.name,
            "model_version": bundle.version, "promoted": "yes" if bundle.promoted else "no",
            "bundle_sha256": onnx_sha256 or bundle.card["onnx_sha256"],
            "item_kind": item.file_kind, "series_uid_hash": item.series_uid_hash, "provider": provider,
            "precision": precision, "scored_utc": utc_now(), "predicted_class": "", "error": "", "heatmap": "",
            **values}


def prediction(class_names: list[str], probs: np.ndarray) -> dict[str, Any]:
    """The prediction columns of a scan from its inputs' probabilities (n_inputs, n_classes)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(class_names))
    mean, peak, where = probs.mean(axis=0), probs.max(axis=0), probs.argmax(axis=0)
    best = int(np.argmax(mean))
    return {"predicted_class": class_names[best], "probability": float(mean[best]),
            "probabilities": _json({c: round(float(v), 7) for c, v in zip(class_names, mean)}),
            "max_probabilities": _json({c: round(float(v), 7) for c, v in zip(class_names, peak)}),
            "max_slice": _json({c: int(v) for c, v in zip(class_names, where)}), "n_inputs": int(len(probs))}


def probabilities(row: dict[str, Any]) -> dict[str, float]:
    """The per-class (mean) probabilities of a row, {} when it has none."""
    cell = row.get("probabilities")
    return json.loads(cell) if isinstance(cell, str) and cell else {}


def upgrade(row: dict[str, Any]) -> dict[str, Any]:
    """A row stored by an older ledger (prob_<class> columns) in today's schema, so the cumulative CSV
    keeps one header across the upgrade."""
    legacy = {k[len(_LEGACY_PROB):]: v for k, v in row.items() if k.startswith(_LEGACY_PROB) and v != ""}
    if not legacy or "probabilities" in row:
        return row
    out = {k: v for k, v in row.items() if not k.startswith(_LEGACY_PROB)}
    out["probabilities"] = out["max_probabilities"] = _json({c: float(v) for c, v in legacy.items()})
    if row.get("predicted_class") in legacy:
        out["probability"] = float(legacy[row["predicted_class"]])
    out["n_inputs"] = 1
    return out
