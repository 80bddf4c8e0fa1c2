"""Calibration: temperature scaling fitted on validation, the expected calibration error and its
reliability table, and the exported graph applying the temperature."""

from __future__ import annotations

import numpy as np
import pytest

from lung_models import calibration


def test_the_expected_calibration_error_of_a_small_case_by_hand():
    # Two items at confidence 0.9 (one right), two at 0.6 (both right): bins (0.8667, 0.9333] and
    # (0.5333, 0.6]. ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.6| = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    table = calibration.reliability(probs, y, bins=15)
    assert table["ece"] == pytest.approx(0.4)
    filled = [b for b in table["bins"] if b["count"]]
    assert [(b["count"], b["accuracy"]) for b in filled] == [(2, 1.0), (2, 0.5)]
    assert filled[0]["confidence"] == pytest.approx(0.6) and filled[1]["confidence"] == pytest.approx(0.9)
    assert table["bins"][0]["accuracy"] is None  # an empty bin says so rather than 0


def test_scaling_keeps_every_prediction_and_a_temperature_of_one_changes_nothing():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=50)
    assert np.allclose(calibration.apply_temperature(probs, 1.0), probs)
    for t in (0.3, 2.0, 7.0):
        assert (calibration.apply_temperature(probs, t).argmax(1) == probs.argmax(1)).all()


def test_the_fitted_temperature_undoes_a_known_over_confidence():
    # Labels drawn from softmax(z); the "model" reports softmax(3 z): three times too sure.
    rng = np.random.default_rng(2)
    z = rng.normal(size=(4000, 3)) * 1.5
    truth = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in truth])
    over = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
    t, how = calibration.fit_temperature(over[:2000], y[:2000])
    assert how == "fitted" and t == pytest.approx(3.0, rel=0.15)
    record = calibration.calibrate(over[:2000], y[:2000], over[2000:], y[2000:])
    assert record["test"]["ece_after"] < record["test"]["ece_before"]


def test_an_over_confident_model_gets_a_lower_test_ece_and_the_same_accuracy(tmp_path):
    """A network that memorised a small noisy training set is sure of its mistakes; scaling fitted
    on a separate validation split lowers the test split's ECE and keeps its accuracy."""
    import keras

    from lung_models.export import probability_function

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)

    def draw(n):  # two classes that overlap: the best possible accuracy is about 80%
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 8, 8, 1)).astype("float32") + (y[:, None, None, None] * 2 - 1) * 0.12
        return x, y

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = draw(60), draw(400), draw(400)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(256, activation="relu"), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=150, batch_size=60, verbose=0)
    fn = probability_function(model, "softmax", (8, 8, 1))
    val, test = fn(x_val).numpy(), fn(x_test).numpy()
    record = calibration.calibrate(val, y_val, test, y_test)
    before, after = record["test"]["ece_before"], record["test"]["ece_after"]
    assert (fn(x_train).numpy().argmax(1) == y_train).mean() == 1.0  # memorised
    assert before > 0.1 and record["temperature"] > 1.5  # sure of its mistakes, so softened
    assert after < before
    assert record["test"]["accuracy_after"] == record["test"]["accuracy_before"]
    # What the exported graph computes is what the card's temperature says.
    scaled = probability_function(model, "softmax", (8, 8, 1), record["temperature"])(x_test).numpy()
    assert np.abs(scaled - calibration.apply_temperature(test, record["temperature"])).max() < 1e-5
    calibration.plot_reliability(record, tmp_path / "reliability.png", "memorised")
    assert (tmp_path / "reliability.png").stat().st_size > 10_000


def test_a_validation_split_with_no_mistakes_leaves_the_model_alone():
    # Every item right: the likelihood only grows as T falls, so an unguarded fit would run to the
    # range's floor and make the model certain of everything.
    probs = np.array([[0.8, 0.2]] * 20 + [[0.3, 0.7]] * 20)
    y = np.array([0] * 20 + [1] * 20)
    t, how = calibration.fit_temperature(probs, y)
    assert t == 1.0 and how.startswith("not fitted: every validation item is right")
    record = calibration.calibrate(probs, y, probs, y)
    assert not record["fitted"] and "T = 1 (not fitted" in calibration.summary(record)
    assert calibration.fit_temperature(probs[:0], y[:0]) == (1.0, "not fitted: no validation items")
    empty = calibration.calibrate(probs, y, probs[:0], y[:0])
    assert "n/a -> n/a" in calibration.summary(empty)  # an empty test split is said, not a crash
