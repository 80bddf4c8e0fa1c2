"""The batch pipeline: decode in background workers, infer in batches, one row per (scan, model).

Each item is decoded once (``decode.decode``) and prepared once per preprocessing signature, in a
pool of worker threads, while the calling thread runs inference; as in nnU-Net's predictor, the
two overlap. Threads, not processes: decoding spends its time in zlib, Pillow, pydicom's NumPy
and SciPy, which release the GIL, and a thread hands its arrays over without pickling them
(``scripts/bench_night.py --only workers``: a process pool of the same size takes 1.10x the time).
Memory stays flat however many files a night holds: at most ``prefetch`` decoded items wait for
inference (a bounded window of futures, consumed in order), and each model's batch buffer holds
at most one batch beyond the last item added.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lung_models import preprocess
from lung_models.data.catalog import negative_class
from lung_models.data.readers import InputError, error_detail
from lung_models.scoring import decode as decoding
from lung_models.scoring.items import ERROR, OK, REJECTED, BundleInputError, FileChanged, Item
from lung_models.scoring.rows import prediction, result_row
from lung_models.scoring.runtime import LoadedModel, cpu_cores, predict

log = logging.getLogger(__name__)

VOLUME_BATCH = 2  # a batch of 3-D volumes costs gigabytes of activations: keep it small


def default_workers() -> int:
    """Decoding threads: half the cores (at least one)."""
    return max(1, cpu_cores() // 2)


@dataclass
class Job:
    """An item and the models that have not scored it yet."""

    item: Item
    models: list[LoadedModel]


@dataclass
class PipelineStats:
    decoded: int = 0  # items decoded by the workers
    finished: int = 0  # items every model has its row for
    max_ahead: int = 0  # most items decoded but not finished at any moment (the memory bound at work)
    decode_seconds: float = 0.0  # summed over the workers
    infer_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note_decoded(self, seconds: float) -> None:
        with self._lock:
            self.decoded += 1
            self.decode_seconds += seconds
            self.max_ahead = max(self.max_ahead, self.decoded - self.finished)

    def note_finished(self) -> None:
        with self._lock:
            self.finished += 1


@dataclass
class _Loaded:
    """What a worker made of one job: per model, its prepared inputs or why there are none."""

    job: Job
    inputs: dict[str, np.ndarray | Exception]
    skipped: str = ""  # the item changed while it was read: no row, a later run scores it


def failure_row(model: LoadedModel, item: Item, root: Path, exc: BaseException) -> dict[str, Any]:
    """The row for an item a model could not get an input for.

    ``rejected`` only when the content is at fault (it would fail again); the system's faults
    (permissions, I/O, memory, the bundle) are ``error``, retried by the next run.
    """
    name = Path(item.key).name
    row = _row_maker(model)
    if isinstance(exc, InputError):
        return row(item, status=REJECTED, error=str(exc))
    if isinstance(exc, BundleInputError):
        return row(item, status=ERROR, error=str(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        return row(item, status=ERROR, error=f"{name}: cannot be read ({exc.strerror}); check the file system and "
                                             "the scoring user's permissions")
    if isinstance(exc, MemoryError):
        return row(item, status=ERROR, error=f"{name}: out of memory while decoding; score it on a machine with "
                                             "more memory or with fewer decoding workers")
    return row(item, status=REJECTED, error=(f"{name}: cannot be decoded or preprocessed "
                                             f"({error_detail(exc, root / item.key)}); re-export or re-transfer "
                                             "the file"))


def _row_maker(model: LoadedModel) -> Callable[..., dict[str, Any]]:
    def row(item: Item, **values: Any) -> dict[str, Any]:
        return result_row(model.bundle, item, provider=model.provider, precision=model.precision,
                          onnx_sha256=model.onnx_sha256, **values)
    return row


def _load(job: Job, root: Path, decoder: Callable[[Item, Path], decoding.Decoded], stats: PipelineStats) -> _Loaded:
    """Decode once, prepare once per signature; failures are kept per model (a series that is no
    volume is still slices to the 2-D models)."""
    started = time.perf_counter()
    try:
        decoded = decoder(job.item, root)
    except Exception as exc:  # noqa: BLE001 - one bad file must never end the night
        failure: BaseException = exc
        try:
            decoding.check_unchanged(job.item, root)  # a failure on a file that changed meanwhile says nothing of it
        except FileChanged as changed:
            failure = changed
        stats.note_decoded(time.perf_counter() - started)
        if isinstance(failure, FileChanged):
            return _Loaded(job, {}, skipped=str(failure))
        return _Loaded(job, {m.name: failure for m in job.models})
    inputs: dict[str, np.ndarray | Exception] = {}
    for model in job.models:
        try:
            inputs[model.name] = decoding.prepare(decoded, model.bundle.preprocessing)
        except Exception as exc:  # noqa: BLE001 - this model cannot take it; the others still may
            inputs[model.name] = exc
    decoding.release_sources(decoded)
    stats.note_decoded(time.perf_counter() - started)
    return _Loaded(job, inputs)


class _ModelBatcher:
    """One model's inference buffer: inputs of several items run together, split back per item."""

    def __init__(self, model: LoadedModel, batch_size: int, root: Path, stats: PipelineStats, explainer=None,
                 drift=None):
        self.model, self.root, self.stats, self.explainer, self.drift = model, root, stats, explainer, drift
        volume = model.bundle.preprocessing["kind"] == "ct_volume"
        self.batch_size = min(batch_size, VOLUME_BATCH) if volume else batch_size
        self.params = model.bundle.preprocessing
        self.classes = model.bundle.class_names
        self.negative = negative_class(self.classes)  # a prediction other than this is a flagged scan
        self.row = _row_maker(model)
        self.pending: list[tuple[Item, np.ndarray]] = []
        self.count = 0

    def add(self, item: Item, inputs: np.ndarray) -> list[tuple[Item, dict[str, Any]]]:
        self.pending.append((item, inputs))
        self.count += len(inputs)
        return self.flush() if self.count >= self.batch_size else []

    def flush(self) -> list[tuple[Item, dict[str, Any]]]:
        if not self.pending:
            return []
        pending, self.pending, self.count = self.pending, [], 0
        started = time.perf_counter()
        try:
            stacked = pending[0][1] if len(pending) == 1 else np.concatenate([x for _, x in pending])
            probs = np.concatenate([predict(self.model, preprocess.batch_stage(stacked[i:i + self.batch_size],
                                                                              self.params))
                                    for i in range(0, len(stacked), self.batch_size)])
        except Exception as exc:  # noqa: BLE001 - a runtime failure fails this batch's rows, not the night
            out = [(item, self.row(item, status=ERROR, error=f"{Path(item.key).name}: inference failed "
                                   f"({error_detail(exc, self.root / item.key)}); check the model and the runtime"))
                   for item, _ in pending]
        else:
            out, start = [], 0
            for item, x in pending:
                mine = probs[start:start + len(x)]
                row = self.row(item, status=OK, **prediction(self.classes, mine))
                flagged = self.explainer is not None and row["predicted_class"] != self.negative
                staged = preprocess.batch_stage(x, self.params) if flagged or self.drift is not None else None
                if self.drift is not None:
                    self._observe(item, staged, mine)
                if flagged:
                    row["heatmap"] = self._heatmap(item, staged, mine, row["predicted_class"])
                out.append((item, row))
                start += len(x)
        self.stats.infer_seconds += time.perf_counter() - started
        return out

    def _observe(self, item: Item, staged: np.ndarray, probs: np.ndarray) -> None:
        """The scan's drift features (``drift``); a failure is logged and costs only them."""
        try:
            self.drift.observe(self.model.name, staged, probs, self.classes)
        except Exception as exc:  # noqa: BLE001 - drift figures are an aid; they never cost the row
            log.warning("%s: no drift figures of %s (%s: %s)", self.model.name, item.key, type(exc).__name__, exc)

    def _heatmap(self, item: Item, staged: np.ndarray, probs: np.ndarray, predicted: str) -> str:
        """A flagged scan's heat map (``explain``), its path relative to the output folder;
        "" when it cannot be made (logged: the row and its probabilities stand without it)."""
        try:
            return self.explainer.explain(self.model.bundle, item.key, item.sha256, staged, probs,
                                          self.classes.index(predicted))
        except Exception as exc:  # noqa: BLE001 - a heat map is an aid; it never costs the row
            log.warning("%s: no heat map of %s (%s: %s)", self.model.name, item.key, type(exc).__name__, exc)
            return ""


def score(jobs: Iterable[Job], root: str | Path, *, batch_size: int = 8, workers: int | None = None,
          prefetch: int | None = None, skipped: list[tuple[str, str]] | None = None,
          decoder: Callable[[Item, Path], decoding.Decoded] | None = None,
          stats: PipelineStats | None = None, explainer=None, drift=None) -> Iterator[list[dict[str, Any]]]:
    """Yield rows as they are ready (lists, so a caller can commit them batch by batch): one per
    (job's item, job's model). Refused items get their refusal as the row. An item that changes while
    it is read gets no row and is added to ``skipped``. ``decoder`` replaces ``decode.decode`` (tests
    count calls with it). With an ``explainer`` (``explain.Explainer``), each scan a model flags (its
    predicted class is not the data set's negative one) gets a heat map, named in its ``heatmap``.
    With a ``drift`` sample (``drift.NightSample``), each ``ok`` scan's drift features are noted in it."""
    root = Path(root)
    decoder = decoder or decoding.decode
    workers = workers or default_workers()
    prefetch = max(1, prefetch or 2 * workers)
    stats = stats if stats is not None else PipelineStats()
    batchers: dict[str, _ModelBatcher] = {}
    waiting: dict[int, int] = {}  # id(item) -> rows still to come

    def batcher(model: LoadedModel) -> _ModelBatcher:
        if model.name not in batchers:
            batchers[model.name] = _ModelBatcher(model, batch_size, root, stats, explainer, drift)
        return batchers[model.name]

    def finished(ready: list[tuple[Item, dict[str, Any]]]) -> list[dict[str, Any]]:
        for item, _ in ready:
            waiting[id(item)] -= 1
            if not waiting[id(item)]:
                del waiting[id(item)]
                stats.note_finished()
        return [row for _, row in ready]

    def consume(loaded: _Loaded) -> list[dict[str, Any]]:
        item = loaded.job.item
        if loaded.skipped:
            log.warning("skipped: %s", loaded.skipped)
            if skipped is not None:
                skipped.append((item.key, loaded.skipped))
            stats.note_finished()
            return []
        waiting[id(item)] = len(loaded.job.models)
        ready: list[tuple[Item, dict[str, Any]]] = []
        for model in loaded.job.models:
            inputs = loaded.inputs[model.name]
            if isinstance(inputs, BaseException):
                ready.append((item, failure_row(model, item, root, inputs)))
            else:
                ready.extend(batcher(model).add(item, inputs))
        return finished(ready)

    window: deque[Future[_Loaded]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        try:
            for job in jobs:
                if not job.models:
                    continue
                item = job.item
                if item.refusal:
                    yield [_row_maker(m)(item, status=item.refusal_status, error=item.refusal) for m in job.models]
                    continue
                window.append(pool.submit(_load, job, root, decoder, stats))
                while len(window) >= prefetch or (window and window[0].done()):
                    rows = consume(window.popleft().result())
                    if rows:
                        yield rows
            while window:
                rows = consume(window.popleft().result())
                if rows:
                    yield rows
            tail = finished([r for b in batchers.values() for r in b.flush()])
            if tail:
                yield tail
        finally:
            for future in window:  # a caller that stops early: no work left running
                future.cancel()
