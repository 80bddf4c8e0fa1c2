"""The registry: which models it holds, how it finds them, their specs, profiles and dependencies."""

import dataclasses

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


def test_a_mistyped_profile_key_is_refused_not_dropped():
    spec = registry.get("chest-cnn").spec
    # Recipe fields and generated_* data options are accepted ...
    dataclasses.replace(spec, profiles={"demo": {"balanced_batches": True, "generated_size": 128}})
    # ... a typo is named, instead of silently training with the documented value.
    with pytest.raises(ValueError, match=r"profile 'demo' has unknown keys \['balanced_batch'\]"):
        dataclasses.replace(spec, profiles={"demo": {"balanced_batch": True}})


def test_every_registered_model_has_test_settings():
    for name in registry.names():
        spec = registry.get(name).spec
        assert len(spec.test_input_shape) == len(spec.input_shape), name
        assert spec.test_input_shape[-1] == spec.input_shape[-1], name  # same channels
        assert all(t <= d for t, d in zip(spec.test_input_shape, spec.input_shape)), name


def test_a_minimum_of_steps_grows_the_epochs_unless_epochs_are_asked_for():
    spec = registry.get("lc25000-cnn").spec
    assert spec.recipe_for("tuned").min_steps == 400 and spec.recipe_for("full").min_steps is None
    assert spec.recipe_for("tuned", epochs=6).min_steps is None  # --epochs 6 means six epochs


def test_reading_the_registry_imports_no_tensorflow():
    # A scoring-only install has no TensorFlow and still lists the models; the Keras code is
    # imported by the builders (and by checkpoint loading) alone.
    import subprocess
    import sys

    code = ("import sys; from lung_models import registry; registry.load_all(); "
            "[registry.get(n).spec.recipe_for('demo') for n in registry.names()]; "
            "print(' '.join(m for m in ('keras', 'tensorflow', 'tf_keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [] and len(registry.names()) >= len(DOCUMENTED)
