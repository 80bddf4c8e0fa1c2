"""Score flow (the nightly job): every new incoming scan, with every exported model of its kind."""

from __future__ import annotations

import uuid
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from lung_models.fileutil import utc_stamp
from lung_models.scoring import DEFAULT_LOCK_TIMEOUT, DEFAULT_SETTLE_SECONDS, scoring_lock
from lung_models.scoring.runtime import PRECISIONS
from tasks.scoring import find_incoming, publish_reports, score_incoming


@flow(name="score-folder", log_prints=True)
def score_folder(input_dir: str, output_dir: str, models: list[str] | None = None, exports_dir: str = "exports",
                 batch_size: int = 8, settle_seconds: float = DEFAULT_SETTLE_SECONDS,
                 lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT, workers: int | None = None,
                 precision: str = "fp32") -> str:
    """Score what the ledger in ``output_dir`` has not seen; write this run's CSV (returned) and
    keep ``scores-cumulative.csv`` current. Runs on one output folder are serialised by a lock;
    files modified less than ``settle_seconds`` ago are left for a later run. ``workers`` decoding
    threads feed inference (default: half the cores). ``precision`` fp32, int8 or auto (the int8
    variant where the export's gate passed it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = str(flow_run.get_id() or uuid.uuid4())
    with scoring_lock(out, timeout=lock_timeout_seconds, label=f"flow run {run_id}"):
        stamp = utc_stamp()
        incoming = find_incoming(input_dir, output_dir, settle_seconds)
        # quote(): the item list grows with the night (thousands of dicts); Prefect would otherwise walk
        # every element of it looking for futures, a cost per file that the bare scorer does not pay.
        scored = score_incoming(quote(incoming), input_dir, output_dir, exports_dir, models, run_id, batch_size,
                                workers, precision)
        return publish_reports(output_dir, input_dir, run_id, stamp, quote(scored), quote(incoming["skipped"]))["night"]
