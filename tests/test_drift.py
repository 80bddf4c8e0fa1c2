"""Drift watch: a night drawn like the training data is not flagged; a night of another display
window, of inverted contrast or of another modality is. The reference and the nights go through the
scorer's own preprocessing of a 2-D CT model; the "model" is a fixed random projection (its
confidence is a feature like any other, and the test needs no training)."""

from __future__ import annotations

import numpy as np
import pytest

from lung_models import drift, preprocess
from lung_models.data import dicom
from lung_models.data.phantoms.chest_slices import CHEST_CLASSES, ct_slice
from lung_models.data.phantoms.chest_volumes import ct_volume
from lung_models.data.phantoms.tiles import histology_tile

PARAMS = {"kind": "rgb_image", "size": [64, 64], "scale": 1.0}
CLASSES = list(CHEST_CLASSES)
WEIGHTS = np.random.default_rng(0).normal(size=(64 * 64 * 3, len(CLASSES))) / 400.0


def _input(grey_or_rgb: np.ndarray) -> np.ndarray:
    """What the scorer feeds the model: RGB, resized, batch-staged, as a batch of one."""
    rgb = grey_or_rgb if grey_or_rgb.ndim == 3 else np.repeat(grey_or_rgb[:, :, None], 3, axis=2)
    return preprocess.batch_stage(preprocess.resize_rgb(rgb.astype(np.uint8), tuple(PARAMS["size"]))[None], PARAMS)


def _model(x: np.ndarray) -> np.ndarray:
    z = (x.reshape(len(x), -1) / 255.0) @ WEIGHTS
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _slices(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [ct_slice(CLASSES[i % len(CLASSES)], rng, size=96, window="wide") for i in range(n)]


@pytest.fixture(scope="module")
def ref():
    train = [_input(s) for s in _slices(1, 240)]
    held_out = _model(np.concatenate([_input(s) for s in _slices(2, 80)]))
    return drift.reference(iter(train), held_out.max(axis=1), held_out.argmax(axis=1), CLASSES)


def _verdict(ref, images: list[np.ndarray]) -> dict:
    sample = drift.NightSample()
    for image in images:
        x = _input(image)
        sample.observe("chest-cnn", x, _model(x), CLASSES)
    return drift.compare(ref, drift.merge([sample.as_dict()])["chest-cnn"])


def test_a_night_drawn_like_the_training_data_is_not_flagged(ref):
    for seed in (3, 4, 5):  # three nights, none flagged
        verdict = _verdict(ref, _slices(seed, 40))
        assert verdict["status"] == "no drift", verdict["features"]


def test_another_window_inverted_contrast_or_another_modality_is_flagged(ref):
    like = _slices(6, 40)
    mediastinal = []  # the same chests exported with a soft-tissue window (level 40, width 400 HU)
    for k in range(4):
        volume, _ = ct_volume("normal", np.random.default_rng(100 + k), in_plane=96, slices=20)
        mediastinal += [dicom.window_to_uint8(volume[::-1, ::-1, z].T, 40, 400) for z in range(5, 15)]
    inverted = [255 - s for s in like]
    rng = np.random.default_rng(7)  # histology tiles, in grey: what another modality looks like to a CT model
    other = [histology_tile(["lung_n", "lung_aca", "lung_scc"][i % 3], rng, size=96).mean(axis=2) for i in range(40)]
    for name, night in (("mediastinal window", mediastinal), ("inverted", inverted), ("histology", other)):
        verdict = _verdict(ref, night)
        assert verdict["status"] == "drift" and verdict["flagged"], (name, verdict["features"])


def test_too_few_scans_or_no_reference_is_said_not_guessed(ref):
    assert _verdict(ref, _slices(8, drift.MIN_ITEMS - 1))["status"] == "too few inputs"
    assert drift.compare(None, {"n": 100})["status"] == "no reference"


def test_a_large_night_is_judged_on_a_sample_of_bounded_size(monkeypatch):
    monkeypatch.setattr(drift, "NIGHT_ITEMS", 50)
    sample = drift.NightSample()
    for i in range(60):  # a 2-D model's volume of two slices: each slice is an input, as in training
        sample.observe("m", np.full((2, 4, 4, 3), float(i)), np.array([[0.9, 0.1], [0.3, 0.7]]), ["normal", "x"])
    part = sample.as_dict()["m"]
    assert part["n"] == 120 and len(part["features"]["input_mean"]) == 50
    assert part["predicted"] == {"normal": 60, "x": 60} and set(part["features"]["confidence"]) == {0.9, 0.7}
    merged = drift.merge([sample.as_dict(), sample.as_dict()])
    assert merged["m"]["n"] == 240 and len(merged["m"]["features"]["confidence"]) == 100


def test_an_unreadable_reference_costs_its_model_only_and_drift_json_keeps_the_last_verdict(ref, tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / drift.REFERENCE_NAME).write_text(__import__("json").dumps(ref))
    (bad / drift.REFERENCE_NAME).write_text("{ truncated")
    pins = [{"model": "a", "version": "1", "bundle": str(good)}, {"model": "b", "version": "1", "bundle": str(bad)}]
    sample = drift.NightSample()
    for image in _slices(9, 30):
        x = _input(image)
        sample.observe("a", x, _model(x), CLASSES)
        sample.observe("b", x, _model(x), CLASSES)
    first = drift.night_report(pins, {}, "n0")  # a first run with nothing to judge still leaves drift.json
    drift.write(tmp_path / "out", first, "n0")
    assert (tmp_path / "out" / "drift.json").is_file()
    report = drift.night_report(pins, drift.merge([sample.as_dict()]), "n1")
    assert report["models"]["a"]["status"] == "no drift" and report["models"]["b"]["status"] == "error"
    drift.write(tmp_path / "out", report, "n1")
    trickle = drift.night_report(pins, {}, "n2")  # a later run with nothing new
    drift.write(tmp_path / "out", trickle, "n2")
    latest = __import__("json").loads((tmp_path / "out" / "drift.json").read_text())
    assert latest["night"] == "n1" and (tmp_path / "out" / "drift-n2.json").is_file()
