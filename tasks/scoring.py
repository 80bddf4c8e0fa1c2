"""Nightly scoring tasks: find and hash the incoming items, score what the ledger has not seen,
publish the night's CSV and the cumulative one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lung_models import scoring
from lung_models.bundle import latest_bundles, load_bundle
from lung_models.ledger import Ledger
from tasks.common import run_logger, say

COMMIT_ROWS = 256
COMMIT_SECONDS = 2.0


@task(name="find-incoming-files", cache_policy=NO_CACHE)  # side effects / fresh listing every run
def find_incoming(input_dir: str, settle_seconds: float) -> dict[str, Any]:
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder not found; check the deployment's input_dir parameter")
    found = scoring.discover(root, settle_seconds=settle_seconds)
    for rel, why in found.skipped:
        run_logger().warning("skipped %s: %s", rel, why)
    say(f"found {len(found.items)} items under {root} ({len(found.skipped)} skipped for now)")
    return {"items": [i.as_dict() for i in found.items], "skipped": [list(s) for s in found.skipped]}


@task(name="find-model-bundles", cache_policy=NO_CACHE)  # side effects / fresh listing every run
def find_bundles(exports_dir: str, models: list[str] | None = None) -> list[str]:
    bundles = latest_bundles(exports_dir, models or None)
    if not bundles:
        raise FileNotFoundError(f"{exports_dir}: no exported model bundles; run the train flow first")
    return [str(b.path) for b in bundles.values()]


@task(name="score-with-model", cache_policy=NO_CACHE)  # side effects / fresh listing every run
def score_with_model(bundle_path: str, input_dir: str, output_dir: str, incoming: dict[str, Any], run_id: str,
                     batch_size: int = 8) -> dict[str, Any]:
    """Every item of this model's kind the ledger has not seen, in batches, in one task (not one
    task per file). Rows are committed to the ledger every COMMIT_ROWS rows or COMMIT_SECONDS
    seconds, whichever comes first: a kill loses at most that much work, which the next run redoes,
    and the fsyncs of a commit (tens of ms) do not dominate a night of small files."""
    root = Path(input_dir)
    bundle = load_bundle(bundle_path)
    ledger = Ledger(Path(output_dir))
    items = scoring.items_for(bundle, (scoring.Item.from_dict(d) for d in incoming["items"]))
    sha = bundle.card["onnx_sha256"]
    done = ledger.done(bundle.name, sha, [(i.key, i.sha256) for i in items])
    todo = [i for i in items if (i.key, i.sha256) not in done]
    counts = {"model": bundle.name, "version": bundle.version, "already_scored": len(items) - len(todo),
              "ok": 0, "rejected": 0, "error": 0, "skipped": []}
    try:
        model = scoring.open_model(bundle)
    except Exception as exc:  # noqa: BLE001 - one refused model (bad hash, bad graph) must not sink the night
        run_logger().error("%s %s refused: %s", bundle.name, bundle.version, exc)
        ledger.record(run_id, scoring.refused_rows(bundle, todo, f"model refused: {exc}"))
        counts["error"] = len(todo)
        return counts
    say(f"{bundle.name} {bundle.version}: {len(todo)} new items on {model.provider} "
        f"({counts['already_scored']} already scored)")
    skipped: list[tuple[str, str]] = []
    uncommitted: list[dict[str, Any]] = []
    last_commit = time.monotonic()
    for rows in scoring.score_items(model, todo, root, batch_size=batch_size, skipped=skipped):
        uncommitted += rows
        for r in rows:
            counts[r["status"]] += 1
        if len(uncommitted) >= COMMIT_ROWS or time.monotonic() - last_commit >= COMMIT_SECONDS:
            ledger.record(run_id, uncommitted)
            uncommitted, last_commit = [], time.monotonic()
    if uncommitted:
        ledger.record(run_id, uncommitted)
    counts["skipped"] = [list(s) for s in skipped]
    say(f"{bundle.name}: {counts['ok']} ok, {counts['rejected']} rejected, {counts['error']} error rows")
    return counts


@task(name="publish-reports", cache_policy=NO_CACHE)  # side effects / fresh listing every run
def publish_reports(output_dir: str, input_dir: str, run_id: str, stamp: str, counts: list[dict[str, Any]],
                    skipped: list[list[str]]) -> dict[str, str]:
    """The night's CSV (every row not yet published, including rows of an interrupted earlier run)
    and the cumulative CSV, both written atomically; a summary artifact links them."""
    ledger = Ledger(Path(output_dir))
    night = ledger.publish(run_id, stamp)
    cumulative = ledger.write_cumulative()
    skipped_all = sorted({tuple(s) for s in skipped} | {tuple(s) for c in counts for s in c["skipped"]})
    lines = ["# Scoring report", "", f"- input: `{input_dir}`",
             f"- this run's CSV: [{night.name}]({night.resolve().as_uri()})",
             f"- cumulative CSV: [{cumulative.name}]({cumulative.resolve().as_uri()})", "",
             "| model | version | new ok | rejected | error | already scored |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['model']} | {c['version']} | {c['ok']} | {c['rejected']} | {c['error']} | {c['already_scored']} |"
              for c in counts]
    if skipped_all:
        lines += ["", "Skipped this run (scored by a later one):", ""]
        lines += [f"- `{rel}`: {why}" for rel, why in skipped_all[:100]]
    create_markdown_artifact(key="nightly-scoring-report", markdown="\n".join(lines),
                             description=f"scores written to {night}")
    say(f"report: {night} (cumulative: {cumulative}); {len(skipped_all)} items skipped for a later run")
    return {"night": str(night), "cumulative": str(cumulative)}
