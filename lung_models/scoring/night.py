"""One night of scoring, as plain functions: find what arrived, score what the ledger has not seen
with every model that takes it, publish. The Prefect flow (``flows/score.py``) runs these same
steps as tasks; ``run_night`` runs them without Prefect (benchmarks compare the two)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lung_models import drift
from lung_models import progress as bars
from lung_models.bundle import BundleError, ModelBundle, latest_bundles, load_bundle
from lung_models.explain import HEATMAP_DIR
from lung_models.fileutil import utc_stamp
from lung_models.scoring import database, pipeline
from lung_models.scoring.discovery import discover
from lung_models.scoring.items import ERROR, Incoming, Item, takes
from lung_models.scoring.ledger import FOLDER_ID_NAME, LEDGER_NAME, Ledger
from lung_models.scoring.lock import DEFAULT_LOCK_TIMEOUT, LOCK_NAME, scoring_lock
from lung_models.scoring.rows import result_row
from lung_models.scoring.runtime import FP32, LoadedModel, choose_graph, cpu_cores, open_model

log = logging.getLogger(__name__)

COMMIT_ROWS = 256
# What a scoring run writes in its output folder: the ledger (and SQLite's journal) or a database
# ledger's folder id, the lock, the night and cumulative CSVs, the night's HTML page and their temp files
# (fileutil.atomic_writer names them ".<name>.<pid>@<host>.<random>.tmp"), the drift verdicts and the
# heat maps' folder.
_OWN_FILE = re.compile(rf"^({re.escape(LEDGER_NAME)}(-journal|-wal|-shm)?|{re.escape(LOCK_NAME)}"
                       rf"|{re.escape(FOLDER_ID_NAME)}|scores-.*\.csv|report-.*\.html|\.(scores|report)-.*\.tmp"
                       rf"|drift(-.*)?\.json|\.drift(-.*)?\.json\..*\.tmp|{HEATMAP_DIR}/)$")
COMMIT_SECONDS = 2.0


def find_incoming(input_dir: str | Path, output_dir: str | Path, settle_seconds: float,
                  ledger: str | None = None) -> Incoming:
    """Discovery with the night's ledger as its hash cache."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder not found; check the deployment's input_dir parameter")
    with Ledger(output_dir, url=ledger) as ledger:
        return discover(root, settle_seconds=settle_seconds, cache=ledger, output_dir=output_dir, own_file=own_file)


def own_file(name: str) -> bool:
    """Whether a file name in the output folder is one the scorer writes (ledger, lock, reports, temps),
    or, with a trailing "/", a folder it writes (the heat maps)."""
    return bool(_OWN_FILE.match(name))


def find_bundles(exports_dir: str | Path, models: list[str] | None = None,
                 include_unpromoted: bool = False) -> list[ModelBundle]:
    """The promoted bundle of each model (or of the named ones); with ``include_unpromoted`` each
    model's newest export, promoted or not, its rows marked ``promoted=no``."""
    bundles = latest_bundles(exports_dir, models or None, include_unpromoted=include_unpromoted)
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
    claimed_elsewhere: int = 0  # left to another run that holds them (a shared ledger)
    ok: int = 0
    rejected: int = 0
    error: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def add(self, other: dict[str, Any]) -> None:
        """Sum another shard's counts of the same model into these."""
        for key in ("already_scored", "claimed_elsewhere", "ok", "rejected", "error"):
            setattr(self, key, getattr(self, key) + int(other.get(key, 0)))
        self.provider = self.provider or other.get("provider", "")
        self.precision = self.precision or other.get("precision", "")


@dataclass
class NightResult:
    counts: list[ModelCounts]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stats: pipeline.PipelineStats = field(default_factory=pipeline.PipelineStats)
    seconds: float = 0.0
    pins: list[dict[str, Any]] = field(default_factory=list)
    drift: dict[str, Any] = field(default_factory=dict)  # the night's drift sample (drift.NightSample.as_dict)


# ----------------------------------------------------------------------------------------- pins
def pin_models(bundles: list[ModelBundle], precision: str = FP32) -> tuple[list[dict[str, Any]],
                                                                            list[tuple[ModelBundle, str]]]:
    """The model versions a night scores with, fixed when it starts: for each bundle the absolute
    folder, the graph that runs (fp32 or its int8 variant) and that graph's sha256, checked now. Every
    worker opens exactly these files and refuses a file whose hash differs, so a bundle re-exported
    mid-night, or a host that sees another version under the same path, cannot mix versions in one
    night. Returns (pins, refused bundles with the reason)."""
    pins, refused = [], []
    for bundle in bundles:
        try:
            path, expected, chosen = choose_graph(bundle, precision)
            sha = bundle.verify(path, expected)
        except Exception as exc:  # noqa: BLE001 - one refused model (bad hash, no int8 variant) must not sink the night
            log.error("%s %s refused: %s", bundle.name, bundle.version, exc)
            refused.append((bundle, str(exc)))
            continue
        pins.append({"model": bundle.name, "version": bundle.version, "bundle": str(bundle.path.resolve()),
                     "precision": chosen, "onnx_sha256": sha, "modality": bundle.modality,
                     "promoted": bundle.promoted})
    return pins, refused


_models_lock = threading.Lock()
_models: dict[tuple[str, str, str, int, bool], LoadedModel] = {}


def pinned_model(pin: dict[str, Any], intra_op_threads: int) -> LoadedModel:
    """The ONNX Runtime session of a pinned model version, opened once per process and reused by every
    shard it runs (a Dask worker keeps it between tasks). Raises BundleError when this host's file is
    not the pinned version."""
    key = (pin["bundle"], pin["precision"], pin["onnx_sha256"], int(intra_op_threads), bool(pin.get("promoted", True)))
    with _models_lock:
        if key not in _models:
            # Promoted or not as the night saw it at its start, whatever LATEST says by now.
            bundle = dataclasses.replace(load_bundle(pin["bundle"]), promoted=key[-1])
            model = open_model(bundle, pin["precision"], intra_op_threads=intra_op_threads)
            if (bundle.name, model.onnx_sha256) != (pin["model"], pin["onnx_sha256"]):
                raise BundleError(
                    f"{pin['bundle']} on host {socket.gethostname()} holds {bundle.name} {bundle.version} with graph "
                    f"sha256 {model.onnx_sha256[:12]}..., not the {pin['model']} {pin['version']} "
                    f"({pin['onnx_sha256'][:12]}...) this night pinned; every host must see the same exports folder "
                    "(a shared file system mounted at the same path) and bundles must not be rewritten mid-night")
            _models[key] = model
        return _models[key]


def forget_models(keep: list[dict[str, Any]]) -> None:
    """Close the sessions of model versions no longer pinned (a long-lived worker between nights)."""
    wanted = {(p["bundle"], p["precision"], p["onnx_sha256"]) for p in keep}
    with _models_lock:
        for key in [k for k in _models if k[:3] not in wanted]:
            del _models[key]


def refused_rows(ledger: Ledger, run_id: str, incoming_items: list[Item],
                 refused: list[tuple[ModelBundle, str]]) -> list[ModelCounts]:
    """Error rows for every item a refused model would have scored and has not (retried next run)."""
    counts = []
    for bundle, why in refused:
        c = ModelCounts(bundle.name, bundle.version)
        mine = [i for i in incoming_items if takes(bundle.modality, i)]
        done = ledger.done(bundle.name, bundle.card.get("onnx_sha256", ""), [(i.key, i.sha256) for i in mine])
        left = [i for i in mine if (i.key, i.sha256) not in done]
        ledger.record(run_id, [result_row(bundle, i, status=ERROR, error=f"model refused: {why}") for i in left])
        c.already_scored, c.error = len(mine) - len(left), len(left)
        counts.append(c)
    return counts


# --------------------------------------------------------------------------------------- shards
def split_shards(items: list[Item], workers: int, per_worker: int = 4, smallest: int = 8,
                 largest: int = 256) -> list[list[Item]]:
    """Cut the night into shards for the workers: about ``per_worker`` shards a worker (so a slow
    shard does not hold the night back and a killed worker's redo is small), each of ``smallest``
    to ``largest`` items, dealt round-robin so that heavy volumes spread over the shards instead of
    clustering where the listing put them."""
    if not items:
        return []
    size = min(largest, max(smallest, -(-len(items) // max(1, workers * per_worker))))
    n = -(-len(items) // size)
    return [items[k::n] for k in range(n)]


@dataclass
class ShardSettings:
    """What every shard of a night needs besides its items: small, so it travels to workers cheaply."""

    input_dir: str
    output_dir: str
    run_id: str
    pins: list[dict[str, Any]]
    ledger: str | None = None
    batch_size: int = 8
    decode_threads: int | None = None
    intra_op_threads: int | None = None
    host: str = field(default_factory=socket.gethostname)  # the flow's: a SQLite ledger must stay on it
    # LUNG_FACTORY_COMMIT_ROWS: commit more often (a kill then loses less, at the cost of more fsyncs)
    commit_rows: int = field(default_factory=lambda: int(os.environ.get("LUNG_FACTORY_COMMIT_ROWS", COMMIT_ROWS)))
    commit_seconds: float = COMMIT_SECONDS
    explain: bool = False  # heat maps of flagged scans (lung_models.explain), under output_dir/heatmaps

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def score_shard(shard_id: str, items: list[Item], settings: ShardSettings,
                progress: Callable[[str], None] = log.info, stats: pipeline.PipelineStats | None = None,
                ) -> dict[str, Any]:
    """Score one shard's items with every pinned model that takes them and has not scored them,
    each item decoded once: claim the keys, score, commit rows every ``commit_rows`` rows or
    ``commit_seconds`` seconds (a kill loses at most that much, which the redo scores again), end
    the claims. Returns the counts per model, the items skipped and where it ran."""
    started = time.perf_counter()
    s = settings
    if not database.is_postgres_url(s.ledger) and socket.gethostname() != s.host:
        raise RuntimeError(f"shard {shard_id} runs on host {socket.gethostname()}, but the night's ledger is the "
                           f"SQLite file in {s.output_dir} on {s.host}: SQLite is for one host; give the night a "
                           "PostgreSQL ledger (--ledger postgresql://...) to score on a cluster")
    threads = s.intra_op_threads or cpu_cores()
    stats = stats if stats is not None else pipeline.PipelineStats()
    counts: dict[str, ModelCounts] = {}
    skipped: list[tuple[str, str]] = []
    forget_models(s.pins)
    with Ledger(s.output_dir, url=s.ledger) as ledger:
        models: list[LoadedModel] = []
        todo: dict[str, set[tuple[str, str]]] = {}
        for pin in s.pins:
            c = counts[pin["model"]] = ModelCounts(pin["model"], pin["version"], precision=pin["precision"])
            mine = [i for i in items if takes(pin["modality"], i)]
            done = ledger.done(pin["model"], pin["onnx_sha256"], [(i.key, i.sha256) for i in mine])
            left = [i for i in mine if (i.key, i.sha256) not in done]
            c.already_scored = len(mine) - len(left)
            if not left:
                continue
            try:
                model = pinned_model(pin, threads)
            except Exception as exc:  # noqa: BLE001 - this host cannot open it: error rows, retried next run
                log.error("%s %s refused on %s: %s", pin["model"], pin["version"], socket.gethostname(), exc)
                bundle = _RefusedBundle(pin)
                ledger.record(s.run_id, [result_row(bundle, i, status=ERROR, error=f"model refused: {exc}")
                                         for i in left])
                c.error += len(left)
                continue
            held = ledger.claim(s.run_id, shard_id, [(i.key, i.sha256, pin["onnx_sha256"], pin["model"])
                                                     for i in left])
            todo[pin["model"]] = {(k[0], k[1]) for k in held}
            c.claimed_elsewhere = len(left) - len(held)
            c.provider = model.provider
            models.append(model)
            progress(f"{shard_id} {pin['model']} {pin['version']}: {len(held)} new items, {model.precision} on "
                     f"{model.provider} ({c.already_scored} already scored, {c.claimed_elsewhere} held by another run)")

        def jobs():
            for item in items:
                yield pipeline.Job(item, [m for m in models if (item.key, item.sha256) in todo[m.name]])

        uncommitted: list[dict[str, Any]] = []
        last_commit = time.monotonic()
        decode_threads = s.decode_threads or max(1, threads // 2)
        explainer = None
        if s.explain and models:
            from lung_models import explain

            explain.forget_models([p["bundle"] for p in s.pins])
            try:
                explainer = explain.Explainer(s.output_dir)
            except explain.ExplainUnavailable as exc:  # this host cannot: its rows still score, without heat maps
                log.error("%s on %s: %s", shard_id, socket.gethostname(), exc)
        sample = drift.NightSample()
        with bars.bar(f"scoring shard {shard_id}", sum(len(keys) for keys in todo.values()), unit="scores",
                      transient=True) as scored:
            for rows in pipeline.score(jobs(), s.input_dir, batch_size=s.batch_size, workers=decode_threads,
                                       skipped=skipped, stats=stats, explainer=explainer, drift=sample):
                uncommitted += rows
                scored.advance(len(rows))
                for r in rows:
                    setattr(counts[r["model"]], r["status"], getattr(counts[r["model"]], r["status"]) + 1)
                if len(uncommitted) >= s.commit_rows or time.monotonic() - last_commit >= s.commit_seconds:
                    ledger.record(s.run_id, uncommitted, shard=shard_id)
                    uncommitted, last_commit = [], time.monotonic()
        if uncommitted:
            ledger.record(s.run_id, uncommitted, shard=shard_id)
        ledger.release(s.run_id, shard_id)
    return {"shard": shard_id, "host": socket.gethostname(), "pid": os.getpid(),
            "counts": [c.as_dict() for c in counts.values()], "skipped": [list(x) for x in skipped],
            "items": len(items), "seconds": round(time.perf_counter() - started, 3), "drift": sample.as_dict()}


class _RefusedBundle:
    """Enough of a bundle for result_row when the pinned file cannot be opened on this host."""

    def __init__(self, pin: dict[str, Any]):
        self.name, self.version, self.card = pin["model"], pin["version"], {"onnx_sha256": pin["onnx_sha256"]}
        self.modality = pin["modality"]
        self.promoted = bool(pin.get("promoted", True))


def score_incoming(incoming: Incoming, input_dir: str | Path, output_dir: str | Path, bundles: list[ModelBundle],
                   run_id: str, *, batch_size: int = 8, workers: int | None = None, precision: str = FP32,
                   progress: Callable[[str], None] = log.info, ledger: str | None = None,
                   explain: bool = False) -> NightResult:
    """Score every (item, model) pair the ledger has not seen, in this process, as one shard: every
    model in one pass over the items (each item decoded once). ``workers`` decoding threads."""
    started = time.perf_counter()
    pins, refused = pin_models(bundles, precision)
    with Ledger(output_dir, url=ledger) as led:
        led.start_night(run_id, pins, exclusive=not led.shared)  # SQLite: the caller holds the folder lock
        counts = {c.model: c for c in refused_rows(led, run_id, incoming.items, refused)}
    settings = ShardSettings(str(input_dir), str(output_dir), run_id, pins, ledger=ledger, batch_size=batch_size,
                             decode_threads=workers, explain=explain)
    result = NightResult([], pins=pins)
    shard = score_shard(f"{run_id[:8]}-all", incoming.items, settings, progress=progress, stats=result.stats)
    for c in shard["counts"]:
        counts.setdefault(c["model"], ModelCounts(c["model"], c["version"])).add(c)
    result.counts = list(counts.values())
    result.skipped = [tuple(x) for x in shard["skipped"]]
    result.drift = shard["drift"]
    for c in result.counts:
        progress(f"{c.model}: {c.ok} ok, {c.rejected} rejected, {c.error} error rows")
    result.seconds = time.perf_counter() - started
    return result


def publish(output_dir: str | Path, run_id: str, stamp: str, ledger: str | None = None,
            lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT) -> tuple[Path, Path]:
    """The night's CSV (every row not yet published, including rows of an interrupted earlier run)
    and the cumulative CSV, both written atomically."""
    with Ledger(output_dir, url=ledger) as led:
        return led.publish(run_id, stamp, lock_timeout_seconds), led.write_cumulative(lock_timeout_seconds)


def publish_drift(output_dir: str | Path, pins: list[dict[str, Any]], samples: list[dict[str, Any]],
                  stamp: str) -> tuple[Path | None, dict[str, Any]]:
    """The night's drift verdict per model (``drift``), written as ``drift-<stamp>.json`` and
    ``drift.json``; a failure costs the file, never the night (its CSVs are already published)."""
    report: dict[str, Any] = {"night": stamp, "models": {}}
    try:
        report = drift.night_report(pins, drift.merge(samples), stamp)
        path = drift.write(output_dir, report, stamp)
    except Exception as exc:  # noqa: BLE001
        log.error("drift report not written: %s: %s", type(exc).__name__, exc)
        return None, report
    for model, verdict in report["models"].items():
        if verdict["flagged"]:
            log.warning("%s: tonight's scans DRIFT from its training data (%s): %s", model, verdict["test"],
                        ", ".join(verdict["drifted"]))
    return path, report


def night_lock(output_dir: str | Path, ledger: str | None, timeout: float, label: str):
    """What keeps a night's runs apart: with the SQLite ledger (one host) the output folder's lock for
    the whole run; with a PostgreSQL ledger nothing here, since runs share the night through claims and
    the database serialises publication."""
    if database.is_postgres_url(ledger):
        return nullcontext(Path(output_dir))
    return scoring_lock(output_dir, timeout=timeout, label=label)


def run_night(input_dir: str | Path, output_dir: str | Path, exports_dir: str | Path = "exports",
              models: list[str] | None = None, *, batch_size: int = 8, workers: int | None = None,
              precision: str = FP32, settle_seconds: float = 0.0,
              lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT, ledger: str | None = None,
              include_unpromoted: bool = False, page: bool = False, explain: bool = False,
              progress: Callable[[str], None] = log.info) -> Path:
    """The whole night without Prefect, in this process: lock, find, score, publish; returns this run's
    CSV. With ``page``, the night's HTML page too (``html_report``), as the flow writes it; with
    ``explain``, heat maps of the flagged scans."""
    if explain:
        from lung_models.explain import require_tensorflow

        require_tensorflow()
    run_id = str(uuid.uuid4())
    with night_lock(output_dir, ledger, lock_timeout_seconds, f"run {run_id}"):
        stamp = utc_stamp()
        incoming = find_incoming(input_dir, output_dir, settle_seconds, ledger)
        result = score_incoming(incoming, input_dir, output_dir, find_bundles(exports_dir, models, include_unpromoted),
                                run_id, batch_size=batch_size, workers=workers, precision=precision, ledger=ledger,
                                progress=progress, explain=explain)
        night_csv, cumulative = publish(output_dir, run_id, stamp, ledger, lock_timeout_seconds)
    drift_path, drift_report = publish_drift(output_dir, result.pins, [result.drift], stamp)
    progress(f"drift: {drift_path}: " + "; ".join(f"{m} {v['status']}" for m, v in drift_report["models"].items()))
    if page:
        from lung_models.scoring import html_report

        skipped = sorted({tuple(s) for s in [*incoming.skipped, *result.skipped]})
        try:
            written = html_report.write_night_report(output_dir, input_dir, night_csv, stamp, skipped, cumulative,
                                                     drift=drift_report)
            progress(f"page: {written}")
        except Exception as exc:  # noqa: BLE001 - the CSVs are published; the page is not worth the night
            log.error("night report page not written: %s: %s", type(exc).__name__, exc)
    return night_csv
