"""``lc25000-inception-mixed7``: keras.applications InceptionV3 (ImageNet, frozen) cut at
``mixed7``, with a dense head: LC25000 lung tiles, three classes (documented by "Lung Cancer
Detection Using Transfer Learning")."""

from __future__ import annotations

from lung_models.data.catalog import LC25000
from lung_models.models import tuned
from lung_models.models.pretrained import PRETRAINED, keras_application
from lung_models.registry import HISTOLOGY_TILE, ModelSpec, TrainingRecipe, register

DATASET = LC25000.subset(
    ("lung_n", "lung_aca", "lung_scc"), name="LC25000 (lung subset, 3 classes)",
    # Documented: 80/20 train/validation (random_state 2022); we hold out a test split too.
    split={"train": 0.8, "val": 0.1, "test": 0.1, "seed": 2022})

SPEC = ModelSpec(
    name="lc25000-inception-mixed7",
    title="InceptionV3 cut at mixed7 + dense head, LC25000 lung 3 classes",
    documented_by="Lung Cancer Detection Using Transfer Learning (GeeksforGeeks)",
    modality=HISTOLOGY_TILE,
    input_shape=(256, 256, 3),
    test_input_shape=(80, 80, 3),  # InceptionV3 needs at least 75 pixels a side
    class_names=DATASET.classes,
    output="softmax",
    # The write-up feeds resized 0-255 pixels straight into InceptionV3; so do we.
    preprocessing={"kind": "rgb_image", "size": [256, 256], "scale": 1.0, "layout": "NHWC, RGB 0-255"},
    dataset=DATASET,
    recipe=TrainingRecipe(
        epochs=10, batch_size=64, loss="categorical_crossentropy", optimizer="adam", learning_rate=1e-3,
        early_stopping={"monitor": "val_accuracy", "patience": 3, "restore_best_weights": True},
        reduce_lr={"monitor": "val_loss", "patience": 2, "factor": 0.5},
        stop_above={"monitor": "val_accuracy", "value": 0.90},
        checkpoint_monitor="val_accuracy",  # the model early stopping restores is the one kept
    ),
    # demo: ImageNet weights cannot be had offline, so a smoke run of the chain at a small input.
    profiles={"demo": {"epochs": 1, "batch_size": 32, "weights": "random", "generated_per_class": 60,
                       "generated_size": 384, "input_shape": (96, 96, 3), "smoke_run": True},
              # tuned (see lung_models.models.tuned): the documented epochs and batch; the head has
              # BatchNorm, so no weight averaging.
              "tuned": {**tuned.HE_TILE, "lr_schedule": {**tuned.WARMUP_COSINE, "warmup_epochs": 1}}},
    documented_metrics={"f1_per_class_above": 0.90},
    pretrained={"kind": "keras_applications", "weights": "imagenet", "model": "InceptionV3"},
)


@register(SPEC)
def build(spec: ModelSpec = SPEC, input_shape=None, weights: str = PRETRAINED):
    import keras
    from keras import layers

    shape = tuple(input_shape or spec.input_shape)
    base = keras_application(keras.applications.InceptionV3, weights, include_top=False, input_shape=shape)
    base.trainable = False
    trunk = keras.Model(base.input, base.get_layer("mixed7").output, name="inception_v3_to_mixed7")
    inputs = keras.Input(shape, name="image")
    x = layers.Flatten()(trunk(inputs, training=False))
    x = layers.Dense(256, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    x = layers.BatchNormalization()(x)
    return keras.Model(inputs, layers.Dense(3, activation="softmax", name="probabilities")(x),
                       name="lc25000_inception_mixed7")
