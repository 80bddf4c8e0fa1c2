"""Score flow (the nightly job): every new incoming scan, with every exported model of its kind.

The night is cut into shards (file paths and small dicts) that run as ``score-shard`` tasks: in this
process by default, on a local Dask cluster of ``workers`` processes, or on an existing Dask cluster
at ``dask_address`` (through prefect-dask's DaskTaskRunner, chosen per run since these are
parameters, while a flow's own task runner is fixed when it is defined).
"""

from __future__ import annotations

import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from lung_models import progress as bars
from lung_models.device import import_onnxruntime
from lung_models.explain import require_tensorflow
from lung_models.fileutil import utc_stamp
from lung_models.scoring import DEFAULT_LOCK_TIMEOUT, DEFAULT_SETTLE_SECONDS, Item, night
from lung_models.scoring.database import is_postgres_url, redact
from lung_models.scoring.runtime import PRECISIONS
from tasks.common import say
from tasks.scoring import find_incoming, pin_models, publish_reports, score_shard

SHARD_ATTEMPTS = 2  # a shard whose task failed (its worker died and Dask gave up) is submitted once more


def shard_runner(workers: int = 1, dask_address: str | None = None):
    """The task runner of the shards: an existing Dask cluster, a local one of ``workers`` processes
    (one shard at a time each), or, for one worker, this process (no Dask at all)."""
    if dask_address or workers > 1:
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        # Processes, not threads: decoding and the session calls then never share one interpreter's GIL.
        # No dashboard: it needs bokeh and a free port; a cluster started by hand has its own.
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=1)


def _slots_by_host(runner) -> dict[str, int]:
    """How many shards the cluster runs at once on each host (Dask worker threads), so that a shard's
    ONNX Runtime takes its share of that host's cores. Empty outside Dask."""
    client = getattr(runner, "client", None)
    if client is None:
        return {}
    slots: dict[str, int] = {}
    for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
        host = address.split("://")[-1].rsplit(":", 1)[0]
        slots[host] = slots.get(host, 0) + int(info.get("nthreads", 1))
    return slots


def score_shards(items: list[dict[str, Any]], settings: dict[str, Any], runner) -> dict[str, Any]:
    """Cut the night into shards and score them on ``runner`` (entered here, so a local cluster lives
    as long as the night's scoring); a shard whose task failed is submitted again (its committed
    rows stay done and its claims are its run's own, so the redo scores only what is missing).
    The runner is used directly rather than through a subflow: a subflow's parameters, the night's
    item list, would be stored in the Prefect database with its run. Returns every shard's result and
    the shards that failed twice."""
    with runner:
        slots = _slots_by_host(runner)
        shards = night.split_shards([Item.from_dict(d) for d in items], max(1, sum(slots.values())))
        settings = {**settings, "slots_by_host": slots}
        run = settings["run_id"][:8]
        pending = {f"{run}-s{k:04d}": [i.as_dict() for i in shard] for k, shard in enumerate(shards)}
        say(f"{len(items)} items in {len(pending)} shards on "
            + (", ".join(f"{h} ({n} slots)" for h, n in slots.items()) or "this process"))
        results: list[dict[str, Any]] = []
        failed: list[str] = []
        watch = _ShardProgress(len(items), len(pending), settings.get("input_dir", ""))
        try:
            _run_shards(runner, pending, settings, results, failed, watch)
        finally:
            watch.finish()
    return {"shards": results, "failed": failed}


def _run_shards(runner, pending: dict[str, list[dict[str, Any]]], settings: dict[str, Any],
                results: list[dict[str, Any]], failed: list[str], watch: _ShardProgress) -> None:
    """Submit the shards; a shard whose task failed once is submitted again."""
    for attempt in range(1, SHARD_ATTEMPTS + 1):
        # Plain parameters: TaskRunner.submit does not unwrap quote(); a shard is small enough to walk.
        futures = {runner.submit(score_shard, {"shard_id": sid, "items": shard, "settings": settings}): sid
                   for sid, shard in pending.items()}
        retry = {}
        for future in as_completed(list(futures)):  # as they end, so the progress moves with the night
            sid = futures[future]
            try:
                results.append(future.result())
                watch.done(len(pending[sid]))
            except Exception as exc:  # noqa: BLE001 - a lost worker fails its shard, not the night
                if attempt < SHARD_ATTEMPTS:
                    retry[sid] = pending[sid]
                else:
                    failed.append(f"{sid}: {type(exc).__name__}: {exc}")
                    watch.done(len(pending[sid]), failed=True)
                say(f"shard {sid} failed (attempt {attempt}): {type(exc).__name__}: {exc}")
        pending = retry
        if not pending:
            break


class _ShardProgress:
    """How far the night's scoring is: a bar in a terminal and the ``nightly-scoring-progress``
    artifact on the flow run (the share of items whose shard has ended), moved as shards end."""

    def __init__(self, items: int, shards: int, input_dir: str):
        self.items, self.ended, self.failed = items, 0, 0
        in_shards = f"{shards} shard{'' if shards == 1 else 's'}"
        self.bar = bars.start(f"scoring {items} items in {in_shards}", items, unit="items")
        self.description = f"items of {Path(input_dir).name or input_dir} scored, by shards ended ({in_shards})"
        self.artifact = self._publish(create=True)

    def done(self, items: int, failed: bool = False) -> None:
        self.ended += items
        self.failed += items if failed else 0
        self.bar.advance(items)
        self._publish()

    def finish(self) -> None:
        self.bar.finish()

    def _publish(self, create: bool = False):
        share = 100.0 * self.ended / self.items if self.items else 100.0
        note = f"; {self.failed} in shards that failed twice" if self.failed else ""
        try:
            if create:
                return create_progress_artifact(share, key="nightly-scoring-progress",
                                                description=self.description + note)
            if self.artifact is not None:
                update_progress_artifact(self.artifact, share, description=self.description + note)
        except Exception as exc:  # noqa: BLE001 - a lost progress update must not cost the night
            say(f"progress artifact not updated: {type(exc).__name__}: {exc}")
        return None


def night_run_name() -> str:
    """What the Prefect UI lists for a night: the date, the folder scored and where the reports go."""
    params = flow_run.parameters or {}
    return (f"night {datetime.now(timezone.utc):%Y-%m-%d %H:%M}Z: {Path(str(params.get('input_dir', '?'))).name}"
            f" -> {Path(str(params.get('output_dir', '?'))).name}")


@flow(name="score-folder", flow_run_name=night_run_name, log_prints=True)
def score_folder(input_dir: str, output_dir: str, models: list[str] | None = None, exports_dir: str = "exports",
                 batch_size: int = 8, settle_seconds: float = DEFAULT_SETTLE_SECONDS,
                 lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT, workers: int | None = 1,
                 dask_address: str | None = None, ledger: str | None = None, decode_threads: int | None = None,
                 precision: str = "fp32", include_unpromoted: bool = False, explain: bool = False) -> str:
    """Score what the ledger has not seen; write this run's CSV (returned) and keep
    ``scores-cumulative.csv`` current. Files modified less than ``settle_seconds`` ago are left for
    a later run. ``workers`` > 1 scores on a local Dask cluster of that many processes,
    ``dask_address`` (tcp://host:port) on an existing cluster. ``ledger``: None for the SQLite file
    in ``output_dir`` (one host; runs on one output folder then take turns through a lock), or a
    postgresql:// URL (runs and hosts share the night). ``decode_threads`` per shard feed inference
    (default: half the shard's cores). ``precision`` fp32, int8 or auto (the int8 variant where the
    export's gate passed it). Each model's promoted version (``LATEST``) is scored; with
    ``include_unpromoted`` its newest export instead, promoted or not, the rows saying which. With
    ``explain``, each flagged scan gets a heat map under ``output_dir/heatmaps`` (needs
    TensorFlow, the ``train`` extra), named in its row's ``heatmap``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    import_onnxruntime()  # a host without it fails here, naming the extra, before the output folder is touched
    if explain and not (dask_address or (workers or 1) > 1):
        require_tensorflow()  # shards run here: say now; a cluster's workers say it per shard (rows still scored)
    workers = 1 if workers is None else workers  # a deployment made before workers meant Dask processes
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if ledger and ledger != "sqlite" and not is_postgres_url(ledger):
        raise ValueError(f"ledger must be 'sqlite' or a postgresql:// URL, not {redact(ledger)!r}")
    if dask_address and not is_postgres_url(ledger):
        say("a Dask cluster at an address with the SQLite ledger: every worker must run on this host "
            f"({socket.gethostname()}); shards on other hosts fail with a message naming the fix (--ledger postgresql://...)")
    # Workers elsewhere resolve no relative path the way this process does: give them absolute ones.
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    inp = str(Path(input_dir).resolve())
    run_id = str(flow_run.get_id() or uuid.uuid4())
    with night.night_lock(out, ledger, lock_timeout_seconds, f"flow run {run_id}"):
        stamp = utc_stamp()
        incoming = find_incoming(inp, str(out), settle_seconds, ledger)
        # quote(): the item list grows with the night (thousands of dicts); Prefect would otherwise walk
        # every element of it looking for futures, a cost per file that the bare scorer does not pay.
        pinned = pin_models(quote(incoming), str(out), str(Path(exports_dir).resolve()), models, precision, ledger,
                            run_id, include_unpromoted)
        settings = night.ShardSettings(inp, str(out), run_id, pinned["pins"], ledger=ledger, batch_size=batch_size,
                                       decode_threads=decode_threads, explain=explain).as_dict()
        scored = score_shards(incoming["items"], settings, shard_runner(workers, dask_address))
        report = publish_reports(str(out), inp, run_id, stamp, quote({**scored, "refused": pinned["refused"],
                                                                        "pins": pinned["pins"]}),
                                 quote(incoming["skipped"]), ledger, lock_timeout_seconds)
    if scored["failed"]:
        raise RuntimeError(f"{len(scored['failed'])} shard(s) failed twice; what they recorded is published in "
                           f"{report['night']} and the next run scores the rest: " + "; ".join(scored["failed"][:5]))
    return report["night"]
