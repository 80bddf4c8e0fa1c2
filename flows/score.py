"""Score flow (the nightly job): every new incoming item, with every exported model of its kind."""

from __future__ import annotations

import uuid
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from lung_models.fileutil import utc_stamp
from lung_models.ledger import DEFAULT_LOCK_TIMEOUT, scoring_lock
from lung_models.scoring import DEFAULT_SETTLE_SECONDS
from tasks.scoring import find_bundles, find_incoming, publish_reports, score_with_model


@flow(name="score-folder", log_prints=True)
def score_folder(input_dir: str, output_dir: str, models: list[str] | None = None, exports_dir: str = "exports",
                 batch_size: int = 8, settle_seconds: float = DEFAULT_SETTLE_SECONDS,
                 lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT) -> str:
    """Score what the ledger in ``output_dir`` has not seen; write this run's CSV (returned) and
    keep ``scores-cumulative.csv`` current. Runs on one output folder are serialised by a lock;
    files modified less than ``settle_seconds`` ago are left for a later run."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = str(flow_run.get_id() or uuid.uuid4())
    with scoring_lock(out, timeout=lock_timeout_seconds, label=f"flow run {run_id}"):
        stamp = utc_stamp()
        incoming = find_incoming(input_dir, settle_seconds)
        counts = [score_with_model(bundle, input_dir, output_dir, incoming, run_id, batch_size)
                  for bundle in find_bundles(exports_dir, models)]
        return publish_reports(output_dir, input_dir, run_id, stamp, counts, incoming["skipped"])["night"]
