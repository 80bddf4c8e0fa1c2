"""Every registered model, whatever its family: it builds at its documented input."""

import numpy as np
import pytest

from lung_models import registry

NAMES = registry.names()


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
