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
