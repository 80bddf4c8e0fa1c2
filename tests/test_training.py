"""Batch order and augmentation of the training loop (lung_models.training)."""

import dataclasses
import json

import numpy as np
import pytest

from lung_models import registry, training
from lung_models.data.datasets import PreparedData
from lung_models.training import make_batches, stratified_order

ANGLES = [-20, -10, -5, 5, 10, 20]


def _batches(y, x=None, **options):
    x = np.random.default_rng(0).random((len(y), 8, 8, 4, 1), dtype=np.float32) if x is None else x
    params = {"kind": "ct_volume"}
    settings = dict(batch_size=4, params=params, loss="binary_crossentropy", num_classes=2, shuffle=True,
                    augmentation=None, seed=3)
    settings.update(options)
    return x, make_batches(x, np.asarray(y), **settings)


@pytest.mark.parametrize("counts", [(22, 22), (10, 30)])
def test_stratified_order_gives_every_batch_the_classes_in_proportion(counts):
    y = np.repeat([0, 1], counts)
    rng = np.random.default_rng(7)
    orders = [stratified_order(y, rng) for _ in range(5)]
    per_batch = 4 * counts[1] // sum(counts)
    for order in orders:
        assert sorted(order) == list(range(len(y)))  # a permutation: every item once
        assert [int(y[order[i:i + 4]].sum()) for i in range(0, len(y) - 3, 4)] == [per_batch] * (len(y) // 4)
    assert len({tuple(o) for o in orders}) == 5  # reshuffled every time, not one fixed pattern


def test_balanced_batches_hold_both_classes_in_every_epoch():
    y = np.repeat([0, 1], 22)
    _, balanced = _batches(y, balanced=True)
    _, plain = _batches(y)
    for _ in range(3):
        assert [int(balanced[i][1].sum()) for i in range(len(balanced))] == [2] * 11
        balanced.on_epoch_end()
    # A plain shuffle of the same data does not: some of its batches are not half and half.
    mixes = []
    for _ in range(3):
        mixes += [int(plain[i][1].sum()) for i in range(len(plain))]
        plain.on_epoch_end()
    assert any(m != 2 for m in mixes), mixes


def test_uneven_classes_stay_close_to_their_share_all_along():
    # A class's running count stays within 1.5 items of its share of the items so far (a plain
    # shuffle of these labels strays 2.3-3 items with most seeds).
    y = np.repeat([0, 1, 2], [7, 13, 4])
    for seed in range(10):
        order = stratified_order(y, np.random.default_rng(seed))
        assert sorted(order) == list(range(len(y)))
        for cls, n in enumerate((7, 13, 4)):
            running = np.cumsum(y[order] == cls)
            share = np.arange(1, len(y) + 1) * n / len(y)
            assert np.all(np.abs(running - share) < 1.5), (seed, cls, running - share)


def test_stratified_order_refuses_one_hot_labels():
    with pytest.raises(ValueError, match="one integer label per item"):
        stratified_order(np.eye(2)[[0, 1, 1, 0]], np.random.default_rng(0))


def test_a_rotation_probability_outside_0_to_1_is_refused():
    with pytest.raises(ValueError, match="between 0 and 1"):
        _batches([0, 1], augmentation={"kind": "volume_rotation", "angles": ANGLES, "probability": 50})


def test_an_unknown_augmentation_kind_is_refused():
    with pytest.raises(ValueError, match="unknown augmentation kind 'volume_rotate'"):
        _batches([0, 1], augmentation={"kind": "volume_rotate", "angles": ANGLES})


@pytest.mark.parametrize("probability, rotated", [(None, "all"), (1.0, "all"), (0.0, "none"), (0.5, "some")])
def test_volume_rotation_applies_to_the_configured_share_of_volumes(probability, rotated):
    # No probability: every volume, as the documented recipe does; "probability" is our addition.
    y = np.repeat([0, 1], 20)
    x = np.zeros((40, 16, 16, 4, 1), np.float32)
    x[:, 4:12, 2:6] = 1.0  # an off-centre bar: any rotation moves it
    augmentation = {"kind": "volume_rotation", "angles": ANGLES}
    if probability is not None:
        augmentation["probability"] = probability
    _, batches = _batches(y, x=x, shuffle=False, augmentation=augmentation)
    changed = [not np.array_equal(v, x[0]) for i in range(len(batches)) for v in batches[i][0]]
    expected = {"all": lambda n: n == 40, "none": lambda n: n == 0, "some": lambda n: 10 <= n <= 30}
    assert expected[rotated](sum(changed)), sum(changed)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("balanced", [True, False])
def test_train_hands_the_recipes_batch_balance_to_the_training_batches(tmp_path, monkeypatch, balanced):
    for split in ("train", "val"):
        np.save(tmp_path / f"{split}_x.npy", np.zeros((4, 48, 48, 48, 1), np.float32))
        np.save(tmp_path / f"{split}_y.npy", np.array([0, 1, 0, 1]))
    (tmp_path / "manifest.json").write_text(json.dumps({"preprocessing": {"kind": "ct_volume"}}))
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("balanced", False))
        raise _Stop  # the batches are all this test needs; no fitting

    monkeypatch.setattr(training, "make_batches", spy)
    entry = registry.get("mosmed-3dcnn")
    recipe = entry.spec.recipe_for("demo", balanced_batches=balanced)
    with pytest.raises(_Stop):
        training.train(entry.spec, entry.build, PreparedData(tmp_path), recipe, tmp_path / "run",
                       input_shape=(48, 48, 48, 1))
    assert seen == [balanced]


def test_an_unknown_learning_rate_schedule_is_refused():
    recipe = registry.get("chest-cnn").spec.recipe
    with pytest.raises(ValueError, match="unknown lr_schedule kind 'cosine_decay'"):
        training.make_optimizer(dataclasses.replace(recipe, lr_schedule={"kind": "cosine_decay"}))


def test_pretrained_models_say_where_their_weights_come_from():
    from lung_models.training import weights_description

    hub = registry.get("ct-inception-hub").spec
    assert "RANDOM INITIALISATION" in weights_description(hub, hub.recipe_for("demo"))
    assert hub.pretrained["handle"] in weights_description(hub, hub.recipe_for("full"))
    cnn = registry.get("lc25000-cnn").spec
    assert weights_description(cnn, cnn.recipe_for("full")).startswith("random initialisation (trained from scratch")


def test_warmup_cosine_rises_to_the_learning_rate_then_decays_to_alpha_at_the_last_epoch():
    recipe = dataclasses.replace(registry.get("chest-cnn").spec.recipe, epochs=10, learning_rate=1e-3,
                                 lr_schedule={"kind": "warmup_cosine", "warmup_epochs": 2, "alpha": 0.01})
    lr = training.make_optimizer(recipe, steps_per_epoch=5)._learning_rate
    assert float(lr(0)) == pytest.approx(1e-4)
    assert float(lr(5)) == pytest.approx(5.5e-4)  # half-way through the warm-up
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(30)) < 1e-3 and float(lr(50)) == pytest.approx(1e-5)


def test_weight_averaging_spans_the_asked_number_of_epochs():
    recipe = dataclasses.replace(registry.get("chest-cnn").spec.recipe, weight_averaging={"over_epochs": 2.0})
    optimizer = training.make_optimizer(recipe, steps_per_epoch=25)
    assert optimizer.use_ema and optimizer.ema_momentum == pytest.approx(1 - 1 / 50)
    assert not training.make_optimizer(registry.get("chest-cnn").spec.recipe).use_ema


class _Model:
    def __init__(self):
        self.saved, self.stop_training, self.epoch = [], False, 0

    def save(self, path):
        self.saved.append(self.epoch)


def test_selection_keeps_the_best_run_of_epochs_not_one_lucky_epoch(tmp_path):
    said = []
    callback = training._SmoothedSelection(tmp_path / "best.keras", "val_loss", 3, 3, said.append)
    model = _Model()
    callback.set_model(model)
    callback.params = {"epochs": 20}
    # Epoch 3 is one lucky low value; epochs 6-8 are steadily good; then no better mean for 3 epochs.
    losses = [1.0, 0.9, 0.3, 0.9, 0.8, 0.5, 0.5, 0.5, 0.7, 0.8, 0.9, 0.2]
    for epoch, loss in enumerate(losses):
        if model.stop_training:
            break
        model.epoch = epoch + 1
        callback.on_epoch_end(epoch, {"val_loss": loss})
    # Means of the last three, from epoch 3 on: .733, .7, .667, .733, .6, .5 (epoch 8), .567, .667, .8.
    assert int(np.argmin(losses)) + 1 != 8 and int(np.argmin(losses[:11])) + 1 == 3  # the lucky single epoch
    assert model.saved == [3, 4, 5, 7, 8]  # nothing chosen before a full window of epochs
    assert model.stop_training and model.epoch == 11 and "last improved at epoch 8" in said[-1]
    assert callback.best_epoch == 8 and callback.best_mean == pytest.approx(0.5)


def test_selection_in_a_run_shorter_than_its_window_still_keeps_a_model(tmp_path):
    callback = training._SmoothedSelection(tmp_path / "best.keras", "val_loss", 3, 3, print)
    model = _Model()
    callback.set_model(model)
    callback.params = {"epochs": 2}
    for epoch, loss in enumerate([0.9, 0.8]):
        model.epoch = epoch + 1
        callback.on_epoch_end(epoch, {"val_loss": loss})
    assert model.saved == [2]


def test_balanced_class_weights_weigh_each_item_inversely_to_its_class_frequency():
    y = np.array([0] * 30 + [1] * 10)
    _, batches = _batches(y, x=np.zeros((40, 4, 4, 4, 1), np.float32), shuffle=False,
                          class_weights=training.balanced_class_weights(y, 2))
    weights = np.concatenate([batches[i][2] for i in range(len(batches))])
    labels = np.concatenate([batches[i][1][:, 0] for i in range(len(batches))])
    assert (weights * (labels == 0)).sum() == pytest.approx((weights * (labels == 1)).sum())  # equal total pull
    assert len(_batches(y)[1][0]) == 2  # without class weights: (inputs, labels) only


@pytest.mark.parametrize("name", registry.names())
def test_every_model_has_a_tuned_profile_that_keeps_its_layers_and_input(name):
    """The tuned profile changes how a model trains, never its architecture or input contract."""
    entry = registry.get(name)
    tuned = entry.spec.recipe_for("tuned")
    assert tuned.input_shape is None and not tuned.smoke_run  # the documented size
    assert set(tuned.build_options or {}) <= {"in_model_augmentation"}  # training-time only
    assert set(tuned.preprocessing or {}) <= {"colour"}  # size, scale, window: as documented
    assert tuned.selection and tuned.lr_schedule["kind"] == "warmup_cosine"
    if entry.spec.preprocessing.get("ct_window"):  # CT slices: grey, like DICOM
        assert tuned.preprocessing == {"colour": "grey"}


@pytest.mark.parametrize("min_steps, epochs", [(23, 5), (3, 2), (None, 2)])
def test_train_grows_the_epochs_to_the_recipes_minimum_of_steps(tmp_path, monkeypatch, min_steps, epochs):
    for split in ("train", "val"):
        np.save(tmp_path / f"{split}_x.npy", np.zeros((20, 64, 64, 3), np.uint8))
        np.save(tmp_path / f"{split}_y.npy", np.arange(20) % 2)
    (tmp_path / "manifest.json").write_text(json.dumps({"preprocessing": {"kind": "rgb_image", "scale": 1 / 255}}))
    seen = []

    def spy(recipe, steps_per_epoch=1):
        seen.append((recipe.epochs, steps_per_epoch))
        raise _Stop

    monkeypatch.setattr(training, "make_optimizer", spy)
    entry = registry.get("lc25000-cnn")
    recipe = dataclasses.replace(entry.spec.recipe_for("tuned"), epochs=2, batch_size=4, min_steps=min_steps)
    with pytest.raises(_Stop):
        training.train(entry.spec, entry.build, PreparedData(tmp_path), recipe, tmp_path / "run",
                       input_shape=(64, 64, 3))
    assert seen == [(epochs, 5)]  # 20 items in batches of 4: 5 steps an epoch


def test_the_epoch_callback_draws_bars_of_epochs_and_batches(monkeypatch):
    from lung_models import progress

    events, said = [], []
    monkeypatch.setattr(progress, "_sink", events.append)  # as in a model process: events to the parent
    callback = training._ProgressLog("tiny", 2, said.append)
    callback.params = {"steps": 3, "epochs": 2}
    callback.on_train_begin()
    for epoch in range(2):
        callback.on_epoch_begin(epoch)
        for batch in range(3):
            callback.on_train_batch_end(batch)
        callback.on_epoch_end(epoch, {"loss": 0.5})
    callback.on_train_end()
    callback.finish()  # again, as train() does after fit: nothing more is sent
    opened = sorted((e[3], e[4]) for e in events if e[1] == "open")  # (description, total)
    assert opened == [("tiny epoch 1", 3), ("tiny epoch 2", 3), ("tiny epochs", 2)]
    by_id = {e[2]: e[3] for e in events if e[1] == "open"}
    advanced: dict[str, int] = {}
    for e in events:
        if e[1] == "advance":
            advanced[by_id[e[2]]] = advanced.get(by_id[e[2]], 0) + e[3]
    assert advanced == {"tiny epochs": 2, "tiny epoch 1": 3, "tiny epoch 2": 3}
    assert sum(1 for e in events if e[1] == "close") == 3
    assert len(said) == 2 and said[0].startswith("tiny: epoch 1/2")
