"""Export: ONNX parity with Keras, and versioned bundles with a LATEST pointer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lung_models import registry
from lung_models.bundle import latest_bundles, load_bundle
from lung_models.fileutil import current_umask


@pytest.mark.parametrize("name", registry.names())
def test_onnx_file_reproduces_the_saved_keras_model(factory, name):
    """Independently of the export's own parity record: run the bundle's ONNX file and its Keras
    checkpoint (with the temperature its card records) on the same inputs and compare."""
    from lung_models import export, scoring, training

    bundle = load_bundle(factory["bundles"][name])
    model = training.load_checkpoint(bundle.path / "model.keras")
    x = np.random.default_rng(0).random((3, *bundle.card["input"]["shape"][1:]), dtype=np.float32)
    if bundle.preprocessing.get("scale") == 1.0:
        x *= 255  # models that rescale inside take 0-255 pixels
    keras_probs = export.probability_function(model, registry.get(name).spec.output, x.shape[1:],
                                              bundle.card["calibration"]["temperature"])(x).numpy()
    onnx_probs = scoring.predict(scoring.open_model(bundle), x)
    assert np.isfinite(onnx_probs).all() and np.abs(onnx_probs - keras_probs).max() <= 1e-4
    np.testing.assert_allclose(onnx_probs.sum(axis=1), 1.0, atol=1e-5)


def test_parity_check_fails_on_nan_and_on_disagreement():
    from lung_models.export import check_parity

    class Session:
        def __init__(self, out):
            self.out = out

        def get_inputs(self):
            return [type("I", (), {"name": "input"})()]

        def run(self, _, feed):
            return [self.out]

    good = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)

    class Fn:
        def __call__(self, x):
            return type("T", (), {"numpy": lambda _self: good})()

    x = np.zeros((2, 4), dtype=np.float32)
    params = {"kind": "ct_volume"}
    assert check_parity(Fn(), Session(good), x, params)["passed"]
    assert not check_parity(Fn(), Session(np.full_like(good, np.nan)), x, params)["passed"]
    assert not check_parity(Fn(), Session(good[:, ::-1].copy()), x, params)["passed"]
    assert not check_parity(Fn(), Session(good + 2e-4), x, params)["passed"]


def _metrics(accuracy: float, low: float, supports: tuple[int, ...]) -> dict:
    n = sum(supports)
    return {"n": n, "accuracy": accuracy, "accuracy_ci95_wilson": [low, min(1.0, accuracy + 0.05)],
            "per_class": {f"c{i}": {"support": s} for i, s in enumerate(supports)}}


def test_a_second_export_is_a_new_version_and_latest_moves_only_past_the_gate(factory, tmp_path):
    from lung_models import export, training
    from lung_models.data.datasets import PreparedData

    src = Path(factory["bundles"]["lc25000-cnn"])
    exports = tmp_path / "exports"
    shutil.copytree(src.parent, exports / "lc25000-cnn")
    spec = registry.get("lc25000-cnn").spec
    data = PreparedData(Path(load_bundle(src).card["data"]["cache"]))
    model = training.load_checkpoint(src / "model.keras")
    said = []
    new = export.export_bundle(spec, model, test_x=data.arrays("test")[0], params=data.manifest["preprocessing"],
                               exports_root=exports, files={}, progress=said.append,
                               card_extra={"weights_init": "random", "metrics": _metrics(0.9, 0.85, (50, 30, 20))})
    assert new.name != src.name and (exports / "lc25000-cnn" / src.name / "model.onnx").is_file()
    assert latest_bundles(exports)["lc25000-cnn"].path == new and load_bundle(new).promoted
    assert any("promoted" in m and new.name in m for m in said)
    assert new.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # readable by the scoring service's group

    # Test accuracy whose 95% interval reaches chance (the share of the largest class, 0.6 here) is
    # exported, not promoted: LATEST stays, and the export says so.
    said.clear()
    weak = export.export_bundle(spec, model, test_x=data.arrays("test")[0], params=data.manifest["preprocessing"],
                                exports_root=exports, files={}, progress=said.append,
                                card_extra={"weights_init": "random", "metrics": _metrics(0.66, 0.58, (60, 20, 20))})
    card = load_bundle(weak).card
    assert not card["promotion"]["passed"] and "not better than chance 0.600" in card["promotion"]["reason"]
    assert latest_bundles(exports)["lc25000-cnn"].path == new
    assert latest_bundles(exports, include_unpromoted=True)["lc25000-cnn"].path == weak
    assert not load_bundle(weak).promoted
    assert any("NOT promoted" in m and "LATEST stays at " + new.name in m for m in said)

    # A failed parity check is loud and leaves no bundle behind.
    before = sorted(p.name for p in (exports / "lc25000-cnn").iterdir())
    original = export.PARITY_ATOL
    export.PARITY_ATOL = -1.0
    try:
        with pytest.raises(export.ParityError, match="bundle not written"):
            export.export_bundle(spec, model, test_x=data.arrays("test")[0],
                                 params=data.manifest["preprocessing"], exports_root=exports,
                                 card_extra={}, files={}, progress=lambda m: None)
    finally:
        export.PARITY_ATOL = original
    assert sorted(p.name for p in (exports / "lc25000-cnn").iterdir()) == before
