"""Chest CT, four classes (documented by "Medical Image Classification with CNNs: pre-trained and
custom models evaluated individually, as an ensemble, and chained"):

- ``chest-resnet50``: frozen ImageNet ResNet50 (max pooling) → BatchNorm → Dense 256 → Dropout 0.25
  → Dense 4 softmax;
- ``chest-cnn``: a custom CNN;
- ``chest-ensemble``: both trained submodels in one graph, combined either by the plain average
  of their probabilities or by a trained Dense(4) on that average, whichever is better on
  validation: the write-up trains only the combiner, and a combiner trained on a few hundred
  slices can collapse onto one class, which the plain average cannot;
- ``chest-chained``: ResNet50 branch without its output layer → Dense → Dropout → Dense 4,
  trained end to end.

Both submodels take raw 0-255 pixels and augment (flip, rotation, zoom) before rescaling, inside
the model, so the exported graph (traced with ``training=False``) needs no rescaling outside.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lung_models.data.catalog import CHEST_CT
from lung_models.models import tuned
from lung_models.models.pretrained import PRETRAINED, keras_application
from lung_models.registry import CT_SLICE, CT_SLICE_WINDOW, ModelSpec, TrainingRecipe, register

PREPROCESSING = {"kind": "rgb_image", "size": [224, 224], "scale": 1.0,
                 "layout": "NHWC, RGB 0-255 (the model rescales)", "ct_window": CT_SLICE_WINDOW}
RECIPE = TrainingRecipe(
    # The write-up does not give epochs or callback settings; both submodels used the same ones.
    epochs=30, batch_size=32, loss="sparse_categorical_crossentropy", optimizer="adam", learning_rate=1e-3,
    early_stopping={"monitor": "val_loss", "patience": 5, "restore_best_weights": True},
    checkpoint_monitor="val_loss",
)
# All four share one generated data set (400 slices a class: 300 train, 40 valid, 60 test), so no
# model's test slice is another's training slice (the ensemble scores the CNN's test split). The
# slices are exported with one display window, the wide preset most of the Kaggle PNGs use and the
# one the scorer applies to DICOM slices (CT_SLICE_WINDOW): a network learning from scratch in a
# demo's minutes needs one consistent contrast; generated data for the full profile keep the
# Kaggle mix of windows. The family trains at 128 px in the demo (one size for all four: the
# ensemble holds two of them in one graph).
DEMO_DATA = {"weights": "random", "generated_per_class": 400, "generated_size": 256,
             "generated_n_valid": 40, "generated_n_test": 60, "generated_window": "wide",
             "input_shape": (128, 128, 3)}
# The custom CNN, in batches of 16 (twice the recipe's updates per epoch: it learns from scratch).
DEMO = {**DEMO_DATA, "epochs": 20, "batch_size": 16,
        "early_stopping": {"monitor": "val_loss", "patience": 10, "restore_best_weights": True}}
# Frozen random backbones cannot learn (no ImageNet weights offline): a smoke run on 20 files a
# class per split shows the chain runs end to end.
DEMO_RANDOM_BACKBONE = {**DEMO_DATA, "epochs": 1, "max_per_class": 20, "smoke_run": True}
# The ensemble's trainable part (its combiner, and the choice of combination) learns from the
# trained chest-cnn, on enough test slices (30 a class) to show it.
DEMO_ENSEMBLE = {**DEMO_DATA, "epochs": 2, "max_per_class": 30}
RESNET = {"kind": "keras_applications", "weights": "imagenet", "model": "ResNet50"}
# tuned (see lung_models.models.tuned): the documented epochs, batch and learning rate, trained the
# careful way, with weight averaging (the heads' BatchNorm sees only the frozen backbone's output,
# whose statistics the trained weights do not change).
TUNED = {**tuned.CT_SLICE, **tuned.PIPELINE_AUGMENTS, "weight_averaging": tuned.AVERAGING}
# The custom CNN learns from scratch: batches of 16 (twice the updates per epoch) over 40 epochs,
# the last ones at a small learning rate, and weight averaging (it has no BatchNorm).
TUNED_CNN = {**TUNED, "epochs": 40, "batch_size": 16, "weight_averaging": tuned.AVERAGING,
             "selection": {**tuned.SELECTION, "patience": 10}}
# The ensemble trains only its combiner (no builder options); it must see its inputs as its
# submodels did (in grey).
TUNED_ENSEMBLE = {**tuned.CT_SLICE, "weight_averaging": tuned.AVERAGING}


def _spec(name: str, title: str, documented: float, demo: dict[str, Any] = DEMO_RANDOM_BACKBONE,
          tuned_profile: dict[str, Any] = TUNED, **extra: Any) -> ModelSpec:
    return ModelSpec(
        name=name, title=title,
        documented_by="Medical Image Classification with CNNs: pre-trained and custom models "
                      "evaluated individually, as an ensemble, and chained",
        modality=CT_SLICE, input_shape=(224, 224, 3), class_names=CHEST_CT.classes, output="softmax",
        # The CNN's five conv/pool blocks need 94 pixels a side; the family shares one size because
        # the ensemble holds both submodels.
        test_input_shape=(96, 96, 3),
        preprocessing=PREPROCESSING, dataset=CHEST_CT, recipe=RECIPE,
        profiles={"demo": dict(demo), "tuned": dict(tuned_profile)},
        documented_metrics={"test_accuracy": documented}, **extra)


RESNET_SPEC = _spec("chest-resnet50", "Frozen ResNet50 + dense head, chest CT 4 classes", 0.514, pretrained=RESNET)
CNN_SPEC = _spec("chest-cnn", "Custom CNN, chest CT 4 classes", 0.470, demo=DEMO, tuned_profile=TUNED_CNN)
ENSEMBLE_SPEC = _spec("chest-ensemble", "Ensemble of chest-resnet50 and chest-cnn", 0.235, demo=DEMO_ENSEMBLE,
                      tuned_profile=TUNED_ENSEMBLE,
                      depends_on=("chest-resnet50", "chest-cnn"), pretrained=RESNET)
CHAINED_SPEC = _spec("chest-chained", "ResNet50 features chained into the custom CNN's head", 0.568,
                     pretrained=RESNET)


def _resnet_features(spec: ModelSpec, input_shape, weights: str, in_model_augmentation: bool = True):
    """Input → augmentation (unless the data pipeline augments instead) → rescale → frozen
    ResNet50 (max pooling) → BatchNorm → Dense 256 → Dropout."""
    import keras
    from keras import layers

    from lung_models.models.blocks import augmentation, rescale

    inputs = keras.Input(tuple(input_shape or spec.input_shape), name="image")
    base = keras_application(keras.applications.ResNet50, weights, include_top=False, pooling="max",
                             input_shape=tuple(input_shape or spec.input_shape))
    base.trainable = False
    x = base(rescale(augmentation(inputs) if in_model_augmentation else inputs), training=False)
    x = layers.BatchNormalization(name="head_bn")(x)
    x = layers.Dense(256, activation="relu", name="head_dense")(x)
    x = layers.Dropout(0.25, name="head_dropout")(x)
    return inputs, x


@register(RESNET_SPEC)
def build_resnet(spec: ModelSpec = RESNET_SPEC, input_shape=None, weights: str = PRETRAINED,
                 in_model_augmentation: bool = True):
    import keras
    from keras import layers

    inputs, x = _resnet_features(spec, input_shape, weights, in_model_augmentation)
    return keras.Model(inputs, layers.Dense(4, activation="softmax", name="probabilities")(x), name="chest_resnet50")


# The write-up gives the custom CNN's pattern (Conv2D/MaxPool blocks → Flatten → Dense → Dropout →
# Dense 4) but not its sizes. Five 3×3 blocks see 94 pixels (about 150 mm, a lung's width) around
# each flattened cell: what tells a hilar mass from a peripheral one is where it sits in the lung,
# which a smaller field of view cannot see. He initialisation suits the ReLU stack; the Flatten
# leaves 5×5×256 features at 224×224 (inputs need at least 94 pixels a side).
CNN_FILTERS = (16, 32, 64, 128, 256)


@register(CNN_SPEC)
def build_cnn(spec: ModelSpec = CNN_SPEC, input_shape=None, in_model_augmentation: bool = True):
    import keras
    from keras import layers

    from lung_models.models.blocks import augmentation, rescale

    inputs = keras.Input(tuple(input_shape or spec.input_shape), name="image")
    x = rescale(augmentation(inputs) if in_model_augmentation else inputs)
    for filters in CNN_FILTERS:
        x = layers.Conv2D(filters, 3, activation="relu", kernel_initializer="he_normal")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    return keras.Model(inputs, layers.Dense(4, activation="softmax", name="probabilities")(x), name="chest_cnn")


@register(CHAINED_SPEC)
def build_chained(spec: ModelSpec = CHAINED_SPEC, input_shape=None, weights: str = PRETRAINED,
                  in_model_augmentation: bool = True):
    import keras
    from keras import layers

    inputs, x = _resnet_features(spec, input_shape, weights, in_model_augmentation)
    x = layers.Dense(128, activation="relu", name="cnn_head_dense")(x)
    x = layers.Dropout(0.5, name="cnn_head_dropout")(x)
    return keras.Model(inputs, layers.Dense(4, activation="softmax", name="probabilities")(x), name="chest_chained")


def choose_combination(spec: ModelSpec, model, val_x: np.ndarray, val_y: np.ndarray):
    """Keep the trained combiner only if it beats the plain average on validation; never hide
    that the ensemble is worse than its best submodel."""
    import keras

    average = keras.Model(model.inputs, model.get_layer("average").output, name="chest_ensemble")
    subs = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    from sklearn.metrics import log_loss

    acc, loss = {}, {}
    candidates = {"plain_average": average, "trained_combiner": model}
    candidates.update({f"submodel {sub.name}": sub for sub in subs})
    for key, candidate in candidates.items():
        probs = np.asarray(candidate.predict(val_x, verbose=0))
        acc[key] = float((probs.argmax(1) == val_y).mean())
        loss[key] = float(log_loss(val_y, np.clip(probs, 1e-7, 1), labels=list(range(probs.shape[1]))))
    choice = "trained_combiner" if acc["trained_combiner"] > acc["plain_average"] else "plain_average"
    best_sub = max(v for k, v in acc.items() if k.startswith("submodel"))
    notes = {"validation_accuracy": acc, "validation_loss": loss, "choice": choice,
             "worse_than_best_submodel": bool(acc[choice] < best_sub),
             "summary": f"ensemble combination on validation: {acc}; chose {choice}"
                        + (" — WARNING: worse than its best submodel on validation" if acc[choice] < best_sub else "")}
    return (model if choice == "trained_combiner" else average), notes


@register(ENSEMBLE_SPEC, finalize=choose_combination)
def build_ensemble(spec: ModelSpec = ENSEMBLE_SPEC, input_shape=None, parts: dict[str, str] | None = None):
    """Both trained submodels (frozen) → average of their probabilities → trained Dense(4) combiner.

    Without ``parts`` (a build check) the submodels are built untrained from random weights.
    """
    import keras
    from keras import layers

    from lung_models.training import load_checkpoint

    shape = tuple(input_shape or spec.input_shape)
    if parts:
        subs = [load_checkpoint(parts[name]) for name in spec.depends_on]
    else:
        subs = [build_resnet(RESNET_SPEC, shape, weights="random"), build_cnn(CNN_SPEC, shape)]
    inputs = keras.Input(shape, name="image")
    probs = []
    for sub, name in zip(subs, spec.depends_on):
        sub.trainable = False
        sub.name = name.replace("-", "_")
        probs.append(sub(inputs, training=False))
    average = layers.Average(name="average")(probs)
    combined = layers.Dense(4, activation="softmax", name="combiner")(average)
    return keras.Model(inputs, combined, name="chest_ensemble")
