"""One night of scoring, as plain functions: find what arrived, score what the ledger has not seen
with every model that takes it, publish. The Prefect flow (``flows/score.py``) runs these same
steps as tasks; ``run_night`` runs them without Prefect (benchmarks compare the two)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lung_models.bundle import ModelBundle, latest_bundles
from lung_models.fileutil import utc_stamp
from lung_models.scoring import pipeline
from lung_models.scoring.discovery import discover
from lung_models.scoring.items import ERROR, Incoming, takes
from lung_models.scoring.ledger import LEDGER_NAME, Ledger
from lung_models.scoring.lock import DEFAULT_LOCK_TIMEOUT, LOCK_NAME, scoring_lock
from lung_models.scoring.rows import result_row
from lung_models.scoring.runtime import FP32, LoadedModel, open_model

log = logging.getLogger(__name__)

COMMIT_ROWS = 256
# What a scoring run writes in its output folder: the ledger (and SQLite's journal), the lock, the
# night and cumulative CSVs and their temp files (fileutil.atomic_writer names them ".<name>.<pid>.<random>.tmp").
_OWN_FILE = re.compile(rf"^({re.escape(LEDGER_NAME)}(-journal|-wal|-shm)?|{re.escape(LOCK_NAME)}"
                       r"|scores-.*\.csv|\.scores-.*\.tmp)$")
COMMIT_SECONDS = 2.0


def find_incoming(input_dir: str | Path, output_dir: str | Path, settle_seconds: float) -> Incoming:
    """Discovery with the output folder's ledger as its hash cache."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder not found; check the deployment's input_dir parameter")
    with Ledger(output_dir) as ledger:
        return discover(root, settle_seconds=settle_seconds, cache=ledger, output_dir=output_dir, own_file=own_file)


def own_file(name: str) -> bool:
    """Whether a file name in the output folder is one the scorer writes (ledger, lock, reports, temps)."""
    return bool(_OWN_FILE.match(name))


def find_bundles(exports_dir: str | Path, models: list[str] | None = None) -> list[ModelBundle]:
    bundles = latest_bundles(exports_dir, models or None)
    if not bundles:
        raise FileNotFoundError(f"{exports_dir}: no exported model bundles; run the train flow first")
    return list(bundles.values())


@dataclass
class ModelCounts:
    model: str
    version: str
    provider: str = ""
    precision: str = ""
    already_scored: int = 0
    ok: int = 0
    rejected: int = 0
    error: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class NightResult:
    counts: list[ModelCounts]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stats: pipeline.PipelineStats = field(default_factory=pipeline.PipelineStats)
    seconds: float = 0.0


def score_incoming(incoming: Incoming, input_dir: str | Path, output_dir: str | Path, bundles: list[ModelBundle],
                   run_id: str, *, batch_size: int = 8, workers: int | None = None, precision: str = FP32,
                   progress: Callable[[str], None] = log.info) -> NightResult:
    """Score every (item, model) pair the ledger has not seen, every model in one pass over the items
    (each item decoded once). Rows are committed every COMMIT_ROWS rows or COMMIT_SECONDS seconds,
    whichever comes first: a kill loses at most that much work, which the next run redoes, and the
    fsyncs of a commit (tens of ms) do not dominate a night of small files."""
    started = time.perf_counter()
    items = incoming.items
    with Ledger(output_dir) as ledger:
        models: list[LoadedModel] = []
        counts: dict[str, ModelCounts] = {}
        todo: dict[str, set[tuple[str, str]]] = {}
        for bundle in bundles:
            c = counts[bundle.name] = ModelCounts(bundle.name, bundle.version)
            mine = [i for i in items if takes(bundle.modality, i)]
            try:
                model = open_model(bundle, precision)
            except Exception as exc:  # noqa: BLE001 - one refused model (bad hash, bad graph) must not sink the night
                log.error("%s %s refused: %s", bundle.name, bundle.version, exc)
                done = ledger.done(bundle.name, bundle.card["onnx_sha256"], [(i.key, i.sha256) for i in mine])
                left = [i for i in mine if (i.key, i.sha256) not in done]
                ledger.record(run_id, [result_row(bundle, i, status=ERROR, error=f"model refused: {exc}")
                                       for i in left])
                c.already_scored, c.error = len(mine) - len(left), len(left)
                continue
            # Exactly once per graph: an int8 variant is another graph, so its rows are its own.
            done = ledger.done(bundle.name, model.onnx_sha256, [(i.key, i.sha256) for i in mine])
            left = [i for i in mine if (i.key, i.sha256) not in done]
            c.already_scored = len(mine) - len(left)
            c.provider, c.precision = model.provider, model.precision
            models.append(model)
            todo[bundle.name] = {(i.key, i.sha256) for i in left}
            progress(f"{bundle.name} {bundle.version}: {len(left)} new items, {model.precision} on {model.provider} "
                     f"({c.already_scored} already scored)")

        def jobs():
            for item in items:
                yield pipeline.Job(item, [m for m in models if (item.key, item.sha256) in todo[m.name]])

        result = NightResult(list(counts.values()))
        uncommitted: list[dict[str, Any]] = []
        last_commit = time.monotonic()
        for rows in pipeline.score(jobs(), input_dir, batch_size=batch_size, workers=workers,
                                   skipped=result.skipped, stats=result.stats):
            uncommitted += rows
            for r in rows:
                setattr(counts[r["model"]], r["status"], getattr(counts[r["model"]], r["status"]) + 1)
            if len(uncommitted) >= COMMIT_ROWS or time.monotonic() - last_commit >= COMMIT_SECONDS:
                ledger.record(run_id, uncommitted)
                uncommitted, last_commit = [], time.monotonic()
        if uncommitted:
            ledger.record(run_id, uncommitted)
    for c in result.counts:
        progress(f"{c.model}: {c.ok} ok, {c.rejected} rejected, {c.error} error rows")
    result.seconds = time.perf_counter() - started
    return result


def publish(output_dir: str | Path, run_id: str, stamp: str) -> tuple[Path, Path]:
    """The night's CSV (every row not yet published, including rows of an interrupted earlier run)
    and the cumulative CSV, both written atomically."""
    with Ledger(output_dir) as ledger:
        return ledger.publish(run_id, stamp), ledger.write_cumulative()


def run_night(input_dir: str | Path, output_dir: str | Path, exports_dir: str | Path = "exports",
              models: list[str] | None = None, *, batch_size: int = 8, workers: int | None = None,
              precision: str = FP32, settle_seconds: float = 0.0,
              lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT) -> Path:
    """The whole night without Prefect: lock, find, score, publish; returns this run's CSV."""
    run_id = str(uuid.uuid4())
    with scoring_lock(output_dir, timeout=lock_timeout_seconds, label=f"run {run_id}"):
        stamp = utc_stamp()
        incoming = find_incoming(input_dir, output_dir, settle_seconds)
        score_incoming(incoming, input_dir, output_dir, find_bundles(exports_dir, models), run_id,
                       batch_size=batch_size, workers=workers, precision=precision)
        return publish(output_dir, run_id, stamp)[0]

