"""``lc25000-cnn``: a small custom CNN that tells lung adenocarcinoma from squamous cell carcinoma
on LC25000 histopathology tiles (documented by "Sub-classifying Lung Cancer with TensorFlow 2 and
Keras")."""

from __future__ import annotations

from lung_models.data.catalog import LC25000
from lung_models.models import tuned
from lung_models.registry import HISTOLOGY_TILE, ModelSpec, TrainingRecipe, register

DATASET = LC25000.subset(("lung_aca", "lung_scc"))

SPEC = ModelSpec(
    name="lc25000-cnn",
    title="Custom CNN, LC25000 lung adenocarcinoma vs squamous cell carcinoma",
    documented_by="Sub-classifying Lung Cancer with TensorFlow 2 and Keras (S. Fuke, GitHub)",
    modality=HISTOLOGY_TILE,
    input_shape=(256, 256, 3),
    test_input_shape=(64, 64, 3),
    class_names=DATASET.classes,
    output="sigmoid",
    preprocessing={"kind": "rgb_image", "size": [256, 256], "scale": 1 / 255, "layout": "NHWC"},
    dataset=DATASET,
    recipe=TrainingRecipe(
        # The write-up does not state epochs or batch size; 32 is flow_from_directory's default
        # batch and 10 epochs reach its reported accuracy range.
        epochs=10,
        batch_size=32,
        loss="binary_crossentropy",
        optimizer="adam",
        learning_rate=1e-3,
        checkpoint_monitor="val_loss",
    ),
    # demo: tiles drawn at half LC25000's 768 px (the phantom scales its tissue with the tile, so the
    # same slide at a quarter of the drawing time) and the network trained at 128 px: the demo has
    # to fit a CPU's few minutes.
    # tuned (see lung_models.models.tuned): the documented 10 epochs, batch and learning rate, with
    # a one-epoch warm-up and weight averaging (the network has no BatchNorm), and at least 400
    # steps: the documented 10 epochs are 1,250 steps on the full data set, 150 on 300 tiles a
    # class, where cross-validation showed the augmented network still improving at its last epoch.
    profiles={"demo": {"epochs": 6, "generated_per_class": 400, "generated_size": 384,
                       "input_shape": (128, 128, 3)},
              "tuned": {**tuned.HE_TILE, "lr_schedule": {**tuned.WARMUP_COSINE, "warmup_epochs": 1},
                        "weight_averaging": tuned.AVERAGING, "min_steps": 400}},
    documented_metrics={"test_accuracy": 0.967, "train_accuracy": 0.980, "val_accuracy": 0.982},
)


@register(SPEC)
def build(spec: ModelSpec = SPEC, input_shape: tuple[int, ...] | None = None):
    import keras

    from lung_models.models.blocks import LC25000CNN

    shape = tuple(input_shape or spec.input_shape)
    model = LC25000CNN(input_shape=shape, name="lc25000_cnn")
    model(keras.ops.zeros((1, *shape)))  # create the weights so the model can be saved and exported
    return model
