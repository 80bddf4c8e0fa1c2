"""Which device runs: a GPU when TensorFlow / ONNX Runtime see one, the CPU otherwise."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def configure_tensorflow() -> str:
    """Turn on memory growth for every visible GPU and return a description of the device used."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: growth was set earlier in this process
            pass
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        device = f"GPU ({details.get('device_name', gpus[0].name)})"
    else:
        device = "CPU"
    log.info("TensorFlow trains on %s", device)
    return device


ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


class RuntimeMissing(ImportError):
    pass


def import_onnxruntime():
    """ONNX Runtime, or an error that says which extra installs it. Warns once when both the CPU and
    the GPU package are installed: they write one ``onnxruntime`` module folder, so whichever was
    installed last is what runs, and removing either breaks the other."""
    global _checked_pair
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeMissing(
            f"ONNX Runtime is not installed ({exc}): install the scoring extra, "
            "pip install 'lung-imaging-factory[score]' (CPU) or '[score-gpu]' (CUDA), not both") from None
    if not _checked_pair:
        _checked_pair = True
        from importlib import metadata

        installed = []
        for name in ORT_DISTRIBUTIONS:
            try:
                installed.append(f"{name} {metadata.version(name)}")
            except metadata.PackageNotFoundError:
                pass
        if len(installed) > 1:
            log.warning("both %s are installed and share one module folder (now %s): uninstall both, then "
                        "install one extra, [score] or [score-gpu]", " and ".join(installed), onnxruntime.__version__)
    return onnxruntime


_checked_pair = False


def onnx_providers() -> list[str]:
    """CUDA first when ONNX Runtime offers it and an NVIDIA driver is present, CPU always as the
    fallback. (onnxruntime-gpu lists CUDA even on machines without a GPU; asking for it there
    only prints loader errors.) Read ``session.get_providers()`` for what really runs."""
    ort = import_onnxruntime()

    gpu_present = Path("/dev/nvidiactl").exists() or os.environ.get("LUNG_FACTORY_TRY_CUDA") == "1"
    cuda = gpu_present and "CUDAExecutionProvider" in ort.get_available_providers()
    return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]
