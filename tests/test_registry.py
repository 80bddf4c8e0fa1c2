import dataclasses

import numpy as np
import pytest

from lung_models import registry

NAMES = registry.names()
DOCUMENTED = {"lc25000-cnn", "mosmed-3dcnn", "ct-inception-hub", "chest-resnet50", "chest-cnn", "chest-ensemble",
              "chest-chained", "lc25000-inception-mixed7"}


def test_registry_holds_the_documented_models():
    # A superset, not equality: a new model is one new module under lung_models/models/, not an edit here.
    assert DOCUMENTED <= set(NAMES)
    for name in NAMES:
        spec = registry.get(name).spec
        assert spec.name == name
        assert set(spec.dataset.layout) == set(spec.class_names)
        split = spec.dataset.split
        if "folders" in split:  # the data set ships its splits; missing ones are carved from train
            assert set(split["folders"]) == {"train", "val", "test"} and "carve" in split
        else:
            assert abs(sum(split[k] for k in ("train", "val", "test")) - 1.0) < 1e-9


def test_the_registry_finds_the_family_modules_by_itself():
    import importlib
    import pkgutil

    import lung_models.models as families

    builders = {entry.build.__module__ for entry in registry.REGISTRY.values()}
    assert all(m.startswith("lung_models.models.") for m in builders)  # nothing registers from elsewhere
    modules = {m.name for m in pkgutil.iter_modules(families.__path__, "lung_models.models.")}
    assert builders <= modules
    for module in modules - builders:  # shared code only: it registers nothing and builds no model
        assert not any(isinstance(v, registry.ModelSpec) for v in vars(importlib.import_module(module)).values())


@pytest.mark.parametrize("name", NAMES)
def test_every_model_builds_at_its_documented_input(name):
    from lung_models.training import build_model

    entry = registry.get(name)
    # No pretrained weights can be downloaded in CI: build the documented architecture from random weights.
    recipe = entry.spec.recipe_for("full", weights="random")
    model = build_model(entry.build, entry.spec, recipe, input_shape=None, parts=None, adapt_x=None)
    x = np.zeros((2, *entry.spec.input_shape), dtype="float32")
    out = np.asarray(model(x, training=False))
    units = 1 if entry.spec.output == "sigmoid" else len(entry.spec.class_names)
    assert out.shape == (2, units)
    if entry.spec.output != "logits":
        assert np.all((out >= 0) & (out <= 1))


def test_mosmed_has_the_documented_parameter_count():
    entry = registry.get("mosmed-3dcnn")
    assert entry.build(entry.spec).count_params() == 1_352_897  # as printed in the Keras example


def test_lc25000_cnn_saves_and_reloads_through_its_config(tmp_path):
    from lung_models.training import load_checkpoint

    entry = registry.get("lc25000-cnn")
    model = entry.build(entry.spec, input_shape=(64, 64, 3))
    x = np.random.default_rng(0).random((3, 64, 64, 3), dtype=np.float32)
    model.save(tmp_path / "m.keras")
    again = load_checkpoint(tmp_path / "m.keras")
    assert type(again).__name__ == "LC25000CNN"
    assert again.get_config()["input_shape"] == [64, 64, 3]
    np.testing.assert_allclose(model(x, training=False), again(x, training=False), atol=1e-6)


def test_profiles_override_the_documented_recipe():
    spec = registry.get("mosmed-3dcnn").spec
    assert spec.recipe_for("full").epochs == 100
    assert spec.recipe_for("full").batch_size == 2
    demo = spec.recipe_for("demo")
    assert demo.epochs < 100 and demo.learning_rate == spec.recipe.learning_rate
    assert spec.recipe_for("demo", epochs=3).epochs == 3
    with pytest.raises(KeyError, match="no profile"):
        spec.recipe_for("nonexistent")
    assert dataclasses.asdict(spec.recipe)["early_stopping"] == {"monitor": "val_accuracy", "patience": 15}
    assert spec.recipe_for("demo").balanced_batches and spec.recipe_for("full").balanced_batches
    assert spec.recipe_for("demo", balanced_batches=False).balanced_batches is False


def test_dependencies_train_first():
    order = registry.training_order(["chest-ensemble", "lc25000-cnn"])
    assert order.index("chest-resnet50") < order.index("chest-ensemble")
    assert order.index("chest-cnn") < order.index("chest-ensemble")
    assert set(order) == {"chest-ensemble", "chest-resnet50", "chest-cnn", "lc25000-cnn"}
    with pytest.raises(KeyError, match="unknown model"):
        registry.training_order(["no-such-model"])


def test_pretrained_models_say_where_their_weights_come_from():
    from lung_models.training import weights_description

    hub = registry.get("ct-inception-hub").spec
    assert "RANDOM INITIALISATION" in weights_description(hub, hub.recipe_for("demo"))
    assert hub.pretrained["handle"] in weights_description(hub, hub.recipe_for("full"))
    cnn = registry.get("lc25000-cnn").spec
    assert weights_description(cnn, cnn.recipe_for("full")).startswith("random initialisation (trained from scratch")


def test_a_mistyped_profile_key_is_refused_not_dropped():
    spec = registry.get("chest-cnn").spec
    # Recipe fields and generated_* data options are accepted ...
    dataclasses.replace(spec, profiles={"demo": {"balanced_batches": True, "generated_size": 128}})
    # ... a typo is named, instead of silently training with the documented value.
    with pytest.raises(ValueError, match=r"profile 'demo' has unknown keys \['balanced_batch'\]"):
        dataclasses.replace(spec, profiles={"demo": {"balanced_batch": True}})
