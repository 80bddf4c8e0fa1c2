"""Pretrained weights: TF-Hub modules and keras.applications ImageNet weights, or none.

Each resolver either returns what the builder needs or raises :class:`PretrainedWeightsError`
saying exactly what to download and where to put it, so an offline machine fails with a fix
rather than a stack trace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RANDOM = "random"
PRETRAINED = "pretrained"
# The files keras.applications looks for in ~/.keras/models (ImageNet weights without the top).
NOTOP_FILES = {"ResNet50": "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
               "InceptionV3": "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"}
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


class PretrainedWeightsError(RuntimeError):
    pass


def resolve_tfhub(handle: str, weights: str) -> Path | None:
    """A local SavedModel folder for ``handle`` (``None`` for random initialisation).

    ``weights`` is ``pretrained`` (resolve and cache the handle with tensorflow_hub; it needs
    network the first time), ``random``, or a local module folder (e.g. one downloaded by hand).
    """
    if weights == RANDOM:
        return None
    if weights != PRETRAINED:
        path = Path(weights)
        if not (path / "saved_model.pb").is_file():
            raise PretrainedWeightsError(
                f"{path}: not a TF-Hub module folder (no saved_model.pb); download {handle} "
                "(TF2 SavedModel format), extract it, and pass that folder as --weights")
        return path
    try:
        import tensorflow_hub as hub

        return Path(hub.resolve(handle))
    except Exception as exc:  # noqa: BLE001 - offline or blocked: say what to do instead
        cache = os.environ.get("TFHUB_CACHE_DIR", "<system temp>/tfhub_modules")
        raise PretrainedWeightsError(
            f"cannot fetch the TF-Hub module {handle} ({type(exc).__name__}: {exc}). Either give this "
            f"machine network access once (it is cached under TFHUB_CACHE_DIR={cache}), or download "
            f"{handle}?tf-hub-format=compressed (a .tar.gz SavedModel) on another machine, extract it "
            "and pass the folder with "
            "--weights /path/to/module, or train from random initialisation with --weights random"
        ) from None


def keras_application(factory: Any, weights: str, **kwargs: Any):
    """Build a keras.applications model with ImageNet weights, a local weights file, or none."""
    if weights == RANDOM:
        return factory(weights=None, **kwargs)
    source = "imagenet" if weights == PRETRAINED else weights
    if source != "imagenet" and not Path(source).is_file():
        raise PretrainedWeightsError(f"{source}: weights file not found; pass an existing .h5 file, "
                                     "'pretrained' for ImageNet, or 'random'")
    try:
        return factory(weights=source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - typically no network: name the file and where it goes
        if source != "imagenet":
            raise PretrainedWeightsError(f"{source}: cannot load these weights ({exc})") from None
        name = factory.__name__
        raise PretrainedWeightsError(
            f"cannot fetch the ImageNet weights of {name} ({type(exc).__name__}: {exc}). Download "
            f"{KERAS_WEIGHTS_URL}{NOTOP_FILES.get(name, '')} into "
            f"{Path(os.environ.get('KERAS_HOME', Path.home() / '.keras')) / 'models'}/, or pass the file "
            "with --weights /path/to/file.h5, or train from random initialisation with --weights random"
        ) from None
