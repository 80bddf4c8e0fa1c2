"""int8 variants of exported models: static QDQ quantization, calibrated on training images, gated.

A variant is written beside the fp32 ``model.onnx`` as ``model.int8.onnx`` and is *usable* only
when, measured at export on this machine, its test accuracy is within ``MAX_ACCURACY_DROP`` of the
fp32 graph's and it runs faster than fp32 (timed in alternation, so both see the same machine
load). Both figures go into the model card either way, so the choice can be checked; the scorer's
``--precision auto`` takes the variant only where it is usable.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lung_models import preprocess
from lung_models.fileutil import sha256_file

log = logging.getLogger(__name__)

INT8_ONNX = "model.int8.onnx"
MAX_ACCURACY_DROP = 0.01  # one point of test accuracy
CALIBRATION_ITEMS = 64  # training images the activation ranges are calibrated on, at most
# onnxruntime's MinMax calibrator keeps every intermediate activation of every calibration batch
# until it has seen them all (its option to bound that, CalibMaxIntermediateOutputs, drops data in
# 1.31), so memory grows with items x voxels: 64 volumes of 128x128x64 took 22 GiB. Items are
# capped so that their input values stay within what 64 images of 224x224x3 hold.
CALIBRATION_VALUES = 64 * 224 * 224 * 3


def calibration_count(available: int, item_shape: tuple[int, ...]) -> int:
    """How many training items to calibrate on: at most CALIBRATION_ITEMS, within CALIBRATION_VALUES."""
    values = max(int(np.prod(item_shape)), 1)
    return max(1, min(available, CALIBRATION_ITEMS, CALIBRATION_VALUES // values))
TIMING_ROUNDS = 5
TIMING_BATCH = 8


def gate(fp32_accuracy: float, int8_accuracy: float, speedup: float) -> tuple[bool, str]:
    """Whether an int8 variant may replace fp32, and why (or why not)."""
    drop = fp32_accuracy - int8_accuracy
    if drop > MAX_ACCURACY_DROP + 1e-12:
        return False, (f"loses {100 * drop:.1f} points of test accuracy ({int8_accuracy:.3f} vs fp32 "
                       f"{fp32_accuracy:.3f}; at most {100 * MAX_ACCURACY_DROP:.0f} allowed)")
    if speedup <= 1.0:
        return False, f"not faster than fp32 on this machine ({speedup:.2f}x)"
    return True, f"{speedup:.2f}x faster than fp32, test accuracy {int8_accuracy:.3f} vs {fp32_accuracy:.3f}"


class _Calibration:
    """onnxruntime's CalibrationDataReader: batches of training inputs, as the scorer feeds them."""

    def __init__(self, input_name: str, x: np.ndarray, params: dict[str, Any], batch_size: int = 8):
        self.batches = iter([{input_name: preprocess.batch_stage(x[i:i + batch_size], params)}
                             for i in range(0, len(x), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _accuracy(session, x: np.ndarray, y: np.ndarray, params: dict[str, Any], batch_size: int = 16) -> float:
    name = session.get_inputs()[0].name
    probs = np.concatenate([session.run(None, {name: preprocess.batch_stage(x[i:i + batch_size], params)})[0]
                            for i in range(0, len(x), batch_size)])
    labels = np.asarray(y)
    labels = labels.argmax(axis=1) if labels.ndim > 1 else labels.astype(np.int64).reshape(-1)
    return float((probs.argmax(axis=1) == labels).mean())


def _speedup(fp32, int8, batch: np.ndarray) -> tuple[float, float, float]:
    """Median seconds per batch of each session, timed in alternation, and fp32 / int8."""
    feeds = [(s, {s.get_inputs()[0].name: batch}) for s in (fp32, int8)]
    for session, feed in feeds:  # warm-up: first runs allocate
        session.run(None, feed)
    times: list[list[float]] = [[], []]
    for _ in range(TIMING_ROUNDS):
        for k, (session, feed) in enumerate(feeds):
            started = time.perf_counter()
            session.run(None, feed)
            times[k].append(time.perf_counter() - started)
    t32, t8 = float(np.median(times[0])), float(np.median(times[1]))
    return t32, t8, t32 / t8


def int8_variant(fp32_path: Path, out_path: Path, *, calib_x: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 params: dict[str, Any], open_session) -> dict[str, Any]:
    """Write the int8 variant of ``fp32_path`` to ``out_path`` and return its card entry. Never raises for
    a model that cannot be quantized: the entry then says why, and the bundle stays fp32 only."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    entry: dict[str, Any] = {"file": out_path.name, "format": "QDQ", "per_channel": True, "weights": "int8",
                             "activations": "uint8", "calibration": {"split": "train", "items": 0,
                                                                     "method": "MinMax"}}
    # Spread over the split (it may be stored class by class), read from a memory map item by item.
    count = calibration_count(len(calib_x), tuple(calib_x.shape[1:]))
    picks = np.unique(np.linspace(0, len(calib_x) - 1, count).astype(np.int64))
    calib = np.asarray(calib_x[picks])
    entry["calibration"]["items"] = int(len(calib))
    try:
        fp32 = open_session(fp32_path)
        name = fp32.get_inputs()[0].name
        with tempfile.TemporaryDirectory() as tmp:
            source = _pre_processed(fp32_path, Path(tmp) / "pre.onnx")
            quantize_static(str(source), str(out_path), _Calibration(name, calib, params),
                            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax)
        int8 = open_session(out_path)
        fp32_acc = _accuracy(fp32, test_x, test_y, params)
        int8_acc = _accuracy(int8, test_x, test_y, params)
        reps = -(-TIMING_BATCH // max(len(test_x), 1))
        batch = preprocess.batch_stage(np.concatenate([test_x] * reps)[:TIMING_BATCH], params)
        t32, t8, speedup = _speedup(fp32, int8, batch)
    except Exception as exc:  # noqa: BLE001 - an op the quantizer cannot handle leaves the bundle fp32 only
        log.warning("int8 variant of %s not made: %s", fp32_path, exc)
        out_path.unlink(missing_ok=True)
        return {**entry, "file": None, "usable": False, "reason": f"quantization failed: {type(exc).__name__}: {exc}"}
    usable, reason = gate(fp32_acc, int8_acc, speedup)
    return {**entry, "sha256": sha256_file(out_path), "test_items": int(len(test_x)), "fp32_accuracy": fp32_acc,
            "int8_accuracy": int8_acc, "seconds_per_batch": {"fp32": t32, "int8": t8, "batch": int(len(batch))},
            "speedup": speedup, "usable": usable, "reason": reason}


def _pre_processed(path: Path, out: Path) -> Path:
    """onnxruntime's recommended pre-processing (shape inference, graph optimisation) when it works."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(path), str(out), skip_symbolic_shape=False)
        return out
    except Exception as exc:  # noqa: BLE001 - quantizing the graph as exported still works, a little slower
        log.info("quantization pre-processing of %s skipped: %s", path, exc)
        return path
