"""Layers and models of the families, and the Keras code they share. Only builders and
:func:`lung_models.training.load_checkpoint` import this module (not the registry), so listing the
models needs no TensorFlow.

Augmentation and rescaling live inside the models, so an exported graph (traced with
``training=False``, which turns the random layers off) takes raw 0-255 pixels and needs nothing
done to them outside. The custom layers are registered with Keras under the package name
``lung_models``, so checkpoints load by that name wherever the class lives.
"""

from __future__ import annotations

import contextvars
from typing import Any

import keras
import numpy as np


def augmentation(x, flip: str = "horizontal", rotation: float = 0.1, zoom: float = 0.1,
                 zoom_width: float | None = None):
    """Random flip, rotation and zoom (``keras.layers.RandomZoom(zoom, zoom_width)``), in that order;
    active only in training."""
    from keras import layers

    x = layers.RandomFlip(flip, name="augment_flip")(x)
    x = layers.RandomRotation(rotation, name="augment_rotation")(x)
    return layers.RandomZoom(zoom, zoom_width, name="augment_zoom")(x)


def rescale(x):
    """0-255 pixels to 0-1."""
    from keras import layers

    return layers.Rescaling(1 / 255, name="rescale")(x)


@keras.saving.register_keras_serializable(package="lung_models")
class ChannelNormalization(keras.layers.Layer):
    """``(x - mean) / sqrt(variance)`` per channel, with the statistics of the training images.

    Same arithmetic as an adapted ``keras.layers.Normalization``, but the statistics are layer
    weights (variables): Keras' own layer keeps them as captured constants, which tf2onnx turns
    into extra graph inputs instead of folding them into the ONNX file.
    """

    def __init__(self, channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.mean = self.add_weight(shape=(channels,), initializer="zeros", trainable=False, name="mean")
        self.variance = self.add_weight(shape=(channels,), initializer="ones", trainable=False, name="variance")

    def adapt(self, images: np.ndarray) -> None:
        flat = np.asarray(images, dtype="float64").reshape(-1, self.channels)
        self.mean.assign(flat.mean(axis=0).astype("float32"))
        self.variance.assign(flat.var(axis=0).astype("float32"))

    def call(self, inputs):
        return (inputs - self.mean) / keras.ops.sqrt(keras.ops.maximum(self.variance, 1e-7))

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


# The TF-Hub module folder a HubFeatures layer is rebuilt from while loading a bundle's model.keras
# (set by lung_models.explain around that load only).
VERIFIED_MODULE: contextvars.ContextVar[str | None] = contextvars.ContextVar("verified_hub_module", default=None)


@keras.saving.register_keras_serializable(package="lung_models")
class HubFeatures(keras.layers.TFSMLayer):
    """A TF-Hub image feature-vector module as a trainable Keras 3 layer.

    Uses the module's ``serving_default`` signature when it has one, else its ``__call__``, and
    renames the variables' paths: TF1-style names end in ``:0``, and Keras optimisers build slot
    variable names from the path, which may not contain ``:``.
    """

    def __init__(self, filepath: str, **kwargs):
        import tensorflow as tf

        endpoint = kwargs.pop("call_endpoint", None)
        if endpoint is None:
            endpoint = "serving_default" if "serving_default" in tf.saved_model.load(filepath).signatures \
                else "__call__"
        super().__init__(filepath, call_endpoint=endpoint, **kwargs)
        for variable in self.weights:
            variable._path = variable.path.replace(":", "_")

    @classmethod
    def from_config(cls, config, custom_objects=None, safe_mode=None):
        # Keras' safe mode refuses a SavedModel named by path; the heat maps' loader sets the bundle's
        # own copy of the module, checked against the export's hashes, and only then is it loaded.
        module = VERIFIED_MODULE.get()
        if module is not None:
            return cls(**{**config, "filepath": module})
        return super().from_config(config, custom_objects=custom_objects, safe_mode=safe_mode)

    def call(self, inputs, training=False, **kwargs):
        out = super().call(inputs, training=training, **kwargs)
        if isinstance(out, dict):  # a signature returns {name: tensor}
            (out,) = out.values()
        return out


@keras.saving.register_keras_serializable(package="lung_models")
class Flip(keras.layers.Layer):
    """Mirror a batch of images along rows (axis 1), columns (axis 2) or both: a view for
    test-time augmentation, active at inference too (unlike RandomFlip)."""

    def __init__(self, axes: tuple[int, ...] = (2,), **kwargs):
        super().__init__(**kwargs)
        self.axes = tuple(int(a) for a in axes)

    def call(self, inputs):
        for axis in self.axes:
            inputs = keras.ops.flip(inputs, axis=axis)
        return inputs

    def get_config(self):
        return {**super().get_config(), "axes": list(self.axes)}


# The views test-time augmentation averages over; tissue has no left or up, a chest has both.
TTA_VIEWS = {"flips": ((), (2,), (1,), (1, 2))}


def with_test_time_augmentation(model, input_shape: tuple[int, ...], views: str = "flips"):
    """``model`` applied to each view of its input (identity, left-right, up-down, both), its
    outputs averaged: one graph, so the exported ONNX file does the same at night."""
    from keras import layers

    inputs = keras.Input(tuple(input_shape), name="image")
    outputs = [model(Flip(axes, name=f"tta_flip_{'_'.join(map(str, axes))}")(inputs) if axes else inputs,
                     training=False) for axes in TTA_VIEWS[views]]
    return keras.Model(inputs, layers.Average(name="tta_average")(outputs), name=f"{model.name}_tta")


@keras.saving.register_keras_serializable(package="lung_models")
class LC25000CNN(keras.Model):
    """Conv 32/64/128 (3×3, ReLU) each with 2×2 max-pooling → Flatten → Dense 128 → Dropout →
    one sigmoid unit, P(squamous cell carcinoma)."""

    def __init__(self, input_shape: tuple[int, int, int] = (256, 256, 3), dropout: float = 0.2,
                 dense_units: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_shape_ = tuple(input_shape)
        self.dropout_rate = dropout
        self.dense_units = dense_units
        self.conv1 = keras.layers.Conv2D(32, 3, activation="relu")
        self.pool1 = keras.layers.MaxPooling2D()
        self.conv2 = keras.layers.Conv2D(64, 3, activation="relu")
        self.pool2 = keras.layers.MaxPooling2D()
        self.conv3 = keras.layers.Conv2D(128, 3, activation="relu")
        self.pool3 = keras.layers.MaxPooling2D()
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(dense_units, activation="relu")
        self.dropout = keras.layers.Dropout(dropout)
        self.out = keras.layers.Dense(1, activation="sigmoid")

    def call(self, inputs, training=False):
        x = self.pool1(self.conv1(inputs))
        x = self.pool2(self.conv2(x))
        x = self.pool3(self.conv3(x))
        x = self.dropout(self.dense(self.flatten(x)), training=training)
        return self.out(x)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(input_shape=list(self.input_shape_), dropout=self.dropout_rate,
                      dense_units=self.dense_units)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        return cls(**config)
