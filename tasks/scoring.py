"""Nightly scoring tasks: find and hash what arrived, pin the model versions, score shards of the
night (on Dask workers or in this process), publish the CSVs."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from lung_models import drift
from lung_models.scoring import Item, html_report, night
from lung_models.scoring.ledger import Ledger
from lung_models.scoring.runtime import cpu_cores
from tasks.common import TIMEOUTS, retry_if_transient, run_logger, say


@task(name="find-incoming-files", task_run_name="find new files in {input_dir}", cache_policy=NO_CACHE,
      retries=1, retry_delay_seconds=60, retry_condition_fn=retry_if_transient, timeout_seconds=TIMEOUTS["find"])
def find_incoming(input_dir: str, output_dir: str, settle_seconds: float, ledger: str | None = None) -> dict[str, Any]:
    found = night.find_incoming(input_dir, output_dir, settle_seconds, ledger)
    for rel, why in found.skipped:
        run_logger().warning("skipped %s: %s", rel, why)
    say(f"found {len(found.items)} items under {input_dir} ({len(found.skipped)} skipped for now; "
        f"{found.hashed} files hashed, {found.cached} known from earlier nights)")
    return {"items": [i.as_dict() for i in found.items], "skipped": [list(s) for s in found.skipped]}


# Not retried: it writes the night's start and refused rows in the ledger, and a second start of the
# same run is not what the ledger expects.
@task(name="pin-models", task_run_name="pin model versions", cache_policy=NO_CACHE, timeout_seconds=TIMEOUTS["pin"])
def pin_models(incoming: dict[str, Any], output_dir: str, exports_dir: str, models: list[str] | None,
               precision: str, ledger: str | None, run_id: str, include_unpromoted: bool = False) -> dict[str, Any]:
    """Fix the model versions of the night (by sha256) and note them in the ledger; a refused bundle
    gets its error rows here, once, rather than on every worker."""
    bundles = night.find_bundles(exports_dir, models, include_unpromoted)
    for bundle in bundles:
        if not bundle.promoted:
            verdict = bundle.card.get("promotion") or {}
            say(f"scoring with UNPROMOTED {bundle.name} {bundle.version} (its rows say promoted=no): "
                f"{verdict.get('reason', 'no gate recorded')}")
    pins, refused = night.pin_models(bundles, precision)
    items = [Item.from_dict(d) for d in incoming["items"]]
    with Ledger(output_dir, url=ledger) as led:
        led.start_night(run_id, pins, exclusive=not led.shared)  # SQLite: the caller holds the folder lock
        counts = night.refused_rows(led, run_id, items, refused)
    for pin in pins:
        say(f"pinned {pin['model']} {pin['version']} ({pin['precision']}, sha256 {pin['onnx_sha256'][:12]}...) "
            f"from {pin['bundle']}")
    return {"pins": pins, "refused": [c.as_dict() for c in counts]}


def _worker_threads(settings: dict[str, Any]) -> int | None:
    """ONNX Runtime threads for a shard on a Dask worker: this host's cores shared by the task slots the
    cluster runs on it (two workers on a 2-core host: one thread each). None outside Dask (all cores)."""
    try:
        from distributed import get_worker

        address = get_worker().address
    except (ImportError, ValueError):
        return settings.get("intra_op_threads")
    # A local cluster's workers inherit the terminal: bars from several processes would tear each
    # other; the flow's own bar shows the night.
    os.environ["LUNG_FACTORY_PROGRESS"] = "plain"
    host = address.split("://")[-1].rsplit(":", 1)[0]
    slots = (settings.get("slots_by_host") or {}).get(host, 1)
    return max(1, cpu_cores() // max(1, slots))


# No task retries: a failed shard is submitted again by the flow (see flows/score.py), and its rows
# already committed stay done.
@task(name="score-shard", task_run_name="shard {shard_id}", cache_policy=NO_CACHE, timeout_seconds=TIMEOUTS["shard"])
def score_shard(shard_id: str, items: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """One shard: file paths and small dicts in, counts out. Its worker opens each pinned model once
    and keeps the session for the shards after it."""
    config = {k: v for k, v in settings.items() if k != "slots_by_host"}
    config["intra_op_threads"] = _worker_threads(settings)
    result = night.score_shard(shard_id, [Item.from_dict(d) for d in items], night.ShardSettings(**config))
    done = sum(c["ok"] + c["rejected"] + c["error"] for c in result["counts"])
    say(f"{shard_id}: {len(items)} items, {done} rows on {result['host']} (pid {result['pid']}) in "
        f"{result['seconds']:.1f} s")
    return result


# Not retried: a retry after the night CSV was written would claim no rows and publish an empty one;
# what a failed publication leaves is published by the next run (the ledger keeps the claim).
@task(name="publish-reports", task_run_name="publish the night's reports", cache_policy=NO_CACHE,
      timeout_seconds=TIMEOUTS["publish"])
def publish_reports(output_dir: str, input_dir: str, run_id: str, stamp: str, scored: dict[str, Any],
                    skipped: list[list[str]], ledger: str | None = None,
                    lock_timeout_seconds: float = night.DEFAULT_LOCK_TIMEOUT) -> dict[str, str]:
    """The night's CSV and the cumulative one, and a summary artifact linking them. ``scored``: the
    refused models' counts and every shard's result."""
    night_csv, cumulative = night.publish(output_dir, run_id, stamp, ledger, lock_timeout_seconds)
    drift_path, drift_report = night.publish_drift(output_dir, scored.get("pins", []),
                                                   [s.get("drift") or {} for s in scored["shards"]], stamp)
    totals: dict[str, night.ModelCounts] = {}
    for c in [*scored["refused"], *(c for s in scored["shards"] for c in s["counts"])]:
        totals.setdefault(c["model"], night.ModelCounts(c["model"], c["version"])).add(c)
    counts = [c.as_dict() for c in totals.values()]
    shards = scored["shards"]
    skipped_all = sorted({tuple(s) for s in skipped} | {tuple(x) for s in shards for x in s["skipped"]})
    hosts = Counter(s["host"] for s in shards)
    lines = ["# Scoring report", "", f"- input: `{input_dir}`",
             f"- this run's CSV: [{night_csv.name}]({night_csv.resolve().as_uri()})",
             f"- cumulative CSV: [{cumulative.name}]({cumulative.resolve().as_uri()})",
             f"- ledger: {Ledger.describe(output_dir, ledger)}",
             f"- {len(shards)} shards on {len(hosts)} host(s): " + ", ".join(f"{h} {n}" for h, n in hosts.items()), "",
             "| model | version | runtime | new ok | rejected | error | already scored | held by another run |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['model']} | {c['version']} | {c['provider']} {c['precision']} | {c['ok']} | {c['rejected']} | "
              f"{c['error']} | {c['already_scored']} | {c['claimed_elsewhere']} |" for c in counts]
    lines += ["", f"Drift ({drift.TEST} test per feature against the bundle's training reference; "
                  f"[{Path(drift_path).name if drift_path else 'not written'}]"
                  f"({Path(drift_path).resolve().as_uri() if drift_path else ''})):", ""]
    lines += [f"- {m}: **{v['status'].upper()}**" + (f" ({', '.join(v['drifted'])})" if v.get("drifted") else "")
              + f", {v['n']} inputs" for m, v in drift_report["models"].items()]
    if scored.get("failed"):
        lines += ["", f"**{len(scored['failed'])} shard(s) failed twice** (their rows are scored by the next run):",
                  ""] + [f"- {f}" for f in scored["failed"][:50]]
    if skipped_all:  # every entry discovery or decoding passed over without a row, with the reason
        lines += ["", f"Not scored this run, no row ({len(skipped_all)}; each reason says whether a later run "
                      "scores it or what to fix):", ""]
        lines += [f"- `{rel.replace('`', chr(39))}`: {why}" for rel, why in skipped_all[:200]]
        if len(skipped_all) > 200:
            lines.append(f"- ... and {len(skipped_all) - 200} more (the flow run's log lists every one)")
    summary = html_report.summarise(night_csv)  # read once, for the page and the table artifacts
    page = _html_report(output_dir, input_dir, night_csv, stamp, skipped_all, cumulative, summary, drift_report)
    if page:
        lines[5:5] = [f"- the page to read: [{page.name}]({page.resolve().as_uri()})"]
    create_markdown_artifact(key="nightly-scoring-report", markdown="\n".join(lines),
                             description=f"scores written to {night_csv}")
    _table_artifacts(night_csv, summary, skipped_all, drift_report)
    say(f"report: {night_csv} (cumulative: {cumulative}; page: {page}); {len(skipped_all)} entries not scored "
        "this run (listed in the nightly-scoring-report artifact)")
    return {"night": str(night_csv), "cumulative": str(cumulative), "page": str(page or ""),
            "drift": str(drift_path or "")}


def _html_report(output_dir: str, input_dir: str, night_csv, stamp: str, skipped: list[tuple[str, str]],
                 cumulative, summary: dict[str, Any], drift_report: dict[str, Any] | None = None) -> Any:
    """The night's HTML page; a failure to draw it is logged and costs the page, never the night (its
    CSVs are already published)."""
    try:
        return html_report.write_night_report(output_dir, input_dir, night_csv, stamp, skipped, cumulative,
                                              summary=summary, drift=drift_report)
    except Exception as exc:  # noqa: BLE001
        run_logger().error("night report page not written: %s: %s", type(exc).__name__, exc)
        return None


def _table_artifacts(night_csv, summary: dict[str, Any], skipped: list[tuple[str, str]],
                     drift_report: dict[str, Any] | None = None, limit: int = 500) -> None:
    """Two tables in the Prefect UI: counts per model and status (with the drift verdict), and the
    files not scored or refused with the reason (at most ``limit`` rows each; the CSV and the page
    hold them all)."""
    flagged = Counter(r["model"] for r in summary["flagged"])
    verdicts = (drift_report or {}).get("models", {})
    create_table_artifact(key="nightly-scoring-counts", description=f"rows of {night_csv.name} by model and status",
                          table=[{"model": m, **{s: c.get(s, 0) for s in html_report.STATUSES},
                                  "flagged": flagged.get(m, 0), "drift": verdicts.get(m, {}).get("status", "")}
                                 for m, c in sorted(summary["counts"].items())])
    problems = [{"file": r["relative_path"], "model": r["model"], "status": r["status"], "reason": r["error"]}
                for r in summary["refused"]]
    problems += [{"file": rel, "model": "", "status": "skipped", "reason": why} for rel, why in skipped]
    create_table_artifact(key="nightly-scoring-problems", table=problems[:limit] or [{"file": "", "status": "none"}],
                          description=f"{len(problems)} rejected, error or skipped entries"
                          + (f" (first {limit})" if len(problems) > limit else ""))
