"""mosmed-3dcnn: the Keras example's 3D CNN."""

from lung_models import registry


def test_mosmed_has_the_documented_parameter_count():
    entry = registry.get("mosmed-3dcnn")
    assert entry.build(entry.spec).count_params() == 1_352_897  # as printed in the Keras example
