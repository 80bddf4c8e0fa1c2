"""Grad-CAM heat maps: they must point at the finding.

A small CNN learns cancerous from normal generated CT slices; on held-out cancerous slices it
flags, the heat map's peak must fall inside the tumour (dilated by 3 pixels) far more often than a
random point of the slice would. Where the tumour is comes from the phantom itself: a slice drawn
with the same seed as a normal slice differs from it only where the tumour was painted.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from lung_models import explain
from lung_models.data.phantoms.chest_slices import ct_slice

SIZE = 96
DILATE = 3


def _slice_and_tumour(seed: int, i: int, cancerous: bool) -> tuple[np.ndarray, np.ndarray | None]:
    normal = ct_slice("normal", np.random.default_rng([seed, i]), size=SIZE, window="wide")
    if not cancerous:
        return normal, None
    cancer = ct_slice("Cancerous", np.random.default_rng([seed, i]), size=SIZE, window="wide")
    return cancer, np.abs(cancer.astype(np.int16) - normal.astype(np.int16)) > 20


def _data(seed: int, n: int):
    xs, ys, masks = [], [], []
    for i in range(n):
        image, mask = _slice_and_tumour(seed, i, cancerous=bool(i % 2))
        xs.append(np.repeat(image[:, :, None], 3, axis=2).astype(np.float32))
        ys.append(int(i % 2))
        masks.append(mask)
    return np.stack(xs), np.array(ys), masks


def _small_cnn():
    import keras
    from keras import layers

    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1 / 255)(inputs)
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.Dropout(0.3)(layers.GlobalMaxPooling2D()(x))  # a finding anywhere in the slice
    return keras.Model(inputs, layers.Dense(2, activation="softmax")(x))


@pytest.fixture(scope="module")
def trained():
    import keras

    keras.utils.set_random_seed(5)
    x, y, _ = _data(seed=11, n=600)
    model = _small_cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=30, batch_size=32, verbose=0)
    return model


def test_the_last_convolutional_feature_map_is_found_inside_nested_models():
    import keras
    from keras import layers

    inner_in = keras.Input((16, 16, 3))
    block = layers.Activation("relu", name="block_out")(layers.Conv2D(4, 3, name="inner_conv")(
        layers.Conv2D(4, 3)(inner_in)))
    inner = keras.Model(inner_in, block, name="inner")
    outer_in = keras.Input((16, 16, 3))
    outer = keras.Model(outer_in, layers.Dense(2)(layers.GlobalAveragePooling2D()(inner(outer_in))))
    x = np.random.default_rng(0).random((1, 16, 16, 3)).astype("float32")
    cam, layer = explain.grad_cam_with_target(outer, x, 1)
    assert layer == "block_out"  # the block's output, after its activation, inside the nested model
    assert cam.shape == (16, 16) and 0 <= cam.min() and cam.max() <= 1
    assert not any("call" in vars(lay) for lay in inner.layers)  # every layer's own method again
    explain.grad_cam(outer, x + 1, 1)
    assert explain._functions[outer][("cam", 1)][0].experimental_get_tracing_count() == 1  # traced once, run twice
    flat_in = keras.Input((16, 16, 3))
    no_conv = keras.Model(flat_in, layers.Dense(2)(layers.Flatten()(flat_in)))
    for _ in range(2):  # the second time from what the first trace found, without tracing again
        with pytest.raises(explain.NoFeatureMap, match="no convolutional feature map"):
            explain.grad_cam(no_conv, x, 0)
    assert explain._functions[no_conv]["no_map"].startswith(no_conv.name)
    # The functions hold their model weakly: a model nobody holds goes, and its functions with it.
    import gc
    import weakref

    gone = weakref.ref(no_conv)
    del no_conv
    gc.collect()
    assert gone() is None


def test_a_model_whose_convolutions_are_inside_a_tf_hub_module_gets_a_smoothgrad_map(tmp_path):
    """ct-inception-hub as users run it: the module is a SavedModel called as one Keras layer, so no
    convolution is in sight. Its bundle carries a copy of the module (Keras' safe mode refuses to load
    a SavedModel from a path the model names); loaded from the bundle as the scorer does, with the
    training host's copy gone, it still gets a heat map, from the input's gradients, and says so."""
    import shutil
    from types import SimpleNamespace

    import keras
    from conftest import make_tiny_hub_module

    from lung_models import registry
    from lung_models.fileutil import sha256_file

    hub = make_tiny_hub_module(tmp_path / "module")
    model = registry.get("ct-inception-hub").build(input_shape=(64, 64, 3), weights=str(hub))
    bundle = SimpleNamespace(path=tmp_path / "bundle", name="ct-inception-hub", version="v1", card={})
    files = {"model.keras": tmp_path / "model.keras", **explain.hub_module_files(model)}
    assert "tfhub_module/saved_model.pb" in files
    model.save(files["model.keras"])
    for name, src in files.items():
        (bundle.path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, bundle.path / name)
    bundle.card["files"] = {name: {"sha256": sha256_file(bundle.path / name)} for name in files}
    shutil.rmtree(hub)  # the training host's module: a scoring host does not have it
    keras.backend.clear_session()
    explain.forget_models([])
    loaded = explain.keras_model(bundle)
    x = np.random.default_rng(1).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    with pytest.raises(explain.NoFeatureMap):
        explain.grad_cam(loaded, x, 1)
    cam, method = explain.heat_map(loaded, x, 1)
    assert method.startswith("SmoothGrad") and "opaque" in method
    assert cam.shape == (64, 64) and cam.max() == pytest.approx(1.0) and cam.min() >= 0
    again, _ = explain.heat_map(loaded, x, 1)
    np.testing.assert_array_equal(cam, again)  # the same scan, the same picture, night after night
    assert explain._functions[loaded][("input", 1)][0].experimental_get_tracing_count() == 1  # traced once

    def refused(match: str):
        explain.forget_models([])
        with pytest.raises(ValueError, match=match):
            explain.keras_model(bundle)

    # What the loader refuses before TensorFlow reads the module: a file changed, added or listed
    # outside the module's folder, and a bundle exported without its copy.
    card_files = dict(bundle.card["files"])
    pb = bundle.path / "tfhub_module" / "saved_model.pb"
    pb.write_bytes(pb.read_bytes() + b"\0")
    refused("changed after export")
    pb.write_bytes(pb.read_bytes()[:-1])
    (bundle.path / "tfhub_module" / "variables" / "extra.bin").write_bytes(b"graph?")
    refused("do not match the export's list")
    (bundle.path / "tfhub_module" / "variables" / "extra.bin").unlink()
    bundle.card["files"]["tfhub_module/../model.keras"] = card_files["model.keras"]
    refused("outside tfhub_module")
    bundle.card["files"] = {k: v for k, v in card_files.items() if not k.startswith("tfhub_module/")}
    shutil.rmtree(bundle.path / "tfhub_module")
    refused("re-export it")
    explain.forget_models([])


def test_the_heat_map_peak_falls_inside_the_tumour_far_more_often_than_chance(trained):
    """Both methods, on the same flagged slices: Grad-CAM (what every model with a visible convolution
    gets) and SmoothGrad (what a model with an opaque TF-Hub module gets instead)."""
    x, y, masks = _data(seed=23, n=160)
    probs = trained.predict(x, verbose=0)
    accuracy = float((probs.argmax(1) == y).mean())
    hits, chance = {"Grad-CAM": [], "SmoothGrad": []}, []
    for i in np.flatnonzero((y == 1) & (probs.argmax(1) == 1)):
        if masks[i].sum() < 4:  # a tumour the slice barely shows (cut at its edge): nothing to point at
            continue
        region = binary_dilation(masks[i], iterations=DILATE)
        for method, cam in (("Grad-CAM", explain.grad_cam(trained, x[i:i + 1], 1)),
                            ("SmoothGrad", explain.smooth_grad(trained, x[i:i + 1], 1))):
            hits[method].append(bool(region[np.unravel_index(int(np.argmax(cam)), cam.shape)]))
        chance.append(float(region.mean()))  # where a random point of the slice would land
    flagged, chance_rate = len(chance), float(np.mean(chance))
    rates = {method: float(np.mean(h)) for method, h in hits.items()}
    print(f"accuracy {accuracy:.3f}; peak inside the tumour (dilated {DILATE} px) in {flagged} flagged cancerous "
          "slices: " + ", ".join(f"{m} {sum(h)} = {rates[m]:.3f}" for m, h in hits.items())
          + f"; a random point: {chance_rate:.3f}")
    assert accuracy > 0.65 and flagged >= 20  # the model learnt the task, so there is something to explain
    for method, rate in rates.items():
        assert rate > 3 * chance_rate, method


def test_a_volume_is_shown_on_the_axial_slices_where_its_map_is_strongest():
    volume = np.zeros((1, 20, 20, 10, 1), np.float32)
    cam = np.zeros((20, 20, 10), np.float32)
    cam[5:8, 5:8, 7] = 1.0
    cam[5:8, 5:8, 2] = 0.5
    cam[:, :, 4] = 0.2
    picture = explain.render(volume, cam)
    assert picture.shape == (20, 3 * 20 + 2 * 4, 3)  # three slices with two gaps
    assert explain.heatmap_name("chest-cnn", "v1", "ward 3/scan #1.dcm", "ab" * 32) == \
        "heatmaps/chest-cnn/v1/ward_3_scan_1.dcm-abababababab.png"


def test_tensorflows_retracing_warning_is_dropped_for_the_heat_maps_functions_only(caplog):
    """One traced function per model and class is the design; TensorFlow's "excessive retracing"
    warning about them would only alarm an operator. Its warning about any other function stays."""
    import logging

    explain._quiet_own_traces()
    explain._quiet_own_traces()  # once is enough: no second filter
    logger = logging.getLogger("tensorflow")
    assert sum(isinstance(f, explain._OwnTracesFilter) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        logger.warning("5 out of the last 5 calls to <function _cam_function.<locals>.run at 0x1> triggered "
                       "tf.function retracing.")
        logger.warning("6 out of the last 6 calls to <function predict_step at 0x2> triggered tf.function retracing.")
    assert [r.getMessage()[:40] for r in caplog.records] == ["6 out of the last 6 calls to <function p"]
