"""The layers the families share."""

import numpy as np

from lung_models.models import blocks


def test_augmentation_is_off_at_inference_and_rescale_maps_pixels_to_the_unit_range():
    import keras

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, blocks.rescale(blocks.augmentation(inputs)))
    assert [layer.name for layer in model.layers[1:]] == ["augment_flip", "augment_rotation", "augment_zoom",
                                                          "rescale"]
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(pixels, training=False)), pixels / 255, rtol=1e-6)


def test_channel_normalization_takes_the_statistics_of_the_images_it_adapts_to():
    images = (np.random.default_rng(1).random((4, 6, 6, 3)) * [1.0, 2.0, 3.0] + [0.0, 1.0, 2.0]).astype("float32")
    layer = blocks.ChannelNormalization(3)
    layer.adapt(images)
    out = np.asarray(layer(images)).reshape(-1, 3)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-4)
    assert [w.name for w in layer.weights] == ["mean", "variance"]  # weights, so ONNX export folds them


def test_test_time_augmentation_averages_the_flipped_views_saves_and_exports(tmp_path):
    """The wrapper is the mean of the model over identity and the three flips; it survives a save
    and load, and its ONNX graph gives the same probabilities."""
    import keras

    from lung_models import export, preprocess, registry
    from lung_models.training import load_checkpoint

    entry = registry.get("lc25000-cnn")
    shape = entry.spec.test_input_shape
    params = entry.spec.preprocessing
    model = entry.build(entry.spec, input_shape=shape)
    pixels = np.random.default_rng(2).integers(0, 256, (3, *shape)).astype("uint8")
    x = preprocess.batch_stage(pixels, params)
    wrapped = blocks.with_test_time_augmentation(model, shape)
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    expected = np.mean([np.asarray(model(v, training=False)) for v in views], axis=0)
    np.testing.assert_allclose(np.asarray(wrapped(x)), expected, rtol=1e-5, atol=1e-6)
    wrapped.save(tmp_path / "tta.keras")
    keras.backend.clear_session()
    loaded = load_checkpoint(tmp_path / "tta.keras")
    np.testing.assert_allclose(np.asarray(loaded(x)), expected, rtol=1e-5, atol=1e-6)
    fn = export.probability_function(loaded, entry.spec.output, shape)
    export.convert(fn, tmp_path / "tta.onnx")
    parity = export.check_parity(fn, export.ort_session(tmp_path / "tta.onnx"), pixels, params)
    assert parity["passed"], parity
