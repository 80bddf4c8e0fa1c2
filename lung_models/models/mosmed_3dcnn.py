"""``mosmed-3dcnn``: a 3D CNN that tells normal chest CT volumes from viral pneumonia (documented by
the Keras example "3D image classification from CT scans", MosMedData)."""

from __future__ import annotations

from lung_models.data.catalog import MOSMED
from lung_models.models import tuned
from lung_models.registry import CT_VOLUME, ModelSpec, TrainingRecipe, register

SPEC = ModelSpec(
    name="mosmed-3dcnn",
    title="3D CNN, CT volumes: normal vs viral pneumonia (MosMedData)",
    documented_by="Keras example: 3D image classification from CT scans (H. Zunair)",
    modality=CT_VOLUME,
    input_shape=(128, 128, 64, 1),
    test_input_shape=(48, 48, 48, 1),  # four conv/pool blocks need at least 46 voxels a side
    class_names=MOSMED.classes,
    output="sigmoid",
    preprocessing={
        "kind": "ct_volume",
        "hu_window": [-1000.0, 400.0],
        "rotate90": 1,
        "target_shape": [128, 128, 64],
        "zoom_order": 1,
        "layout": "NDHWC (x, y, z, channel)",
    },
    dataset=MOSMED,
    recipe=TrainingRecipe(
        epochs=100,
        batch_size=2,
        loss="binary_crossentropy",
        optimizer="adam",
        learning_rate=1e-4,
        lr_schedule={"kind": "exponential_decay", "decay_steps": 100000, "decay_rate": 0.96,
                     "staircase": True},
        early_stopping={"monitor": "val_accuracy", "patience": 15},
        checkpoint_monitor="val_loss",
        # Two departures from the example, both about BatchNorm statistics:
        # - The example rotates every training volume. Spline interpolation smooths the noise
        #   (voxel-to-voxel differences about 13% smaller), and validation, test and nightly
        #   volumes are never rotated, so at inference every layer would see inputs unlike the
        #   ones its statistics were gathered on. Rotating half keeps unrotated volumes in them.
        # - The example shuffles freely. In training, BatchNorm centres each batch on its own
        #   mean, so an all-normal batch is shifted as if half of it were abnormal; the model
        #   learns with that shift, and at inference the moving averages do not apply it. Every
        #   batch here holds the classes in the data's proportions.
        augmentation={"kind": "volume_rotation", "angles": [-20, -10, -5, 5, 10, 20],
                      "probability": 0.5},
        balanced_batches=True,
    ),
    # demo: BatchNorm's moving statistics with the default momentum (0.99) are still mostly their
    # initial values after the couple of hundred steps a demo can afford, so inference-mode outputs
    # come out constant; momentum 0.9 lets them converge, and batches of 4 make the batch statistics
    # less noisy. Volumes are resampled to 48x48x48 (a tenth of the documented voxels; the four
    # conv/pool blocks need 46) to fit a CPU's minutes, and enough are generated for a test split
    # that can show learning (36 volumes).
    # Layers, optimiser and learning rate are the documented ones.
    profiles={"demo": {"epochs": 10, "batch_size": 4, "generated_per_class": 120, "generated_in_plane": 128,
                       "generated_slices": [40, 60], "build_options": {"bn_momentum": 0.9},
                       "input_shape": (48, 48, 48, 1)},
              # tuned (see lung_models.models.tuned): the documented rotation and class-proportioned
              # batches stay; the documented learning rate with a warm-up and cosine decay, selection
              # by averaged validation loss with patience 15 (of 100 epochs), no weight averaging
              # (BatchNorm).
              "tuned": {**tuned.COMMON, "class_weight": "balanced",
                        "selection": {**tuned.SELECTION, "patience": 15}}},
    documented_metrics={"val_accuracy": 0.78, "val_accuracy_full_dataset": 0.83},
)


@register(SPEC)
def build(spec: ModelSpec = SPEC, input_shape: tuple[int, ...] | None = None, bn_momentum: float = 0.99):
    """The documented network; ``bn_momentum`` is Keras' default (0.99) unless a profile says
    otherwise."""
    import keras
    from keras import layers

    inputs = keras.Input(tuple(input_shape or spec.input_shape))
    x = inputs
    for filters in (64, 64, 128, 256):
        x = layers.Conv3D(filters, kernel_size=3, activation="relu")(x)
        x = layers.MaxPool3D(pool_size=2)(x)
        x = layers.BatchNormalization(momentum=bn_momentum)(x)
    x = layers.GlobalAveragePooling3D()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs, name="mosmed_3dcnn")
