"""Pretrained weights: offline errors name what to download and where it goes."""

import pytest

from lung_models import registry
from lung_models.models import pretrained


def test_offline_tfhub_error_names_the_module_and_the_fix(monkeypatch):
    import tensorflow_hub as hub

    def offline(handle):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "resolve", offline)
    handle = registry.get("ct-inception-hub").spec.pretrained["handle"]
    with pytest.raises(pretrained.PretrainedWeightsError) as err:
        pretrained.resolve_tfhub(handle, "pretrained")
    assert handle in str(err.value) and "--weights" in str(err.value) and "TFHUB_CACHE_DIR" in str(err.value)
    assert pretrained.resolve_tfhub(handle, "random") is None


def test_offline_imagenet_error_names_the_file_and_where_it_goes():
    def ResNet50(weights=None, **kwargs):  # noqa: N802 - stands in for keras.applications.ResNet50
        raise Exception("URL fetch failure: network is unreachable")

    with pytest.raises(pretrained.PretrainedWeightsError) as err:
        pretrained.keras_application(ResNet50, "pretrained", include_top=False)
    message = str(err.value)
    assert "keras-applications/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert ".keras/models" in message
    with pytest.raises(pretrained.PretrainedWeightsError, match="not found"):
        pretrained.keras_application(ResNet50, "/no/such/weights.h5")
