"""Grad-CAM heat maps (Selvaraju et al. 2017) for the scans a model flags: where it looked.

ONNX Runtime has no gradients, so a heat map comes from the bundle's Keras model (``model.keras``,
hence TensorFlow: the ``train`` extra), checked against the sha256 its export recorded and loaded
in Keras' safe mode. Its target is the model's last convolutional feature map (see ``_target``:
the output of the last convolutional block, 2-D or, for the 3-D model, 3-D), found in the forward
pass itself, however deeply the block is nested; an ensemble's is its first submodel's, a model
that averages flipped views of its input (test-time augmentation) is explained on the first,
unflipped view. The gradient of the predicted class's score with respect to that map, averaged
over its spatial axes, weighs its channels; their weighted sum, kept where positive and resized
to the input, is the heat map.

The map is caught by wrapping every layer's ``call`` while the gradient function is traced (once
per model and class, ``tf.function``): a wrapped call returns the very tensor the rest of the
model uses, so the tape can differentiate with respect to it, and the traced graph keeps that
without the wrapping.

A model whose convolutions Keras cannot see (``ct-inception-hub`` with its TF-Hub module, a
SavedModel called as one layer) has no map to weigh; its heat map is SmoothGrad (Smilkov et al.
2017) instead: the gradient of the class's score with respect to the input pixels, averaged over
noisy copies of the input and smoothed, which needs nothing but a differentiable model. Each PNG
says which method drew it (its ``Description`` text, shown by the night page).
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HEATMAP_DIR = "heatmaps"
HUB_DIR = "tfhub_module"  # a bundle's copy of the TF-Hub SavedModel its Keras model calls
CONV_TYPES = ("Conv1D", "Conv2D", "Conv3D", "SeparableConv2D", "DepthwiseConv2D")
SLICES_SHOWN = 3  # axial slices of a volume shown, where its heat map is strongest
MIN_SIDE = 192  # pixels: a smaller picture is enlarged by a whole factor
# SmoothGrad's noisy copies and their spread (a share of the input's range): the paper's suggested
# 10-20 % noise; 16 copies in batches of 8 keep an InceptionV3 pass at 299 px within a CPU's memory.
SMOOTHGRAD_SAMPLES, SMOOTHGRAD_NOISE, SMOOTHGRAD_BATCH = 16, 0.15, 8


class ExplainUnavailable(RuntimeError):
    pass


class NoFeatureMap(ValueError):
    """The model has no convolutional feature map Keras can see (Grad-CAM has nothing to weigh)."""


def require_tensorflow() -> None:
    """Heat maps need the bundle's Keras model, hence TensorFlow: say which extra brings it."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
        raise ExplainUnavailable("heat maps (--explain) need TensorFlow to run the bundles' Keras models; install "
                                 "the training extra (pip install 'lung-factory[train]') or score without --explain")


def _leaves(layer, seen: set[int] | None = None) -> list:
    """Every layer of ``layer`` that is not itself a model, nested models' layers included, once each."""
    seen = set() if seen is None else seen
    out = []
    for child in getattr(layer, "layers", None) or []:
        if getattr(child, "layers", None):
            out.extend(_leaves(child, seen))
        elif id(child) not in seen:
            seen.add(id(child))
            out.append(child)
    return out


def _target(events: list[tuple[Any, Any]]):
    """The last convolutional layer's map in a forward pass, from its layer calls in order: the
    output of the last convolution before the first flat output (where a Flatten, a global pooling
    or a Dense takes over), carried through what completes its block at the same resolution
    (normalisation, activation, a residual add, a concatenation of branches) but not through a
    pooling: ResNet50's conv5_block3_out, InceptionV3's mixed layer, a plain CNN's last Conv2D or
    Conv3D with its ReLU. In a model that runs a submodel more than once (test-time augmentation)
    it is the first run's, on the unflipped view."""
    candidate, in_block = None, False
    for layer, out in events:
        rank, kind = len(getattr(out, "shape", ()) or ()), type(layer).__name__
        if kind in CONV_TYPES:
            candidate, in_block = (layer, out), True
        elif "Pooling" in kind or "Pool" in kind:
            in_block = False
        elif rank >= 4 and in_block:
            candidate = (layer, out)
        if rank <= 2 and candidate is not None:
            return candidate
    return candidate


def grad_cam(model, x: np.ndarray, class_index: int) -> np.ndarray:
    """The Grad-CAM map of ``class_index`` for one model input ``x`` (a batch of one), resized to
    the input's spatial shape and scaled to [0, 1] (all zeros when nothing supports the class)."""
    return grad_cam_with_target(model, x, class_index)[0]


def grad_cam_with_target(model, x: np.ndarray, class_index: int) -> tuple[np.ndarray, str]:
    """``grad_cam`` and the name of the layer whose output it weighed. Raises NoFeatureMap for a
    model with no convolutional feature map in sight."""
    cams, layer = grad_cam_batch(model, x[:1], class_index)
    return cams[0], layer


def grad_cam_batch(model, x: np.ndarray, class_index: int) -> tuple[np.ndarray, str]:
    """``grad_cam`` of every item of the batch ``x`` (items are independent: the model runs in
    inference mode), with the target layer's name."""
    import tensorflow as tf
    from scipy.ndimage import zoom

    run, meta = _traced(model, "cam", class_index)
    try:
        maps, grads = (np.asarray(t) for t in run(tf.convert_to_tensor(x, dtype=tf.float32)))
    except NoFeatureMap as exc:  # found while tracing: remembered (its text only: the exception's
        _functions[model]["no_map"] = str(exc)  # traceback holds this frame, hence the model, alive)
        raise
    spatial = x.shape[1:-1] if x.ndim == maps.ndim else x.shape[1:]
    cams = []
    for m, g in zip(maps, grads):  # m: (*spatial, channels)
        cam = np.maximum((m * g.mean(axis=tuple(range(m.ndim - 1)))).sum(axis=-1), 0.0)
        cam = zoom(cam, [s / c for s, c in zip(spatial, cam.shape)], order=1)
        peak = float(cam.max())
        cams.append(cam / peak if peak > 0 else np.zeros_like(cam))
    return np.stack(cams).astype(np.float32), meta["layer"]


# Per model and class, its traced gradient functions (tf.function), made on first use: tracing runs
# the model once with its layers' calls wrapped; every later call runs the graph instead of Keras
# layer by layer in Python, several times faster at the scorer's sizes. Keyed weakly, and the
# functions hold the model only weakly, so a model the cache forgets takes its functions with it.
_functions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _OwnTracesFilter(logging.Filter):
    """TensorFlow warns of "excessive retracing" when several tf.functions of the same code are traced
    in a short while, which is what one function per model and class means here (each is traced once,
    as the tests check): that warning, for these functions only, would only alarm an operator."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("retracing" in message and ("_cam_function.<locals>" in message
                                                 or "_input_function.<locals>" in message))


def _quiet_own_traces() -> None:
    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _OwnTracesFilter) for f in logger.filters):
        logger.addFilter(_OwnTracesFilter())


def _traced(model, kind: str, class_index: int):
    """``(function, meta)`` of ``kind`` ("cam": the target map and its gradient; "input": the input's
    gradient) for ``class_index``. A model already found to have no feature map raises NoFeatureMap
    at once, not after tracing again."""
    mine = _functions.setdefault(model, {})
    if kind == "cam" and "no_map" in mine:
        raise NoFeatureMap(mine["no_map"])
    if (kind, class_index) not in mine:
        _quiet_own_traces()
        make = _cam_function if kind == "cam" else _input_function
        mine[(kind, class_index)] = make(weakref.ref(model), class_index)
    return mine[(kind, class_index)]


def _cam_function(ref, class_index: int):
    import tensorflow as tf

    meta: dict[str, str] = {}

    @tf.function(reduce_retracing=True, autograph=False)  # plain Python at trace time: its errors propagate as raised
    def run(x):
        model = ref()
        events: list[tuple[Any, Any]] = []

        def catching(layer, original):
            def call(*args, **kwargs):
                out = original(*args, **kwargs)
                if tf.is_tensor(out):
                    tape.watch(out)  # frozen backbones hold no trainable variables for the tape to follow
                    events.append((layer, out))
                return out
            return call

        wrapped = []
        with tf.GradientTape() as tape:
            try:
                for layer in _leaves(model):
                    layer.call = catching(layer, layer.call)
                    wrapped.append(layer)
                probs = model(x, training=False)
            finally:
                for layer in wrapped:
                    del layer.call  # the class's own method again
            score = tf.reduce_sum(_score(probs, class_index))  # items are independent: per-item gradients
        target = _target(events)
        if target is None:
            raise NoFeatureMap(f"{model.name}: no convolutional feature map Keras can see (a TF-Hub module's "
                               "layers are opaque), so no Grad-CAM")
        grads = tape.gradient(score, target[1])
        if grads is None:
            raise NoFeatureMap(f"{model.name}: the score does not depend on {target[0].name}, so no Grad-CAM")
        meta["layer"] = target[0].name
        return target[1], grads

    return run, meta


def _input_function(ref, class_index: int):
    import tensorflow as tf

    @tf.function(reduce_retracing=True, autograph=False)  # plain Python at trace time: its errors propagate as raised
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.reduce_sum(_score(ref()(x, training=False), class_index))
        return tape.gradient(score, x)

    return run, {}


def _score(outputs, class_index: int):
    """The class's score per batch item: its output unit, or for one sigmoid unit P(class 1) or 1 - P."""
    if outputs.shape[-1] == 1:
        return outputs[:, 0] if class_index == 1 else 1.0 - outputs[:, 0]
    return outputs[:, class_index]


def smooth_grad(model, x: np.ndarray, class_index: int, samples: int = SMOOTHGRAD_SAMPLES,
                noise: float = SMOOTHGRAD_NOISE, seed: int = 0) -> np.ndarray:
    """SmoothGrad saliency of ``class_index`` for one model input ``x`` (a batch of one): the mean
    absolute gradient of the class's score with respect to the input over ``samples`` copies with
    Gaussian noise (``noise`` of the input's range), the largest over colour channels, smoothed
    with a Gaussian of 1/50 of the smaller side, scaled to [0, 1]. Any differentiable model."""
    import tensorflow as tf
    from scipy.ndimage import gaussian_filter

    run, _ = _traced(model, "input", class_index)
    x = np.asarray(x, dtype=np.float32)
    spread = noise * (float(x.max() - x.min()) or 1.0)
    rng = np.random.default_rng(seed)  # the same scan gives the same picture every night
    total = np.zeros(x.shape[1:], np.float64)
    for start in range(0, samples, SMOOTHGRAD_BATCH):
        n = min(SMOOTHGRAD_BATCH, samples - start)
        noisy = tf.convert_to_tensor(x + rng.normal(0.0, spread, (n, *x.shape[1:])).astype(np.float32))
        total += np.abs(np.asarray(run(noisy))).sum(axis=0)  # items are independent: per-item gradients
    # Every model here takes (batch, *spatial, channels) (Conv2D and Conv3D need the channel axis),
    # a rank-3 input being a grey slice without one: the map is per pixel or voxel.
    sal = total.max(axis=-1) if x.ndim >= 4 else total
    sal = gaussian_filter(sal / samples, sigma=max(1.0, min(sal.shape) / 50))
    peak = float(sal.max())
    return (sal / peak if peak > 0 else np.zeros_like(sal)).astype(np.float32)


def heat_map(model, x: np.ndarray, class_index: int) -> tuple[np.ndarray, str]:
    """Where the model looked for ``class_index`` in ``x`` and how that was found: Grad-CAM on its
    last convolutional map, or SmoothGrad on the input when it has none Keras can see."""
    try:
        cam, layer = grad_cam_with_target(model, x, class_index)
        return cam, f"Grad-CAM on {layer}"
    except NoFeatureMap:
        return smooth_grad(model, x, class_index), (
            f"SmoothGrad on the input pixels ({SMOOTHGRAD_SAMPLES} noisy copies): the model's convolutions are "
            "inside an opaque module")


def _grey(image: np.ndarray) -> np.ndarray:
    """A model input (H, W[, C]) as 8-bit grey or RGB for display, whatever its scale."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    return img.astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with the heat map laid over it in colour (jet), weighted by the map itself so cold
    regions show the image unchanged."""
    from matplotlib import colormaps

    base = _grey(image)
    rgb = np.repeat(base[..., None], 3, axis=2) if base.ndim == 2 else base[..., :3]
    heat = colormaps["jet"](cam)[..., :3] * 255.0
    weight = alpha * cam[..., None]
    return np.clip(rgb * (1 - weight) + heat * weight, 0, 255).astype(np.uint8)


def _axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of an (x, y, z) RAS array as a viewer shows it (anterior up, patient right
    on the left), as the night page's thumbnails do."""
    return volume[::-1, ::-1, k].T


def render(x: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The PNG's pixels: a 2-D input with its map; a volume (x, y, z) as its ``SLICES_SHOWN`` axial
    slices where the map is strongest, side by side, most inferior first."""
    image = x[0]
    if cam.ndim == 2:
        return overlay(image, cam)
    volume = image[..., 0] if image.ndim == 4 else image
    strongest = np.argsort(cam.reshape(-1, cam.shape[-1]).max(axis=0))[::-1][:SLICES_SHOWN]
    tiles = [overlay(_axial(volume, int(k)), _axial(cam, int(k))) for k in sorted(strongest)]
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([t if i == 0 else np.concatenate([gap, t], axis=1) for i, t in enumerate(tiles)], axis=1)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "x"


def heatmap_name(model: str, version: str, key: str, sha256: str) -> str:
    """Where an item's heat map goes, relative to the output folder: one file per (model version,
    scan content), named after the scan so a reader recognises it."""
    stem = _safe(re.sub(r"[^A-Za-z0-9._-]+", "_", key)[-120:])
    return f"{HEATMAP_DIR}/{_safe(model)}/{_safe(version)}/{stem}-{sha256[:12]}.png"


# The Keras models of the bundles this process explains with, loaded once and kept for the shards
# after (a Dask worker lives for many); a model that cannot be loaded is remembered by its error's
# type and text (not the exception: its traceback would keep every frame it passed through alive).
_models_lock = threading.Lock()
_models: dict[tuple[str, str], Any] = {}


def keras_model(bundle):
    """The bundle's Keras model, checked against the sha256 its export recorded and loaded in Keras'
    safe mode: no deserialised Python runs; a TF-Hub model's SavedModel graph (TensorFlow ops) runs
    from the bundle's own copy, every file of it checked. Raises what stops it, every time."""
    from lung_models.fileutil import sha256_file

    path = Path(bundle.path) / "model.keras"
    recorded = bundle.card.get("files") or {}
    expected = recorded.get("model.keras", {}).get("sha256", "")
    key = (str(path), expected)
    with _models_lock:
        if key not in _models:
            try:
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: no Keras model in the bundle; re-export the model or score "
                                            "without --explain")
                if not expected:
                    raise ValueError(f"{bundle.name} {bundle.version}: its card records no sha256 of model.keras "
                                     "(exported before heat maps); re-export it to explain its scans")
                hub = _hub_files(Path(bundle.path), recorded)
                for name in ["model.keras", *hub]:
                    actual = sha256_file(Path(bundle.path) / name)
                    if actual != recorded[name]["sha256"]:
                        raise ValueError(f"{Path(bundle.path) / name}: sha256 {actual[:12]}... is not the "
                                         f"{recorded[name]['sha256'][:12]}... its export recorded; the bundle was "
                                         "changed after export")
                _models[key] = _load(path, Path(bundle.path) / HUB_DIR if hub else None)
            except Exception as exc:  # noqa: BLE001 - remembered: not tried again for every flagged scan
                _models[key] = _Failed(type(exc), str(exc))
        found = _models[key]
    if isinstance(found, _Failed):
        raise found.error()
    return found


class _Failed(tuple):
    """Why a bundle's model could not be loaded: raised anew, as its own type where it can be."""

    def __new__(cls, kind: type, text: str):
        return super().__new__(cls, (kind, text))

    def error(self) -> Exception:
        kind, text = self
        try:
            return kind(text)
        except Exception:  # noqa: BLE001 - a type that wants other arguments
            return RuntimeError(text)


def _hub_files(root: Path, recorded: dict[str, Any]) -> list[str]:
    """The bundle's TF-Hub module files its card lists, checked to be exactly what the folder holds:
    every name inside ``HUB_DIR`` (no ``..``, no absolute path), no file on disk left unlisted (the
    SavedModel loader reads the whole folder), no link, and ``saved_model.pb`` among them."""
    listed = sorted(name for name in recorded if name.startswith(HUB_DIR + "/"))
    folder = root / HUB_DIR
    if not listed and not folder.exists():
        return []
    base = folder.resolve()
    for name in listed:
        if Path(name).is_absolute() or ".." in Path(name).parts or not (root / name).resolve().is_relative_to(base):
            raise ValueError(f"{root}: its card lists {name!r} outside {HUB_DIR}/; the card was changed after export")
    on_disk = sorted(f"{HUB_DIR}/{f.relative_to(folder).as_posix()}" for f in folder.rglob("*")
                     if f.is_file() or f.is_symlink())
    if any((folder / n.removeprefix(HUB_DIR + "/")).is_symlink() for n in on_disk):
        raise ValueError(f"{folder}: holds a symbolic link; a bundle's module is plain files, as exported")
    if on_disk != listed or f"{HUB_DIR}/saved_model.pb" not in listed:
        extra, missing = sorted(set(on_disk) - set(listed)), sorted(set(listed) - set(on_disk))
        raise ValueError(f"{folder}: the files do not match the export's list (not listed: {extra[:3]}, missing: "
                         f"{missing[:3]}); the bundle was changed after export, re-export it")
    return listed


def _load(path: Path, hub_dir: Path | None = None):
    """Load ``model.keras`` in safe mode. A TF-Hub module's layer names the SavedModel it loads, which
    Keras refuses in safe mode (its graph could be anything); with ``hub_dir`` (the bundle's copy,
    checked by the caller against the export's hashes) that copy is loaded instead of the path the
    training host had."""
    import keras

    from lung_models import registry
    from lung_models.models.blocks import VERIFIED_MODULE  # importing it registers the custom layers by name

    registry.load_all()
    token = VERIFIED_MODULE.set(str(hub_dir) if hub_dir is not None else None)
    try:
        return keras.models.load_model(path, safe_mode=True)
    except ValueError as exc:
        if "TFSMLayer" in str(exc):  # a bundle exported before its module was bundled
            raise ValueError(f"{path}: the model calls a TF-Hub module its bundle does not hold (exported before "
                             f"modules were bundled); re-export it to explain its scans") from None
        raise
    finally:
        VERIFIED_MODULE.reset(token)


def hub_module_files(model) -> dict[str, Path]:
    """The files of the TF-Hub SavedModel ``model`` calls (``HubFeatures``), by their name in a bundle
    (under ``HUB_DIR``): the export copies them so the heat maps' loader never follows a path of the
    training host. Empty for a model without one."""
    found: dict[str, Path] = {}
    modules = {str(layer.filepath) for layer in _leaves(model) if type(layer).__name__ == "HubFeatures"}
    if len(modules) > 1:
        raise ValueError(f"{model.name}: calls {len(modules)} TF-Hub modules; a bundle holds one")
    for module in modules:
        for file in sorted(Path(module).rglob("*")):
            if file.is_file():
                found[f"{HUB_DIR}/{file.relative_to(module).as_posix()}"] = file
    return found


def forget_models(keep: list[str]) -> None:
    """Drop the Keras models of bundles no longer pinned (a long-lived worker between nights)."""
    with _models_lock:
        for key in [k for k in _models if str(Path(k[0]).parent) not in keep]:
            del _models[key]


class Explainer:
    """Heat maps for one night's output folder, with the Keras models this process holds."""

    def __init__(self, output_dir: str | Path):
        require_tensorflow()
        self.output_dir = Path(output_dir)

    def explain(self, bundle, key: str, sha256: str, inputs: np.ndarray, probs: np.ndarray, class_index: int) -> str:
        """Write the heat map of ``class_index`` for one scan's model inputs (already batch-staged)
        and return its path relative to the output folder. Several 2-D inputs (a volume's slices):
        the one where the class is most probable."""
        from PIL import Image

        from lung_models.fileutil import atomic_writer

        pick = int(np.argmax(np.asarray(probs).reshape(len(inputs), -1)[:, class_index]))
        x = inputs[pick:pick + 1]
        model = keras_model(bundle)
        with _models_lock:  # one at a time: a first call traces with the layers' calls wrapped
            cam, method = heat_map(model, x, class_index)
        rel = heatmap_name(bundle.name, bundle.version, key, sha256)
        path = self.output_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(render(x, cam))
        scale = -(-MIN_SIDE // min(picture.size))
        if scale > 1:  # a small model input (the demo's 96 px) would be a stamp on the page
            picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.BILINEAR)
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()  # the picture says what drew it, wherever it is copied to
        info.add_text("Description", f"{method}: where {bundle.name} {bundle.version} looked for "
                                     f"{bundle.class_names[class_index]}")
        with atomic_writer(path, binary=True) as handle:
            picture.save(handle, format="PNG", pnginfo=info)
        return rel
