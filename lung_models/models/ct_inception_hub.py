"""``ct-inception-hub``: TF-Hub InceptionV3 feature vector, fine-tuned, cancerous vs non-cancerous
lung CT slices (documented by "Lung CT-Scan images", Kaggle orvile/ct-scan-images).

Keras 3 cannot hold a ``hub.KerasLayer``; the module is loaded as a SavedModel with
``keras.layers.TFSMLayer`` instead (its variables trainable), which keeps one Keras for the whole
project. Augmentation, rescaling and the adapted Normalization live inside the model, so the
exported graph takes raw 0-255 RGB pixels and applies no augmentation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lung_models.data.catalog import CT_CANCER
from lung_models.models import tuned
from lung_models.models.pretrained import PRETRAINED, resolve_tfhub
from lung_models.registry import CT_SLICE, CT_SLICE_WINDOW, ModelSpec, TrainingRecipe, register

HANDLE = "https://www.kaggle.com/models/google/inception-v3/TensorFlow2/feature-vector/2"

SPEC = ModelSpec(
    name="ct-inception-hub",
    title="TF-Hub InceptionV3 feature vector, fine-tuned: cancerous vs non-cancerous CT slices",
    documented_by="Lung CT-Scan images (J. X. Chen, GitHub MyProjects)",
    modality=CT_SLICE,
    input_shape=(299, 299, 3),
    test_input_shape=(64, 64, 3),  # the tests fine-tune a tiny stand-in module that takes any size
    class_names=CT_CANCER.classes,
    output="logits",
    preprocessing={"kind": "rgb_image", "size": [299, 299], "scale": 1.0,
                   "layout": "NHWC, RGB 0-255 (the model rescales and normalises)", "ct_window": CT_SLICE_WINDOW},
    dataset=CT_CANCER,
    recipe=TrainingRecipe(
        epochs=1000, batch_size=16, loss="categorical_focal_crossentropy", optimizer="lion",
        learning_rate=1e-4, loss_options={"alpha": "balanced", "gamma": 2.0, "from_logits": True},
        early_stopping={"monitor": "val_loss", "patience": 10, "restore_best_weights": True},
        reduce_lr={"monitor": "val_accuracy", "patience": 1, "factor": 0.2, "min_lr": 1e-8},
        checkpoint_monitor="val_loss",
    ),
    # demo: the TF-Hub module cannot be had offline, so a smoke run of the chain at a small input.
    profiles={"demo": {"epochs": 1, "weights": "random", "generated_per_class": 40, "generated_size": 299,
                       "input_shape": (96, 96, 3), "smoke_run": True},
              # tuned (see lung_models.models.tuned): at most 60 epochs instead of "until early
              # stopping" (1000), patience 10; the documented focal loss already balances the classes,
              # and the fine-tuned module's BatchNorm rules out weight averaging.
              "tuned": {**tuned.CT_SLICE, **tuned.PIPELINE_AUGMENTS, "class_weight": None, "epochs": 60,
                        "selection": {**tuned.SELECTION, "patience": 10}}},
    documented_metrics={"test_accuracy": 1.0, "test_n": 33},
    pretrained={"kind": "tfhub", "handle": HANDLE},
)


@register(SPEC)
def build(spec: ModelSpec = SPEC, input_shape=None, weights: str = PRETRAINED, adapt_x: np.ndarray | None = None,
          in_model_augmentation: bool = True):
    import keras
    from keras import layers

    from lung_models.models.blocks import ChannelNormalization, HubFeatures, augmentation, rescale

    shape = tuple(input_shape or spec.input_shape)
    inputs = keras.Input(shape, name="image")
    x = rescale(inputs)
    if in_model_augmentation:  # off when the data pipeline augments instead (the tuned profile)
        x = augmentation(x, flip="horizontal_and_vertical", rotation=0.7, zoom=0.0, zoom_width=0.2)
    norm = ChannelNormalization(shape[-1], name="normalize")
    if adapt_x is not None:  # statistics of the training images, after rescaling, as documented
        norm.adapt(np.asarray(adapt_x, dtype="float32") / 255.0)
    x = norm(x)
    module = resolve_tfhub(spec.pretrained["handle"], weights)
    if module is None:
        # Random initialisation: the same InceptionV3 architecture, average-pooled to 2048 features.
        features = keras.applications.InceptionV3(include_top=False, weights=None, pooling="avg", input_shape=shape)
    else:
        features = HubFeatures(str(Path(module)), trainable=True, name="tfhub_inception_v3")
    x = features(x)
    x = layers.Dropout(0.4, name="dropout")(x)
    return keras.Model(inputs, layers.Dense(2, name="logits")(x), name="ct_inception_hub")
