"""Keras → ONNX export with a parity check, written as a self-describing model bundle."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lung_models import preprocess, promotion
from lung_models.bundle import CARD, ONNX
from lung_models.fileutil import atomic_write_json, current_umask, sha256_file, utc_now, utc_stamp
from lung_models.registry import ModelSpec

OPSET = 17
PARITY_ATOL = 1e-4


class ParityError(RuntimeError):
    pass


def probability_function(model, output_kind: str, input_shape: tuple[int, ...], temperature: float | None = None):
    """A ``tf.function`` of the inference graph (``training=False``: augmentation and dropout off)
    that returns one probability per class, whatever the model's own output layer. With a
    ``temperature``, the calibrated probabilities ``softmax(log(p) / T)`` (``calibration``), so the
    exported graph gives the scorer calibrated probabilities."""
    import tensorflow as tf

    from lung_models.calibration import EPS

    @tf.function(input_signature=[tf.TensorSpec((None, *input_shape), tf.float32, name="input")])
    def probabilities(x):
        y = model(x, training=False)
        if output_kind == "sigmoid":
            y = tf.concat([1.0 - y, y], axis=1)
        elif output_kind == "logits":
            y = tf.nn.softmax(y, axis=1)
        if temperature is not None:
            y = tf.nn.softmax(tf.math.log(tf.clip_by_value(y, EPS, 1.0)) / float(temperature), axis=1)
        return tf.identity(y, name="probabilities")

    return probabilities


def _collect_after_each_tf2onnx_pass() -> None:
    """tf2onnx deep-copies the whole graph, weights included, before each optimizer pass and
    rebuilds every node's proto after it. The copies are reference cycles that Python's collector
    reaches only now and then, so they piled up: converting the demo's InceptionV3 took 8.3 GiB,
    2.8 GiB with a collection after each pass (no slower)."""
    import gc

    from tf2onnx.optimizer import optimizer_base

    base = optimizer_base.GraphOptimizerBase
    if getattr(base.optimize, "collects_garbage", False):
        return
    original = base.optimize

    def optimize(self, graph, iteration):
        try:
            return original(self, graph, iteration)
        finally:
            gc.collect()

    optimize.collects_garbage = True
    base.optimize = optimize


def convert(fn, path: Path) -> None:
    import gc

    import tf2onnx

    _collect_after_each_tf2onnx_pass()
    # Those collections then walk only what the conversion creates, not the objects of the training
    # that ran before it in this process (walking them too made a conversion about half as slow).
    gc.freeze()
    try:
        tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=OPSET,
                                      output_path=str(path))
    finally:
        gc.unfreeze()


def ort_session(path: Path, providers: list[str] | None = None):
    """The session the scorer opens (same options), so parity is checked on what the scorer runs."""
    from lung_models.scoring.runtime import open_session

    return open_session(path, providers=providers)


def check_parity(fn, session, x: np.ndarray, params: dict[str, Any], batch_size: int = 8) -> dict[str, Any]:
    """Compare TensorFlow and ONNX Runtime probabilities on every item of ``x``."""
    input_name = session.get_inputs()[0].name
    diffs, mismatched, finite = [], 0, True
    for start in range(0, len(x), batch_size):
        batch = preprocess.batch_stage(x[start:start + batch_size], params)
        tf_probs = fn(batch).numpy()
        ort_probs = session.run(None, {input_name: batch})[0]
        finite &= bool(np.isfinite(tf_probs).all() and np.isfinite(ort_probs).all())
        diffs.append(np.abs(tf_probs - ort_probs).reshape(-1))
        mismatched += int((tf_probs.argmax(1) != ort_probs.argmax(1)).sum())
    # NaN compares false and would slip through a plain max: non-finite output fails outright.
    max_diff = float(np.max(np.concatenate(diffs))) if diffs else float("nan")
    passed = bool(finite and len(x) > 0 and max_diff <= PARITY_ATOL and mismatched == 0)
    return {"items": int(len(x)), "max_abs_diff": max_diff if finite else None, "all_finite": finite,
            "class_mismatches": mismatched, "atol": PARITY_ATOL, "passed": passed}


def reserve_version(model_dir: Path) -> str:
    """Claim a new version folder (UTC time, then -002, -003... within one second) with an
    exclusive mkdir, so two exports never get the same version."""
    stamp = utc_stamp()
    for n in range(1, 1000):
        version = stamp if n == 1 else f"{stamp}-{n:03d}"
        try:
            (model_dir / version).mkdir()
            return version
        except FileExistsError:
            continue
    raise RuntimeError(f"{model_dir}: cannot reserve a new version folder")


INTENDED_USE = ("research and engineering use only; not a medical device, not for clinical diagnosis or "
                "treatment decisions")


def _code_commit() -> str | None:
    """The git commit of the code that exported the bundle (with "+dirty" for uncommitted changes),
    None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def export_bundle(spec: ModelSpec, model, *, test_x: np.ndarray, params: dict[str, Any],
                  exports_root: Path, card_extra: dict[str, Any], files: dict[str, Path],
                  progress: Callable[[str], None] = print, test_y: np.ndarray | None = None,
                  calib_x: np.ndarray | None = None, temperature: float | None = None) -> Path:
    """Convert, check parity on the test arrays, write the bundle, then point LATEST at it if it
    passed its promotion gate (``promotion.gate``; otherwise it is exported but not promoted).

    ``params`` is the preprocessing that produced ``test_x`` (the spec's, or a test's smaller
    size); it goes into the card unchanged so the scorer reproduces it. ``files`` are copied into
    the bundle under their keys (metrics, plots, split manifest, checkpoint...). With ``test_y`` and
    ``calib_x`` (training inputs) an int8 variant is made and gated too (see ``quantize``). With a
    ``temperature`` (``calibration.calibrate``, recorded by the caller in ``card_extra``) the graph
    outputs calibrated probabilities, and parity is checked on those.
    """
    import onnx

    model_dir = Path(exports_root) / spec.name
    model_dir.mkdir(parents=True, exist_ok=True)
    input_shape = tuple(int(d) for d in test_x.shape[1:])
    fn = probability_function(model, spec.output, input_shape, temperature)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    # mkdtemp makes it 0700; a bundle is read by other service accounts (the scoring worker's group).
    os.chmod(staging, 0o777 & ~current_umask())
    final: Path | None = None
    try:
        onnx_path = staging / ONNX
        progress(f"{spec.name}: converting to ONNX (opset {OPSET})")
        convert(fn, onnx_path)
        session = ort_session(onnx_path)
        parity = check_parity(fn, session, test_x, params)
        progress(f"{spec.name}: parity on {parity['items']} test items: max |Δp| = "
                 f"{parity['max_abs_diff']}, class mismatches = {parity['class_mismatches']}")
        if not parity["passed"]:
            raise ParityError(
                f"{spec.name}: ONNX output differs from Keras (max |Δp| {parity['max_abs_diff']} > "
                f"{PARITY_ATOL}, {parity['class_mismatches']} class mismatches, all finite: "
                f"{parity['all_finite']}); bundle not written")

        int8 = None
        if calib_x is not None and test_y is not None:
            from lung_models import quantize

            progress(f"{spec.name}: int8 variant (static QDQ, per channel, calibrated on "
                     f"{quantize.calibration_count(len(calib_x), tuple(calib_x.shape[1:]))} training items)")
            int8 = quantize.int8_variant(onnx_path, staging / quantize.INT8_ONNX, calib_x=calib_x, test_x=test_x,
                                         test_y=test_y, params=params, open_session=ort_session)
            progress(f"{spec.name}: int8 {'usable' if int8['usable'] else 'not used'}: {int8['reason']}")

        version = reserve_version(model_dir)
        final = model_dir / version
        card: dict[str, Any] = {
            "version": version,
            "created_utc": utc_now(),
            "model": {"name": spec.name, "title": spec.title, "documented_by": spec.documented_by,
                      "modality": spec.modality, "class_names": list(spec.class_names),
                      "dataset": spec.dataset.name, "dataset_citation": spec.dataset.citation or None,
                      "documented_metrics": spec.documented_metrics},
            "input": {"name": session.get_inputs()[0].name, "shape": [None, *input_shape],
                      "dtype": "float32", "layout": params.get("layout", "")},
            "output": {"name": session.get_outputs()[0].name,
                       "meaning": "probability per class, in class_names order"
                       + (f", calibrated (temperature scaling, T = {temperature:.4f})" if temperature else "")},
            "preprocessing": params,
            "parity": parity,
            "software": _versions(),
            "code": {"commit": _code_commit()},
            "intended_use": INTENDED_USE,
            "opset": OPSET,
            **({"int8": int8} if int8 is not None else {}),
            **card_extra,
        }
        card["promotion"] = promotion.gate(card.get("metrics") or {}, parity)
        meta = {"model_name": spec.name, "version": version, "modality": spec.modality,
                "class_names": json.dumps(list(spec.class_names)), "preprocessing": json.dumps(params),
                "input_layout": params.get("layout", ""), "weights_init": str(card_extra.get("weights_init")),
                "training_device": str(card_extra.get("training", {}).get("device")),
                "metrics": json.dumps({k: card_extra.get("metrics", {}).get(k)
                                       for k in ("accuracy", "accuracy_ci95_wilson", "roc_auc", "n")})}
        proto = onnx.load(str(onnx_path))
        onnx.helper.set_model_props(proto, meta)
        proto.doc_string = f"{spec.title} ({spec.name} {version})"
        onnx.save(proto, str(onnx_path))
        card["onnx_sha256"] = sha256_file(onnx_path)
        for name, src in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)  # a TF-Hub module's folders
            shutil.copy2(src, staging / name)
        # What the export wrote, so a reader (the heat maps' loader of model.keras) can tell it unchanged.
        card["files"] = {name: {"sha256": sha256_file(staging / name)} for name in sorted(files)}
        atomic_write_json(staging / CARD, card)
        os.rename(staging, final)  # replaces the empty reserved folder: the bundle appears whole
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if final is not None and final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        raise
    progress(f"{spec.name}: bundle written to {final}")
    if promotion.promote_if_passed(model_dir, version, card):
        progress(f"{spec.name}: promoted {version} (LATEST): {card['promotion']['reason']}")
    elif card["promotion"]["passed"]:
        progress(f"{spec.name}: {version} passed its gate; the newer {promotion.promoted_version(model_dir)} "
                 "is already promoted")
    else:
        progress(f"{spec.name}: exported, NOT promoted ({card['promotion']['reason']}); LATEST stays at "
                 f"{promotion.promoted_version(model_dir) or 'none'}; see lung-factory bundles --help")
    return final
