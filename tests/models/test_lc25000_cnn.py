"""lc25000-cnn: a subclassed Keras model, saved and reloaded through its config."""

import numpy as np

from lung_models import registry


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
