"""ONNX Runtime sessions for scoring: opened once per model and night, with explicit options.

The provider list puts CUDA first when ONNX Runtime offers it and a driver is present (see
``device.onnx_providers``), CPU always last; what really runs is read back from the session and
written on every row, so a GPU that silently fell back to CPU shows in the report.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lung_models.bundle import BundleError, ModelBundle
from lung_models.device import import_onnxruntime, onnx_providers

log = logging.getLogger(__name__)

FP32, INT8, AUTO = "fp32", "int8", "auto"
PRECISIONS = (FP32, INT8, AUTO)


def cpu_cores() -> int:
    """The cores this process may use. Inference takes them all (intra-op threads): the decoding
    threads beside it spend most of their time in native decoders that release the GIL."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_arena_lock = threading.Lock()
_arena_registered: bool | None = None


def _shared_cpu_arena(ort) -> bool:
    """Register one CPU memory arena for every session of this process (once). A session's own arena
    keeps the largest working set it ever needed until the session closes, so a night with eight models
    held the sum of eight peaks (2.3 GiB over the bad-input corpus); sharing one arena holds about the
    largest (1.6 GiB), at the same speed (see README, Benchmarks). Without it, sessions keep their own."""
    global _arena_registered
    with _arena_lock:
        if _arena_registered is None:
            try:
                memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                           ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT's defaults
                _arena_registered = True
            except Exception as exc:  # noqa: BLE001 - an ORT build without it: each session keeps its own arena
                log.warning("ONNX Runtime shared CPU arena not available (%s); sessions use their own", exc)
                _arena_registered = False
        return _arena_registered


def session_options(intra_op_threads: int | None = None):
    """Every graph optimisation, sequential execution (these are chains of convolutions: parallel
    branches buy nothing), a fixed thread count instead of ORT's guess, and no thread spinning, so
    idle inference threads do not take the cores the decoding workers need."""
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads or cpu_cores()
    options.inter_op_num_threads = 1
    if _shared_cpu_arena(ort):
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(path, providers: list[str] | None = None, intra_op_threads: int | None = None):
    ort = import_onnxruntime()

    ort.set_default_logger_severity(3)  # the CPU fallback of onnxruntime-gpu is expected, not an error
    return ort.InferenceSession(str(path), sess_options=session_options(intra_op_threads),
                                providers=providers or onnx_providers())


@dataclass
class LoadedModel:
    bundle: ModelBundle
    session: Any
    provider: str  # the first provider the session really uses
    input_name: str
    onnx_sha256: str  # of the graph that runs (the int8 variant's when it runs)
    precision: str = FP32

    @property
    def name(self) -> str:
        return self.bundle.name


def choose_graph(bundle: ModelBundle, precision: str = FP32) -> tuple[Path, str, str]:
    """(ONNX file, its expected sha256, precision) for ``precision`` fp32, int8 or auto (int8 where the
    export's gate found it usable). Asking for int8 where the bundle has no variant is an error."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    int8 = bundle.card.get("int8") or {}
    if precision == AUTO:
        precision = INT8 if int8.get("usable") and int8.get("file") else FP32
    if precision == FP32:
        return bundle.onnx_path, bundle.card["onnx_sha256"], FP32
    if not int8.get("file"):
        why = int8.get("reason", "it was exported before int8 variants existed")
        raise BundleError(f"{bundle.path}: no int8 variant ({why}); score with --precision fp32 or auto, "
                          "or re-export the model")
    if not int8.get("usable"):
        log.warning("%s %s: scoring with an int8 variant the export gate did not pass (%s)", bundle.name,
                    bundle.version, int8.get("reason"))
    return bundle.path / int8["file"], int8["sha256"], INT8


def open_model(bundle: ModelBundle, precision: str = FP32, intra_op_threads: int | None = None) -> LoadedModel:
    """Verify the chosen ONNX file against the bundle, open a session, note the provider that runs."""
    path, expected, chosen = choose_graph(bundle, precision)
    actual = bundle.verify(path, expected)
    session = open_session(path, intra_op_threads=intra_op_threads)
    providers = session.get_providers()
    log.info("%s %s (%s) runs on ONNX Runtime with %s", bundle.name, bundle.version, chosen, ", ".join(providers))
    return LoadedModel(bundle, session, providers[0], session.get_inputs()[0].name, actual, chosen)


def predict(model: LoadedModel, batch: np.ndarray) -> np.ndarray:
    return model.session.run(None, {model.input_name: batch.astype(np.float32, copy=False)})[0]
