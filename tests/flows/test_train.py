"""The train flow's bundles (the session's factory): every registered model trained, evaluated and
exported, with its card, files and split manifest.

Models train for two epochs on small inputs (the architectures are the documented ones, only the
input size shrinks) so the suite stays fast; the demo and the benchmark scripts measure accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from lung_models import registry
from lung_models.bundle import LATEST, load_bundle
from lung_models.fileutil import sha256_file


@pytest.mark.parametrize("name", registry.names())
def test_model_trains_exports_and_onnx_matches_keras(factory, name):
    path = Path(factory["bundles"][name])
    bundle = load_bundle(path)
    for f in ("model.onnx", "model_card.json", "metrics.json", "split_manifest.json", "history.json",
              "training_curves.png", "confusion_matrix.png", "roc.png", "reliability.png", "model.keras"):
        assert (path / f).is_file(), f
    card = bundle.card
    # Every copied file's hash is recorded; a model calling a TF-Hub module carries the module itself
    # (the heat maps' loader never follows a path of the training host).
    assert all(card["files"][f]["sha256"] == sha256_file(path / f) for f in card["files"])
    bundled_module = sorted(f for f in card["files"] if f.startswith("tfhub_module/"))
    if name == "ct-inception-hub":
        assert "tfhub_module/saved_model.pb" in bundled_module
        assert len(bundled_module) == sum(1 for f in Path(factory["hub"]).rglob("*") if f.is_file())
        # The scorer's loader builds the model from that copy, in safe mode, and explains it by SmoothGrad.
        from lung_models import explain

        x = np.full((1, *card["input"]["shape"][1:]), 128, "float32")
        cam, method = explain.heat_map(explain.keras_model(bundle), x, 1)
        assert method.startswith("SmoothGrad") and cam.shape == x.shape[1:3]
    else:
        assert not bundled_module
    assert card["parity"]["passed"] and card["parity"]["max_abs_diff"] <= 1e-4
    assert card["parity"]["class_mismatches"] == 0 and card["parity"]["items"] == card["metrics"]["n"] > 0
    assert card["onnx_sha256"] == sha256_file(path / "model.onnx")
    assert card["model"]["class_names"] == list(registry.get(name).spec.class_names)
    assert card["training"]["device"] in ("CPU",) or card["training"]["device"].startswith("GPU")
    assert card["data"]["provenance"]["kind"] == "local"
    assert card["input"]["shape"][1:] == list(registry.get(name).spec.test_input_shape)
    metrics = card["metrics"]
    assert 0 <= metrics["accuracy_ci95_wilson"][0] <= metrics["accuracy"] <= metrics["accuracy_ci95_wilson"][1]
    assert set(metrics["per_class"]) == set(card["model"]["class_names"])
    assert (path.parent / LATEST).read_text().strip() == path.name
    # What a reader of the card needs besides the numbers: the data's citation, the code, the intended use.
    assert card["model"]["dataset_citation"] == registry.get(name).spec.dataset.citation != ""
    assert "not for clinical" in card["intended_use"]
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert card["code"]["commit"].split("+")[0] == head.stdout.strip() != ""
    # The export promoted the bundle exactly when its gate, recomputed here from the card, passed.
    from lung_models import promotion

    verdict = promotion.gate(metrics, card["parity"])
    assert card["promotion"] == verdict
    assert factory["promoted_at_export"][name] == (path.name if verdict["passed"] else None)
    chance = max(c["support"] for c in metrics["per_class"].values()) / metrics["n"]
    assert verdict["passed"] == (metrics["accuracy_ci95_wilson"][0] > chance)
    # Calibration: fitted on validation, measured on test; the graph the scorer runs outputs the
    # calibrated probabilities of the Keras model.
    calibrated = card["calibration"]
    assert calibrated["fitted_on"]["split"] == "val" and calibrated["bins"] == 15
    assert 0.05 <= calibrated["temperature"] <= 20
    assert calibrated["fitted_on"]["nll_after"] <= calibrated["fitted_on"]["nll_before"] + 1e-9
    test = calibrated["test"]
    assert test["n"] == metrics["n"] and test["accuracy_after"] == test["accuracy_before"] == metrics["accuracy"]
    assert sum(b["count"] for b in test["bins_after"]) == test["n"] and 0 <= test["ece_after"] <= 1
    from lung_models import calibration, preprocess, training
    from lung_models.data.datasets import PreparedData
    from lung_models.export import ort_session, probability_function

    x, _ = PreparedData(Path(card["data"]["cache"])).arrays("test")
    batch = preprocess.batch_stage(x[:4], card["preprocessing"])
    keras_probs = probability_function(training.load_checkpoint(path / "model.keras"), registry.get(name).spec.output,
                                       tuple(batch.shape[1:]))(batch).numpy()
    session = ort_session(path / "model.onnx")
    scored = session.run(None, {session.get_inputs()[0].name: batch})[0]
    assert np.abs(scored - calibration.apply_temperature(keras_probs, calibrated["temperature"])).max() < 1e-4
    props = {p.key: p.value for p in onnx.load(str(path / "model.onnx")).metadata_props}
    assert props["model_name"] == name and props["version"] == card["version"]
    assert json.loads(props["class_names"]) == card["model"]["class_names"]
    assert json.loads(props["preprocessing"]) == card["preprocessing"]


@pytest.mark.parametrize("name", registry.names())
def test_split_manifest_has_disjoint_splits(factory, name):
    manifest = json.loads((Path(factory["bundles"][name]) / "split_manifest.json").read_text())
    seen = [e["sha256"] for split in ("train", "val", "test") for e in manifest["splits"][split]]
    assert len(seen) == len(set(seen)) > 0
