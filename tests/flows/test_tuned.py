"""``--profile tuned``: every model trains, exports and scores with it, pretrained ones from local
weights files; ``--folds`` puts the recipe's cross-validated figures in the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lung_models import registry
from lung_models.bundle import load_bundle

AUGMENTATION_LAYERS = ("augment_flip", "augment_rotation", "augment_zoom")


@pytest.mark.parametrize("name", registry.names())
def test_every_model_trains_and_exports_with_the_tuned_profile(tuned_factory, name):
    path = Path(tuned_factory["bundles"][name])
    card = load_bundle(path).card
    spec = registry.get(name).spec
    assert card["training"]["profile"] == "tuned" and card["training"]["recipe"]["selection"]
    assert card["parity"]["passed"] and card["input"]["shape"][1:] == list(spec.test_input_shape)
    # The documented input contract, with the tuned colour handling recorded for the scorer.
    sizes = ("size", "target_shape")  # the tests' smaller inputs
    assert {k: v for k, v in card["preprocessing"].items() if k not in (*sizes, "colour")} == \
        {k: v for k, v in spec.preprocessing.items() if k not in sizes}
    assert card["preprocessing"].get("colour", "rgb") == ("grey" if spec.preprocessing.get("ct_window") else "rgb")
    if name in tuned_factory["weights"]:
        assert card["weights_init"] == f"pretrained: local file {tuned_factory['weights'][name]}"


def test_the_tuned_chest_cnn_has_the_documented_layers_without_its_augmentation_layers(tuned_factory):
    """The pipeline augments instead, so the tuned network is the documented one minus its
    training-only augmentation layers: every weight has the same shape."""
    from lung_models.training import load_checkpoint

    tuned = load_checkpoint(Path(tuned_factory["bundles"]["chest-cnn"]) / "model.keras")
    entry = registry.get("chest-cnn")
    full = entry.build(entry.spec, input_shape=tuple(tuned.inputs[0].shape[1:]))  # the documented network
    assert [w.shape for w in tuned.weights] == [w.shape for w in full.weights]
    names = {layer.name for layer in tuned.layers}
    assert not names & set(AUGMENTATION_LAYERS) and set(AUGMENTATION_LAYERS) <= {layer.name for layer in full.layers}


def test_folds_put_the_cross_validated_figures_in_the_model_card(prefect_harness, tuned_factory, tmp_path):
    from flows.train import train_models

    bundles = train_models(models=["lc25000-cnn"], profile="tuned", source="local",
                           data_dir=str(tuned_factory["root"] / "data"), exports_dir=str(tmp_path / "exports"),
                           work_dir=str(tmp_path / "work"), epochs=1, batch_size=4,
                           input_shape={"lc25000-cnn": list(registry.get("lc25000-cnn").spec.test_input_shape)},
                           folds=2)
    card = load_bundle(bundles["lc25000-cnn"]).card
    cv = card["crossval"]
    assert cv["folds"] == 2 and cv["profile"] == "tuned" and len(cv["per_fold"]) == 2
    assert cv["recipe"] == card["training"]["recipe"]  # the recipe cross-validated is the one that shipped
    assert cv["n"] == sum(card["metrics"]["splits"][s]["n"] for s in ("train", "val"))
    assert 0 <= cv["accuracy"]["mean"] <= 1 and "macro_f1" in card["metrics"]
    json.dumps(card)  # the card stays plain JSON
